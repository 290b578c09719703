"""The errors izitorch shows a user as one line.

Anything a user can get wrong (a manifest, a reference, a plugin name, data that does not fit a
model) raises an :class:`IzitorchError`; the CLI prints ``str(error)`` alone and exits with the
error's ``exit_code``, so a message must name the cause and the fix without a traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class IzitorchError(Exception):
    """Base of every error meant for the user: its text is the whole message, on one line."""

    exit_code = 2

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0]),)  # a name or a library message may hold "\n"
        super().__init__(*args)


def one_line(text: str) -> str:
    """``text`` with every non-printable character (``\n``, ``\r``, ``\u2028``...) shown escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ManifestError(IzitorchError):
    """A manifest (or a Rack configuration) is wrong: ``source: key.path: message``."""

    def __init__(self, message: str, path: str = "", source: str = "") -> None:
        self.message, self.path, self.source = message, path, source
        super().__init__(self._render())

    def _render(self) -> str:
        # one line, always: a key or value holding "\n" (legal in TOML) is shown escaped
        return one_line(": ".join(part for part in (self.source, self.path, self.message) if part))

    def located(self, source: str = "", prefix: str = "") -> "ManifestError":
        """The same error placed in a file and under a key prefix (``models[1]``)."""
        path = join_path(prefix, self.path) if prefix else self.path
        return ManifestError(self.message, path, source or self.source)


class TrainingError(IzitorchError):
    """A failure while training (bad shapes, labels out of range): finished epochs stay on disk."""

    exit_code = 1


def join_path(prefix: str, key: str | int) -> str:
    """``join_path("models", 1) == "models[1]"``, ``join_path("run", "epochs") == "run.epochs"``."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    if not key:
        return prefix
    if key.startswith("["):
        return f"{prefix}{key}"
    return f"{prefix}.{key}" if prefix else key


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean "epochs"?)`` when a close choice exists, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def describe(value: object) -> str:
    """How a wrong value is shown in a message: strings quoted as in TOML, tables as 'a table'."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def first_line(error: BaseException) -> str:
    """An error's message reduced to its first line (its type's name when it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def error_text(error: BaseException) -> str:
    """``Type: first line of the message``, or the type's name alone when there is no message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {first_line(error)}" if text else type(error).__name__
