"""When learning-rate schedulers step: after each epoch, after each optimizer step, or on the
monitored metric.

``scheduler = { class = ..., interval = "epoch" | "step", ... }`` (:class:`izitorch.config.SchedulerSpec`):

- ``"epoch"`` (the default): once per epoch, after its training pass;
- ``"step"``: after each optimizer step the model takes (with ``[run] accumulate = N``, once per
  N batches). A step that does not happen does not count: a window skipped by the NaN policy, an
  fp16 step skipped because its gradients overflowed, a batch of parallel folds without any of
  the fold's samples. A schedule then never runs ahead of its optimizer (``OneCycleLR`` raises
  past its ``total_steps``); it may end a few steps short;
- ``ReduceLROnPlateau``: after each evaluated epoch, with the value of ``[run] best_metric`` (the
  run's :class:`~izitorch.selection.Selection`) on the validation set. Its ``mode`` follows the
  metric's direction; one written in the manifest must agree. Without a validation set the value
  would be the test set's, which would then steer training: refused.

The same code steps a lone model, each member of a vectorized group (a member's scheduler sets
its own optimizer's ``param_groups``, which the stacked optimizer reads at every step) and each
fold of parallel folds. The scheduler's state is in the resume state, saved at the end of an
epoch, where a resume starts again.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch

from izitorch.config import SchedulerSpec
from izitorch.diagnose import what
from izitorch.errors import ManifestError, TrainingError, describe
from izitorch.references import resolve
from izitorch.selection import Selection
from izitorch.state import Fold, Scores, Slot

PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau
#: ReduceLROnPlateau's ``mode`` for a metric's direction
MODES = {"lower": "min", "higher": "max"}


def interval(slot: Slot) -> str:
    """``"epoch"`` or ``"step"``: when ``slot``'s scheduler steps (a slot built without a spec: each epoch)."""
    spec = slot.spec.scheduler if slot.spec is not None else None
    return getattr(spec, "interval", "epoch")


# -- building ---------------------------------------------------------------------------------


def arguments(spec: SchedulerSpec, where: str, base_dir: str, selection: Selection, validation: bool) -> dict:
    """The keyword arguments ``spec``'s scheduler is built with: its own, and for a
    ``ReduceLROnPlateau`` class the ``mode`` of the metric it watches (a ``mode`` that disagrees
    is refused in one line naming it)."""
    try:
        target = resolve(spec.target, base_dir) if isinstance(spec.target, str) else spec.target
    except ManifestError:  # building it says what is wrong, at its key
        return spec.params
    if not (inspect.isclass(target) and issubclass(target, PLATEAU)):
        return spec.params
    check_plateau(spec, where, selection, validation)
    mode = MODES[selection.direction]
    written = spec.params.get("mode", mode)
    if written != mode:
        raise ManifestError(_mode_mismatch(written, selection), f"{where}.mode")
    return {**spec.params, "mode": mode}


def check_built(scheduler: Any, spec: SchedulerSpec, where: str, selection: Selection, validation: bool) -> None:
    """Refuse a built ``ReduceLROnPlateau`` (from a factory, or given to the Rack) that cannot
    watch the run's metric, or watches it the wrong way round."""
    if not isinstance(scheduler, PLATEAU):
        return
    check_plateau(spec, where, selection, validation)
    if scheduler.mode != MODES[selection.direction]:
        raise ManifestError(_mode_mismatch(scheduler.mode, selection), where)


def check_plateau(spec: SchedulerSpec, where: str, selection: Selection, validation: bool) -> None:
    """What a ``ReduceLROnPlateau`` needs: a metric, a validation set, stepping per epoch."""
    if spec.interval != "epoch":
        raise ManifestError(
            f'ReduceLROnPlateau steps on [run] best_metric after each evaluated epoch, not per optimizer step: remove interval = "{spec.interval}"',
            f"{where}.interval",
        )
    if selection.key is None or selection.direction is None:
        raise ManifestError('ReduceLROnPlateau needs a metric to watch, and "loss" is not registered: set [run] best_metric', where)
    if not validation:
        raise ManifestError(
            "ReduceLROnPlateau steps on [run] best_metric of the evaluated set; without a validation set that is "
            "the test set, whose scores would then steer training: set [data] validation = true",
            where,
        )


