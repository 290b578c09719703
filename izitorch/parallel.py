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

This module only sets the run up: the members, their stacks and masks, the shared loaders, as
one :class:`~izitorch.cohort.Cohort` of every fold. The fold protocol that trains it, its hooks
(each fold's, in fold order within an epoch) and its resume state are the same code as for
sequential folds (:func:`izitorch.loop.train`).
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

from izitorch import ensemble, resume
from izitorch.cohort import Cohort, new_scalers
from izitorch.data import make_loader
from izitorch.errors import IzitorchError
from izitorch.loop import train
from izitorch.reproducibility import seed_everything
from izitorch.stacks import VectorStack
from izitorch.state import Fold, Run, Slot

OPTION = "parallel = true"
KEY = "plugins.kfold.parallel"  # where OPTION is set: every refusal names it (the CLI adds the file)


def run_parallel(run: Run, resuming: bool) -> dict[str, list[dict]]:
    """Train every fold of ``run.splits`` at once; return each model's final test scores per fold."""
    saved = resume.load_file(run, resume.parallel_state_path(run.res_dir)) if resuming else None
    if not resume.needs_training(saved, run.config.run.epochs):  # finished: nothing to retrain (more epochs extend it)
        finals = [resume.final_scores(fold) for fold in saved["folds"]]
    else:
        finals = train(run, _prepare(run, saved))
    return {slot.name: [final[slot.name] for final in finals] for slot in run.slots}


# -- set-up -------------------------------------------------------------------------------------


def _prepare(run: Run, saved: dict | None) -> Cohort:
    """One member per model and fold, all in vector stacks, and per phase one loader that
    goes once over the samples some fold uses in that phase; each stack's ``sample_masks``
    say which member counts which sample."""
    check(run)
    count, seed, classes = len(run.splits), run.config.run.rdm_seed, run.config.data.num_classes
    for slot in run.slots:
        slot.reset()
    members = [[_member(slot) for slot in run.slots] for _ in range(count)]
    groups, singles, reasons = ensemble.group_slots([slot for fold in members for slot in fold])
    if singles:
        raise IzitorchError(f"{OPTION} trains every model as a vectorized group, but {reasons[0]}; set parallel = false", KEY)
    seed_everything(seed)
    fold_of = {slot: index for index, slots in enumerate(members) for slot in slots}
    loaders, used = {}, {}
    for phase in ("train", "val", "test"):
        parts = [getattr(split, phase) for split in run.splits]
        if parts[0] is None:
            continue
        used[phase] = torch.zeros(count, len(run.dataset), dtype=torch.bool)
        for index, indices in enumerate(parts):
            used[phase][index, torch.as_tensor(indices, dtype=torch.long)] = True
        loaders[phase] = make_loader(run, np.unique(np.concatenate(parts)), seed, training=phase == "train", with_rows=True)
    stacks = [
        VectorStack(group, classes, {phase: mask[[fold_of[slot] for slot in group.slots]].to(run.device) for phase, mask in used.items()}) for group in groups
    ]
    # each fold's loaders are the shared ones (a fold's own samples: fold.split)
    folds = [Fold(index, count, split, loaders, slots) for index, (split, slots) in enumerate(zip(run.splits, members))]
    if run.config.run.compile:
        for stack in stacks:
            stack.compile()
    return Cohort(folds, stacks, loaders, resume.parallel_state_path(run.res_dir), with_rows=True, saved=saved, scalers=new_scalers(run, stacks))


def check(run: Run) -> None:
    """Refuse what parallel folds cannot do faithfully, with the reason and the way out."""
    if run.config.data.sampler is not None:
        raise IzitorchError(
            f"{OPTION} draws one pass of batches for every fold, so a sampler cannot draw from each fold's own training samples; "
            "drop [data] sampler or set parallel = false",
            KEY,
        )
    if run.config.run.multi_model == "sequential":
        raise IzitorchError(f'{OPTION} trains the folds as vectorized groups; it cannot run with multi_model = "sequential": drop one of them', KEY)
    for slot in run.slots:
        why = ensemble.why_not_vectorizable(slot)
        if why:
            raise IzitorchError(f"{OPTION} trains every model as a vectorized group, but {slot.name}: {why}; set parallel = false", KEY)
        if not ensemble.supports_masked_loss(slot.criterion):
            raise IzitorchError(
                f"model {slot.name}: {OPTION} needs a CrossEntropyLoss, MSELoss or L1Loss criterion with reduction "
                f"mean or sum (it has {type(slot.criterion).__name__}); set parallel = false",
                KEY,
            )
        for name, module in slot.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise IzitorchError(
                    f"model {slot.name}: module {name!r} is a BatchNorm, whose batch statistics would mix each fold's "
                    f"test samples into its training; set parallel = false",
                    KEY,
                )


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
