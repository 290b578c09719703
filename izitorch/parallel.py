"""Parallel folds: the k folds of a cross-validation trained at once (``[plugins.kfold] parallel = true``).

Sequential folds pass over the data k times per epoch with one small model each; here every
model gets one member per fold (a copy with the model's initial weights and a fresh optimizer),
all members are stacked into vectorized groups (:mod:`izitorch.ensemble`), and one shuffled pass
over the samples trains them all. Member k's loss on a batch is its criterion reduced over the
samples of the batch that fold k trains on only: its test and validation samples contribute an
exact zero to its loss and to its gradient (``masked_loss``).

What differs from sequential folds is the batches: a fold's model sees batches drawn from the
whole dataset, of which about (k-1)/k are its own, so its effective batch is a little smaller
and it takes about k/(k-1) times as many steps per epoch (a batch with none of its samples is
skipped for it). Results are close to sequential folds but not identical. BatchNorm is refused:
its batch statistics would mix every sample of the batch, test samples included, into the
training of each fold.

Hooks see each fold as a sequential run shows it: ``izitorch_fold_start``, ``epoch_start``,
``epoch_finish``, ``should_stop`` and ``fold_finish`` get that fold's :class:`Fold` and slots, in
fold order within an epoch. Plugins keep one state per fold: before a fold's hooks run, its
state is loaded into them (``izitorch_load_state_dict``) and taken back after
(``izitorch_state_dict``), the contract exact resume already asks of every stateful plugin.
The folds advance together, so their resume state is one file (``resume.parallel_state_path``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import types
import weakref
from typing import Any, Iterator

import attrs
import numpy as np
import torch
from torch import nn

from izitorch import ensemble, resume
from izitorch.data import make_loader
from izitorch.errors import IzitorchError
from izitorch.io import commit, save_torch
from izitorch.loop import epoch_pass, kept_weights
from izitorch.reproducibility import seed_everything
from izitorch.state import Fold, Run, Scores, Slot

OPTION = "parallel = true"
KEY = "plugins.kfold.parallel"  # where OPTION is set: every refusal names it (the CLI adds the file)


@attrs.define
class SampleMasks:
    """Which samples each member of each group trains on: ``[K, N]`` bool per group."""

    by_member: list[torch.Tensor]

    def for_group(self, index: int, rows: torch.Tensor) -> torch.Tensor:
        """``[K, B]``: for the batch's dataset ``rows``, whether member k trains on each."""
        return self.by_member[index].index_select(1, rows)


def run_parallel(run: Run, resuming: bool) -> dict[str, list[dict]]:
    """Train every fold of ``run.splits`` at once; return each model's final test scores per fold."""
    folds, passes = _prepare(run)
    hook, epochs, states = run.hook, run.config.run.epochs, _PluginStates(run)
    saved = resume.load_file(run, resume.parallel_state_path(run.res_dir)) if resuming else None
    if saved is not None:
        first = _restore(run, folds, passes, states, saved)
        if not resume.parallel_needs_training(saved, epochs):  # finished: nothing to retrain (more epochs extend it)
            return _results(run, [resume.final_scores(fold) for fold in saved["folds"]])
    else:
        first = 1
        for fold in folds:
            hook.izitorch_fold_start(run=run, fold=fold)
            states.take(fold)
    for epoch in range(first, epochs + 1):
        running = [fold for fold in folds if not fold.stop_reason]
        if not running:
            break
        for fold in running:
            fold.epoch = epoch
            with states.of(fold):
                hook.izitorch_epoch_start(run=run, fold=fold, epoch=epoch)
        trained = _shared_pass(run, passes, "train", running)
        for fold in running:
            for slot in fold.slots:
                if slot.scheduler is not None and not slot.stopped:
                    slot.scheduler.step()
        phase = folds[0].eval_phase
        evaluated = _shared_pass(run, passes, phase, running) if epoch % run.config.run.test_epoch == 0 or epoch == epochs else {}
        for fold in running:
            _finish_epoch(run, fold, epoch, {"train": trained, phase: evaluated}, states)
        _save(run, folds, passes, states, epoch, final=False)
    with kept_weights([slot for fold in folds for slot in fold.slots]):
        tested = _shared_pass(run, passes, "test", folds)
        for fold in folds:
            fold.final_scores = {slot.name: tested[slot] for slot in fold.slots}
            with states.of(fold):
                hook.izitorch_fold_finish(run=run, fold=fold)
    _save(run, folds, passes, states, max(fold.epoch for fold in folds), final=True)
    return _results(run, [fold.final_scores for fold in folds])


