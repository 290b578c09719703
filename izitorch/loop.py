"""The essential plugin: the fold protocol and the one pass that trains and evaluates.

This is the whole training loop. Everything optional (checkpoints, logs, early stopping,
clipping, progress bars) hooks in from plugins; the loop only computes losses and scores.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterator

import attrs
import torch
from torch import nn

from izitorch import resume
from izitorch.data import loading_error, make_loaders, to_device
from izitorch.errors import IzitorchError, TrainingError, error_text, first_line
from izitorch.guard import Interrupted
from izitorch.metrics import compute_all, meters_for
from izitorch.hookspecs import hookimpl
from izitorch.reproducibility import seed_everything
from izitorch.state import Fold, Run, Scores, Slot


@hookimpl(trylast=True)
def izitorch_run_folds(run: Run, resuming: bool) -> dict[str, list[dict]]:
    """The folds one after another, each from the models' initial weights (see the hookspec)."""
    epochs = run.config.run.epochs
    results: dict[str, list[dict]] = {slot.name: [] for slot in run.slots}
    for index, split in enumerate(run.splits):
        saved = resume.load(run, index) if resuming else None
        if resume.needs_training(saved, epochs):
            for slot in run.slots:
                slot.reset()
            seed_everything(run.config.run.rdm_seed + index)
            fold = Fold(index, len(run.splits), split, make_loaders(run, split, index), run.slots, resume_state=saved)
            final = run.hook.izitorch_run_fold(run=run, fold=fold)
        else:
            final = resume.final_scores(saved)
        for name, scores in final.items():
            results[name].append(scores)
    return results


@hookimpl(trylast=True)
def izitorch_run_fold(run: Run, fold: Fold) -> dict[str, dict]:
    hook, epochs = run.hook, run.config.run.epochs
    hook.izitorch_fold_start(run=run, fold=fold)
    for epoch in range(_first_epoch(run, fold), epochs + 1):
        fold.epoch = epoch
        hook.izitorch_epoch_start(run=run, fold=fold, epoch=epoch)
        scores = Scores(epoch)
        scores.add("train", run_epoch(run, fold, "train"))
        for slot in fold.slots:
            if slot.scheduler is not None and not slot.stopped:
                slot.scheduler.step()
        if epoch % run.config.run.test_epoch == 0 or epoch == epochs:
            scores.add(fold.eval_phase, run_epoch(run, fold, fold.eval_phase))
        hook.izitorch_epoch_finish(run=run, fold=fold, epoch=epoch, scores=scores)
        fold.stop_reason = hook.izitorch_should_stop(run=run, fold=fold, epoch=epoch, scores=scores)
        if not fold.stop_reason and all(slot.stopped for slot in fold.slots):
            fold.stop_reason = f"every model stopped (epoch {epoch})"
        resume.save(run, fold, epoch)
        if fold.stop_reason:
            break
    with kept_weights(fold.slots):
        fold.final_scores = run_epoch(run, fold, "test")
        hook.izitorch_fold_finish(run=run, fold=fold)
    resume.save(run, fold, fold.epoch, final=True)
    return fold.final_scores


def _first_epoch(run: Run, fold: Fold) -> int:
    """1, or after a resume the first epoch that did not finish (past the end if it stopped)."""
    first = resume.restore(run, fold, fold.resume_state) if fold.resume_state else 1
    for group in run.groups:
        group.sync_from_members()  # the members were reset or restored behind the group's back
    return run.config.run.epochs + 1 if fold.stop_reason else first


@contextlib.contextmanager
def kept_weights(slots: list[Slot]) -> Iterator[None]:
    """Models hold the weights they kept (``Slot.keep_weights``) inside the block, their last
    epoch's weights after it: the final test uses the kept ones, a resume continues the last."""
    last = {}
    for slot in slots:
        if slot.kept_state is not None:
            last[slot.name] = {k: v.clone() for k, v in slot.model.state_dict().items()}
            slot.model.load_state_dict(slot.kept_state)
    try:
        yield
    finally:
        for slot in slots:
            if slot.name in last:
                slot.model.load_state_dict(last[slot.name])


def run_epoch(run: Run, fold: Fold, phase: str) -> dict[str, dict[str, Any]]:
    """One pass over ``fold.loaders[phase]``: trains when ``phase == "train"``, else evaluates.

    Returns ``{slot name: {metric: value, "train_step_time" | "inference_time": seconds}}``
    for the fold's slots (see :func:`epoch_pass`).
    """
    return {slot.name: values for slot, values in epoch_pass(run, fold, phase).items()}


