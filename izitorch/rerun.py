"""``res_dir/manifest.toml``: the manifest as the run ran it, to run it again.

The run's configuration after ``--set`` and with its sweeps expanded (each expanded table is an
ordinary ``[[models]]`` entry recording its ``swept`` values and ``seed``), written in the
manifest's own keys (``class = ...``, not the recorded ``target``) by ``tomli-w``, the TOML
writer of ``tomli``'s author (a format we only read otherwise; hand-written TOML would have to
get its quoting and nesting right for every value a manifest can hold).

``python -m izitorch run RES_DIR/manifest.toml`` repeats the run: the file's own folder is where
relative references are looked up, so each ``"file.py:attr"`` reference and each file plugin of
``plugins.enable`` is rewritten relative to ``res_dir``. Paths inside a table of arguments
(``params``) are written as they were given. ``res_dir`` is kept, so a repeat needs a folder of its
own: ``--set run.res_dir=...`` (a run's folder never receives a second run). A run given Python
objects (a ``Rack`` with a module or a dataset object), or values TOML cannot hold, has no
manifest to write: none is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from izitorch.trained import GivenObject, manifest_form

FILE_REFERENCE = re.compile(r"^(?P<file>[^:]+\.py)(?P<attr>:.+)?$")


def manifest_text(config: dict, base_dir: str, res_dir: Path) -> str | None:
    """The TOML of ``config`` (``conf.json``'s ``config`` table), its file references moved from
    ``base_dir`` to ``res_dir``; None where the run was given Python objects."""
    import tomli_w

    raw = manifest_form(config, res_dir / "conf.json")
    if _holds_given(raw):
        return None
    moved = _without_none(_moved(raw, Path(base_dir), res_dir))
    for model in moved.get("models", []):
        if not model.get("swept"):  # a model no sweep made
            model.pop("swept", None)
    try:
        text = tomli_w.dumps(moved)
    except (TypeError, ValueError):  # a value TOML cannot hold (an object in params): no manifest to repeat the run
        return None
    return "# The manifest as this run ran it (--set applied, sweeps expanded), written by izitorch.\n" + text


def _without_none(value: Any) -> Any:
    """``value`` without unset (None) entries, which TOML has no way to write: a manifest leaves them out."""
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def _holds_given(value: Any) -> bool:
    if isinstance(value, GivenObject):
        return True
    if isinstance(value, dict):
        return any(_holds_given(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_given(item) for item in value)
    return False


def _moved(raw: dict, base: Path, res_dir: Path) -> dict:
    """``raw`` with every relative ``"file.py[:attr]"`` reference re-rooted at ``res_dir``."""

    def move(value: Any, in_params: bool) -> Any:
        if isinstance(value, dict):
            return {key: move(item, in_params or key == "params") for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [move(item, in_params) for item in value]
        if isinstance(value, str) and not in_params:
            match = FILE_REFERENCE.match(value)
            if match and not os.path.isabs(match["file"]):
                relative = os.path.relpath(os.path.abspath(base / match["file"]), os.path.abspath(res_dir))
                return Path(relative).as_posix() + (match["attr"] or "")
        return value

    return move(raw, False)
