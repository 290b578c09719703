"""Which slots can share a vectorized group, and the plan that ``run.multi_model`` asks for.

Two slots share a group when their models have the same module structure and configuration,
their optimizers are the same vectorized class with the same structural options, and their
criteria are configured alike (a :class:`_Signature`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from izitorch.errors import IzitorchError
from izitorch.state import Slot, deep_equal


VECTORIZED_OPTIMIZERS: tuple[type, ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

# Module attributes that are torch's bookkeeping, not configuration that changes the forward.
_MODULE_INTERNALS = frozenset(
    {
        "training",
        "_parameters",
        "_buffers",
        "_non_persistent_buffers_set",
        "_modules",
        "_compiled_call_impl",
        "_is_full_backward_hook",
    }
)


def partition(slots: Sequence[Slot]) -> tuple[list[list[Slot]], dict[str, str]]:
    """The sets of 2+ ``slots`` that can share a vectorized group, and why each other slot
    cannot (by name, one line each, for the console and ``multi_model = "vectorized"`` errors).

    A group is slots whose models have the same module structure and configuration, whose
    optimizers are the same vectorized class with the same structural options, and whose
    criteria are configured alike.
    """
    reasons: dict[str, str] = {}
    candidates: list[tuple[Slot, _Signature]] = []
    for slot in slots:
        why = why_not_vectorizable(slot)
        if why:
            reasons[slot.name] = f"{slot.name}: {why}"
        else:
            candidates.append((slot, _Signature.of(slot)))
    buckets: list[list[tuple[Slot, _Signature]]] = []
    for slot, signature in candidates:
        for bucket in buckets:
            if signature.matches(bucket[0][1]):
                bucket.append((slot, signature))
                break
        else:
            buckets.append([(slot, signature)])
    groups = []
    for bucket in buckets:
        if len(bucket) >= 2:
            groups.append([slot for slot, _ in bucket])
        else:
            slot, signature = bucket[0]
            reasons[slot.name] = f"{slot.name}: {_why_alone(slot, signature, candidates, slots)}"
    return groups, reasons


def check_groupable(slots: Sequence[Slot]) -> None:
    """Raise an :class:`IzitorchError` naming the first of ``slots`` that cannot share one
    vectorized group with the others."""
    for slot in slots:
        why = why_not_vectorizable(slot)
        if why:
            raise IzitorchError(f"model {slot.name} cannot be vectorized: {why}")
    first = _Signature.of(slots[0])
    for slot in slots[1:]:
        if not _Signature.of(slot).matches(first):
            raise IzitorchError(
                f"models {slots[0].name} and {slot.name} cannot share a vectorized group: their architectures, optimizer kinds or criteria differ"
            )


def why_not_vectorizable(slot: Slot) -> str | None:
    """Why this slot can never be part of a group (whatever the others are), or None."""
    model, optimizer = slot.model, slot.optimizer
    kind = type(optimizer)
    if kind not in VECTORIZED_OPTIMIZERS:
        return f"optimizer {kind.__name__} is not vectorized (SGD, Adam, AdamW are)"
    if len(optimizer.param_groups) != 1:
        return f"optimizer has {len(optimizer.param_groups)} parameter groups (a vectorized group needs one)"
    group = optimizer.param_groups[0]
    params = list(model.parameters())
    if not params:
        return "model has no parameters"
    if len(group["params"]) != len(params) or any(a is not b for a, b in zip(group["params"], params)):
        return "optimizer does not hold exactly the model's parameters, in order"
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return "optimizer has step hooks (the group steps all members at once, without them)"
    for option in ("maximize", "differentiable", "capturable", "amsgrad"):
        if group.get(option):
            return f"optimizer option {option}=True is not vectorized"
    if any(not p.requires_grad for p in params):
        return "model has frozen parameters (requires_grad=False)"
    if any(p.is_sparse or not p.is_floating_point() or p.is_complex() for p in params):
        return "model has sparse, complex or non-float parameters"
    if len({p.dtype for p in params}) > 1 or len({p.device for p in params}) > 1:
        return "model parameters have several dtypes or devices"
    for name, module in model.named_modules():
        hooks = [k for k, v in vars(module).items() if "hook" in k and isinstance(v, dict) and v]
        if hooks:
            return f"module {name or type(module).__name__!r} has hooks ({', '.join(sorted(hooks))})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            return f"module {name!r}: BatchNorm with momentum=None (cumulative average) is not vectorized"
    return None


class _Signature:
    """What must be equal for two slots to share a group: architecture, optimizer kind, criterion."""

    def __init__(self, architecture: list, optimizer: tuple, criterion: Any) -> None:
        self.architecture, self.optimizer, self.criterion = architecture, optimizer, criterion

    @classmethod
    def of(cls, slot: Slot) -> "_Signature":
        return cls(_architecture(slot.model), _optimizer_kind(slot.optimizer), _config(slot.criterion, values=True))

    def matches(self, other: "_Signature") -> bool:
        return self.optimizer == other.optimizer and deep_equal(self.architecture, other.architecture) and deep_equal(self.criterion, other.criterion)


def _architecture(model: nn.Module) -> list:
    """Type tree, per-module configuration, and parameter/buffer names, shapes, dtypes, devices."""
    modules = [(name, _config(module)) for name, module in model.named_modules()]
    params = [(n, tuple(p.shape), p.dtype, p.device) for n, p in model.named_parameters()]
    buffers = [(n, tuple(b.shape), b.dtype, b.device) for n, b in model.named_buffers()]
    return [modules, params, buffers]


def _config(obj: Any, values: bool = False) -> Any:
    """An object's type and the attributes that configure it.

    The group runs every member through one copy of the first member's module, so anything
    that changes the forward (a dropout rate, a convolution's stride, a loss's reduction) must
    be equal. A plain function criterion is compared by identity. ``values`` adds the module's
    own parameters and buffers (a criterion's class weights), which for a model differ by design.
    """
    if not isinstance(obj, nn.Module):
        return obj
    attributes = {k: v for k, v in vars(obj).items() if k not in _MODULE_INTERNALS and "hook" not in k}
    if values and (obj._parameters or obj._buffers):
        attributes["__tensors__"] = {**dict(obj.named_parameters(recurse=False)), **dict(obj.named_buffers(recurse=False))}
    return (type(obj), attributes)


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple:
    """The optimizer's class and the options that change its formula (not its hyper-parameters)."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        return ("SGD", bool(group["nesterov"]))
    decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
    return (type(optimizer).__name__, decoupled)


def _describe_optimizer(kind: tuple) -> str:
    name, flag = kind
    if name == "SGD":
        return "SGD(nesterov=True)" if flag else "SGD"
    return f"{name}(decoupled_weight_decay={flag})" if flag != (name == "AdamW") else name


def _why_alone(slot: Slot, signature: _Signature, candidates: list, slots: Sequence[Slot]) -> str:
    same_architecture = [(s, sig) for s, sig in candidates if s is not slot and deep_equal(sig.architecture, signature.architecture)]
    for other, sig in same_architecture:
        if sig.optimizer != signature.optimizer:
            return f"optimizer {_describe_optimizer(signature.optimizer)} differs from {other.name}'s {_describe_optimizer(sig.optimizer)} (same architecture)"
    for other, sig in same_architecture:
        if not deep_equal(sig.criterion, signature.criterion):
            return f"criterion {type(slot.criterion).__name__} is configured unlike {other.name}'s (same architecture and optimizer)"
    others = [s.name for s in slots if s is not slot and deep_equal(_architecture(s.model), signature.architecture)]
    if others:
        return f"no other vectorizable model with the same architecture ({', '.join(others)} cannot be grouped)"
    return "no other model with the same architecture"
