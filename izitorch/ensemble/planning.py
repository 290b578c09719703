"""Which models train as vectorized groups: ``run.multi_model``'s plan over the grouping rules."""

from __future__ import annotations

from typing import Sequence

from izitorch.ensemble.group import VectorGroup
from izitorch.ensemble.grouping import partition
from izitorch.errors import IzitorchError
from izitorch.state import Slot


def group_slots(slots: Sequence[Slot]) -> tuple[list[VectorGroup], list[Slot], list[str]]:
    """Split ``slots`` into vectorized groups (:func:`~izitorch.ensemble.grouping.partition`)
    and slots trained one by one; returns ``(groups, sequential, reasons)``, one reason per
    sequential slot. Building a group re-points its members' parameters (see :class:`VectorGroup`).
    """
    sets, reasons = partition(slots)
    groups = [VectorGroup(members, checked=True) for members in sets]
    grouped = {id(slot) for group in groups for slot in group.slots}
    sequential = [slot for slot in slots if id(slot) not in grouped]
    return groups, sequential, [reasons[slot.name] for slot in sequential]


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
        raise IzitorchError(
            f'"vectorized" needs every model in a group, but {reasons[0]}; use multi_model = "auto" to step such models one by one', "run.multi_model"
        )
    notes = [f"vectorized group of {len(g)}: {', '.join(g.names)} ({type(g.slots[0].optimizer).__name__})" for g in groups]
    return groups, sequential, notes + [f"sequential: {reason}" for reason in reasons]
