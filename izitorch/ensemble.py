"""Vectorized model groups: K models of one architecture trained with one forward, one backward
and one optimizer step per batch.

Training K small models one after another costs K forwards, K backwards and K optimizer steps of
tiny kernels, each dominated by Python and dispatch overhead. When the models share their
architecture, :mod:`torch.func` can run them as one batched model: their parameters are stacked
into ``[K, ...]`` tensors and ``vmap(functional_call(...))`` evaluates all members at once.

Each member keeps its own identity (DESIGN §7): its ``nn.Module`` parameters and buffers are
re-pointed to views of row ``k`` of the stacked tensors, so ``slot.model.state_dict()`` always
shows the member's current weights and ``slot.model.load_state_dict`` writes into the group; its
own torch optimizer keeps its ``param_groups`` (read at every step, so each member's scheduler
keeps working) and its ``state`` holds views of the member's rows of the stacked optimizer state,
so ``slot.optimizer.state_dict()`` is what that optimizer would hold had it stepped alone.

Parameters live in one flat ``[K, N]`` tensor (each stacked parameter is a view of a column
range), and so do their gradients and the optimizer's moments. The update of all members is
then a handful of elementwise operations on ``[K, N]`` tensors with per-member hyper-parameters
as ``[K, 1]`` columns, whatever the number of parameter tensors; on the CPU, when the members
share the hyper-parameters torch's fused kernels take as one value, a single fused SGD / Adam
call (see :class:`_FusedStep`).
"""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Any, Sequence

import attrs
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from izitorch.data import host_to_device
from izitorch.errors import IzitorchError
from izitorch.state import Slot, deep_equal, standalone  # standalone: in __all__ for the code that imported it from here

__all__ = ["VectorGroup", "StackedOptimizer", "group_slots", "standalone", "why_not_vectorizable", "masked_loss", "supports_masked_loss"]

VECTORIZED_OPTIMIZERS: tuple[type, ...] = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

# A stacked parameter is a column range of the flat [K, N] tensor, so it is not "dense" and
# autograd warns (once) that its gradient, a view with exactly the same strides, breaks the
# layout contract. The accumulation is in place and correct; the warning is a false positive,
# silenced inside VectorGroup.backward only (never globally: this is the user's process).
_relaxed_grad_layout = getattr(torch.autograd, "enforce_grad_layout_policy", None)
_LAYOUT_WARNING = "grad and param do not obey the gradient layout contract"

# Module attributes that are torch's bookkeeping, not configuration that changes the forward.
_MODULE_INTERNALS = frozenset({
    "training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules",
    "_compiled_call_impl", "_is_full_backward_hook",
})


# --------------------------------------------------------------------------------------------
# Grouping


