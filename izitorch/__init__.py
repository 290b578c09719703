"""izitorch: train and compare several PyTorch models on one dataset from a manifest.

Public surface: :data:`hookimpl` for plugins, :class:`Rack` / :class:`ModelConfig` (the original
API), :func:`load_manifest` and :func:`run`.
"""
from __future__ import annotations

__version__ = "0.2.0"

from izitorch.config import ComponentSpec, Config, DataConfig, ModelSpec, PluginsConfig, RunConfig
from izitorch.errors import IzitorchError, ManifestError, TrainingError
from izitorch.manifest import load_manifest
from izitorch.pluginmanager import hookimpl
from izitorch.runner import run
from izitorch.state import Fold, Run, Scores, Slot, Split, Stash, StashKey
from izitorch.trainRack import ModelConfig, Rack

__all__ = [
    "ComponentSpec", "Config", "DataConfig", "Fold", "IzitorchError", "ManifestError", "ModelConfig",
    "ModelSpec", "PluginsConfig", "Rack", "Run", "RunConfig", "Scores", "Slot", "Split", "Stash",
    "StashKey", "TrainingError", "__version__", "hookimpl", "load_manifest", "run",
]
