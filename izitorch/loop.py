"""The essential plugin: the fold protocol and the one pass that trains and evaluates.

This is the whole training loop. A cohort (:mod:`izitorch.cohort`) is the folds trained
together: one at a time by default, all at once for parallel folds; either way the code below
trains it. What one batch does to a stack of models is :mod:`izitorch.engine`'s; everything
optional (checkpoints, logs, early stopping, clipping, progress bars) hooks in from plugins.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch

from izitorch import cohort as cohorts
from izitorch import resume, schedules, sharding, spread
from izitorch.engine import BatchLosses, StackPass, agreed_stop
from izitorch.guard import Interrupted
from izitorch.selection import note_epoch
from izitorch.hookspecs import hookimpl
from izitorch.state import Fold, Run, Scores, Slot


@hookimpl(trylast=True)
def izitorch_run_folds(run: Run, resuming: bool) -> dict[str, list[dict]]:
    """The folds one after another, each from the models' initial weights (see the hookspec);
    under torchrun with ``distributed = "models"``, this rank's share of them (:mod:`izitorch.spread`)."""
    if run.share is not None:
        return spread.run_share(run, resuming)
    results: dict[str, list[dict]] = {slot.name: [] for slot in run.slots}
    for index in range(len(run.splits)):
        saved = resume.load(run, index) if resuming else None
        if resume.needs_training(saved, run.config.run.epochs):
            fold = cohorts.sequential(run, index, saved).folds[0]
            final = run.hook.izitorch_run_fold(run=run, fold=fold)
        else:
            final = resume.final_scores(saved["folds"][0])
        for name, scores in final.items():
            results[name].append(scores)
    return results


@hookimpl(trylast=True)
def izitorch_run_fold(run: Run, fold: Fold) -> dict[str, dict]:
    return train(run, fold.cohort)[0]


def train(run: Run, cohort: cohorts.Cohort) -> list[dict[str, dict]]:
    """Train the cohort's folds to the end; return each fold's final test scores by model.

    See ``izitorch_run_fold`` in :mod:`izitorch.hookspecs` for the order of the hooks.
    """
    hook, epochs, folds = run.hook, run.config.run.epochs, cohort.folds
    # every fold's batches, so that the first fold already refuses what a later one would meet
    batches = max([len(cohort.loaders["train"])] + [sharding.batches_per_rank(len(split.train), run) for split in run.splits])
    schedules.check_total_steps(cohort.slots, batches, run.config.run.accumulate, epochs, run.config.models)
    for fold in folds:
        hook.izitorch_fold_start(run=run, fold=fold)
        cohort.take_plugin_state(run, fold)
    first = resume.restore(run, cohort, cohort.saved) if cohort.saved else 1
    for stack in cohort.stacks:
        stack.sync_from_members()  # the members were reset or restored behind the stack's back
    if sharding.active(run.ranks):
        sharding.from_rank_0_weights(cohort.stacks, run.ranks)
    for epoch in range(first, epochs + 1):
        running = [fold for fold in folds if not fold.stop_reason]
        if not running:
            break
        for fold in running:
            fold.epoch = epoch
            with cohort.hooks_of(run, fold):
                hook.izitorch_epoch_start(run=run, fold=fold, epoch=epoch)
        started = {slot: float(slot.optimizer.param_groups[0]["lr"]) for fold in running for slot in fold.slots}
        passes = {"train": epoch_pass(run, cohort, "train", running)}
        schedules.after_training([slot for fold in running for slot in fold.slots])
        phase = folds[0].eval_phase
        if epoch % run.config.run.test_epoch == 0 or epoch == epochs:
            passes[phase] = epoch_pass(run, cohort, phase, running)
        for fold in running:
            finish_epoch(run, cohort, fold, epoch, passes, started)
        resume.save(run, cohort, epoch)
    with kept_weights(cohort.slots):
        tested = epoch_pass(run, cohort, "test", folds, record=True)
        for fold in folds:
            fold.final_scores = {slot.name: {**tested[slot], **kept_and_timed(slot, fold)} for slot in fold.slots}
            with cohort.hooks_of(run, fold):
                hook.izitorch_fold_finish(run=run, fold=fold)
    resume.save(run, cohort, max(fold.epoch for fold in folds), final=True)
    return [fold.final_scores for fold in folds]


def kept_and_timed(slot: Slot, fold: Fold) -> dict[str, Any]:
    """What a model's final scores add to its test: the epoch whose weights were tested and,
    where measured, its training time per epoch (``train_time``, seconds)."""
    extra: dict[str, Any] = {"epoch": slot.kept_epoch if slot.kept_epoch is not None else fold.epoch}
    if slot.timed_epochs:
        extra["train_time"] = slot.train_seconds / slot.timed_epochs
    return extra