def epoch_pass(run: Run, fold: Fold, phase: str) -> dict[Slot, dict[str, Any]]:
    """:func:`run_epoch` keyed by slot, for passes whose slots share names (parallel folds).

    Vectorized groups (``run.groups``) take one forward/backward/step for their members in
    ``fold.slots`` (the others are frozen); the other slots (``run.singles``) step one after
    another on the same batch. With ``fold.masks`` (parallel folds), the loader yields
    ``(input, target, rows)`` and each member's loss and metrics count only the samples of the
    batch that its own fold uses in this phase. Metrics accumulate on the device; the only
    per-batch synchronisation is the finiteness check of the training losses (``nan_policy``).
    """
    train = phase == "train"
    members = set(fold.slots)
    singles = [slot for slot in run.singles if slot in members and not (train and slot.stopped)]
    classes = run.config.data.num_classes
    meters = {slot: meters_for(run.metric_factories, classes, 1) for slot in singles}
    group_meters = [meters_for(run.metric_factories, classes, len(group)) for group in run.groups]
    skipped = dict.fromkeys(fold.slots, 0)
    for group in run.groups:  # every member, those of folds that stopped too: a group runs in its first member's mode
        group.train(train)
    for slot in run.singles:
        if slot in members:
            slot.model.train(train)
    hook, stop_flag = run.hook, run.stop_flag
    before_step = hook.izitorch_before_optimizer_step if hook.izitorch_before_optimizer_step.get_hookimpls() else None
    batch_finish = hook.izitorch_batch_finish if train and hook.izitorch_batch_finish.get_hookimpls() else None
    masks = fold.masks
    group_step = _GroupStep(run, fold, members, train, before_step, skipped, wants_losses=batch_finish is not None)
    non_blocking = run.device.type == "cuda"
    steps = 0
    start = time.perf_counter()
    with torch.set_grad_enabled(train):
        for steps, batch in enumerate(_batches(run, fold, phase), 1):
            if masks is not None:
                inputs, target, rows = to_device(batch, run.device, non_blocking)
            else:
                inputs, target = to_device(unpack(batch), run.device, non_blocking)
            losses: dict[Slot, Any] = {}
            group_step.step, group_step.losses = steps, losses
            for index, (group, group_meter) in enumerate(zip(run.groups, group_meters)):
                group_step.apply(group, group_meter, inputs, target, masks.for_group(index, rows) if masks is not None else None)
            for slot in singles:
                if train and slot.stopped:
                    continue  # stopped during this epoch by the NaN guard
                output, loss = forward_loss(slot, inputs, target, run.config.data.num_classes)
                if train:
                    value = loss.item()  # the one per-step sync: nan_policy needs it
                    if not math.isfinite(value):
                        skipped[slot] += _non_finite(run, fold, slot, value, steps)
                        continue
                    _step(run, slot, loss, before_step)
                output, loss = output.detach(), loss.detach()
                for meter in meters[slot]:
                    meter.update(output.unsqueeze(0), target, loss.reshape(1))
                losses[slot] = loss
            if batch_finish is not None:
                for part in fold.parts or [fold]:
                    batch_finish(run=run, fold=part, step=steps, losses={s.name: losses[s] for s in part.slots if s in losses})
            if stop_flag is not None and stop_flag.signum is not None:
                raise Interrupted(stop_flag.signum, "interrupted")
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    per_step = (time.perf_counter() - start) / max(steps, 1)
    values = {slot: compute_all(slot_meters, 1)[0] for slot, slot_meters in meters.items()}
    for group, group_meter in zip(run.groups, group_meters):
        for slot, member in zip(group.slots, compute_all(group_meter, len(group))):
            if slot in members and not (train and slot.stopped and not member):
                values[slot] = member
    time_key = "train_step_time" if train else "inference_time"
    results = {}
    for slot in fold.slots:
        if slot not in values or (train and not values[slot] and slot.stopped):
            continue
        results[slot] = {**values[slot], time_key: per_step}
        if skipped[slot]:
            results[slot]["skipped_batches"] = skipped[slot]
    return results


