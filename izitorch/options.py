"""Helpers for plugins: structure a ``[plugins.<name>]`` table, compare scores.

Plugins describe their options as a frozen attrs class; :func:`plugin_options` structures the
manifest table into it with the manifest's own strict converter, so a plugin's errors read
exactly like the core's (``m.toml: plugins.kfold.k: expected an integer >= 2, got 1``). A plugin
declares that class as its ``izitorch_options`` attribute (on the plugin class or module), and
``izitorch plugins`` lists its keys, defaults and ``doc`` metadata (:func:`declared_options`).
"""
from __future__ import annotations

from typing import Any, TypeVar

import attrs

from izitorch.config import Config
from izitorch.errors import ManifestError

T = TypeVar("T")

METRIC_ALIASES = {"loss": "loss", "acc": "accuracy", "accuracy": "accuracy", "IoU": "IoU", "iou": "IoU"}
LOWER_IS_BETTER = {"loss"}


def plugin_options(config: Config, name: str, cls: type[T]) -> T:
    """The plugin's table structured into ``cls``; a ``ManifestError`` naming ``plugins.<name>.key``."""
    from izitorch.manifest import _structure

    try:
        return _structure(config.plugin_table(name), cls, f"plugins.{name}")
    except ManifestError as error:
        raise error.located(source=config.source) from None


@attrs.frozen
class OptionInfo:
    """One key of a plugin's ``[plugins.<name>]`` table, as ``izitorch plugins`` shows it."""

    key: str
    default: str
    doc: str


def declared_options(plugin: Any) -> list[OptionInfo]:
    """The keys of the attrs class a plugin declares as ``izitorch_options`` (none when it
    declares none), each with its default written as in TOML and its ``doc`` metadata."""
    cls = getattr(plugin, "izitorch_options", None)
    if cls is None or not attrs.has(cls):
        return []
    return [OptionInfo(field.name, _toml_default(field.default), field.metadata.get("doc", "")) for field in attrs.fields(cls)]


def _toml_default(default: Any) -> str:
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if default is attrs.NOTHING:
        return "(required)"
    if default is None:
        return "(unset)"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, str):
        return f'"{default}"'
    return repr(default)


def score_key(metric: str) -> str:
    """The scores' key for a user-facing metric name (``acc`` -> ``accuracy``)."""
    return METRIC_ALIASES[metric]


def improved(metric: str, new: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether ``new`` beats ``best`` in the metric's direction (loss down, accuracy/IoU up)."""
    if best is None:
        return True
    if score_key(metric) in LOWER_IS_BETTER:
        return new < best - min_delta
    return new > best + min_delta
