"""Helpers for plugins: structure a ``[plugins.<name>]`` table, compare scores.

Plugins describe their options as a frozen attrs class; :func:`plugin_options` structures the
manifest table into it with the manifest's own strict converter, so a plugin's errors read
exactly like the core's (``m.toml: plugins.kfold.k: expected an integer >= 2, got 1``).
"""
from __future__ import annotations

from typing import TypeVar

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
