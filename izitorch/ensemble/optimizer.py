"""The stacked optimizer: one SGD / Adam / AdamW update of every member of a vectorized group.

The update of all members is a handful of elementwise operations on ``[K, N]`` tensors with
per-member hyper-parameters as ``[K, 1]`` columns, whatever the number of parameter tensors; on
the CPU, when the members share the hyper-parameters torch's fused kernels take as one value, a
single fused SGD / Adam call (see :class:`_FusedStep`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import attrs
import numpy as np
import torch

from izitorch.data import host_to_device
from izitorch.ensemble.kernels import inactive_rows

if TYPE_CHECKING:
    from izitorch.ensemble.group import VectorGroup


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
            columns = {"lr": lr, "one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2, "eps": eps, "wd": wd, "decay": 1 - lr * wd}
            self.any_wd = bool((wd != 0).any())
            self._lr64, self._beta1_64, self._beta2_64 = lr.numpy(), beta1.numpy(), beta2.numpy()
        flat = self.group.flat
        self._columns = {k: v.to(dtype=flat.dtype, device=flat.device).unsqueeze(1) for k, v in columns.items()}
        self._fused = _FusedStep.of(self, values, self._fused) if self.use_fused else None
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
        frozen = inactive_rows(active, self.group.size)
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
        # numpy rather than a dozen tiny torch kernels
        step = self.steps[:, 0].numpy().astype(np.float64)
        bias1 = 1 - self._beta1_64**step
        bias2_sqrt = np.sqrt(1 - self._beta2_64**step)
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
        """:meth:`_sgd` / :meth:`_adam` as one call of torch's fused kernel (CPU), in place of a
        dozen elementwise operations: every member is one row, with its own Adam step count.
        Members that differ only in learning rate (a sweep) share the kernel: it writes each
        member's unscaled update (lr = 1) into a zeroed scratch tensor, which one ``addcmul_``
        scales by each member's lr. ``is_first_step``: no member has stepped yet (SGD's momentum
        buffer then starts as the gradient)."""
        fused, c = self._fused, self._columns
        param = self.group.flat
        if fused.lr is None:
            fused.scratch.zero_()
        target = fused.rows["param"] if fused.lr is not None else fused.rows["scratch"]
        lr = 1.0 if fused.lr is None else fused.lr
        if self.kind == "sgd":
            buffers = fused.rows["momentum_buffer"] if fused.options["momentum"] else []
            torch._fused_sgd_(target, fused.rows["grad"], buffers, lr=lr, nesterov=self.nesterov, maximize=False, is_first_step=is_first_step, **fused.options)
        else:
            self.steps += 1  # the kernel reads the step; torch's own fused Adam increments it first
            if self.any_wd and self.decoupled:
                param.mul_(c["decay"])
            torch._fused_adam_(
                target,
                fused.rows["grad"],
                fused.rows["exp_avg"],
                fused.rows["exp_avg_sq"],
                [],
                fused.rows["step"],
                lr=lr,
                amsgrad=False,
                maximize=False,
                **fused.options,
            )
        if fused.lr is None:
            param.addcmul_(fused.scratch, c["lr"])

    # -- members' view of the state

    def _install(self, k: int) -> None:
        """Put views of member ``k``'s rows into its own optimizer's ``state``."""
        group, optimizer = self.group, self.group.slots[k].optimizer
        if self.kind == "sgd" and not self.momentum_mask[k]:
            self._installed[k] = True  # torch keeps no state for momentum 0
            return
        rows = {key: group.member_rows(stacked, k) for key, stacked in self.state.items()}
        for j, param in enumerate(group.member_params(k)):
            optimizer.state[param] = self.entry(rows, self.steps[k], j)
        self._installed[k] = True

    def entry(self, rows: dict[str, list[torch.Tensor]], steps: torch.Tensor, j: int) -> dict[str, torch.Tensor]:
        """Parameter ``j``'s state as a lone torch optimizer keeps it, from a member's rows of the
        stacked state (:meth:`VectorGroup.member_rows` of each) and its step counts ``[P]``."""
        if self.kind == "sgd":
            return {"momentum_buffer": rows["momentum_buffer"][j]}
        return {"step": steps[j], "exp_avg": rows["exp_avg"][j], "exp_avg_sq": rows["exp_avg_sq"][j]}

    def state_dict(self) -> dict:
        return {"state": {key: value.clone() for key, value in self.state.items()}, "steps": self.steps.clone(), "started": list(self.started)}

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
            for stacked in self.state.values():  # what the loop below does row by row, in one operation each
                stacked.zero_()
            self.steps.zero_()
            self.started, self._installed = [False] * group.size, [False] * group.size
            return
        for k, slot in enumerate(group.slots):
            states = [slot.optimizer.state.get(param) or {} for param in group.member_params(k)]
            started = any(states)
            rows = {key: group.member_rows(stacked, k) for key, stacked in self.state.items()}
            for j, state in enumerate(states):
                for key in self.state:
                    row = rows[key][j]
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
    def of(cls, optimizer: "StackedOptimizer", values: list[tuple], previous: "_FusedStep | None" = None) -> "_FusedStep | None":
        """The fused step for these hyper-parameter ``values``, or None where it does not apply.
        ``previous`` (the last one made for this optimizer) lends its scratch tensor and row
        views, which depend on the stacked tensors only: a scheduler stepping per optimizer
        step changes the values at every step."""
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
        if previous is not None:
            return cls(lr, options, previous.scratch, previous.rows)
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
        torch._fused_adam_(
            [one.clone()],
            [one.clone()],
            [one.clone()],
            [one.clone()],
            [],
            [torch.ones(())],
            amsgrad=False,
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )
        torch._fused_sgd_(
            [one.clone()],
            [one.clone()],
            [one.clone()],
            weight_decay=0.0,
            momentum=0.9,
            lr=0.1,
            dampening=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=True,
        )
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True
