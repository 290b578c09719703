"""What hooks receive: the run, its folds, one slot per model, the scores of an epoch.

These are plain attrs classes with no behaviour beyond bookkeeping, so that a plugin can read
everything it needs from its arguments and keep its own state on itself or in ``run.stash``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Generic, Iterator, TypeVar

import attrs
import numpy as np
import torch

from izitorch.config import Config, ModelSpec
from izitorch.distributed import Ranks
from izitorch.selection import Selection

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key for :class:`Stash`: plugins create one at import time and keep it private."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash(dict):
    """Per-run storage for plugins, indexed by :class:`StashKey` so plugins never collide."""


@attrs.frozen
class Split:
    """One fold's indices into the dataset; ``val`` is ``None`` without validation."""

    train: np.ndarray = attrs.field(converter=np.asarray)
    test: np.ndarray = attrs.field(converter=np.asarray)
    val: np.ndarray | None = attrs.field(default=None)

    def as_lists(self) -> tuple[list[int], ...]:
        """The original izitorch's ``Dataset_split.pkl`` entry: (train, test) or (train, val, test)."""
        parts = (self.train, self.test) if self.val is None else (self.train, self.val, self.test)
        return tuple(np.asarray(p, dtype=np.int64).tolist() for p in parts)


@attrs.define(eq=False)
class Slot:
    """One model with its criterion, optimizer and scheduler, trained on the shared batches.

    The initial states are kept so that every fold starts from the same weights and a fresh
    optimizer and scheduler (the original izitorch carried optimizer state across folds).
    """

    name: str
    spec: ModelSpec | None
    model: torch.nn.Module
    criterion: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    initial_state: dict = attrs.field(factory=dict, repr=False)
    kept_state: dict | None = attrs.field(default=None, repr=False)
    kept_epoch: int | None = None
    #: The best evaluated epoch so far and its ``[run] best_metric`` (:mod:`izitorch.selection`)
    best_epoch: int | None = None
    best_value: float | None = None
    stopped: str | None = None
    #: Seconds of this model's own share of its training passes and how many epochs they were
    #: (:class:`izitorch.engine.StackPass`; CPU only): its training time per epoch
    train_seconds: float = 0.0
    timed_epochs: int = 0

    def snapshot_initial_state(self) -> None:
        self.initial_state = {
            "model": standalone(self.model.state_dict()),  # cloned, not deep-copied: ~4x faster
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None,
        }

    def reset(self) -> None:
        """Back to the initial weights and a fresh optimizer/scheduler, as at the first fold."""
        self.model.load_state_dict(self.initial_state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(self.initial_state["optimizer"]))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(self.initial_state["scheduler"])
        self.kept_state, self.kept_epoch, self.stopped = None, None, None
        self.best_epoch, self.best_value = None, None
        self.train_seconds, self.timed_epochs = 0.0, 0

    def grads(self) -> list[torch.Tensor]:
        """This model's gradients (what grad clipping acts on)."""
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def keep_weights(self, epoch: int) -> None:
        """Keep a copy of the current weights: the fold's final test scores them (the core calls
        this on the best epoch when ``[run] test_weights = "best"``; a plugin may too, e.g. to
        test averaged weights)."""
        self.kept_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.kept_epoch = epoch

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@attrs.define(eq=False)
class Scores:
    """One epoch's metrics: ``scores[name][phase][metric]``, phase in train / val / test."""

    epoch: int
    values: dict[str, dict[str, dict[str, Any]]] = attrs.field(factory=dict)
    #: The learning rate each model that trained this epoch started it with (its first parameter
    #: group's, as the epoch's first optimizer step used it; a per-step scheduler moves it after):
    #: exactly the models with ``train`` scores.
    lrs: dict[str, float] = attrs.field(factory=dict)

    def add(self, phase: str, per_slot: dict[str, dict[str, Any]]) -> None:
        for name, metrics in per_slot.items():
            self.values.setdefault(name, {})[phase] = metrics

    def __getitem__(self, name: str) -> dict[str, dict[str, Any]]:
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def phases(self, name: str) -> list[str]:
        return list(self.values.get(name, {}))


