"""Stacks: the one unit the loop trains and evaluates, K >= 1 members that take the same batch.

Two implementations behind one protocol (:class:`Stack`):

- :class:`LoneStack`, a model on its own (K = 1): its module called as it is, no vmap, nothing
  added to the step a hand-written loop takes;
- :class:`VectorStack`, K models of one architecture run as one batched model
  (:class:`izitorch.ensemble.VectorGroup`); parallel folds are vector stacks whose members carry
  per-sample masks (``sample_masks``: which samples each member counts, per phase).

The step around them (the NaN policy, the before-step hook, which members are active, metrics,
mixed precision, accumulation) is written once, in :mod:`izitorch.engine`; the stacks only say
how their members compute and update. Failures of a user's model or criterion become one line
naming the model(s) and the shapes (:mod:`izitorch.diagnose`).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from izitorch import sharding
from izitorch.compiling import compiled
from izitorch.diagnose import FIT_CLASSES, GROUP_FAILED, hint, shape, too_few_classes, what
from izitorch.errors import IzitorchError, TrainingError
from izitorch.state import Slot


class Stack(Protocol):
    """What the engine asks of K members that take the same batch."""

    members: list[Slot]  # K slots, in the order of every per-member tensor
    label: str  # how error lines name the stack
    vectorized: bool  # whether the members' weights live in the stack's state (resume)

    def train(self, mode: bool) -> None: ...

    def forward(self, inputs: Any, active: Sequence[bool] | None) -> torch.Tensor:
        """The members' outputs ``[K, B, ...]``; inactive members' buffers do not move."""

    def losses(self, outputs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Each member's loss ``[K]``; with ``mask`` ``[K, B]``, over the member's own samples."""

    def backward(self, losses: torch.Tensor, factor: Any = None) -> None:
        """Add the gradients of every member's loss (times ``factor``, a number or a scalar
        tensor: accumulation's share, fp16's loss scale) to the members' gradients."""

    def zero_grad(self) -> None: ...

    def step(self, active: Sequence[bool]) -> None:
        """One optimizer update of the members with ``active[k]``."""

    def scaled_params(self) -> list[torch.Tensor]:
        """The tensors whose ``.grad`` fp16's loss scaler unscales before a step."""

    def scale_grads(self, factor: float | torch.Tensor) -> None:
        """Multiply the members' gradients by ``factor`` (a number, or ``[K]``: one per member)."""

    def compile(self) -> None:
        """Run the forward through ``torch.compile`` from now on (``[run] compile``)."""

    def batch_mask(self, phase: str, rows: torch.Tensor | None) -> torch.Tensor | None:
        """``[K, B]``: which samples of the batch (dataset ``rows``) each member counts, or None."""

    def state_dict(self) -> dict | None:
        """State kept beside the members' own (a vector stack's stacked weights), or None."""

    def load_state_dict(self, state: dict) -> None: ...

    def sync_from_members(self) -> None:
        """Take back the members' weights after they were reset or restored one by one."""

    def distribute(self, ranks: Any, device: torch.device) -> None:
        """Train data-parallel over ``ranks`` from now on (``distributed = "data"``,
        :mod:`izitorch.sharding`); every rank calls this together."""

    def reduce_grads(self) -> None:
        """Average the gradients over the ranks before the optimizer step, where the backward
        pass did not already (data-parallel training only)."""


def call_model(slot: Slot, inputs: Any, module: Any = None) -> Any:
    """``slot.model`` (or ``module``, the model compiled) on a batch's inputs (a tensor, a tuple
    of positional ones, or a dict of keyword ones); a failure is one line naming the model and
    the input's shape."""
    model = slot.model if module is None else module
    try:
        if isinstance(inputs, dict):
            return model(**inputs)
        if isinstance(inputs, (list, tuple)):
            return model(*inputs)
        return model(inputs)
    except IzitorchError:
        raise
    except Exception as error:
        raise TrainingError(f"model {slot.name}: forward failed on input of shape {shape(inputs)}: {what(error)}{hint(error)}") from None