def finish_epoch(run: Run, cohort: cohorts.Cohort, fold: Fold, epoch: int, passes: dict[str, dict[Slot, dict]], started: dict[Slot, float]) -> None:
    """Each model's best epoch so far (:mod:`izitorch.selection`) and its ``ReduceLROnPlateau``
    step, then the epoch's scores to the plugins; the fold stops when one gives a reason or every
    model stopped."""
    scores = Scores(epoch, lrs={slot.name: started[slot] for slot in fold.slots if slot in passes["train"]})
    for slot in fold.slots:
        seconds = passes["train"].get(slot, {}).get("train_time")
        if seconds is not None:
            slot.train_seconds += seconds
            slot.timed_epochs += 1
    for phase, values in passes.items():
        scores.add(phase, {slot.name: values[slot] for slot in fold.slots if slot in values})
    note_epoch(run.selection, fold, epoch, scores)
    schedules.after_evaluation(run.selection, fold, scores)
    with cohort.hooks_of(run, fold):
        run.hook.izitorch_epoch_finish(run=run, fold=fold, epoch=epoch, scores=scores)
        fold.stop_reason = run.hook.izitorch_should_stop(run=run, fold=fold, epoch=epoch, scores=scores)
    if not fold.stop_reason and all(slot.stopped for slot in fold.slots):
        fold.stop_reason = f"every model stopped (epoch {epoch})"
    if sharding.active(run.ranks):
        sharding.follow_rank_0(fold, run.ranks, run.stop_flag)


@contextlib.contextmanager
def kept_weights(slots: list[Slot]) -> Iterator[None]:
    """Models hold the weights they kept (``Slot.keep_weights``: the best epoch's under ``[run]
    test_weights = "best"``) inside the block, their last epoch's after it: the final test scores
    the kept ones, a resume continues from the last."""
    last = {}
    for slot in slots:
        if slot.kept_state is not None:
            last[slot] = {k: v.clone() for k, v in slot.model.state_dict().items()}
            slot.model.load_state_dict(slot.kept_state)
    try:
        yield
    finally:
        for slot, state in last.items():
            slot.model.load_state_dict(state)


def epoch_pass(run: Run, cohort: cohorts.Cohort, phase: str, folds: list[Fold], record: bool = False) -> dict[Slot, dict[str, Any]]:
    """One pass over ``cohort.loaders[phase]`` for the models of ``folds``: trains when
    ``phase == "train"``, else evaluates. Returns each model's metrics with the time per step
    (``train_step_time`` or ``inference_time``) and, where the NaN policy skipped some, its
    ``skipped_batches``. Metrics accumulate on the device; the only per-batch synchronisation
    is the finiteness check of the training losses. ``record``: each model's per-sample
    predictions too (:mod:`izitorch.predictions`), for the final test.
    """
    train, hook = phase == "train", run.hook
    fold_of = {slot: fold for fold in folds for slot in fold.slots}
    before_step = hook.izitorch_before_optimizer_step if hook.izitorch_before_optimizer_step.get_hookimpls() else None
    batch_finish = hook.izitorch_batch_finish if train and hook.izitorch_batch_finish.get_hookimpls() else None
    batches = len(cohort.loaders[phase])
    stacks = [StackPass(run, stack, phase, fold_of, before_step, scaler, batches, record) for stack, scaler in zip(cohort.stacks, cohort.scalers)]
    for stack in cohort.stacks:
        stack.train(train)
    stop_flag, steps = run.stop_flag, 0
    agreeing = train and sharding.active(run.ranks)  # data-parallel: the ranks stop at the same step
    start = time.perf_counter()
    with torch.set_grad_enabled(train):
        for steps, (inputs, target, rows) in enumerate(cohorts.batches(run, cohort, phase), 1):
            mark = time.perf_counter()
            for stack in stacks:
                stack.batch(inputs, target, rows)
                now = time.perf_counter()
                stack.seconds += now - mark
                mark = now
            if batch_finish is not None:
                where: dict = {}
                for stack in stacks:
                    stack.member_losses(where)
                for fold in folds:
                    losses = BatchLosses({slot.name: where[slot] for slot in fold.slots if slot in where})
                    batch_finish(run=run, fold=fold, step=steps, losses=losses)
            if stop_flag is not None:
                signum = agreed_stop(stacks, stop_flag.signum) if agreeing else stop_flag.signum
                if signum is not None:
                    raise Interrupted(signum, "interrupted")
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    per_step = (time.perf_counter() - start) / max(steps, 1)
    time_key = "train_step_time" if train else "inference_time"
    results: dict[Slot, dict[str, Any]] = {}
    for stack in stacks:
        results.update(stack.results(time_key, per_step))
    return {slot: results[slot] for slot in fold_of if slot in results}
