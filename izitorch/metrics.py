"""The metric protocol: accumulators over the K members of a stack, with an optional sample mask.

A metric factory registered through ``izitorch_register_metrics`` declares ``names`` (each value
it computes, with the direction that is better: ``"higher"`` or ``"lower"``) and is called as
``factory(num_classes, members)``; its ``update(outputs [K, B, ...], target [B, ...], losses [K],
mask [K, B] | None)`` runs per batch without synchronising the device, and ``compute()`` returns
one dict per member once per phase. A lone model is K = 1.
"""
from __future__ import annotations

from typing import Any

import torch


def meters_for(factories: dict[str, Any], num_classes: int | None, members: int) -> list[Any]:
    """A fresh accumulator of every registered metric for a stack of ``members``."""
    return [_meter(factory, num_classes, members) for factory in factories.values()]


def compute_all(meters: list[Any], members: int) -> list[dict[str, Any]]:
    """Every metric's values, one dict per member."""
    values: list[dict[str, Any]] = [{} for _ in range(members)]
    for meter in meters:
        for k, member in enumerate(meter.compute()):
            values[k].update(member)
    return values


def _meter(factory: Any, num_classes: int | None, members: int) -> Any:
    if hasattr(factory, "names"):
        return factory(num_classes, members)
    if hasattr(factory, "stacked"):
        return _Stacked(factory.stacked(num_classes, members))
    return LegacyMeters(factory, num_classes, members)


class _Stacked:
    def __init__(self, meter: Any) -> None:
        self.meter = meter

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.meter.update(outputs, target, losses, None, mask=mask)

    def compute(self) -> list[dict[str, Any]]:
        return self.meter.compute()


class LegacyMeters:
    """A metric of the previous protocol (``factory(num_classes)``, ``update(output, target, loss)``,
    ``compute() -> dict``): one accumulator per member, each fed its own samples."""

    def __init__(self, factory: Any, num_classes: int | None, members: int) -> None:
        self.meters = [factory(num_classes) for _ in range(members)]

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        for k, meter in enumerate(self.meters):
            if mask is None:
                meter.update(outputs[k], target, losses[k])
            elif bool(mask[k].any()):
                meter.update(outputs[k][mask[k]], target[mask[k]], losses[k])

    def compute(self) -> list[dict[str, Any]]:
        return [meter.compute() for meter in self.meters]