@attrs.define(eq=False)
class Fold:
    """One split being trained: its loaders, the slots, and the final scores once done."""

    index: int
    count: int
    split: Split
    loaders: dict[str, Any]
    slots: list[Slot]
    epoch: int = 0
    stop_reason: str | None = None
    final_scores: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    #: The folds trained together with this one (``izitorch.cohort.Cohort``)
    cohort: Any = attrs.field(default=None, repr=False)

    @property
    def eval_phase(self) -> str:
        """The phase evaluated each epoch: ``val`` when there is a validation set, else ``test``."""
        return "val" if "val" in self.loaders else "test"


@attrs.define(eq=False)
class Run:
    """Everything about the run in progress; passed to every hook."""

    config: Config
    pm: Any
    device: torch.device
    res_dir: Path
    stash: Stash = attrs.field(factory=Stash)
    metric_factories: dict[str, Any] = attrs.field(factory=dict)
    selection: Selection = attrs.field(factory=Selection)  # which weights the final test scores
    dataset: Any = None
    splits: list[Split] = attrs.field(factory=list)
    slots: list[Slot] = attrs.field(factory=list)
    plugin_versions: dict[str, str] = attrs.field(factory=dict)
    stop_flag: Any = None  # izitorch.guard.StopFlag: set by SIGINT/SIGTERM, read after every step
    stacks: list = attrs.field(factory=list)  # izitorch.stacks.Stack: the models as the loop steps them
    grouping: list[str] = attrs.field(factory=list)  # why models were (not) grouped, for the console
    task: str | None = None  # "classification", "regression", "segmentation" (izitorch.tasks), None where unclear
    ranks: Ranks = attrs.field(factory=Ranks)  # this process's place under torchrun (izitorch.distributed)
    share: list | None = None  # izitorch.spread.Unit: what this rank trains under distributed = "models"

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def model_dir(self, slot: Slot, fold: Fold) -> Path:
        """``res_dir/<model>`` for one split, ``res_dir/<model>/FOLD_<k>`` (1-based) for several."""
        base = self.res_dir / slot.name
        return base if fold.count == 1 else base / f"FOLD_{fold.index + 1}"


def standalone(state: Any, device: torch.device | str | None = None) -> Any:
    """A copy of a (nested) state dict whose tensors own their memory (on ``device`` if given).

    A member's ``model.state_dict()`` and ``optimizer.state_dict()`` hold views of the group's
    stacked tensors, and ``torch.save`` writes a view's whole storage: call this before saving
    so that a member's checkpoint holds the member alone. Checkpoints pass ``device="cpu"`` so
    that ``torch.load`` works on a machine without the GPU they were trained on.
    """
    if isinstance(device, str):
        device = torch.device(device)  # parsed once, not for every tensor
    if isinstance(state, torch.Tensor):
        tensor = state.detach()
        return tensor.clone() if device is None or tensor.device == device else tensor.to(device, copy=True)
    if isinstance(state, dict):
        result = copy.copy(state)  # keeps the type and a state dict's ``_metadata``
        for key, value in result.items():
            result[key] = standalone(value, device)
        return result
    if isinstance(state, list):
        return [standalone(v, device) for v in state]
    if isinstance(state, tuple):
        return tuple(standalone(v, device) for v in state)
    return state


#: Types compared with == by ``deep_equal`` without further checks (a fast path: grouping 64 models
#: compares ~4,000 values).
_PLAIN = frozenset({str, int, float, bool, type(None), type, torch.dtype, torch.device})


def deep_equal(a: Any, b: Any) -> bool:
    """Deep equality of nested values that understands tensors (equal shape, dtype, device and
    values) and treats values of different types, or incomparable ones, as different: whether
    two models can share a group, whether a hyper-parameter moved since the initial snapshot."""
    kind = type(a)
    if kind is type(b) and kind in _PLAIN:  # most of an architecture: names, sizes, flags, dtypes
        return a is b or a == b
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and (a.is_meta or bool(torch.equal(a, b)))
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False