def group_slots(slots: Sequence[Slot]) -> tuple[list["VectorGroup"], list[Slot], list[str]]:
    """Split ``slots`` into vectorized groups and slots trained one by one.

    A group is 2+ slots whose models have the same module structure and configuration, whose
    optimizers are the same vectorized class with the same structural options, and whose
    criteria are configured alike. Returns ``(groups, sequential, reasons)`` where ``reasons``
    has one line per slot left sequential, saying why (for the console and for
    ``multi_model = "vectorized"`` errors). Building a group re-points its members' parameters
    (see :class:`VectorGroup`).
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
            groups.append(VectorGroup([slot for slot, _ in bucket], checked=True))
        else:
            slot, signature = bucket[0]
            reasons[slot.name] = f"{slot.name}: {_why_alone(slot, signature, candidates, slots)}"
    grouped = {id(slot) for group in groups for slot in group.slots}
    sequential = [slot for slot in slots if id(slot) not in grouped]
    return groups, sequential, [reasons[slot.name] for slot in sequential]


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
        return (self.optimizer == other.optimizer and deep_equal(self.architecture, other.architecture)
                and deep_equal(self.criterion, other.criterion))


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
            return (f"optimizer {_describe_optimizer(signature.optimizer)} differs from {other.name}'s "
                    f"{_describe_optimizer(sig.optimizer)} (same architecture)")
    for other, sig in same_architecture:
        if not deep_equal(sig.criterion, signature.criterion):
            return f"criterion {type(slot.criterion).__name__} is configured unlike {other.name}'s (same architecture and optimizer)"
    others = [s.name for s in slots if s is not slot and deep_equal(_architecture(s.model), signature.architecture)]
    if others:
        return f"no other vectorizable model with the same architecture ({', '.join(others)} cannot be grouped)"
    return "no other model with the same architecture"


# --------------------------------------------------------------------------------------------
# The group


class VectorGroup:
    """K member slots trained as one batched model (see the module docstring).

    Typical step, replacing K per-slot steps::

        group.zero_grad()
        outputs = group.forward(inputs)            # [K, B, ...]
        losses = group.losses(outputs, target)     # [K]
        group.backward(losses)                     # each member's gradient is its own
        ...clip group.member_grads(k) per member...
        group.step(active)                          # active: [K] bool, e.g. isfinite(losses)

    Call :meth:`sync_from_members` after a member's model or optimizer was loaded or reset
    (``Slot.reset``, a resume) so that the stacked state takes the members' state back.
    """

    def __init__(self, slots: Sequence[Slot], checked: bool = False) -> None:
        """``checked``: :func:`group_slots` already verified that the slots can be grouped."""
        slots = list(slots)
        if len(slots) < 2:
            raise IzitorchError("a vectorized group needs at least two models")
        if not checked:
            for slot in slots:
                why = why_not_vectorizable(slot)
                if why:
                    raise IzitorchError(f"model {slot.name} cannot be vectorized: {why}")
            first = _Signature.of(slots[0])
            for slot in slots[1:]:
                if not _Signature.of(slot).matches(first):
                    raise IzitorchError(f"models {slots[0].name} and {slot.name} cannot share a vectorized group: "
                                        "their architectures, optimizer kinds or criteria differ")
        self.slots = slots
        self.size = len(slots)
        models = [slot.model for slot in slots]
        # One stateless copy of the first member runs everyone's weights through functional_call.
        self._base = copy.deepcopy(models[0]).to("meta")
        self._pairs = list(zip(self._base.modules(), models[0].modules()))
        self._modules = [module for model in models for module in model.modules()]
        self._plain_modes = all(type(module).train is nn.Module.train for module in self._modules)
        self.param_names = [name for name, _ in models[0].named_parameters()]
        self.buffer_names = [name for name, _ in models[0].named_buffers()]
        self._member_params = [list(model.parameters()) for model in models]
        self._member_buffers = [[b for _, b in model.named_buffers()] for model in models]
        stacked_params, self.buffers = stack_module_state(models)
        stacked_params = {name: stacked_params[name].detach() for name in self.param_names}
        self.buffers = {name: self.buffers[name] for name in self.buffer_names}

        K = self.size
        sample = stacked_params[self.param_names[0]]
        self._spans: list[tuple[int, int, torch.Size]] = []
        offset = 0
        for name in self.param_names:
            shape = stacked_params[name].shape[1:]
            count = shape.numel()
            self._spans.append((offset, offset + count, shape))
            offset += count
        self.numel = offset
        self.flat = torch.empty(K, offset, dtype=sample.dtype, device=sample.device)
        self.flat_grad = torch.zeros_like(self.flat)
        self.params: dict[str, torch.Tensor] = {}
        for name, (start, stop, shape) in zip(self.param_names, self._spans):
            self.flat[:, start:stop].copy_(stacked_params[name].reshape(K, -1))
            leaf = self._columns(self.flat, start, stop, shape).detach().requires_grad_(True)
            leaf.grad = self._columns(self.flat_grad, start, stop, shape)
            self.params[name] = leaf
        self._grad_views = [[self._row(self.flat_grad, k, span) for span in self._spans] for k in range(K)]
        self._repoint_members()
        self.optimizer = StackedOptimizer(self)

        def call(params: dict, buffers: dict, args: tuple, kwargs: dict) -> Any:
            return functional_call(self._base, (params, buffers), args, kwargs)

        self._vforward = vmap(call, in_dims=(0, 0, None, None), randomness="different")
        self._plain = PlainStack.of(self._base)  # a faster forward for stacks of Linear layers
        criterion = slots[0].criterion
        self._vcriterion = vmap(lambda output, target: criterion(output, target), in_dims=(0, None), randomness="different")

    # -- layout helpers

    @staticmethod
    def _columns(flat: torch.Tensor, start: int, stop: int, shape: torch.Size) -> torch.Tensor:
        return flat[:, start:stop].view(flat.shape[0], *shape)

    @staticmethod
    def _row(flat: torch.Tensor, k: int, span: tuple[int, int, torch.Size]) -> torch.Tensor:
        start, stop, shape = span
        return flat[k, start:stop].view(shape)

    def _repoint_members(self) -> None:
        """Make every member's parameters, gradients and buffers views of its stacked rows."""
        with torch.no_grad():
            for k in range(self.size):
                for param, span, grad in zip(self._member_params[k], self._spans, self._grad_views[k]):
                    view = self._row(self.flat, k, span)
                    if param.data.data_ptr() != view.data_ptr() or param.data.stride() != view.stride():
                        view.copy_(param.data)
                        param.data = view
                    param.grad = grad
                for buffer, name in zip(self._member_buffers[k], self.buffer_names):
                    view = self.buffers[name][k]
                    if buffer.data_ptr() != view.data_ptr() or buffer.stride() != view.stride():
                        view.copy_(buffer)
                        buffer.data = view

    # -- public API

    @property
    def names(self) -> list[str]:
        return [slot.name for slot in self.slots]

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"VectorGroup({', '.join(self.names)}; {type(self.slots[0].optimizer).__name__}, {self.numel} parameters each)"

    def forward(self, inputs: Any, active: torch.Tensor | Sequence[bool] | None = None) -> Any:
        """Every member's output on the same batch, stacked: ``[K, B, ...]``.

        Runs in the train/eval mode of the first member's model. Dropout draws different masks
        per member; BatchNorm updates each member's running statistics in place (in the stacked
        buffers, hence in each member's module). Members with ``active[k]`` False (stopped
        models, which the sequential loop would not run) get their buffers restored afterwards.
        """
        self._sync_mode()
        if isinstance(inputs, dict):
            args, kwargs = (), inputs
        elif isinstance(inputs, (list, tuple)):
            args, kwargs = tuple(inputs), {}
        else:
            args, kwargs = (inputs,), {}
        if self._plain is not None and not kwargs and len(args) == 1:
            outputs = self._plain(self.params, args[0], self.size)
            if outputs is not None:
                return outputs
        params = self.params
        dtype = autocast_dtype(self.flat.device.type)
        if dtype is not None:  # autocast does not reach inside vmap: cast weights and inputs as it would
            params = {name: param.to(dtype) for name, param in params.items()}
            args = tuple(arg.to(dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg for arg in args)
        frozen = _inactive_rows(active, self.size)
        if not frozen or not self.buffers or not self._base.training:  # only training updates buffers
            return self._vforward(params, self.buffers, args, kwargs)
        saved = {name: buffer[frozen].clone() for name, buffer in self.buffers.items()}
        try:
            return self._vforward(params, self.buffers, args, kwargs)
        finally:
            with torch.no_grad():
                for name, rows in saved.items():
                    self.buffers[name][frozen] = rows

    __call__ = forward

    def losses(self, outputs: Any, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each member's criterion value on its own outputs: ``[K]`` (one shared target).

        Common criteria (cross-entropy on class indices, MSE, L1) are computed directly on the
        flattened ``[K*B, ...]`` outputs, which costs half of ``vmap`` over the criterion; any
        other criterion goes through ``vmap``. With ``mask`` (``[K, B]`` bool, parallel folds),
        member ``k``'s loss is the criterion's reduction over the samples ``mask[k]`` selects
        only (the others contribute an exact zero to its value and gradient).
        """
        if mask is not None:
            criterion = self.slots[0].criterion
            loss = masked_loss(criterion, outputs, target, mask)
            if loss is not None:
                return loss
            if supports_masked_loss(criterion):  # a known criterion: the shapes do not fit
                got = tuple(outputs.shape[1:]) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
                want = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
                raise ValueError(f"{type(criterion).__name__} cannot take output {got} with target {want}")
            raise IzitorchError(f"{type(criterion).__name__} cannot be restricted to each member's samples; "
                                "parallel folds support CrossEntropyLoss, MSELoss and L1Loss")
        if isinstance(outputs, torch.Tensor) and isinstance(target, torch.Tensor):
            loss = _batched_loss(self.slots[0].criterion, outputs, target)
            if loss is not None:
                return loss
        return self._vcriterion(outputs, target)

    def backward(self, losses: torch.Tensor) -> None:
        """``losses.sum().backward()``: member ``k``'s gradient only depends on ``losses[k]``.

        Rows with a non-finite loss get non-finite gradients, in their own rows only; pass
        ``active`` to :meth:`step` to skip them.
        """
        total = losses.sum()
        if _relaxed_grad_layout is not None:
            with _relaxed_grad_layout(False):
                total.backward()
            return
        with warnings.catch_warnings():  # older torch: no policy switch, only the warning to silence
            warnings.filterwarnings("ignore", message=_LAYOUT_WARNING, category=UserWarning)
            total.backward()

    def zero_grad(self) -> None:
        """Zero the stacked gradients in place (members' ``.grad`` stay views of them)."""
        self.flat_grad.zero_()
        for k in range(self.size):
            params = self._member_params[k]
            if params[0].grad is not self._grad_views[k][0]:
                for param, grad in zip(params, self._grad_views[k]):
                    param.grad = grad

    def member_grads(self, k: int) -> list[torch.Tensor]:
        """Member ``k``'s gradients, as views of the stacked ones (in-place clipping works).

        These are also the ``.grad`` of the member's own parameters, so ``Slot.grads()`` gives
        the same views.
        """
        return self._grad_views[k]

    def step(self, active: torch.Tensor | Sequence[bool] | None = None) -> None:
        """One optimizer update of all members; members with ``active[k]`` False are left as is."""
        self.optimizer.step(active)

    @torch.no_grad()
    def scale_grads(self, factor: float | torch.Tensor) -> None:
        """Multiply every member's gradients by ``factor`` (a number, or ``[K]``: one per member)."""
        self.flat_grad.mul_(factor.reshape(-1, 1) if isinstance(factor, torch.Tensor) else factor)

    def compile(self, wrap: Any) -> None:
        """Run the stacked forward through ``wrap(forward)`` (``torch.compile`` with a fallback)."""
        self._vforward = wrap(self._vforward)
        if self._plain is not None:
            self._plain = wrap(self._plain)

    def sync_from_members(self) -> None:
        """Take the members' current weights, buffers and optimizer states into the group.

        Needed after anything replaced them behind the group's back: ``Slot.reset()`` (it loads a
        fresh optimizer state), a resume loading saved states, a ``param.data = ...``.
        """
        self._repoint_members()
        self.optimizer.sync_from_members()

    def state_dict(self) -> dict:
        """The stacked weights, buffers and optimizer state, once for all members (copies).

        A resume state saves this instead of K per-member state dicts: pickling thousands of
        small tensors cost ~55 ms an epoch for 64 small models, a few stacked ones almost nothing.
        """
        return {
            "names": self.names,
            "flat": self.flat.detach().clone(),
            "buffers": {name: buffer.detach().clone() for name, buffer in self.buffers.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` in place: members keep seeing their rows."""
        if state["names"] != self.names or state["flat"].shape != self.flat.shape:
            raise IzitorchError(f"the saved group {state['names']} does not fit the group {self.names}; start over with --overwrite")
        self._repoint_members()
        self.flat.copy_(state["flat"])
        for name, buffer in self.buffers.items():
            buffer.copy_(state["buffers"][name])
        self.optimizer.load_state_dict(state["optimizer"])

    def train(self, mode: bool = True) -> None:
        """Set every member's (and the group's) train/eval mode, as ``model.train(mode)`` on
        each member does.

        Where no module class of the members overrides ``train``, the flags are set directly:
        ``Module.train`` recurses through ``__setattr__``, ~0.7 ms a pass for 64 small models
        against ~0.03 ms. The module list is the members' at grouping: the group runs that
        structure and no other (a module attached to a member later is not switched).
        """
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")  # as Module.train
        if self._plain_modes:
            for module in self._modules:
                object.__setattr__(module, "training", mode)
        else:
            for slot in self.slots:
                slot.model.train(mode)
        self._sync_mode()

    def _sync_mode(self) -> None:
        if self._base.training != self.slots[0].model.training:
            for base, module in self._pairs:
                base.training = module.training


class PlainStack:
    """The forward of a model that is a stack of ``Linear`` layers, elementwise activations,
    ``Dropout`` and ``Flatten``, run for K members with batched matrix products.

    ``vmap(functional_call(...))`` costs a fixed ~0.3 ms of Python and dispatch per call, which
    dominates for small models; ``torch.baddbmm`` on the stacked ``[K, out, in]`` weights
    computes the same thing in one kernel per layer. Applies to an ``nn.Sequential`` (nested
    ones are flattened) and to a model that says what its forward is by a method
    ``izitorch_plain_stack() -> nn.Sequential`` of its own layers (``izitorch.models.MLP`` does).
    Layer types are matched exactly (a subclass may change ``forward``); anything else keeps the
    ``vmap`` path, and so does an input the stack does not expect (one tensor, 2-D at each Linear).
    """

    ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
                   nn.Softplus, nn.Hardtanh, nn.Identity)

    def __init__(self, layers: list[nn.Module], names: dict[int, str]) -> None:
        self.layers = layers
        self.linear_names = {id(layer): (names[id(layer.weight)], names[id(layer.bias)] if layer.bias is not None else None)
                             for layer in layers if type(layer) is nn.Linear}

    @classmethod
    def of(cls, model: nn.Module) -> "PlainStack | None":
        declared = getattr(model, "izitorch_plain_stack", None)
        stack = model if type(model) is nn.Sequential else declared() if callable(declared) else None
        if not isinstance(stack, nn.Sequential):
            return None
        layers = _flat_layers(stack)
        if layers is None or not any(type(layer) is nn.Linear for layer in layers):
            return None
        names = {id(param): name for name, param in model.named_parameters()}
        if any(id(p) not in names for layer in layers for p in layer.parameters()):
            return None  # the declared stack holds layers that are not the model's own
        return cls(layers, names)

    def __call__(self, params: dict[str, torch.Tensor], x: Any, members: int) -> torch.Tensor | None:
        """``[K, B, out]`` for a shared input ``x`` of ``[B, ...]``, or None when it does not apply."""
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return None
        h, shared = x, True  # shared: no member dimension yet (the input is everyone's)
        for layer in self.layers:
            kind = type(layer)
            if kind is nn.Linear:
                if h.ndim != (2 if shared else 3):
                    return None
                weight_name, bias_name = self.linear_names[id(layer)]
                weight = params[weight_name].transpose(1, 2)  # [K, in, out]
                if shared:
                    h = h.unsqueeze(0).expand(members, -1, -1)
                    shared = False
                h = torch.baddbmm(params[bias_name].unsqueeze(1), h, weight) if bias_name else torch.bmm(h, weight)
            elif kind is nn.Flatten:
                offset = 0 if shared else 1
                start = layer.start_dim + offset if layer.start_dim >= 0 else layer.start_dim
                end = layer.end_dim + offset if layer.end_dim >= 0 else layer.end_dim
                h = h.flatten(start, end)
            elif kind is nn.Dropout:
                if layer.training and layer.p > 0:
                    if shared:  # each member draws its own mask
                        h = h.unsqueeze(0).expand(members, *h.shape)
                        shared = False
                    h = nn.functional.dropout(h, layer.p, training=True)
            else:
                h = layer(h)
        return h.unsqueeze(0).expand(members, *h.shape) if shared else h


def _flat_layers(stack: nn.Sequential) -> list[nn.Module] | None:
    layers: list[nn.Module] = []
    for layer in stack:
        if type(layer) is nn.Sequential:
            inner = _flat_layers(layer)
            if inner is None:
                return None
            layers += inner
        elif type(layer) in (nn.Linear, nn.Flatten, nn.Dropout, *PlainStack.ELEMENTWISE) and not layer._buffers:
            layers.append(layer)
        else:
            return None
    return layers


def _per_sample_cross_entropy(criterion: nn.CrossEntropyLoss, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[K, B]``: each member's cross-entropy on each sample (``reduction="none"``).

    On the CPU torch's ``log_softmax`` kernel is slow for few classes (for 10 classes, ~0.13 us
    a row, 4x ``logsumexp``) and a group computes K*B rows; without class weights or label
    smoothing the loss is ``logsumexp(x) - x[target]`` instead (the same value up to float
    rounding, ~1e-7), which takes forward and backward from 0.23 to 0.09 ms for 16 x 64 rows.
    """
    size = outputs.shape[0]
    if criterion.weight is None and criterion.label_smoothing == 0.0:
        kept = target != criterion.ignore_index
        safe = torch.where(kept, target, 0).view(1, -1, 1).expand(size, -1, 1)
        return torch.where(kept, torch.logsumexp(outputs, 2) - outputs.gather(2, safe).squeeze(2), 0.0)
    return nn.functional.cross_entropy(
        outputs.flatten(0, 1), target.repeat(size), weight=criterion.weight, ignore_index=criterion.ignore_index,
        reduction="none", label_smoothing=criterion.label_smoothing).view(size, -1)


def _class_indices(outputs: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``[K, B, C]`` outputs and a ``[B]`` target of class indices fit (cross-entropy)."""
    return outputs.ndim == 3 and target.ndim == 1 and not target.is_floating_point() and outputs.shape[1] == target.shape[0]


def _batched_loss(criterion: Any, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``[K]`` losses of ``criterion`` without vmap, for the criteria it knows, else None."""
    kind = type(criterion)
    if kind is nn.CrossEntropyLoss:
        if criterion.weight is not None or criterion.reduction not in ("mean", "sum") or not _class_indices(outputs, target):
            return None
        total = _per_sample_cross_entropy(criterion, outputs, target).sum(1)
        # torch's mean divides by the number of targets that are not ignored
        return total / (target != criterion.ignore_index).sum() if criterion.reduction == "mean" else total
    if kind in (nn.MSELoss, nn.L1Loss):
        if criterion.reduction not in ("mean", "sum") or outputs.shape[1:] != target.shape:
            return None
        function = nn.functional.mse_loss if kind is nn.MSELoss else nn.functional.l1_loss
        per_element = function(outputs, target.expand_as(outputs), reduction="none").flatten(1)
        return per_element.mean(1) if criterion.reduction == "mean" else per_element.sum(1)
    return None


def masked_loss(criterion: Any, outputs: Any, target: Any, mask: torch.Tensor) -> torch.Tensor | None:
    """``[K]`` losses of ``criterion`` where member ``k`` only counts the samples ``mask[k]``
    selects, reduced as the criterion reduces (a mean over no sample is 0); None for a
    criterion this does not know (see :func:`supports_masked_loss`)."""
    if not supports_masked_loss(criterion) or not isinstance(outputs, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None
    mean = criterion.reduction == "mean"
    if type(criterion) is nn.CrossEntropyLoss:
        if not _class_indices(outputs, target):
            return None
        per_sample = _per_sample_cross_entropy(criterion, outputs, target)
        total = torch.where(mask, per_sample, 0.0).sum(1)
        if not mean:
            return total
        # torch's mean divides by the summed class weights of the targets that are not ignored
        counted = (target != criterion.ignore_index).to(per_sample.dtype)
        if criterion.weight is not None:
            counted = counted * criterion.weight[target.clamp(0, outputs.shape[2] - 1)]
        return total / torch.where(mask, counted, 0.0).sum(1).clamp_min(torch.finfo(per_sample.dtype).tiny)
    if outputs.shape[1:] != target.shape or outputs.ndim < 2:
        return None
    function = nn.functional.mse_loss if type(criterion) is nn.MSELoss else nn.functional.l1_loss
    per_element = function(outputs, target.expand_as(outputs), reduction="none").flatten(2)
    per_sample = per_element.mean(2) if mean else per_element.sum(2)
    total = torch.where(mask, per_sample, 0.0).sum(1)
    return total / mask.sum(1).clamp_min(1) if mean else total


def supports_masked_loss(criterion: Any) -> bool:
    """Whether :func:`masked_loss` knows ``criterion`` (what parallel folds need)."""
    return type(criterion) in (nn.CrossEntropyLoss, nn.MSELoss, nn.L1Loss) and criterion.reduction in ("mean", "sum")


def _inactive_rows(active: torch.Tensor | Sequence[bool] | None, size: int) -> list[int]:
    if active is None:
        return []
    flags = active.tolist() if isinstance(active, torch.Tensor) else list(active)
    if len(flags) != size:
        raise ValueError(f"active has {len(flags)} entries for a group of {size}")
    return [k for k, flag in enumerate(flags) if not flag]


# --------------------------------------------------------------------------------------------
# The stacked optimizer


class StackedOptimizer:
    """One vectorized SGD / Adam / AdamW update for all members of a :class:`VectorGroup`.

    The formulas are those of torch's single-tensor code paths (``torch/optim/sgd.py``,
    ``adam.py``), applied to ``[K, N]`` tensors with each member's hyper-parameters as a
    ``[K, 1]`` column. The hyper-parameters are read from each member's own optimizer
    ``param_groups[0]`` at every step (tensors are rebuilt only when a value changed), so a
    member's scheduler, which sets its own optimizer's ``lr``, keeps working.

    The state (moments, momentum buffers, a ``[K, P]`` float32 step count: one per member and
    parameter, as torch keeps one per parameter) lives here; each member optimizer's ``state``
    holds views of its rows, installed from the member's first step on (torch creates the
    state lazily too), so ``slot.optimizer.state_dict()`` equals a lone optimizer's.

    One difference remains: torch skips a parameter whose ``.grad`` is None (unused in the
    forward); here every parameter has a (zero) gradient, so momentum and weight decay still
    move it. Members' optimizer step hooks never run (models with them are not grouped).
    """

    #: Step on torch's fused SGD / Adam kernels where they apply (False: always elementwise).
    use_fused = True

    def __init__(self, group: VectorGroup) -> None:
        self.group = group
        first = group.slots[0].optimizer
        self.kind = "sgd" if isinstance(first, torch.optim.SGD) else "adam"
        options = first.param_groups[0]
        self.nesterov = bool(options.get("nesterov", False))
        self.decoupled = bool(options.get("decoupled_weight_decay", isinstance(first, torch.optim.AdamW)))
        K, P = group.size, len(group.param_names)
        flat = group.flat
        if self.kind == "sgd":
            self.state = {"momentum_buffer": torch.zeros_like(flat)}
        else:
            self.state = {"exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        self.steps = torch.zeros(K, P, dtype=torch.float32)  # torch keeps "step" as a CPU float32
        self.started = [False] * K  # member has state (torch: after its first step)
        self._installed = [False] * K
        self._hyper_values: list[tuple] | None = None
        self._columns: dict[str, torch.Tensor] = {}
        self._fused: _FusedStep | None = None
        self.sync_from_members()

    # -- hyper-parameters

    def _read_hyper(self) -> list[tuple]:
        values = []
        for slot in self.group.slots:
            g = slot.optimizer.param_groups[0]
            if self.kind == "sgd":
                values.append((float(g["lr"]), float(g["weight_decay"]), float(g["momentum"]), float(g["dampening"])))
            else:
                beta1, beta2 = g["betas"]
                values.append((float(g["lr"]), float(beta1), float(beta2), float(g["eps"]), float(g["weight_decay"])))
        return values

    def _refresh(self) -> None:
        values = self._read_hyper()
        if values == self._hyper_values:
            return
        self._hyper_values = values
        h = torch.tensor(values, dtype=torch.float64)  # [K, n]: derived factors in double, as Python floats are
        if self.kind == "sgd":
            lr, wd, momentum, dampening = h.unbind(1)
            columns = {"lr": lr, "wd": wd, "momentum": momentum, "one_minus_dampening": 1 - dampening}
            self.any_wd = bool((wd != 0).any())
            self.momentum_mask = (momentum != 0).tolist()
        else:
            lr, beta1, beta2, eps, wd = h.unbind(1)
            columns = {"lr": lr, "one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2, "eps": eps,
                       "wd": wd, "decay": 1 - lr * wd}
            self.any_wd = bool((wd != 0).any())
            self._lr64, self._beta1_64, self._beta2_64 = lr.numpy(), beta1.numpy(), beta2.numpy()
        flat = self.group.flat
        self._columns = {k: v.to(dtype=flat.dtype, device=flat.device).unsqueeze(1) for k, v in columns.items()}
        self._fused = _FusedStep.of(self, values) if self.use_fused else None
        if self.kind == "sgd":
            mask = torch.tensor(self.momentum_mask, device=flat.device).unsqueeze(1)
            self._columns["has_momentum"] = mask

    # -- the update

    @torch.no_grad()
    def step(self, active: torch.Tensor | Sequence[bool] | None = None) -> None:
        """Update every member with ``active[k]`` True (all when ``active`` is None).

        Inactive members are left exactly as they were: their rows of the parameters and of the
        state are saved before the update and written back after it, so even a NaN gradient in
        an inactive row cannot leak (rows never mix).
        """
        frozen = _inactive_rows(active, self.group.size)
        if len(frozen) == self.group.size:
            return
        self._refresh()
        tensors = [self.group.flat, *self.state.values()]
        rows = host_to_device(torch.tensor(frozen, dtype=torch.long), tensors[0].device) if frozen else None
        saved = [t[rows] for t in tensors] if frozen else None  # advanced indexing copies
        skip = set(frozen)
        moving = [k for k in range(self.group.size) if k not in skip]
        if self._fused is not None and not frozen and (self.kind == "adam" or len(set(self.started)) == 1):
            self._fused_step(is_first_step=not self.started[0])  # SGD: all members at their first step, or none
        elif self.kind == "sgd":
            self._sgd(moving)
        else:
            self._adam(frozen)
        if saved is not None:
            for t, kept in zip(tensors, saved):
                t[rows] = kept
        for k in moving:
            if not self.started[k]:
                self.started[k] = True
                # what a scheduler checks to tell that its optimizer stepped before it
                self.group.slots[k].optimizer._opt_called = True
            if not self._installed[k]:
                self._install(k)

    def _sgd(self, moving: list[int]) -> None:
        c, param, grad = self._columns, self.group.flat, self.group.flat_grad
        if self.any_wd:
            grad = grad.add(c["wd"] * param)
        if any(self.momentum_mask):
            buf = self.state["momentum_buffer"]
            fresh = [k for k in moving if not self.started[k]]
            if fresh:  # torch: the first step's buffer is the gradient itself, undamped
                updated = buf * c["momentum"] + grad * c["one_minus_dampening"]
                first = torch.zeros(self.group.size, 1, dtype=torch.bool, device=param.device)
                first[fresh] = True
                buf.copy_(torch.where(first, grad, updated))
            else:
                buf.mul_(c["momentum"]).add_(grad * c["one_minus_dampening"])
            direction = grad + buf * c["momentum"] if self.nesterov else buf
            if not all(self.momentum_mask):
                direction = torch.where(c["has_momentum"], direction, grad)
        else:
            direction = grad
        param.addcmul_(direction, c["lr"], value=-1)

    def _adam(self, frozen: list[int]) -> None:
        c, param, grad = self._columns, self.group.flat, self.group.flat_grad
        if frozen:
            increment = torch.ones(self.group.size, 1)
            increment[frozen] = 0
            self.steps += increment
        else:
            self.steps += 1
        # torch: bias corrections from the Python float step, in double precision; K numbers, so
        # numpy (a microsecond an operation) rather than a dozen tiny torch kernels
        step = self.steps[:, 0].numpy().astype(np.float64)
        bias1 = 1 - self._beta1_64 ** step
        bias2_sqrt = np.sqrt(1 - self._beta2_64 ** step)
        with np.errstate(divide="ignore"):  # a frozen member that never stepped: inf, in a row left as it was
            neg_step = -(self._lr64 / bias1)
        scalars = host_to_device(torch.from_numpy(np.stack([neg_step, bias2_sqrt])).to(param.dtype), param.device)
        neg_step_size, bias2_sqrt = scalars.unsqueeze(2).unbind(0)
        if self.any_wd:
            if self.decoupled:
                param.mul_(c["decay"])
            else:
                grad = grad.add(c["wd"] * param)
        exp_avg, exp_avg_sq = self.state["exp_avg"], self.state["exp_avg_sq"]
        exp_avg.lerp_(grad, c["one_minus_beta1"])
        exp_avg_sq.mul_(c["beta2"]).addcmul_(grad * c["one_minus_beta2"], grad)
        denom = exp_avg_sq.sqrt().div_(bias2_sqrt).add_(c["eps"])
        param.addcmul_(exp_avg / denom, neg_step_size)

    def _fused_step(self, is_first_step: bool) -> None:
        """:meth:`_sgd` / :meth:`_adam` as one call of torch's fused kernel (CPU; Adam at K = 16:
        ~12 us against ~200 us for a dozen elementwise operations): every member is one row,
        with its own Adam step count. Members that differ only in learning rate (a sweep) share
        the kernel: it writes each member's unscaled update (lr = 1) into a zeroed scratch
        tensor, which one ``addcmul_`` scales by each member's lr. ``is_first_step``: no member
        has stepped yet (SGD's momentum buffer then starts as the gradient)."""
        fused, c = self._fused, self._columns
        param = self.group.flat
        if fused.lr is None:
            fused.scratch.zero_()
        target = fused.rows["param"] if fused.lr is not None else fused.rows["scratch"]
        lr = 1.0 if fused.lr is None else fused.lr
        if self.kind == "sgd":
            buffers = fused.rows["momentum_buffer"] if fused.options["momentum"] else []
            torch._fused_sgd_(target, fused.rows["grad"], buffers, lr=lr, nesterov=self.nesterov, maximize=False,
                              is_first_step=is_first_step, **fused.options)
        else:
            self.steps += 1  # the kernel reads the step; torch's own fused Adam increments it first
            if self.any_wd and self.decoupled:
                param.mul_(c["decay"])
            torch._fused_adam_(target, fused.rows["grad"], fused.rows["exp_avg"], fused.rows["exp_avg_sq"], [], fused.rows["step"],
                               lr=lr, amsgrad=False, maximize=False, **fused.options)
        if fused.lr is None:
            param.addcmul_(fused.scratch, c["lr"])

    # -- members' view of the state

    def _install(self, k: int) -> None:
        """Put views of member ``k``'s rows into its own optimizer's ``state``."""
        group, optimizer = self.group, self.group.slots[k].optimizer
        for j, (param, span) in enumerate(zip(group._member_params[k], group._spans)):
            if self.kind == "sgd":
                if not self.momentum_mask[k]:
                    continue  # torch keeps no state for momentum 0
                entry = {"momentum_buffer": group._row(self.state["momentum_buffer"], k, span)}
            else:
                entry = {"step": self.steps[k, j],
                         "exp_avg": group._row(self.state["exp_avg"], k, span),
                         "exp_avg_sq": group._row(self.state["exp_avg_sq"], k, span)}
            optimizer.state[param] = entry
        self._installed[k] = True

    def state_dict(self) -> dict:
        return {"state": {key: value.clone() for key, value in self.state.items()}, "steps": self.steps.clone(),
                "started": list(self.started)}

    @torch.no_grad()
    def load_state_dict(self, saved: dict) -> None:
        """Take a saved stacked state; started members see it through their own optimizers."""
        for key, value in self.state.items():
            value.copy_(saved["state"][key])
        self.steps.copy_(saved["steps"])
        self._hyper_values = None
        self._refresh()
        for k, started in enumerate(saved["started"]):
            self.started[k], self._installed[k] = started, False
            self.group.slots[k].optimizer.state.clear()
            if started:
                self._install(k)

    @torch.no_grad()
    def sync_from_members(self) -> None:
        """Rebuild the stacked state from the members' optimizers (empty state: a fresh start)."""
        group = self.group
        self._hyper_values = None
        self._refresh()
        if not any(slot.optimizer.state for slot in group.slots):  # every member fresh (a fold's start)
            for stacked in self.state.values():  # what the loop below does row by row (~4 ms at K = 64)
                stacked.zero_()
            self.steps.zero_()
            self.started, self._installed = [False] * group.size, [False] * group.size
            return
        for k, slot in enumerate(group.slots):
            states = [slot.optimizer.state.get(param) or {} for param in group._member_params[k]]
            started = any(states)
            for j, (state, span) in enumerate(zip(states, group._spans)):
                for key, stacked in self.state.items():
                    row = group._row(stacked, k, span)
                    value = state.get(key)
                    if value is None:
                        row.zero_()
                    elif value.data_ptr() != row.data_ptr():
                        row.copy_(value)
                if self.kind == "adam":
                    value = state.get("step")
                    self.steps[k, j] = float(value) if value is not None else 0.0
            if self.kind == "sgd":
                started = any("momentum_buffer" in s and s["momentum_buffer"] is not None for s in states)
            self.started[k] = started
            self._installed[k] = False
            if started:
                self._install(k)


@attrs.frozen
class _FusedStep:
    """When and how :meth:`StackedOptimizer._fused_step` applies to a group.

    torch's fused kernels take one value of each hyper-parameter for all their tensors: the
    members must share them (SGD: momentum, dampening; Adam: betas, eps), except the lr (the
    update is then scaled per member after the kernel) and AdamW's decoupled weight decay
    (applied before it, as on the elementwise path). L2 weight decay (SGD, Adam) acts on the
    parameter inside the kernel, so it needs one lr and one decay. ``rows`` holds the
    per-member row views the kernel takes, made once: the stacked tensors are updated in
    place, never replaced.
    """

    lr: float | None  # None: per-member lrs, scaled after the kernel
    options: dict  # the kernel's shared hyper-parameters
    scratch: torch.Tensor
    rows: dict

    @classmethod
    def of(cls, optimizer: "StackedOptimizer", values: list[tuple]) -> "_FusedStep | None":
        flat = optimizer.group.flat
        columns = list(zip(*values))  # sgd: lr, wd, momentum, dampening; adam: lr, beta1, beta2, eps, wd
        if optimizer.kind == "sgd":
            lrs, wds, momenta, dampenings = columns
            shared = {"momentum": momenta, "dampening": dampenings}
        else:
            lrs, beta1s, beta2s, epss, wds = columns
            shared = {"beta1": beta1s, "beta2": beta2s, "eps": epss}
        if any(len(set(v)) > 1 for v in shared.values()) or not _has_fused_kernels(flat.device, flat.dtype):
            return None
        lr = lrs[0] if len(set(lrs)) == 1 else None
        options = {key: v[0] for key, v in shared.items()}
        options["weight_decay"] = 0.0
        if not optimizer.decoupled and any(wds):
            if lr is None or len(set(wds)) > 1:
                return None
            options["weight_decay"] = wds[0]
        scratch = torch.zeros_like(flat)
        tensors = {"param": flat, "grad": optimizer.group.flat_grad, "scratch": scratch, **optimizer.state}
        rows = {name: list(tensor.unbind(0)) for name, tensor in tensors.items()}
        rows["step"] = [optimizer.steps[k, 0] for k in range(len(flat))]  # a member's parameters step together
        return cls(lr, options, scratch, rows)


@functools.lru_cache(maxsize=None)
def _has_fused_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has fused SGD and Adam kernels for these tensors (CPU: torch >= 2.4).

    On CUDA the Adam kernel wants its step counts on the GPU, where torch keeps them on the CPU
    (and so does a member's ``optimizer.state_dict()``): the elementwise path stays there.
    """
    if device.type != "cpu" or not hasattr(torch, "_fused_adam_") or not hasattr(torch, "_fused_sgd_"):
        return False
    one = torch.ones(2, dtype=dtype)
    try:
        torch._fused_adam_([one.clone()], [one.clone()], [one.clone()], [one.clone()], [], [torch.ones(())], amsgrad=False,
                           lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)
        torch._fused_sgd_([one.clone()], [one.clone()], [one.clone()], weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0,
                          nesterov=False, maximize=False, is_first_step=True)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------------------------


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device_type`` now, or None outside autocast."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def plan(mode: str, slots: Sequence[Slot]) -> tuple[list[VectorGroup], list[Slot], list[str]]:
    """Apply ``run.multi_model``: the groups, the slots stepped one by one, and console notes.

    ``"sequential"`` groups nothing; ``"auto"`` groups what can be grouped and says why the rest
    was not; ``"vectorized"`` requires every model to be in a group and fails naming the first
    model that cannot be.
    """
    if mode == "sequential" or len(slots) < 2:
        return [], list(slots), []
    groups, sequential, reasons = group_slots(slots)
    if mode == "vectorized" and sequential:
        raise IzitorchError(f'"vectorized" needs every model in a group, but {reasons[0]}; use multi_model = "auto" to step such models one by one',
                            "run.multi_model")
    notes = [f"vectorized group of {len(g)}: {', '.join(g.names)} ({type(g.slots[0].optimizer).__name__})" for g in groups]
    return groups, sequential, notes + [f"sequential: {reason}" for reason in reasons]
