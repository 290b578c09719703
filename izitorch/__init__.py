"""izitorch: train and compare several PyTorch models on one dataset from a manifest.

Public surface: :data:`hookimpl` for plugins, :class:`Rack` / :class:`ModelConfig` (the original
API), :func:`load_manifest`, :func:`run`, and :func:`load_model` for a finished run's models.
"""

from __future__ import annotations

from izitorch.version import __version__


def _plugins_of_a_source_checkout() -> None:
    """Make ``plugins/`` importable as ``izitorch.plugins`` when running from a checkout.

    Installed (wheel or editable), ``plugins/`` *is* ``izitorch.plugins``. But ``python -m
    izitorch`` started from the repository root imports this folder first, beside which
    ``plugins/`` sits as a plain folder: the built-ins' entry points would then fail to import.
    """
    import importlib.util
    import sys
    from pathlib import Path

    if "izitorch.plugins" in sys.modules or importlib.util.find_spec("izitorch.plugins") is not None:
        return
    beside = Path(__file__).resolve().parent.parent / "plugins"
    if not (beside / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("izitorch.plugins", beside / "__init__.py", submodule_search_locations=[str(beside)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["izitorch.plugins"] = module
    spec.loader.exec_module(module)


_plugins_of_a_source_checkout()

from izitorch.config import ComponentSpec, Config, DataConfig, ModelSpec, PluginsConfig, RunConfig, SchedulerSpec
from izitorch.errors import IzitorchError, ManifestError, TrainingError
from izitorch.manifest import load_manifest
from izitorch.hookspecs import hookimpl
from izitorch.runner import run
from izitorch.trained import load_model
from izitorch.state import Fold, Run, Scores, Slot, Split, Stash, StashKey
from izitorch.trainRack import ModelConfig, Rack

__all__ = [
    "ComponentSpec",
    "Config",
    "DataConfig",
    "Fold",
    "IzitorchError",
    "ManifestError",
    "ModelConfig",
    "ModelSpec",
    "PluginsConfig",
    "Rack",
    "Run",
    "RunConfig",
    "SchedulerSpec",
    "Scores",
    "Slot",
    "Split",
    "Stash",
    "StashKey",
    "TrainingError",
    "__version__",
    "hookimpl",
    "load_manifest",
    "load_model",
    "run",
]
