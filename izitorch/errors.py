"""The errors izitorch shows a user as one line.

Anything a user can get wrong (a manifest, a reference, a plugin name, data that does not fit a
model) raises an :class:`IzitorchError`; the CLI prints ``str(error)`` alone and exits with the
error's ``exit_code``, so a message must name the cause and the fix without a traceback.

An error may carry the key path of the setting at fault (``data.num_classes``) and the file it
comes from: ``source: key.path: message``. Code that runs after the manifest is read raises with
the key path only; :func:`located_in` adds the manifest file where the run (or ``validate``)
starts, so that no builder needs to be handed the file.
"""

from __future__ import annotations

import contextlib
import difflib
from typing import Iterable, Iterator

#: The longest value echoed into a message (a 5 MB string is cut to this, with its length said).
MAX_VALUE_CHARS = 60
#: The longest message shown: anything longer keeps its head and its tail (the advice).
MAX_MESSAGE_CHARS = 600


class IzitorchError(Exception):
    """Base of every error meant for the user: ``source: path: message``, on one line.

    ``path`` is the key path of the setting at fault as the manifest spells it, ``source`` the
    file it lives in (a manifest, a saved state, a ``results.json``); either may be empty.
    """

    exit_code = 2
    #: Whether :func:`located_in` puts the manifest file in front (an interruption is no mistake
    #: in the manifest, and its message already says how to continue it).
    locatable = True

    def __init__(self, message: str = "", path: str = "", source: str = "") -> None:
        self.message, self.path, self.source = str(message), path, source
        super().__init__(self._render())

    def _render(self) -> str:
        # one line, always: a key, a value or a library message may hold "\n" (legal in TOML)
        return shorten(one_line(": ".join(part for part in (self.source, self.path, self.message) if part)))

    def located(self, source: str = "", prefix: str = "") -> "IzitorchError":
        """The same error (same class) placed in a file and under a key prefix (``models[1]``)."""
        error = type(self).__new__(type(self))
        error.__dict__.update(self.__dict__)
        error.path = join_path(prefix, self.path) if prefix else self.path
        error.source = source or self.source
        Exception.__init__(error, error._render())
        return error


def one_line(text: str) -> str:
    """``text`` with every non-printable character (``\n``, ``\r``, ``\u2028``...) shown escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shorten(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut in the middle to at most about ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return f"{text[:head]}...({len(text) - head - tail:,} characters cut)...{text[-tail:]}"


class ManifestError(IzitorchError):
    """A manifest (or a Rack configuration) is wrong: ``source: key.path: message``."""


class TrainingError(IzitorchError):
    """A failure while training (bad shapes, labels out of range): finished epochs stay on disk."""

    exit_code = 1


@contextlib.contextmanager
def located_in(source: str) -> Iterator[None]:
    """Put ``source`` (the manifest file) in front of every error raised in the block that names
    no file: the builders, plugins, checks and the loop that run after the manifest is read know
    the key (or the model) at fault, not the file."""
    try:
        yield
    except IzitorchError as error:
        if not source or error.source or not error.locatable:
            raise
        raise error.located(source) from None


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
    if len(word) > MAX_VALUE_CHARS:  # nothing is close to a huge word, and difflib is quadratic
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def describe(value: object) -> str:
    """How a wrong value is shown in a message: strings quoted as in TOML, tables as 'a table',
    anything longer than ``MAX_VALUE_CHARS`` cut, with its length."""
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            return f'"{value[:MAX_VALUE_CHARS]}..." ({len(value):,} characters)'
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else f"{text[:MAX_VALUE_CHARS]}... ({len(text):,} characters)"


def first_line(error: BaseException) -> str:
    """An error's message reduced to its first line (its type's name when it has no message)."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def error_text(error: BaseException) -> str:
    """``Type: first line of the message``, or the type's name alone when there is no message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {first_line(error)}" if text else type(error).__name__
