"""Checkpoints of a vectorized group's members from one copy of its stacked state.

Why: a checkpoint is a snapshot of a member's weights and optimizer state taken at an epoch's end
and serialised later, at the run's next flush (:mod:`izitorch.held`). Copying each member's
tensors one by one costs K state dicts of small copies per epoch, most of them replaced by the
next epoch's before any flush. Here an epoch's end copies the group's stacked tensors once
(:meth:`~izitorch.ensemble.group.VectorGroup.state_dict`), and each member's checkpoint is
built from that copy when its file is serialised: the same dict, tensors and containers that
``slot.model.state_dict()`` and ``slot.optimizer.state_dict()`` gave at the epoch's end, each
tensor its own (a member's file holds the member alone).

A group whose members' state dicts hold anything besides their parameters and buffers (a
module's extra state, or its own ``state_dict``) has no template: its members' checkpoints are
copied one by one, as any lone model's are.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from izitorch.ensemble.group import VectorGroup
from izitorch.io import tensor_bytes
from izitorch.state import standalone


class Template:
    """A member's ``model.state_dict()`` with its values taken out (its type, keys and torch's
    ``_metadata`` kept: copied for each member), and where each value lives in the group:
    ``("param", j)``, the j-th of :attr:`VectorGroup.param_names`, or ``("buffer", name)``."""

    def __init__(self, empty: dict, sources: list[tuple[str, str, Any]]) -> None:
        self.empty, self.sources = empty, sources

    @classmethod
    def of(cls, group: VectorGroup) -> Template | None:
        """The template of ``group``'s members, or None where a member's state dict holds more
        than its parameters and buffers, or a module writes its own."""
        model = group.slots[0].model
        plain = nn.Module.state_dict, nn.Module._save_to_state_dict
        if any((type(module).state_dict, type(module)._save_to_state_dict) != plain for module in model.modules()):
            return None
        params = {name: j for j, name in enumerate(group.param_names)}
        buffers = set(group.buffer_names)
        empty = model.state_dict()
        sources = []
        for key in empty:
            if key in params:
                sources.append((key, "param", params[key]))
            elif key in buffers:
                sources.append((key, "buffer", key))
            else:
                return None
            empty[key] = None  # no reference to the live tensors
        return cls(empty, sources)


class GroupMoment:
    """One copy of a group's stacked state (made at the first member asked for), from which each
    member's checkpoint of that moment is built when it is serialised."""

    def __init__(self, group: VectorGroup, template: Template) -> None:
        self.group, self.template = group, template
        self._state: dict | None = None
        self._size = 0

    def checkpoint(self, k: int, epoch: int, scheduler: dict | None) -> tuple[Callable[[], dict], int]:
        """A function that builds member ``k``'s checkpoint as
        :func:`izitorch.plugins.checkpoint.checkpoint` lays it out (``scheduler``: its scheduler's
        state, copied; None: no scheduler), and about its tensors' bytes."""
        if self._state is None:
            self._state = self.group.state_dict()
            self._size = tensor_bytes(self._state) // self.group.size
        state, group, template = self._state, self.group, self.template
        optimizer = group.slots[k].optimizer.state_dict()  # its state's tensors are views of the group's: rebuilt below
        param_groups = optimizer["param_groups"]  # torch packs new dicts: only a tensor in them is shared
        if any(isinstance(value, torch.Tensor) for options in param_groups for value in options.values()):
            param_groups = standalone(param_groups)
        entries = sorted(optimizer["state"])  # the parameters with state at this moment

        def build() -> dict:
            rows = group.member_rows(state["flat"], k)
            model = copy.copy(template.empty)  # an OrderedDict with the module versions torch loads by
            for key, kind, source in template.sources:
                model[key] = (rows[source] if kind == "param" else state["buffers"][source][k]).clone()
            stacked = {key: group.member_rows(value, k) for key, value in state["optimizer"]["state"].items()}
            steps = state["optimizer"]["steps"]
            packed = {}
            for j in entries:
                if "exp_avg" in stacked:
                    packed[j] = {"step": steps[k, j].clone(), "exp_avg": stacked["exp_avg"][j].clone(), "exp_avg_sq": stacked["exp_avg_sq"][j].clone()}
                else:
                    packed[j] = {"momentum_buffer": stacked["momentum_buffer"][j].clone()}
            built = {"epoch": epoch, "state_dict": model, "optimizer": {"state": packed, "param_groups": param_groups}}
            if scheduler is not None:
                built["scheduler"] = scheduler
            return built

        return build, self._size
