"""What each component key expects: a model, an optimizer, a learning-rate scheduler, a loss.

A manifest key names a component of one kind; a class of another kind is refused before its
arguments are checked, so that ``optimizer = "torch.nn:Linear"`` is called "not an optimizer"
rather than "missing argument out_features". :func:`class_mismatch` judges a class (the
manifest's reference checks and the building of slots both ask it); :func:`built_mismatch`
judges what a factory or the ``Rack`` gave, once built.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

#: key -> (the class a component must derive from, what it is, what the key expects, an example)
KINDS: dict[str, tuple[type | tuple[type, ...], str, str, str]] = {
    "model": (torch.nn.Module, "a model", "a torch.nn.Module", "izitorch.models:MLP"),
    "optimizer": (torch.optim.Optimizer, "an optimizer", "a torch.optim.Optimizer", "torch.optim:Adam"),
    "scheduler": (
        (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
        "a learning-rate scheduler",
        "a torch.optim.lr_scheduler.LRScheduler",
        "torch.optim.lr_scheduler:StepLR",
    ),
}

NO_REDUCTION = 'reduction = "none" gives one loss per sample, but the loss must be a scalar: use "mean" or "sum"'


def class_mismatch(key: str, target: Any, label: str) -> str | None:
    """Why the class ``target`` (named ``label``) cannot be the ``key`` component, or None.

    A factory function cannot be judged before it is called: :func:`built_mismatch` judges
    what it returns.
    """
    if key not in KINDS or not inspect.isclass(target):
        return None
    base, kind, expected, example = KINDS[key]
    if not issubclass(target, base):
        return f'{label} is not {kind}: {key} expects {expected} class, e.g. "{example}"'
    return None


def built_mismatch(key: str, obj: Any, label: str) -> str | None:
    """Why the object built for ``key`` (from ``label``) cannot serve as it, or None."""
    if key == "criterion":
        if getattr(obj, "reduction", None) == "none":
            return NO_REDUCTION
        return None
    base, kind, expected, example = KINDS[key]
    if not isinstance(obj, base):
        return f'{label} gave a {type(obj).__name__}, not {kind}: {key} expects {expected}, e.g. "{example}"'
    if key == "model" and next(obj.parameters(), None) is None:
        return f"{label} built a model with no parameters: there is nothing to train; check its class and params"
    return None
