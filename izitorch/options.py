"""Helpers for plugins: structure a ``[plugins.<name>]`` table, name a metric, compare scores.

Plugins describe their options as a frozen attrs class; :func:`plugin_options` structures the
manifest table into it with the manifest's own strict converter, so a plugin's errors read
exactly like the core's (``m.toml: plugins.kfold.k: expected an integer >= 2, got 1``). A plugin
declares that class as its ``izitorch_options`` attribute (on the plugin class or module), and
``izitorch plugins`` lists its keys, defaults and ``doc`` metadata (:func:`declared_options`).

An option that names a metric is declared with :func:`metric_option`: once the plugins have
registered their metrics, :func:`check_metric_options` checks it against them (``run`` and
``validate`` alike), and the plugin reads the value's key and direction from
:func:`izitorch.metrics.resolve` and :func:`izitorch.metrics.directions`.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import attrs

from izitorch.config import Config
from izitorch.errors import ManifestError
from izitorch.metrics import better, resolve

__all__ = ["OptionInfo", "better", "check_metric_options", "declared_options", "metric_option", "plugin_options"]

T = TypeVar("T")


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


def metric_option(default: str, doc: str, used: Callable[[Any], bool] | None = None) -> Any:
    """An attrs field naming a registered metric (``metric = "mae"``), checked by
    :func:`check_metric_options` when the manifest writes it or when ``used(options)`` says the
    plugin will compare it (default: always)."""
    return attrs.field(default=default, metadata={"doc": doc, "metric": used or _always})


def _always(_options: Any) -> bool:
    return True


def check_metric_options(plugins: list[tuple[str, Any]], config: Config, factories: dict[str, Any]) -> None:
    """Refuse in one line (``plugins.<name>.<key>``) a :func:`metric_option` of an enabled
    plugin that names no registered metric, or one without a declared direction."""
    for name, plugin in plugins:
        cls = getattr(plugin, "izitorch_options", None)
        if cls is None or not attrs.has(cls):
            continue
        fields = [field for field in attrs.fields(cls) if "metric" in field.metadata]
        if not fields:
            continue
        options = plugin_options(config, name, cls)
        table = config.plugin_table(name)
        for field in fields:
            if field.name in table or field.metadata["metric"](options):
                try:
                    resolve(getattr(options, field.name), factories, f"plugins.{name}.{field.name}")
                except ManifestError as error:
                    raise error.located(source=config.source) from None
