"""MAE, MSE, RMSE and R^2 of K members' outputs against a float target, from accumulated sums.

A member's values are exact over the pass whatever the batch sizes: each batch adds, per member
and per output column, the sums of ``|error|``, ``error^2``, ``t`` and ``t^2`` (``t`` the target
less the first batch's mean, which keeps ``sum(t^2) - sum(t)^2 / n`` from cancelling), and the
samples counted; the values are read from them once per phase. The sums are kept in float64
where the device has it. A multi-output target ``[B, D, ...]`` is averaged over its columns as
scikit-learn's ``multioutput="uniform_average"`` does: MAE and MSE over all values, RMSE and
R^2 as the mean of each column's. A column whose target is constant has R^2 1 when predicted
exactly, else 0 (scikit-learn's ``force_finite``).
"""

from __future__ import annotations

from typing import Any

import torch


class RegressionMeter:
    """The regression metrics of outputs ``[K, B, ...]`` against a float target of a member's
    output shape ``[B, ...]`` (or ``[B]`` against outputs ``[K, B, 1]``); any other pair
    (class scores and integer labels) produces none. With ``mask``, member ``k`` counts only
    its own samples, and a value it leaves out (even a NaN) adds nothing."""

    names = {"MAE": "lower", "MSE": "lower", "RMSE": "lower", "R2": "higher"}

    def __init__(self, num_classes: int | None = None, members: int = 1) -> None:
        self.members = members
        self.sums: torch.Tensor | None = None  # [K, 4, D]: |e|, e^2, t, t^2
        self.count: torch.Tensor | int = 0  # samples per member ([K, 1]), or a number without masks
        self.center: torch.Tensor | None = None  # [D]: the first batch's target mean
        self.applies = True

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if not self.applies:
            return
        if not target.is_floating_point() or not isinstance(outputs, torch.Tensor) or target.ndim == 0 or not _fits(outputs, target):
            self.applies = False
            return
        batch = target.shape[0]
        dtype = torch.float32 if outputs.device.type == "mps" else torch.float64
        truth = target.reshape(batch, -1).to(dtype)  # [B, D]
        predicted = outputs.reshape(outputs.shape[0], batch, -1).to(dtype)  # [K, B, D]
        if self.center is None:
            self.center = truth.mean(0)
        error = predicted - truth
        shifted = (truth - self.center).expand_as(error)
        stats = torch.stack([error.abs(), error.square(), shifted, shifted.square()], 1)  # [K, 4, B, D]
        if mask is not None:
            stats = torch.where(mask[:, None, :, None], stats, 0.0)
            count: torch.Tensor | int = mask.sum(1, keepdim=True)
        else:
            count = batch
        sums = stats.sum(2)
        self.sums = sums if self.sums is None else self.sums + sums
        self.count = self.count + count

    def merge(self, other: "RegressionMeter") -> None:
        """Count what ``other`` (the same members' meter on another rank) counted. Its target
        sums are centred on its own first batch: moved to this meter's centre first (with ``d``
        the shift, ``sum(t + d) = sum(t) + n d`` and ``sum((t + d)^2) = sum(t^2) + 2 d sum(t) + n d^2``)."""
        self.applies = self.applies and other.applies
        if other.sums is None:
            return
        if self.sums is None:
            self.sums, self.count, self.center = other.sums, other.count, other.center
            return
        shift = (other.center - self.center).to(other.sums.dtype)  # [D]
        count = other.count.to(other.sums.dtype) if isinstance(other.count, torch.Tensor) else other.count  # [K, 1] or a number
        absolute, squared, total, total_squares = other.sums.unbind(1)  # each [K, D]
        moved = torch.stack([absolute, squared, total + count * shift, total_squares + 2 * shift * total + count * shift.square()], 1)
        self.sums = self.sums + moved
        self.count = self.count + other.count

    def compute(self) -> list[dict[str, Any]]:
        if not self.applies or self.sums is None:
            return [{} for _ in range(self.members)]
        sums = self.sums.cpu().double()
        counts = self.count.cpu().double() if isinstance(self.count, torch.Tensor) else torch.full((self.members, 1), float(self.count), dtype=torch.float64)
        values = []
        for k in range(self.members):
            n = float(counts[k, 0])
            if n == 0:
                values.append({})
                continue
            absolute, squared, total, total_squares = sums[k]
            mse_columns = squared / n
            spread = total_squares - total.square() / n  # sum of (t - mean)^2 per column
            r2 = torch.where(spread > 0, 1 - squared / spread.clamp(min=1e-300), torch.where(squared == 0, 1.0, 0.0))
            values.append(
                {
                    "MAE": float(absolute.mean() / n),
                    "MSE": float(mse_columns.mean()),
                    "RMSE": float(mse_columns.sqrt().mean()),
                    "R2": float(r2.mean()),
                }
            )
        return values


def _fits(outputs: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether each member's output ``outputs[k]`` holds one value per target value."""
    shape = tuple(outputs.shape[1:])
    return shape == tuple(target.shape) or (target.ndim == 1 and shape == (target.shape[0], 1))
