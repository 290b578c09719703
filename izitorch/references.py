"""``"module:attr"`` and ``"file.py:attr"`` references: import them and check their arguments.

A manifest names every model, dataset, loss, optimizer and scheduler this way. Checking a
reference means importing it and binding its keyword table against its signature, so that
``validate`` catches a misspelled class or argument before any training starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from izitorch.errors import ManifestError, describe, did_you_mean


def resolve(ref: str, base_dir: str = ".") -> Any:
    """The object a reference names; ``ManifestError`` (path-less) when it cannot be found."""
    module_part, _, attr = ref.partition(":")
    module = _import_file(module_part, base_dir) if module_part.endswith(".py") else _import_module(module_part)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ManifestError(f'"{module_part}" has no attribute "{attr}"{did_you_mean(part, names)}')
        obj = getattr(obj, part)
    return obj


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise ManifestError(f'cannot import module "{name}" ({error}); check the spelling or install it') from None
    except Exception as error:  # a module that fails while importing
        raise ManifestError(f'importing "{name}" failed: {type(error).__name__}: {error}') from None


def _import_file(path: str, base_dir: str):
    file = Path(path) if Path(path).is_absolute() else Path(base_dir) / path
    if not file.is_file():
        raise ManifestError(f'file "{path}" not found (looked in {Path(base_dir).resolve()})')
    module_name = f"izitorch_user_{file.resolve().stem}_{abs(hash(str(file.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    module.__izitorch_file__ = path  # how messages name it (its module name is made up)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ManifestError(f'loading "{path}" failed: {type(error).__name__}: {error}') from None
    return module


def check_arguments(fn: Callable, kwargs: dict, leading: int = 0) -> None:
    """Raise ``ManifestError`` (path = the bad key) when ``kwargs`` cannot be passed to ``fn``.

    ``leading`` positional arguments are supplied by izitorch (the parameters for an optimizer,
    the optimizer for a scheduler). A value whose default is a number, a boolean or a string must
    have that type, which catches ``lr = "fast"`` before training.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    params = list(signature.parameters.values())
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {p.name: p for p in params[leading:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in kwargs.items():
        if key not in named:
            if accepts_any:
                continue
            raise ManifestError(f'unexpected argument "{key}" for {_name(fn)}{did_you_mean(key, named)}', key)
        expected = _expected_type(named[key].default)
        if expected and not _matches(value, expected):
            raise ManifestError(f"expected {expected}, got {describe(value)}", key)
    missing = [p.name for p in params[leading:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name not in kwargs]
    if missing:
        raise ManifestError(f'missing argument "{missing[0]}" for {_name(fn)}')


def _name(fn: Callable) -> str:
    """``module.qualname``, or ``file.py:qualname`` for what a manifest loads from a file."""
    module = getattr(fn, "__module__", None) or "?"
    file = getattr(sys.modules.get(module), "__izitorch_file__", None)
    return f"{file}:{getattr(fn, '__qualname__', fn)}" if file else f"{module}.{getattr(fn, '__qualname__', fn)}"


def _expected_type(default: Any) -> str | None:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return None


def _matches(value: Any, expected: str) -> bool:
    if expected == "true or false":
        return isinstance(value, bool)
    if expected == "a number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)
