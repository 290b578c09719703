"""The step, written once for every stack: what one batch does to K members.

A :class:`StackPass` is one stack's share of one pass over the data (a training epoch, an
evaluation). Its batch function is chosen once, when the pass starts (train or evaluate, as
Ignite's engines choose their step), so the loop calls the same method for every stack and
never asks which kind it holds.

A training batch: forward and loss of the active members, then the NaN policy on the losses
(one device synchronisation for the whole stack), then backward, ``izitorch_before_optimizer_step``
per member that steps, the optimizer step of those members, then the per-step scheduler of each
member whose optimizer stepped (:mod:`izitorch.schedules`). Members that are frozen (a
stopped model, another fold's member in an evaluation of parallel folds, a member without a
sample of its own in the batch) neither move nor count in the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch

from izitorch import precision, schedules, sharding
from izitorch.diagnose import hint, what
from izitorch.errors import IzitorchError, TrainingError
from izitorch.metrics import compute_all, meters_for, update_all
from izitorch.predictions import PredictionRecord
from izitorch.stacks import Stack
from izitorch.state import Fold, Run, Slot


class StackPass:
    """One stack's part of a pass: its step, its metrics, its skipped batches.

    ``fold_of`` maps each member taking part in the pass to its fold (the NaN policy names
    it); the other members of the stack are frozen. ``scaler`` is the stack's fp16 loss scaler
    (or None); ``batches`` how many batches the pass has (accumulation closes its last window
    on the last one); ``record``: keep each sample's predicted class (the final test).
    """

    def __init__(
        self,
        run: Run,
        stack: Stack,
        phase: str,
        fold_of: dict[Slot, Fold],
        before_step: Callable | None,
        scaler: Any = None,
        batches: int = 0,
        record: bool = False,
    ) -> None:
        self.run, self.stack, self.phase, self.fold_of, self.before_step = run, stack, phase, fold_of, before_step
        train = phase == "train"
        self.active = [slot in fold_of and not (train and slot.stopped) for slot in stack.members]
        self.whole = all(self.active)  # no member frozen: no flags to pass on
        self.skipped = [0] * len(stack.members)
        self.meters = meters_for(run.metric_factories, run.config.data.num_classes, len(stack.members))
        self.record = PredictionRecord(len(stack.members)) if record else None  # the final test's predictions
        self.losses: torch.Tensor | None = None  # the last batch's per-member losses
        self.counted: list[bool] = []  # the members that batch counted
        self.autocast = precision.autocast(run.config.run.precision, run.device)
        self.scaler, self.scaled = scaler, precision.ScaledStep(stack) if scaler is not None else None
        self.accumulate, self.batches = run.config.run.accumulate, batches
        # a mean-reduced loss counts for its samples in a window: one step on the window's samples
        self.by_count = self.accumulate > 1 and getattr(stack.members[0].criterion, "reduction", "mean") != "sum"
        self.window_left, self.window_ok, self.window_samples, self.scale = 0, [], 0, None
        self.batch = self._train if train else self._evaluate
        #: Seconds spent in this stack's batches (the loop adds them up): each member's share of
        #: the pass is its stack's time over the members taking part. Measured on the CPU only:
        #: on a GPU the host returns before the kernels have run.
        self.seconds = 0.0
        self.sharing = max(1, sum(self.active))
        self.schedulers = schedules.per_step(stack.members) if train else None  # those stepping with the optimizer
        self.step = 0
        self.ranks = run.ranks if sharding.active(run.ranks) else None  # data-parallel: what the ranks must agree on
        self.stop_agreed: int | None = None  # data-parallel: the signal some rank had by this step
        self.agreed_at = 0  # ... and the step that agreed on it

    def _train(self, inputs: Any, target: torch.Tensor, rows: torch.Tensor | None) -> None:
        self.step += 1
        active = self.active
        if not any(active):
            self.losses = None
            return
        stack = self.stack
        if not self.window_left:
            self._open_window()
        mask = stack.batch_mask(self.phase, rows)
        with self.autocast:
            outputs = stack.forward(inputs, None if self.whole else active)
            losses = stack.losses(outputs, target, mask)
        stepping = self._guard(losses, mask)
        self.window_ok = [ok and steps for ok, steps in zip(self.window_ok, stepping)]
        self.window_left -= 1
        factor = self.scale
        if self.by_count:
            samples = target.shape[0] if mask is None else mask.sum(1)
            self.window_samples = self.window_samples + samples
            factor = samples if factor is None else factor * samples
        stepped = False
        try:
            if any(stepping):
                stack.backward(losses, factor)
            if not self.window_left and any(self.window_ok):
                stepped = self._optimizer_step(self.window_ok)
        except IzitorchError:  # a plugin's before-step hook already said what failed
            raise
        except Exception as error:  # a user's optimizer may raise anything
            raise TrainingError(f"{stack.label}: the backward pass or optimizer step failed: {what(error)}{hint(error)}") from None
        if stepped and self.schedulers is not None:
            schedules.after_optimizer_step(stack.members, self.schedulers, self.window_ok)
        self._count(outputs.detach(), target, losses.detach(), mask, stepping)

    def _open_window(self) -> None:
        """Gradients start from zero for the next ``accumulate`` batches (fewer at the end of
        the pass). A mean-reduced loss is weighted by its batch's samples (a member's own, with
        sample masks) and the gradients divided by the window's before the step: the step is
        the one the window's samples would give as one batch."""
        self.stack.zero_grad()
        size = min(self.accumulate, self.batches - self.step + 1) if self.batches else self.accumulate
        self.window_left, self.window_ok, self.window_samples = size, list(self.active), 0
        if self.scaler is not None:  # the scale as a tensor: reading it back would synchronise the device
            self.scale = self.scaler.scale(torch.ones((), device=self.run.device))

    def _optimizer_step(self, stepping: list[bool]) -> bool:
        """``izitorch_before_optimizer_step`` for each member that steps, then the update (fp16:
        on unscaled gradients, skipped when they overflowed, as ``GradScaler.step`` does).
        Return whether the update took place."""
        if self.ranks is not None:
            self.stack.reduce_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.scaled)
        if self.by_count:
            samples = self.window_samples
            self.stack.scale_grads(1.0 / samples if isinstance(samples, int) else 1.0 / samples.clamp(min=1))
        if self.before_step is not None:
            for slot, steps in zip(self.stack.members, stepping):
                if steps:
                    self.before_step(run=self.run, slot=slot)
        if self.scaler is None:
            self.stack.step(stepping)
            return True
        self.scaled.stepping, self.scaled.stepped = stepping, False
        self.scaler.step(self.scaled)
        self.scaler.update()
        return self.scaled.stepped

    def _evaluate(self, inputs: Any, target: torch.Tensor, rows: torch.Tensor | None) -> None:
        self.step += 1
        if not any(self.active):
            return
        mask = self.stack.batch_mask(self.phase, rows)
        with self.autocast:
            outputs = self.stack.forward(inputs, None if self.whole else self.active)
            losses = self.stack.losses(outputs, target, mask)
        self._count(outputs, target, losses, mask, self.active)

    def _guard(self, losses: torch.Tensor, mask: torch.Tensor | None) -> list[bool]:
        """Which members step on this batch: active ones with a finite loss (``nan_policy``)
        and, with sample masks, at least one sample of their own in the batch."""
        if self.ranks is not None:  # every rank decides on the same numbers, and stops at the same step
            values, self.stop_agreed = sharding.agree(losses, self.run.stop_flag, self.ranks)
            self.agreed_at = self.step
            counts = None  # no sample masks: parallel folds do not run under torchrun
        elif mask is None:
            values, counts = losses.tolist(), None  # the one per-step synchronisation
        else:  # both read back in one transfer
            values, counts = torch.stack([losses.detach().double(), mask.sum(1).double()]).tolist()
        stepping = list(self.active)
        for k, value in enumerate(values):
            if not stepping[k]:
                continue
            if counts is not None and counts[k] == 0:
                stepping[k] = False
            elif not math.isfinite(value):
                stepping[k] = False
                self.skipped[k] += self._non_finite(self.stack.members[k], value)
                if self.stack.members[k].stopped:
                    self.active[k] = self.whole = False
        return stepping

    def _non_finite(self, slot: Slot, value: float) -> int:
        """Apply ``nan_policy`` to a non-finite loss; return 1 when the batch is skipped."""
        fold = self.fold_of[slot]
        where = f"loss is {value} at fold {fold.index + 1}, epoch {fold.epoch}, step {self.step}"
        policy = self.run.config.run.nan_policy
        if policy == "raise":
            raise TrainingError(f'model {slot.name}: {where}; lower the learning rate, clip gradients, or set nan_policy = "stop" / "skip_batch"')
        if policy == "stop":
            slot.stopped = f'{where} (nan_policy = "stop")'  # the console adds "<model> stopped: "
            return 0
        return 1

    def _count(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None, counted: list[bool]) -> None:
        """Add the batch to every metric, for the members in ``counted`` only."""
        self.losses, self.counted = losses, counted
        if not all(counted):  # frozen members count nothing
            flags = torch.tensor(counted, device=losses.device).reshape(-1, 1)
            mask = flags.expand(len(counted), target.shape[0]) if mask is None else mask & flags
        update_all(self.meters, outputs, target, losses, mask)
        if self.record is not None:
            self.record.update(outputs, target, mask)

    def member_losses(self, into: dict[Slot, tuple[StackPass, int]]) -> None:
        """Where the last batch's loss of each member that counted it is: ``into[slot] = (self, k)``."""
        if self.losses is not None:
            for k, slot in enumerate(self.stack.members):
                if self.counted[k]:
                    into[slot] = (self, k)

    def results(self, time_key: str, per_step: float) -> dict[Slot, dict[str, Any]]:
        """Each member's metrics for the pass, with the time per step of the whole pass, on the
        CPU the member's own share of the pass in seconds (``train_time`` or ``eval_time``), and
        any skipped batches."""
        train = self.phase == "train"
        results = {}
        recorded = self.record.compute() if self.record is not None else [{}] * len(self.stack.members)
        if self.ranks is not None:  # every rank's samples, counted once
            sharding.merge_meters(self.meters, self.ranks, self.run.device, self.run.stop_flag)
            if self.record is not None:
                recorded = sharding.gather_predictions(recorded, self.ranks, self.run.stop_flag)
        own = {"train_time" if train else "eval_time": self.seconds / self.sharing} if self.run.device.type == "cpu" else {}
        for k, (slot, values) in enumerate(zip(self.stack.members, compute_all(self.meters, len(self.stack.members)))):
            if slot not in self.fold_of or (train and slot.stopped and not values):
                continue
            results[slot] = {**values, **recorded[k], time_key: per_step, **own}
            if self.skipped[k]:
                results[slot]["skipped_batches"] = self.skipped[k]
        return results


def agreed_stop(passes: list[StackPass], local: int | None) -> int | None:
    """The signal to stop on after a batch of data-parallel training: the one the ranks agreed on
    in the step, so that every rank stops at the same step (``local``, this process's own, when
    no stack stepped)."""
    agreeing = [p for p in passes if p.agreed_at == p.step]
    if not agreeing:
        return local
    return next((p.stop_agreed for p in agreeing if p.stop_agreed is not None), None)


class BatchLosses(Mapping):
    """``izitorch_batch_finish``'s ``losses``: each model's loss tensor of the batch, by name.
    A member's tensor (a view of its stack's losses) is made only when a plugin reads it."""

    def __init__(self, where: dict[str, tuple[StackPass, int]]) -> None:
        self.where = where

    def __getitem__(self, name: str) -> torch.Tensor:
        stack, k = self.where[name]
        return stack.losses[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)