@attrs.define
class _GroupStep:
    """One batch for a vectorized group: one forward, one backward, one optimizer step.

    Made once per pass; ``step`` and ``losses`` (the batch's losses by slot) are set per batch.

    Members outside ``members`` (another fold's, in an evaluation of parallel folds) and, in
    training, stopped members are frozen: their weights, buffers and metrics do not move.
    """

    run: Run
    fold: Fold
    members: set
    train: bool
    before_step: Any
    skipped: dict
    wants_losses: bool = True
    step: int = 0
    losses: dict = attrs.field(factory=dict)

    def apply(self, group: Any, group_meter: list, inputs: Any, target: torch.Tensor, mask: torch.Tensor | None) -> None:
        train = self.train
        active = [slot in self.members and not (train and slot.stopped) for slot in group.slots]
        if not any(active):
            return
        if all(active) and not train:
            active = None  # evaluation of the whole group: no row is frozen
        try:
            outputs = group.forward(inputs, active)
        except IzitorchError:
            raise
        except Exception as error:
            raise TrainingError(f"{_label(group)}: {_what(error)}{_hint(error)}; {GROUP_FAILED}") from None
        classes = self.run.config.data.num_classes
        if _too_few_classes(group.slots[0].criterion, outputs, target, classes, class_dim=2):
            raise TrainingError(f"{_label(group)}: output {_shape(outputs)} has {outputs.shape[2]} classes but num_classes = {classes}; {FIT_CLASSES}")
        try:
            member_losses = group.losses(outputs, target, mask)
        except IzitorchError:
            raise
        except Exception as error:
            raise TrainingError(f"{_label(group)}: {_what(error)}{_hint(error)}; {GROUP_FAILED}") from None
        if train:
            self._guard(group, member_losses, active, mask)
            if any(active):
                group.zero_grad()
                group.backward(member_losses)
                if self.before_step is not None:
                    for slot, is_active in zip(group.slots, active):
                        if is_active:
                            self.before_step(run=self.run, slot=slot)
                group.step(active)
        outputs, member_losses = outputs.detach(), member_losses.detach()
        if active is not None and not all(active):  # frozen members count nothing
            flags = torch.tensor(active, device=outputs.device).reshape(-1, 1)
            mask = flags.expand(len(active), target.shape[0]) if mask is None else mask & flags
        for meter in group_meter:
            meter.update(outputs, target, member_losses, mask)
        if self.wants_losses:  # one view per member: only for izitorch_batch_finish
            for k, slot in enumerate(group.slots):
                if active is None or active[k]:
                    self.losses[slot] = member_losses[k]

    def _guard(self, group: Any, member_losses: torch.Tensor, active: list[bool], mask: torch.Tensor | None) -> None:
        """Apply ``nan_policy`` (one sync for the whole group); a member with no sample of its
        own in the batch (parallel folds) does not step."""
        if mask is None:
            values, counts = member_losses.tolist(), None
        else:  # both read back in one transfer
            values, counts = torch.stack([member_losses.detach().double(), mask.sum(1).double()]).tolist()
        for k, value in enumerate(values):
            if not active[k]:
                continue
            if counts is not None and counts[k] == 0:
                active[k] = False
            elif not math.isfinite(value):
                slot = group.slots[k]
                fold = next((part for part in self.fold.parts if slot in part.slots), self.fold)  # parallel folds: its own
                self.skipped[slot] += _non_finite(self.run, fold, slot, value, self.step)
                active[k] = False


def _label(group: Any) -> str:
    return f"models {', '.join(dict.fromkeys(group.names))} (vectorized)"


def _step(run: Run, slot: Slot, loss: torch.Tensor, before_step: Any) -> None:
    try:
        slot.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step(run=run, slot=slot)
        slot.optimizer.step()
    except IzitorchError:  # a plugin's before-step hook already said what failed
        raise
    except Exception as error:  # a user's optimizer may raise anything
        raise TrainingError(f"model {slot.name}: the backward pass or optimizer step failed: {_what(error)}{_hint(error)}") from None


def _non_finite(run: Run, fold: Fold, slot: Slot, value: float, step: int) -> int:
    """Apply ``nan_policy`` to a non-finite loss; return 1 when the batch is skipped."""
    where = f"loss is {value} at fold {fold.index + 1}, epoch {fold.epoch}, step {step}"
    policy = run.config.run.nan_policy
    if policy == "raise":
        raise TrainingError(f'model {slot.name}: {where}; lower the learning rate, clip gradients, or set nan_policy = "stop" / "skip_batch"')
    if policy == "stop":
        slot.stopped = f'{where} (nan_policy = "stop")'  # the console adds "<model> stopped: "
        return 0
    return 1


