"""A fresh pluggy manager per run, holding exactly the plugins the configuration enables.

Built-in plugins are found through the ``izitorch`` entry-point group like any third party's.
The defaults (``DEFAULT_PLUGINS``) are on unless disabled; every other plugin is loaded only when
the manifest names it (``[plugins] enable`` or a ``[plugins.<name>]`` table), so nothing is
loaded silently. Names may also be dotted module paths or ``path/to/plugin.py`` files.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import attrs
import pluggy

from izitorch import hookspecs, loop
from izitorch.config import Config
from izitorch.errors import IzitorchError, ManifestError, TrainingError, did_you_mean, error_text, one_line
from izitorch.hookspecs import hookimpl as hookimpl  # re-exported: older plugins import it from here
from izitorch.references import _import_file
from izitorch.version import __version__

GROUP = "izitorch"
ESSENTIAL = "loop"
DEFAULT_PLUGINS = ("holdout", "metrics", "checkpoint", "trainlog", "console")


@attrs.frozen
class PluginInfo:
    """What ``izitorch plugins`` shows about one available plugin."""

    name: str
    version: str
    default: bool
    hooks: tuple[str, ...]
    origin: str
    options: tuple = ()  # OptionInfo of the keys of its [plugins.<name>] table
    essential: bool = False


def available_plugins() -> dict[str, EntryPoint]:
    """Installed plugins by name: every entry point of the ``izitorch`` group."""
    return dict(_entry_points(_installation_stamp()))


def _installation_stamp() -> tuple:
    """``sys.path`` with each folder's modification time: installing or removing a distribution
    changes it (its ``.dist-info`` folder comes or goes; pip replaces the folder on a reinstall),
    so the cache below sees new plugins. An ``entry_points.txt`` edited in place is not seen
    until the process restarts."""
    stamp = []
    for entry in sys.path:
        try:
            stamp.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            stamp.append((entry, None))
    return tuple(stamp)


@functools.lru_cache(maxsize=4)
def _entry_points(_stamp: tuple) -> tuple[tuple[str, EntryPoint], ...]:
    """The plugins' entry points, scanned once per installation state: a scan reads the metadata
    of every installed distribution."""
    return tuple((ep.name, ep) for ep in entry_points(group=GROUP))


def enabled_plugin_names(config: Config) -> list[str]:
    """Resolve defaults, ``enable``, ``no:name``, ``disable`` and tables to an ordered name list."""
    known = available_plugins()
    wanted = [n for n in config.plugins.enable if not n.startswith("no:")]
    blocked = list(config.plugins.disable) + [n[3:] for n in config.plugins.enable if n.startswith("no:")]
    for name in blocked:
        if name == ESSENTIAL:
            raise ManifestError('"loop" is the essential plugin and cannot be disabled', "plugins.disable", config.source)
        if name not in known and name not in wanted:
            raise ManifestError(f'unknown plugin "{name}"{did_you_mean(name, known)}; `izitorch plugins` lists them', "plugins.disable", config.source)
    for name in config.plugins.tables:
        if name in blocked:
            raise ManifestError(
                f'[plugins.{name}] configures a plugin that is disabled; remove the table or the "disable" entry', f"plugins.{name}", config.source
            )
    names: list[str] = []
    for name in (*DEFAULT_PLUGINS, *wanted, *config.plugins.tables):
        if name not in blocked and name not in names:
            names.append(name)
    for name in names:
        if name not in known and not _is_local(name):
            where = f"plugins.{name}" if name in config.plugins.tables else "plugins.enable"
            raise ManifestError(f'unknown plugin "{name}"{did_you_mean(name, known)}; `izitorch plugins` lists the installed ones', where, config.source)
    return names


def make_plugin_manager(config: Config) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A new manager with the essential loop and the enabled plugins, configured.

    Returns the manager and ``{plugin name: version}`` for the run's ``conf.json``.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    versions = {ESSENTIAL: __version__}
    _register(pm, loop, ESSENTIAL)
    known = available_plugins()
    for name in enabled_plugin_names(config):
        plugin, version = _load(name, known, config)
        _register(pm, plugin, name, config)
        versions[name] = version
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        name = pm.get_name(error.plugin)
        raise IzitorchError(f'plugin "{name}": {_unknown_hook_message(error)}', _key_of(name, config)) from None
    pm.hook.izitorch_configure.call_historic(kwargs={"config": config})
    return pm, versions


def describe_plugins() -> list[PluginInfo]:
    """The essential loop, then every installed plugin, with its version, the hooks it
    implements and the options of its ``[plugins.<name>]`` table (for the CLI)."""
    from izitorch.options import declared_options

    infos = [PluginInfo(ESSENTIAL, __version__, True, tuple(sorted(_hook_names(loop))), loop.__name__, essential=True)]
    for name, ep in sorted(available_plugins().items()):
        options: tuple = ()
        try:
            obj = ep.load()
            hooks = tuple(sorted(_hook_names(_instantiate(obj))))
            options = tuple(declared_options(obj))
        except Exception as error:  # a broken third-party plugin must not hide the others
            hooks = (f"<failed to load: {type(error).__name__}: {one_line(str(error))}>",)
        version = _version(ep.dist)
        infos.append(PluginInfo(name, version, name in DEFAULT_PLUGINS, hooks, ep.value, options))
    return infos


def _is_local(name: str) -> bool:
    return name.endswith(".py") or "." in name


def _load(name: str, known: dict[str, EntryPoint], config: Config) -> tuple[Any, str]:
    try:
        if name in known:
            ep = known[name]
            return _instantiate(ep.load()), _version(ep.dist)
        if name.endswith(".py"):
            return _instantiate(_import_file(name, config.base_dir)), "local"
        module = importlib.import_module(name)
        return _instantiate(module), getattr(module, "__version__", "local")
    except ManifestError as error:  # a local plugin file that is missing or fails to import
        raise error.located(config.source, _key_of(name, config)) from None
    except IzitorchError:
        raise
    except Exception as error:
        raise IzitorchError(f'plugin "{name}" failed to load: {type(error).__name__}: {error}', _key_of(name, config)) from None


def _key_of(name: str, config: Config) -> str:
    """Where the manifest names a plugin: its own table, else the enable list (or the defaults)."""
    if name in config.plugins.tables:
        return f"plugins.{name}"
    return "plugins.enable" if name in config.plugins.enable else "plugins"


@functools.lru_cache(maxsize=None)
def _version(distribution: Any) -> str:
    """A plugin distribution's version, read once per distribution object: reading it parses the
    whole METADATA file, and the built-in plugins all share izitorch's. The entry
    points are cached until the installation changes (:func:`available_plugins`), their
    distribution objects with them."""
    return distribution.version if distribution is not None else "?"


def _instantiate(obj: Any) -> Any:
    """Entry points may name a module (stateless hooks) or a class (one instance per run)."""
    return obj() if inspect.isclass(obj) else obj


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, config: Config | None = None) -> None:
    source, key = (config.source, _key_of(name, config)) if config is not None else ("", "plugins")
    already = pm.get_name(plugin)
    if already is not None:  # e.g. enable = ["izitorch.plugins.kfold"] next to "kfold"
        raise ManifestError(f'plugin "{name}" is the plugin "{already}", already enabled; name it once', "plugins.enable", source)
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as error:
        raise IzitorchError(f'plugin "{name}": {error}', key) from None
    if name != ESSENTIAL:  # the loop's own failures are reported where they happen
        for caller in pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                    impl.function = _reported(impl.function, name, caller.name)


def _reported(function: Any, plugin: str, hook: str) -> Any:
    """``function`` (a plugin's hook implementation) with whatever it raises turned into one line
    naming the plugin, the hook and the error: exit 2 while configuring, 1 once the run started.

    Set on pluggy's record of the implementation, so every call of every hook goes through it
    without a change at the call sites. izitorch's own errors (a plugin's deliberate one-line
    error, an interrupt) and ``BaseException`` (Ctrl-C, ``sys.exit``) pass through unchanged.
    """
    failure = IzitorchError if hook == "izitorch_configure" else TrainingError

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except IzitorchError:
            raise
        except Exception as error:
            raise failure(f'plugin "{plugin}": {hook} raised {error_text(error)}') from None

    return call


def _hook_names(plugin: Any) -> set[str]:
    names = set()
    for attr in dir(plugin):
        if attr.startswith("izitorch_") and getattr(getattr(plugin, attr, None), "izitorch_impl", None) is not None:
            names.add(attr)
    return names


def _unknown_hook_message(error: pluggy.PluginValidationError) -> str:
    text = str(error)
    specs = [n for n in dir(hookspecs) if n.startswith("izitorch_")]
    for word in text.replace("'", " ").split():
        if word.startswith("izitorch_") and word not in specs:
            return f"implements unknown hook {word}{did_you_mean(word, specs)}"
    return text
