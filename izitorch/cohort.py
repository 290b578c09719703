"""A cohort: the folds trained together, their stacks, and the passes that serve them.

Sequential folds are cohorts of one fold, trained one after another with the run's stacks;
parallel folds (:mod:`izitorch.parallel`) are one cohort of every fold, whose vector stacks hold
one member per model and fold and mask each member's samples. The fold protocol
(:func:`izitorch.loop.train`) is the same code for both.

Hooks see each fold as a sequential run shows it. Plugins keep one state per fold: in a cohort
of several folds, a fold's state is loaded into the plugins before its hooks run
(``izitorch_load_state_dict``) and taken back after (``izitorch_state_dict``), the contract exact
resume already asks of every stateful plugin.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs
import torch

from izitorch import precision, resume, sharding
from izitorch.data import loading_error, make_loaders, to_device
from izitorch.errors import IzitorchError, TrainingError
from izitorch.reproducibility import seed_everything
from izitorch.stacks import Stack
from izitorch.state import Fold, Run, Slot


@attrs.define(eq=False)
class Cohort:
    """Folds that advance together, epoch by epoch, over shared passes of the data.

    ``loaders[phase]`` yields ``(inputs, target)`` batches, or ``(inputs, target, rows)`` with
    ``with_rows`` (the dataset rows of the batch, by which vector stacks mask their members).
    ``state_path`` is where the cohort's resume state goes; ``saved`` the state to resume from.
    """

    folds: list[Fold]
    stacks: list[Stack]
    loaders: dict[str, Any]
    state_path: Path
    with_rows: bool = False
    saved: dict | None = attrs.field(default=None, repr=False)
    plugin_states: dict[int, dict] = attrs.field(factory=dict, repr=False)
    fold_of: dict[Slot, Fold] = attrs.field(factory=dict, repr=False)
    #: Per stack, its fp16 loss scaler (``[run] precision = "fp16"``), else None
    scalers: list[Any] = attrs.field(factory=list, repr=False)

    def __attrs_post_init__(self) -> None:
        self.scalers = self.scalers or [None] * len(self.stacks)
        self.fold_of = {slot: fold for fold in self.folds for slot in fold.slots}
        for fold in self.folds:
            fold.cohort = self

    @property
    def slots(self) -> list[Slot]:
        return list(self.fold_of)

    def take_plugin_state(self, run: Run, fold: Fold) -> None:
        """Keep what the plugins hold now as ``fold``'s state (a copy: plugins keep mutating theirs)."""
        if len(self.folds) > 1:
            self.plugin_states[fold.index] = copy.deepcopy(resume.plugin_states(run))

    def put_plugin_state(self, run: Run, fold: Fold, state: dict) -> None:
        """``fold``'s saved plugin state: into the plugins (one fold), or kept for its hooks."""
        if len(self.folds) > 1:
            self.plugin_states[fold.index] = state
        else:
            run.hook.izitorch_load_state_dict(run=run, state=state)

    def plugin_state(self, run: Run, fold: Fold) -> dict:
        """``fold``'s plugin state as the resume state holds it."""
        return self.plugin_states[fold.index] if len(self.folds) > 1 else resume.plugin_states(run)

    @contextlib.contextmanager
    def hooks_of(self, run: Run, fold: Fold) -> Iterator[None]:
        """``fold``'s state in the plugins around the block (nothing to swap with one fold).
        Loaded without a copy: what the plugins change in it is replaced by the copy taken after."""
        if len(self.folds) == 1:
            yield
            return
        run.hook.izitorch_load_state_dict(run=run, state=self.plugin_states[fold.index])
        yield
        self.take_plugin_state(run, fold)


def sequential(run: Run, index: int, saved: dict | None, stacks: list[Stack] | None = None, state_path: Path | None = None) -> Cohort:
    """Fold ``index`` alone, with the run's stacks (or only ``stacks``, whose resume state goes
    to ``state_path``: a unit of a run spread over ranks, :mod:`izitorch.spread`): models reset to
    their initial weights and fresh optimizers, every generator seeded with ``rdm_seed + index``,
    its loaders made."""
    stacks = run.stacks if stacks is None else stacks
    members = {slot for stack in stacks for slot in stack.members}
    slots = [slot for slot in run.slots if slot in members]
    for slot in slots:
        slot.reset()
    seed_everything(run.config.run.rdm_seed + index)
    split = run.splits[index]
    loaders = make_loaders(run, split, index)
    fold = Fold(index, len(run.splits), split, loaders, slots)
    path = state_path or resume.state_path(run.res_dir, index)
    return Cohort([fold], stacks, loaders, path, saved=saved, scalers=new_scalers(run, stacks))


def new_scalers(run: Run, stacks: list[Stack]) -> list[Any]:
    """A fresh fp16 loss scaler per stack (None each under another precision)."""
    return [precision.new_scaler(run.config.run.precision, run.device) for _ in stacks]


def read(loader: Any, failure: Callable[[Exception], Exception]) -> Iterator[Any]:
    """Each batch of ``loader``; a failure to give one is raised as ``failure(error)`` (one line),
    an :class:`IzitorchError` as it is."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except IzitorchError:
            raise
        except Exception as error:
            raise failure(error) from None
        yield batch


def batches(run: Run, cohort: Cohort, phase: str) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor | None]]:
    """``(inputs, target, rows or None)`` on the run's device for each batch of ``phase``.

    A dataset failing to give a batch (a sample raising, items that do not collate,
    ``__len__`` beyond the data, in this process or a worker) is a one-line
    :class:`TrainingError` naming the dataset, the phase and the sample where known.
    """
    device, non_blocking = run.device, run.device.type == "cuda"
    loader = cohort.loaders[phase]
    move = not getattr(loader, "on_device", False)
    if phase == "train":
        sharding.set_epoch(loader, cohort.folds[0].epoch)
    for batch in read(loader, lambda error: loading_error(run.config, error, f"the {phase} set{_where(cohort)}")):
        if move:
            batch = to_device(batch, device, non_blocking)
        if cohort.with_rows:
            yield batch
        else:
            inputs, target = unpack(batch)
            yield inputs, target, None


def _where(cohort: Cohort) -> str:
    epoch = cohort.folds[0].epoch
    if not epoch:
        return ""
    return f" (fold {cohort.folds[0].index + 1}, epoch {epoch})" if len(cohort.folds) == 1 else f" (epoch {epoch})"


def unpack(batch: Any) -> tuple[Any, torch.Tensor]:
    """A collated batch as ``(inputs, target)``; anything else is a one-line TrainingError."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    # a collated batch of bare tensors is itself a tensor: its len() is the batch size, not an item's
    got = f"items of {len(batch)} elements" if isinstance(batch, (list, tuple)) else f"{type(batch).__name__} items"
    raise TrainingError(f"the dataset yields {got}; izitorch expects (input, target) pairs from __getitem__")