def _batches(run: Run, fold: Fold, phase: str) -> Iterator[Any]:
    """The batches of ``fold.loaders[phase]``; a dataset failing to give one (a sample raising,
    items that do not collate, ``__len__`` beyond the data, in this process or a worker) is a
    one-line :class:`TrainingError` naming the dataset, the phase and the sample where known."""
    iterator = iter(fold.loaders[phase])
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except IzitorchError:
            raise
        except Exception as error:
            where = f"the {phase} set" + (f" (fold {fold.index + 1}, epoch {fold.epoch})" if fold.epoch and not fold.parts else
                                          f" (epoch {fold.epoch})" if fold.epoch else "")
            raise loading_error(run.config, error, where) from None
        yield batch


def unpack(batch: Any) -> tuple[Any, torch.Tensor]:
    """A collated batch as ``(inputs, target)``; anything else is a one-line TrainingError."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    # a collated batch of bare tensors is itself a tensor: its len() is the batch size, not an item's
    got = f"items of {len(batch)} elements" if isinstance(batch, (list, tuple)) else f"{type(batch).__name__} items"
    raise TrainingError(f"the dataset yields {got}; izitorch expects (input, target) pairs from __getitem__")


def forward_loss(slot: Slot, inputs: Any, target: torch.Tensor, classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output and loss; any failure of the model or the criterion (a shape or label
    mistake, a bug raising whatever it raises) and a loss that is not a scalar become a one-line
    TrainingError naming the model. izitorch's own errors and interrupts pass through."""
    try:
        if isinstance(inputs, dict):
            output = slot.model(**inputs)
        elif isinstance(inputs, (list, tuple)):
            output = slot.model(*inputs)
        else:
            output = slot.model(inputs)
    except IzitorchError:
        raise
    except Exception as error:
        raise TrainingError(f"model {slot.name}: forward failed on input of shape {_shape(inputs)}: {_what(error)}{_hint(error)}") from None
    if _too_few_classes(slot.criterion, output, target, classes, class_dim=1):
        raise TrainingError(f"model {slot.name}: output {_shape(output)} has {output.shape[1]} classes but num_classes = {classes} "
                            f"(target {_shape(target)}); {FIT_CLASSES}")
    try:
        loss = slot.criterion(output, target)
    except IzitorchError:
        raise
    except Exception as error:
        raise TrainingError(
            f"model {slot.name}: the criterion failed on output {_shape(output)} and target {_shape(target)}: "
            f"{_what(error)}; {FIT_CLASSES}") from None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TrainingError(f"model {slot.name}: the criterion returned {_shape(loss)}, not a scalar loss; "
                            'give it reduction = "mean" or "sum", or make it return one value')
    return output, loss


FIT_CLASSES = "check that the model's output size matches num_classes and that labels lie in [0, num_classes)"
GROUP_FAILED = 'check the output size against num_classes, or set multi_model = "sequential" to see which model fails'


def _too_few_classes(criterion: Any, output: Any, target: Any, classes: int | None, class_dim: int) -> bool:
    """Whether a class-index criterion may meet a label beyond the output's classes (labels
    were checked against ``num_classes`` before training).

    Decided from shapes on the host, before the criterion runs: on CUDA that mistake is a
    device-side assert, which kills the process with a traceback and loses the CUDA context.
    Without ``num_classes`` the criterion is left to find it.
    """
    return (classes is not None and isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss))
            and isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor) and not target.is_floating_point()
            and output.dim() > class_dim and output.shape[class_dim] < classes)


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def _what(error: BaseException) -> str:
    """An error's first line, after its type's name unless it is of the kinds a shape or value
    mistake raises (whose messages say enough)."""
    if isinstance(error, (RuntimeError, ValueError, TypeError, IndexError)):
        return first_line(error)
    return error_text(error)


def _hint(error: BaseException) -> str:
    text = str(error).lower()
    if "out of memory" in text or "can't allocate memory" in text:
        return "; out of memory: lower batch_size, or train fewer or smaller models at once"
    if "deterministic" in text and "use_deterministic_algorithms" in text:
        return "; this operation has no deterministic algorithm: set deterministic = false in [run]"
    return ""