def _shared_pass(run: Run, passes: dict[str, Fold], phase: str, folds: list[Fold]) -> dict[Slot, dict]:
    """One pass over the data of ``phase`` for the members of ``folds``, each on its own samples."""
    shared = passes[phase]
    shared.epoch, shared.parts, shared.slots = folds[0].epoch, folds, [slot for fold in folds for slot in fold.slots]
    return epoch_pass(run, shared, phase)


def _finish_epoch(run: Run, fold: Fold, epoch: int, passes: dict[str, dict[Slot, dict]], states: "_PluginStates") -> None:
    scores = Scores(epoch)
    for phase, values in passes.items():
        scores.add(phase, {slot.name: values[slot] for slot in fold.slots if slot in values})
    with states.of(fold):
        run.hook.izitorch_epoch_finish(run=run, fold=fold, epoch=epoch, scores=scores)
        fold.stop_reason = run.hook.izitorch_should_stop(run=run, fold=fold, epoch=epoch, scores=scores)
    if not fold.stop_reason and all(slot.stopped for slot in fold.slots):
        fold.stop_reason = f"every model stopped (epoch {epoch})"


def _results(run: Run, finals: list[dict[str, dict]]) -> dict[str, list[dict]]:
    return {slot.name: [final[slot.name] for final in finals] for slot in run.slots}


# -- set-up -------------------------------------------------------------------------------------

def _prepare(run: Run) -> tuple[list[Fold], dict[str, Fold]]:
    """One member per model and fold, grouped; the folds, and per phase the pass that serves them all.

    A pass (train, val, test) goes once over the samples that some fold uses in that phase;
    its masks say which member counts which sample (``fold.masks``, see :func:`epoch_pass`).
    """
    check(run)
    count, seed = len(run.splits), run.config.run.rdm_seed
    for slot in run.slots:
        slot.reset()
    members = [[_member(slot) for slot in run.slots] for _ in range(count)]
    groups, singles, reasons = ensemble.group_slots([slot for fold in members for slot in fold])
    if singles:
        raise IzitorchError(f"{OPTION} trains every model as a vectorized group, but {reasons[0]}; set parallel = false", KEY)
    run.groups, run.singles = groups, []
    seed_everything(seed)
    fold_of = {slot: index for index, slots in enumerate(members) for slot in slots}
    passes = {}
    for phase in ("train", "val", "test"):
        parts = [getattr(split, phase) for split in run.splits]
        if parts[0] is None:
            continue
        used = torch.zeros(count, len(run.dataset), dtype=torch.bool)
        for index, indices in enumerate(parts):
            used[index, torch.as_tensor(indices, dtype=torch.long)] = True
        loader = make_loader(run, np.unique(np.concatenate(parts)), seed, shuffle=phase == "train" and run.config.run.shuffle, with_rows=True)
        masks = SampleMasks([used[[fold_of[slot] for slot in group.slots]].to(run.device) for group in groups])
        passes[phase] = Fold(0, count, run.splits[0], {phase: loader}, [], masks=masks)
    # the folds' loaders are the shared passes' (each fold's own samples: fold.split)
    loaders = {phase: shared.loaders[phase] for phase, shared in passes.items()}
    folds = [Fold(index, count, split, loaders, slots) for index, (split, slots) in enumerate(zip(run.splits, members))]
    return folds, passes


def check(run: Run) -> None:
    """Refuse what parallel folds cannot do faithfully, with the reason and the way out."""
    if run.config.run.multi_model == "sequential":
        raise IzitorchError(f'{OPTION} trains the folds as vectorized groups; it cannot run with multi_model = "sequential": drop one of them', KEY)
    for slot in run.slots:
        why = ensemble.why_not_vectorizable(slot)
        if why:
            raise IzitorchError(f"{OPTION} trains every model as a vectorized group, but {slot.name}: {why}; set parallel = false", KEY)
        if not ensemble.supports_masked_loss(slot.criterion):
            raise IzitorchError(f"model {slot.name}: {OPTION} needs a CrossEntropyLoss, MSELoss or L1Loss criterion with reduction "
                                f"mean or sum (it has {type(slot.criterion).__name__}); set parallel = false", KEY)
        for name, module in slot.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise IzitorchError(f"model {slot.name}: module {name!r} is a BatchNorm, whose batch statistics would mix each fold's "
                                    f"test samples into its training; set parallel = false", KEY)