def _mode_mismatch(mode: Any, selection: Selection) -> str:
    wanted = MODES[selection.direction]
    return (
        f'ReduceLROnPlateau has mode = {describe(mode)} but watches [run] best_metric "{selection.key}", which is better {selection.direction}: '
        f'use mode = "{wanted}", or leave mode out (izitorch sets it)'
    )


def check_total_steps(slots: Sequence[Slot], batches: int, accumulate: int, epochs: int, models: Sequence[Any]) -> None:
    """Refuse, before training, a scheduler with a ``total_steps`` (``OneCycleLR``) shorter than
    the steps the run may take: it would raise at the step past it, in the middle of the run.
    A model steps at most ``ceil(batches / accumulate)`` times an epoch (``batches``: the most
    training batches an epoch of any fold has)."""
    per_epoch = math.ceil(batches / accumulate)
    for slot in slots:
        total = getattr(slot.scheduler, "total_steps", None)
        if not isinstance(total, int):
            continue
        steps = epochs * (per_epoch if interval(slot) == "step" else 1)
        if total >= steps:
            continue
        index = next((i for i, spec in enumerate(models) if spec.name == slot.name), 0)
        if interval(slot) == "step":
            count = f"{epochs} epochs of {per_epoch} optimizer steps" + (f": {batches} batches, accumulate = {accumulate}" if accumulate > 1 else "")
        else:
            count = f'{epochs} epochs, one step each: interval = "epoch"'
        raise ManifestError(
            f"{type(slot.scheduler).__name__} has total_steps = {total}, fewer than the {steps} steps of this run ({count}); set total_steps = {steps}",
            f"models[{index}].scheduler.total_steps",
        )


# -- stepping ---------------------------------------------------------------------------------


def per_step(slots: Sequence[Slot]) -> list[Any] | None:
    """Each member's scheduler that steps with the optimizer (None where it has none), or None
    when no member has one: the engine then does nothing more per step."""
    schedulers = [slot.scheduler if slot.scheduler is not None and interval(slot) == "step" else None for slot in slots]
    return schedulers if any(scheduler is not None for scheduler in schedulers) else None


def after_optimizer_step(slots: Sequence[Slot], schedulers: Sequence[Any], stepped: Sequence[bool]) -> None:
    """Step the per-step scheduler of each member that has just taken an optimizer step."""
    for slot, scheduler, moved in zip(slots, schedulers, stepped):
        if scheduler is not None and moved:
            _step(slot, scheduler)


def after_training(slots: Sequence[Slot]) -> None:
    """Step each epoch scheduler (not ``ReduceLROnPlateau``'s) of the models that trained this epoch."""
    for slot in slots:
        if slot.scheduler is not None and not slot.stopped and interval(slot) == "epoch" and not isinstance(slot.scheduler, PLATEAU):
            _step(slot, slot.scheduler)


def after_evaluation(selection: Selection, fold: Fold, scores: Scores) -> None:
    """Step each ``ReduceLROnPlateau`` of ``fold`` with its model's value of the watched metric on
    this epoch's evaluation (epochs that are not evaluated do not step it)."""
    for slot in fold.slots:
        if not isinstance(slot.scheduler, PLATEAU) or slot.stopped or slot.name not in scores:
            continue
        value = scores[slot.name].get(fold.eval_phase, {}).get(selection.key)
        if value is not None:
            _step(slot, slot.scheduler, float(value))


def _step(slot: Slot, scheduler: Any, *metric: float) -> None:
    try:
        scheduler.step(*metric)
    except Exception as error:  # a user's scheduler may raise anything
        raise TrainingError(f"model {slot.name}: the scheduler's step failed: {what(error)}") from None