def criterion_loss(slot: Slot, output: Any, target: torch.Tensor, classes: int | None) -> torch.Tensor:
    """The criterion's scalar loss on ``output``; a failure, an output with too few classes and
    a loss that is not a scalar are one line naming the model and both shapes."""
    if too_few_classes(slot.criterion, output, target, classes, class_dim=1):
        raise TrainingError(
            f"model {slot.name}: output {shape(output)} has {output.shape[1]} classes but num_classes = {classes} (target {shape(target)}); {FIT_CLASSES}"
        )
    try:
        loss = slot.criterion(output, target)
    except IzitorchError:
        raise
    except Exception as error:
        raise TrainingError(
            f"model {slot.name}: the criterion failed on output {shape(output)} and target {shape(target)}: {what(error)}; {FIT_CLASSES}"
        ) from None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TrainingError(
            f'model {slot.name}: the criterion returned {shape(loss)}, not a scalar loss; give it reduction = "mean" or "sum", or make it return one value'
        )
    return loss


def forward_loss(slot: Slot, inputs: Any, target: torch.Tensor, classes: int | None) -> tuple[Any, torch.Tensor]:
    """A lone model's output and loss on one batch (the dry run of ``validate`` uses it too)."""
    output = call_model(slot, inputs)
    return output, criterion_loss(slot, output, target, classes)


