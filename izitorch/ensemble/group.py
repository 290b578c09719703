"""A vectorized group: K models of one architecture trained with one forward, one backward and
one optimizer step per batch.

Training K small models one after another costs K forwards, K backwards and K optimizer steps of
tiny kernels, each dominated by Python and dispatch overhead. When the models share their
architecture, :mod:`torch.func` can run them as one batched model: their parameters are stacked
into ``[K, ...]`` tensors and ``vmap(functional_call(...))`` evaluates all members at once.

Each member keeps its own identity: its ``nn.Module`` parameters and buffers are re-pointed
to views of row ``k`` of the stacked tensors, so ``slot.model.state_dict()`` always
shows the member's current weights and ``slot.model.load_state_dict`` writes into the group; its
own torch optimizer keeps its ``param_groups`` (read at every step, so each member's scheduler
keeps working) and its ``state`` holds views of the member's rows of the stacked optimizer state,
so ``slot.optimizer.state_dict()`` is what that optimizer would hold had it stepped alone.

Parameters live in one flat ``[K, N]`` tensor (each stacked parameter is a view of a column
range), and so do their gradients and the optimizer's moments.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from izitorch.ensemble.grouping import check_groupable
from izitorch.ensemble.kernels import PlainStack, batched_loss, inactive_rows, masked_loss, supports_masked_loss
from izitorch.ensemble.optimizer import StackedOptimizer
from izitorch.errors import IzitorchError
from izitorch.state import Slot

# A stacked parameter is a column range of the flat [K, N] tensor, so it is not "dense" and
# autograd warns (once) that its gradient, a view with exactly the same strides, breaks the
# layout contract. The accumulation is in place and correct; the warning is a false positive,
# silenced inside VectorGroup.backward only (never globally: this is the user's process).
_relaxed_grad_layout = getattr(torch.autograd, "enforce_grad_layout_policy", None)
_LAYOUT_WARNING = "grad and param do not obey the gradient layout contract"


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
            check_groupable(slots)
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
        frozen = inactive_rows(active, self.size)
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
        flattened ``[K*B, ...]`` outputs, with fewer kernels than ``vmap`` over the criterion;
        any other criterion goes through ``vmap``. With ``mask`` (``[K, B]`` bool, parallel folds),
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
            raise IzitorchError(
                f"{type(criterion).__name__} cannot be restricted to each member's samples; parallel folds support CrossEntropyLoss, MSELoss and L1Loss"
            )
        if isinstance(outputs, torch.Tensor) and isinstance(target, torch.Tensor):
            loss = batched_loss(self.slots[0].criterion, outputs, target)
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
        with warnings.catch_warnings():  # a torch without the policy switch: only the warning to silence
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

    def member_params(self, k: int) -> list[nn.Parameter]:
        """Member ``k``'s own parameters, in the order of :attr:`param_names` (the keys of its
        optimizer's ``state``)."""
        return list(self._member_params[k])

    def member_rows(self, stacked: torch.Tensor, k: int) -> list[torch.Tensor]:
        """Views of member ``k``'s row of ``stacked``, a ``[K, N]`` tensor laid out as
        :attr:`flat` (the stacked optimizer's state): one per parameter, shaped like it."""
        return [self._row(stacked, k, span) for span in self._spans]

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

        A resume state saves this instead of K per-member state dicts: a few stacked tensors
        pickle much faster than thousands of small ones.
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

        Where no module class of the members overrides ``train``, the flags are set directly,
        which is what ``Module.train`` does, without its recursion through ``__setattr__`` for
        every module of every member. The module list is the members' at grouping: the group
        runs that structure and no other (a module attached to a member later is not switched).
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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``device_type`` now, or None outside autocast."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
