"""TOML manifest -> :class:`izitorch.config.Config`, with one-line errors that carry key paths.

The attrs classes of :mod:`izitorch.config` are the schema; cattrs structures the TOML into them
with extra keys forbidden and strict scalar types (no ``"3"`` silently becoming ``3``). Every
failure becomes ``file.toml: models[1].optimizer.lr: expected a number, got "fast"``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Iterable

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from izitorch.config import ComponentSpec, Config, DataConfig, FieldError, ModelSpec, PluginsConfig, RunConfig, SchedulerSpec
from izitorch.sweeps import expand_models, relocated
from izitorch.errors import ManifestError, describe, did_you_mean, join_path
from izitorch.kinds import NO_REDUCTION, class_mismatch
from izitorch.references import check_arguments, resolve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SECTIONS = {"run": RunConfig, "data": DataConfig, "models": ModelSpec, "plugins": PluginsConfig}


class ValueTypeError(TypeError):
    """A scalar of the wrong TOML type."""


def load_manifest(path: str | Path, overrides: Iterable[str] = (), check_references: bool = True) -> Config:
    """Read, override, structure and check a manifest; raise ``ManifestError`` on any mistake."""
    raw = read_manifest(path, overrides)
    return config_from_dict(raw, source=str(path), base_dir=str(Path(path).parent), check=check_references)


def read_manifest(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """A manifest's tables as written, with ``overrides`` (``--set``) applied."""
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise ManifestError(_not_a_file(file), source=source)
    try:  # utf-8-sig: a byte-order mark (some Windows editors write one) is read as nothing
        raw = tomllib.loads(file.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(f"invalid TOML: {error}", source=source) from None
    except RecursionError:  # tomllib recurses once per level of nested arrays / inline tables
        raise ManifestError("invalid TOML: arrays or inline tables nested too deeply", source=source) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read the manifest: {error}", source=source) from None
    for override in overrides:
        try:
            apply_override(raw, override)
        except ManifestError as error:
            raise error.located(source=source) from None
    return raw


def _not_a_file(file: Path) -> str:
    """Why ``file`` cannot be read as a manifest; checked before opening, so a FIFO never blocks."""
    if file.is_dir():
        return "is a folder, not a manifest: give the path of a .toml file"
    if file.exists():
        return "is not a regular file (a FIFO, a socket or a device): give the path of a .toml file"
    return f"manifest not found{'' if file.suffix == '.toml' else ' (manifests are .toml files)'}"


def config_from_dict(raw: dict, source: str = "", base_dir: str = ".", check: bool = True) -> Config:
    """Structure a manifest's dict (its sweeps expanded, :mod:`izitorch.sweeps`); ``check`` also
    imports every reference and checks arguments. ``raw`` itself is left as it is."""
    expansions: list = []
    try:
        check_depth(raw)
        raw = dict(raw)
        expansions = expand_models(raw)
        sections = {}
        for key, value in raw.items():
            if key not in SECTIONS:
                raise ManifestError(f'unknown section "{key}"{did_you_mean(key, SECTIONS)}', key)
            sections[key] = _structure_section(key, value)
        if "models" not in sections:
            raise ManifestError("no [[models]] entry: a run needs at least one model", "models")
        try:
            config = Config(**sections, source=source, base_dir=base_dir)
        except FieldError as error:
            raise ManifestError(error.message, error.field) from None
        if check:
            check_config_references(config)
    except ManifestError as error:
        raise relocated(error, expansions).located(source=source) from None
    return config


#: How deep tables and arrays may nest: far more than any real manifest needs, and deep enough
#: values would exhaust Python's recursion in the code that copies and compares them.
MAX_DEPTH = 32


def check_depth(raw: dict) -> None:
    """Refuse a manifest nested deeper than ``MAX_DEPTH``, naming the key where it goes too deep."""
    stack: list[tuple[Any, str, int]] = [(raw, "", 0)]
    while stack:  # iterative: the point is to survive a nesting that recursion would not
        node, path, depth = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, item in items:
            if isinstance(item, (dict, list)):
                where = join_path(path, key)
                if depth + 1 > MAX_DEPTH:
                    raise ManifestError(f"tables and arrays are nested more than {MAX_DEPTH} levels deep; flatten the value", where)
                stack.append((item, where, depth + 1))


def _structure_section(key: str, value: Any) -> Any:
    if key == "models":
        if not isinstance(value, list):
            raise ManifestError("expected an array of tables ([[models]] entries)", key)
        return tuple(_structure(item, ModelSpec, join_path(key, index)) for index, item in enumerate(value))
    if not isinstance(value, dict):
        raise ManifestError(f"expected a table ([{key}]), got {describe(value)}", key)
    return _structure(value, SECTIONS[key], key)


def _structure(value: Any, cls: type, path: str) -> Any:
    if not isinstance(value, dict):
        raise ManifestError(f"expected a table, got {describe(value)}", path)
    try:
        return converter.structure(value, cls)
    except Exception as error:  # cattrs groups: find the first leaf and its path
        raise _first_error(error, path) from None


def _first_error(error: BaseException, path: str) -> ManifestError:
    """Walk a cattrs exception group down to its first leaf, collecting the key path."""
    for note in getattr(error, "__notes__", []) or []:
        name = getattr(note, "name", None)
        index = getattr(note, "index", None)
        if name is not None:
            path = join_path(path, name)
        elif index is not None:
            path = join_path(path, index)
    if isinstance(error, (ClassValidationError, IterableValidationError)) and error.exceptions:
        return _first_error(error.exceptions[0], path)
    if isinstance(error, ForbiddenExtraKeysError):
        key = sorted(error.extra_fields)[0]
        fields = [f.name for f in attrs.fields(error.cl)]
        return ManifestError(f'unknown key "{key}"{did_you_mean(key, fields)}', join_path(path, key))
    if isinstance(error, FieldError):
        return ManifestError(error.message, join_path(path, error.field))
    if isinstance(error, ManifestError):
        return ManifestError(error.message, join_path(path, error.path))
    if isinstance(error, ValueTypeError):
        return ManifestError(str(error), path)
    if isinstance(error, KeyError):
        return ManifestError(f'missing required key "{error.args[0]}"', path)
    return ManifestError(f"{error}", path)


# -- the converter: strict TOML scalars, components, plugin tables ---------------------------

converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(expected: str, check):
    def structure(value: Any, _type: type) -> Any:
        if not check(value):
            raise ValueTypeError(f"expected {expected}, got {describe(value)}")
        return value

    return structure


converter.register_structure_hook(bool, _strict("true or false", lambda v: isinstance(v, bool)))


def _structure_int(value: Any, _type: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float):  # 1e9 and 3.0 are floats in TOML
        example = f", e.g. {int(value)}" if value.is_integer() and abs(value) < 2**63 else ""
        raise ValueTypeError(f"expected an integer, got {describe(value)} (a float): write an integer{example}")
    raise ValueTypeError(f"expected an integer, got {describe(value)}")


converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(str, _strict("a string", lambda v: isinstance(v, str)))
converter.register_structure_hook(dict, _strict("a table", lambda v: isinstance(v, dict)))


def _structure_float(value: Any, _type: type) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueTypeError(f"expected a number, got {describe(value)}")
    return float(value)


def _structure_names(value: Any, _type: type) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueTypeError(f"expected a list of plugin names, got {describe(value)}")
    for item in value:
        if not isinstance(item, str):
            raise ValueTypeError(f"expected a list of plugin names (strings), found {describe(item)} in it")
    return tuple(value)


def _structure_component(value: Any, kind: type) -> ComponentSpec:
    """A component (``kind``: :class:`ComponentSpec`, or :class:`SchedulerSpec`, whose table may
    also hold izitorch's own ``interval``) from a reference or a table with a ``class`` key."""
    if isinstance(value, str):
        try:
            return kind(value)
        except FieldError as error:  # the key is the component's own, not ComponentSpec's "target"
            raise ValueTypeError(error.message) from None
    if isinstance(value, dict):
        if "class" not in value:
            raise ValueTypeError('expected a table with a "class" key, e.g. { class = "torch.optim:Adam", lr = 1e-3 }')
        own = {key: value[key] for key in OWN_KEYS.get(kind, ()) if key in value}
        params = {k: v for k, v in value.items() if k != "class" and k not in own}
        for key, item in own.items():
            if not isinstance(item, str):
                raise ManifestError(f"expected a string, got {describe(item)}", key)
        try:
            return kind(value["class"], params, **own)
        except FieldError as error:
            raise ManifestError(error.message, "class" if error.field == "target" else error.field) from None
    raise ValueTypeError(f'expected a reference "module:attr" or a table with a "class" key, got {describe(value)}')


#: izitorch's own keys in a component's table (the others are the callable's arguments).
OWN_KEYS = {SchedulerSpec: ("interval",)}


def _structure_plugins(value: Any, _type: type) -> PluginsConfig:
    fields = {"enable": (), "disable": ()}
    tables = {}
    for key, item in value.items():
        if key in fields:
            try:
                fields[key] = _structure_names(item, tuple)
            except ValueTypeError as error:
                raise ManifestError(str(error), key) from None
        elif isinstance(item, dict):
            tables[key] = item
        else:
            raise ManifestError(f"expected a table [plugins.{key}] (or the lists enable / disable), got {describe(item)}", key)
    return PluginsConfig(fields["enable"], fields["disable"], tables)


converter.register_structure_hook(float, _structure_float)
converter.register_structure_hook(ComponentSpec, _structure_component)
converter.register_structure_hook(SchedulerSpec, _structure_component)
converter.register_structure_hook(PluginsConfig, _structure_plugins)


# -- references -------------------------------------------------------------------------------


def check_config_references(config: Config) -> None:
    """Import every reference of a config and check the keyword tables against the signatures."""
    if isinstance(config.data.dataset, str):
        _check(config.data.dataset, config.data.params, "data.dataset", "data.params", config.base_dir)
    elif config.data.dataset is None and config.data.train is None:
        raise ManifestError('missing: name a dataset, e.g. dataset = "izitorch.datasets:digits"', "data.dataset")
    for index, spec in enumerate(config.models):
        where = f"models[{index}]"
        if isinstance(spec.model, str):
            _check(spec.model, spec.params, f"{where}.model", f"{where}.params", config.base_dir, kind="model")
        for part, leading in (("criterion", 0), ("optimizer", 1), ("scheduler", 1)):
            component = getattr(spec, part)
            if component is not None and isinstance(component.target, str):
                _check(
                    component.target,
                    component.params,
                    f"{where}.{part}.class" if component.params or part != "criterion" else f"{where}.{part}",
                    f"{where}.{part}",
                    config.base_dir,
                    leading,
                    part,
                )
            if part == "criterion" and component is not None and component.params.get("reduction") == "none":
                raise ManifestError(NO_REDUCTION, f"{where}.criterion.reduction")


def _check(ref: str, params: dict, ref_path: str, params_path: str, base_dir: str, leading: int = 0, kind: str = "") -> None:
    """Import ``ref``, check it is of its ``kind`` (:mod:`izitorch.kinds`), then its arguments."""
    try:
        target = resolve(ref, base_dir)
    except ManifestError as error:
        raise ManifestError(error.message, ref_path) from None
    if not callable(target):
        raise ManifestError(f'"{ref}" is not callable', ref_path)
    why = class_mismatch(kind, target, f'"{ref}"') if kind else None
    if why:
        raise ManifestError(why, ref_path)
    try:
        check_arguments(target, params, leading)
    except ManifestError as error:
        raise ManifestError(error.message, join_path(params_path, error.path)) from None


# -- --set overrides --------------------------------------------------------------------------

_TOKEN = re.compile(r"([A-Za-z0-9_\-]+)|\[(\d+)\]")


def apply_override(raw: dict, override: str) -> None:
    """Apply ``key.path=value`` (value parsed as TOML, else taken as a string) to ``raw``."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path.strip():
        raise ManifestError(f'--set "{override}": expected key.path=value, e.g. --set run.epochs=3')
    keys = _parse_key_path(key_path.strip(), override)
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except RecursionError:
        raise ManifestError(f'--set "{override}": arrays or inline tables nested too deeply') from None
    except tomllib.TOMLDecodeError:
        value = text
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        next_key = keys[depth + 1]
        node = _descend(node, key, {} if isinstance(next_key, str) else [], override)
    last = keys[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ManifestError(f'--set "{override}": index [{last}] does not exist')
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise ManifestError(f'--set "{override}": "{last}" is not inside a table')
        node[last] = value


def _parse_key_path(key_path: str, override: str) -> list[str | int]:
    keys: list[str | int] = []
    position = 0
    for part in key_path.split("."):
        matches = list(_TOKEN.finditer(part))
        if not matches or "".join(m.group(0) for m in matches) != part:
            raise ManifestError(f'--set "{override}": cannot read the key path "{key_path}"')
        keys.extend(m.group(1) if m.group(1) else int(m.group(2)) for m in matches)
        position += 1
    return keys


def _descend(node: Any, key: str | int, empty: Any, override: str) -> Any:
    if isinstance(key, int):
        if not isinstance(node, list) or key >= len(node):
            raise ManifestError(f'--set "{override}": index [{key}] does not exist')
        return node[key]
    if not isinstance(node, dict):
        raise ManifestError(f'--set "{override}": "{key}" is not inside a table')
    return node.setdefault(key, empty)