def _member(slot: Slot) -> Slot:
    """A copy of ``slot`` at its initial state (one deepcopy, so the optimizer holds the copy's parameters)."""
    model, criterion, optimizer, scheduler = copy.deepcopy((slot.model, slot.criterion, slot.optimizer, slot.scheduler))
    if hasattr(slot.optimizer.step, "_wrapped_by_lr_sched"):
        _mark_step_calls(optimizer)
    member = Slot(slot.name, slot.spec, model, criterion, optimizer, scheduler)
    member.snapshot_initial_state()
    return member


def _mark_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """Wrap ``optimizer.step`` as an LR scheduler's constructor wraps its optimizer's (torch's
    ``patch_track_step_called``: it marks ``_opt_called`` and carries the ``_wrapped_by_lr_sched``
    flag, which is what the scheduler checks; a group never calls a member's own step, it marks
    ``_opt_called`` itself). A deepcopy loses that
    wrapper (``Optimizer.__getstate__`` keeps no instance attributes), and without it the
    copy's scheduler warns at its first step that ``optimizer.step()`` was overridden."""
    optimizer_ref = weakref.ref(optimizer)  # no reference cycle, as in torch
    step = type(optimizer).step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        target = optimizer_ref()
        target._opt_called = True
        return step(target, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


# -- one plugin state per fold -----------------------------------------------------------------

class _PluginStates:
    """Each fold's plugin state, swapped into the plugins around that fold's hooks."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.states: dict[int, dict] = {}

    def take(self, fold: Fold) -> None:
        """Keep what the plugins hold now as ``fold``'s state (a copy: plugins may keep mutating theirs)."""
        self.states[fold.index] = copy.deepcopy(resume.plugin_states(self.run))

    @contextlib.contextmanager
    def of(self, fold: Fold) -> Iterator[None]:
        """``fold``'s state in the plugins around the block. Loaded without a copy: whatever the
        plugins then change in it is replaced by the copy ``take`` keeps right after."""
        self.run.hook.izitorch_load_state_dict(run=self.run, state=self.states[fold.index])
        yield
        self.take(fold)


# -- resume --------------------------------------------------------------------------------------

def _loaders(passes: dict[str, Fold]) -> Any:
    """Every loader whose generator the resume state keeps (``resume`` reads ``.loaders``)."""
    return types.SimpleNamespace(loaders={phase: shared.loaders[phase] for phase, shared in passes.items()})


def _save(run: Run, folds: list[Fold], passes: dict[str, Fold], states: _PluginStates, epoch: int, final: bool) -> None:
    state = {
        "format": resume.FORMAT,
        "fingerprint": resume.saved_fingerprint(run),
        "parallel": len(folds),
        "epoch": epoch,
        "final": final,
        "folds": [{
            "epoch": fold.epoch,
            "stop_reason": fold.stop_reason,
            "final_scores": resume.tensorise(fold.final_scores) if final else None,
            "slots": {slot.name: resume.slot_state(slot, grouped=True) for slot in fold.slots},
            "plugins": states.states[fold.index],
        } for fold in folds],
        "groups": [group.state_dict() for group in run.groups],
        "rng": resume.rng_state(_loaders(passes)),
    }
    save_torch(resume.parallel_state_path(run.res_dir), state)
    commit()  # the state is the epoch's last file


def _restore(run: Run, folds: list[Fold], passes: dict[str, Fold], states: _PluginStates, saved: dict) -> int:
    """Put every fold back where the saved state left it; return the first epoch still to train."""
    if saved.get("parallel") != len(folds):
        raise IzitorchError(f"cannot resume: the saved parallel run has {saved.get('parallel')} folds, this one {len(folds)}; start over with --overwrite")
    for fold, entry in zip(folds, saved["folds"]):
        for slot in fold.slots:
            resume.restore_slot(run, slot, entry["slots"].get(slot.name))
        fold.epoch, fold.stop_reason = entry["epoch"], entry["stop_reason"]
        states.states[fold.index] = entry["plugins"]
    resume.restore_groups(run, saved["groups"])
    resume.set_rng_state(_loaders(passes), saved["rng"])
    return saved["epoch"] + 1