class LoneStack:
    """One model, stepped as a hand-written loop steps it."""

    vectorized = False

    def __init__(self, slot: Slot, classes: int | None) -> None:
        self.slot, self.classes = slot, classes
        self.members = [slot]
        self.label = f"model {slot.name}"
        self.output: Any = None
        self.loss: torch.Tensor | None = None
        self.module: Any = slot.model  # the model, or it compiled
        self.ranks: Any = None  # distributed = "data": the ranks it trains over
        self.wrapped: Any = None  # ... and what training calls then: the model in DistributedDataParallel
        self.calling: Any = self.module  # what the forward calls (chosen by train(): evaluation is not in lockstep)

    def train(self, mode: bool) -> None:
        self.slot.model.train(mode)
        self.calling = self.wrapped if mode and self.wrapped is not None else self.module
        if not mode and self.ranks is not None:  # every rank evaluates with rank 0's statistics, as DDP trains
            sharding.from_rank_0(list(self.slot.model.buffers()), self.ranks)

    def forward(self, inputs: Any, active: Sequence[bool] | None = None) -> Any:
        self.output = call_model(self.slot, inputs, self.calling)
        return self.output.unsqueeze(0) if isinstance(self.output, torch.Tensor) else self.output

    def losses(self, outputs: Any, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.loss = criterion_loss(self.slot, self.output, target, self.classes)
        return self.loss.reshape(1)

    def backward(self, losses: torch.Tensor, factor: Any = None) -> None:
        (self.loss if factor is None else self.loss * factor).backward()

    def zero_grad(self) -> None:
        self.slot.optimizer.zero_grad(set_to_none=True)

    def step(self, active: Sequence[bool]) -> None:
        self.slot.optimizer.step()

    def scaled_params(self) -> list[torch.Tensor]:
        return [param for group in self.slot.optimizer.param_groups for param in group["params"]]

    def scale_grads(self, factor: float | torch.Tensor) -> None:
        grads = [param.grad for param in self.scaled_params() if param.grad is not None]
        if grads:
            torch._foreach_mul_(grads, float(factor) if isinstance(factor, torch.Tensor) else factor)

    def compile(self) -> None:
        self.module = self.calling = compiled(self.slot.model, self.label)

    def batch_mask(self, phase: str, rows: torch.Tensor | None) -> None:
        return None

    def state_dict(self) -> None:
        return None  # the model's weights are in its slot's own state

    def load_state_dict(self, state: dict) -> None:
        pass

    def sync_from_members(self) -> None:
        pass

    def distribute(self, ranks: Any, device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.ranks = ranks
        wrapped = DistributedDataParallel(self.slot.model, device_ids=[device] if device.type == "cuda" else None, process_group=ranks.steps)
        self.wrapped = compiled(wrapped, self.label) if self.module is not self.slot.model else wrapped  # DDP, then compiled

    def reduce_grads(self) -> None:
        pass  # DistributedDataParallel averaged them during the backward pass


class VectorStack:
    """K models of one architecture as one batched model (a :class:`~izitorch.ensemble.VectorGroup`).

    ``sample_masks[phase]`` (``[K, N]`` bool over the dataset, parallel folds): which samples
    each member trains on or is evaluated on in that phase.
    """

    vectorized = True

    def __init__(self, group: Any, classes: int | None, sample_masks: dict[str, torch.Tensor] | None = None) -> None:
        self.group, self.classes = group, classes
        self.members = list(group.slots)
        self.sample_masks = sample_masks or {}
        self.label = f"models {', '.join(dict.fromkeys(group.names))} (vectorized)"
        self.ranks: Any = None  # distributed = "data": the ranks it trains over

    def train(self, mode: bool) -> None:
        self.group.train(mode)
        if not mode and self.ranks is not None:  # every rank evaluates with rank 0's statistics
            sharding.from_rank_0(list(self.group.buffers.values()), self.ranks)

    def forward(self, inputs: Any, active: Sequence[bool] | None = None) -> torch.Tensor:
        try:
            outputs = self.group.forward(inputs, active)
        except IzitorchError:
            raise
        except Exception as error:
            raise TrainingError(f"{self.label}: {what(error)}{hint(error)}; {GROUP_FAILED}") from None
        return outputs

    def losses(self, outputs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if too_few_classes(self.members[0].criterion, outputs, target, self.classes, class_dim=2):
            raise TrainingError(f"{self.label}: output {shape(outputs)} has {outputs.shape[2]} classes but num_classes = {self.classes}; {FIT_CLASSES}")
        try:
            return self.group.losses(outputs, target, mask)
        except IzitorchError:
            raise
        except Exception as error:
            raise TrainingError(f"{self.label}: {what(error)}{hint(error)}; {GROUP_FAILED}") from None

    def backward(self, losses: torch.Tensor, factor: Any = None) -> None:
        self.group.backward(losses if factor is None else losses * factor)

    def zero_grad(self) -> None:
        self.group.zero_grad()

    def step(self, active: Sequence[bool]) -> None:
        self.group.step(active)

    def scaled_params(self) -> list[torch.Tensor]:
        return list(self.group.params.values())

    def scale_grads(self, factor: float | torch.Tensor) -> None:
        self.group.scale_grads(factor)

    def compile(self) -> None:
        self.group.compile(lambda forward: compiled(forward, self.label))

    def batch_mask(self, phase: str, rows: torch.Tensor | None) -> torch.Tensor | None:
        masks = self.sample_masks.get(phase)
        return None if masks is None else masks.index_select(1, rows)

    def state_dict(self) -> dict:
        return self.group.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.group.load_state_dict(state)

    def sync_from_members(self) -> None:
        self.group.sync_from_members()

    def distribute(self, ranks: Any, device: torch.device) -> None:
        self.ranks = ranks

    def reduce_grads(self) -> None:
        # the group's gradients are one flat tensor: one all-reduce is DDP's reduction with a single bucket
        if self.ranks is not None:
            sharding.average(self.group.flat_grad, self.ranks)


def build_stacks(groups: Sequence[Any], singles: Sequence[Slot], classes: int | None, compile: bool = False) -> list[Stack]:
    """The run's stacks: its vectorized groups first, then each model stepped on its own (the
    order in which the members of a batch have always stepped); compiled with ``compile``."""
    stacks: list[Stack] = [VectorStack(group, classes) for group in groups] + [LoneStack(slot, classes) for slot in singles]
    if compile:
        for stack in stacks:
            stack.compile()
    return stacks
