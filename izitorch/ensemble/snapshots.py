"""Checkpoints of a vectorized group's members built from copies of their rows of the group.

Why: a checkpoint is a snapshot of a member's weights and optimizer state taken at an epoch's end
and serialised later, at the run's next flush (:mod:`izitorch.held`). Copying a member's state
dicts costs a copy and a walk per tensor (a dozen or more a model, K members an epoch), and with
files held between flushes most of those snapshots are replaced by the next epoch's before they
are serialised. Here an epoch's end copies the member's rows of the group's stacked tensors (a
handful of tensors whatever the model) to the CPU, and the checkpoint is built from them when its
file is serialised: the same dict, tensors and containers that ``slot.model.state_dict()`` and
``slot.optimizer.state_dict()`` gave at the epoch's end, on the CPU, each tensor its own (a
member's file holds the member alone).

A group whose members' state dicts hold anything besides their parameters and buffers (a
module's extra state, or its own ``state_dict``), or whose optimizers' state dicts pass through
hooks, has no template: its members' checkpoints are copied whole, as any lone model's are.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from izitorch.ensemble.group import VectorGroup
from izitorch.io import tensor_bytes
from izitorch.state import standalone

CPU = torch.device("cpu")


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
        for slot in group.slots:  # an optimizer whose state dict is its own, or passes through hooks
            optimizer = slot.optimizer
            if type(optimizer).state_dict is not torch.optim.Optimizer.state_dict:
                return None
            if optimizer._optimizer_state_dict_pre_hooks or optimizer._optimizer_state_dict_post_hooks:
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


def member_checkpoint(group: VectorGroup, template: Template, k: int, epoch: int, scheduler: dict | None) -> tuple[Callable[[], dict], int]:
    """A function that builds member ``k``'s checkpoint of this moment as
    :func:`izitorch.plugins.checkpoint.checkpoint` lays it out, and its tensors' bytes.

    Now: a CPU copy of the member's rows of the group's stacked tensors (weights, buffers,
    optimizer state, step counts: a handful of tensors, whatever the model). At the call: the
    state dicts built from them (``scheduler``: its scheduler's state, copied; None: none)."""
    optimizer = group.slots[k].optimizer.state_dict()  # its state's tensors are views of the group's: copied below
    param_groups = optimizer["param_groups"]  # torch packs new dicts: only a tensor in them is shared
    if any(isinstance(value, torch.Tensor) for options in param_groups for value in options.values()):
        param_groups = standalone(param_groups, device="cpu")
    entries = sorted(optimizer["state"])  # the parameters with state at this moment
    views = {
        "flat": group.flat[k],
        "buffers": {name: buffer[k] for name, buffer in group.buffers.items()},
        "state": {key: stacked[k] for key, stacked in group.optimizer.state.items()},
        "steps": group.optimizer.steps[k],
    }
    rows = standalone(views, device=CPU)  # on the CPU: a checkpoint loads with a plain torch.load anywhere

    def build() -> dict:
        params = group.member_rows(rows["flat"].unsqueeze(0), 0)
        model = copy.copy(template.empty)  # an OrderedDict with the module versions torch loads by
        for key, kind, source in template.sources:
            model[key] = (params[source] if kind == "param" else rows["buffers"][source]).clone()
        stacked = {key: group.member_rows(row.unsqueeze(0), 0) for key, row in rows["state"].items()}
        packed = {j: {key: value.clone() for key, value in group.optimizer.entry(stacked, rows["steps"], j).items()} for j in entries}
        built = {"epoch": epoch, "state_dict": model, "optimizer": {"state": packed, "param_groups": param_groups}}
        if scheduler is not None:
            built["scheduler"] = scheduler
        return built

    return build, tensor_bytes(rows)
