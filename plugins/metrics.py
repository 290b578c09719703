"""Loss, accuracy (%), IoU (fraction) and the confusion matrix, from accumulated counts.

Accumulators stay on the model's device and never call ``.item()`` per batch; values are read
once per phase. Accuracy and IoU come from the epoch's confusion matrix, not from averaging
per-batch means, so they are exact whatever the batch sizes.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from izitorch import hookimpl
from izitorch.data import host_to_device


class LossMeter:
    """The sample-weighted mean of the criterion's (mean-reduced) batch losses."""

    @classmethod
    def stacked(cls, num_classes: int | None, members: int) -> "StackedLossMeter":
        return StackedLossMeter(members)

    def __init__(self, num_classes: int | None = None) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        n = target.shape[0] if target.ndim else 1
        weighted = loss.float() * n
        self.total = weighted if self.total is None else self.total + weighted
        self.count += n

    def compute(self) -> dict[str, Any]:
        if self.total is None:
            return {}
        return {"loss": (self.total / self.count).item()}


class ConfusionMeter:
    """Confusion matrix (rows true, columns predicted) for class scores ``(N, C, ...)``.

    Integer targets only; other targets (regression) produce no classification metrics.
    ``num_classes`` defaults to the output's class dimension. Targets outside ``[0, C)`` (an
    ``ignore_index``) are left out.
    """

    @classmethod
    def stacked(cls, num_classes: int | None, members: int) -> "StackedConfusionMeter":
        return StackedConfusionMeter(num_classes, members)

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self.counts: torch.Tensor | None = None
        self.applies = True

    def update(self, output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        if not self.applies:
            return
        if target.is_floating_point() or output.ndim < 2 or output.shape[0] != target.shape[0]:
            self.applies = False
            return
        classes = self.num_classes or output.shape[1]
        predicted = output.argmax(dim=1).reshape(-1)
        truth = target.reshape(-1)
        # Out-of-range targets (an ignore_index) go to one extra bin that is dropped: no boolean
        # indexing, so no data-dependent shape and no device synchronisation.
        cells = classes * classes
        pairs = torch.where((truth >= 0) & (truth < classes), truth * classes + predicted, cells)
        counts = count_cells(pairs, cells + 1)
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self) -> dict[str, Any]:
        if not self.applies or self.counts is None:
            return {}
        classes = int(round((self.counts.numel() - 1) ** 0.5))
        matrix = self.counts[:-1].reshape(classes, classes).cpu().numpy().astype(np.int64)
        return {"accuracy": accuracy(matrix), "IoU": mean_iou(matrix), "confusion_matrix": matrix}


class StackedLossMeter:
    """:class:`LossMeter` for the K members of a vectorized group at once (losses ``[K]``).

    With ``mask`` (``[K, B]`` bool, parallel folds), member ``k``'s batch counts for the
    samples it trained on, ``mask[k].sum()``, not for the whole batch.
    """

    accepts_mask = True

    def __init__(self, members: int) -> None:
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, active: list[bool] | None = None,
               mask: torch.Tensor | None = None) -> None:
        if mask is not None:
            weights = mask.sum(1).to(torch.float32)
        else:
            n = target.shape[0] if target.ndim else 1
            weights = torch.full_like(losses, float(n), dtype=torch.float32)
        if active is not None:
            weights = weights * host_to_device(torch.tensor(active, dtype=torch.float32), losses.device)
        weighted = torch.where(weights > 0, losses.float() * weights, torch.zeros_like(weights))
        self.total = weighted if self.total is None else self.total + weighted
        self.count = weights if self.count is None else self.count + weights

    def compute(self) -> list[dict[str, Any]]:
        if self.total is None:
            return []
        return [{"loss": total / count} if count else {} for total, count in zip(self.total.tolist(), self.count.tolist())]


class StackedConfusionMeter:
    """:class:`ConfusionMeter` for K members at once: one ``bincount`` over ``[K, B, C, ...]``.

    With ``mask`` (``[K, B]`` bool, parallel folds), member ``k`` counts only its own samples.
    """

    accepts_mask = True

    def __init__(self, num_classes: int | None, members: int) -> None:
        self.num_classes = num_classes
        self.members = members
        self.counts: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None  # member k's cells start at k * cells
        self.applies = True

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, active: list[bool] | None = None,
               mask: torch.Tensor | None = None) -> None:
        if not self.applies:
            return
        if target.is_floating_point() or outputs.ndim < 3 or outputs.shape[1] != target.shape[0]:
            self.applies = False
            return
        members, classes = outputs.shape[0], self.num_classes or outputs.shape[2]
        cells = classes * classes + 1  # the last cell of each member collects what is dropped
        predicted = outputs.argmax(dim=2).reshape(members, -1)
        truth = target.reshape(1, -1)  # shared by every member: checked once, broadcast over K
        valid = (truth >= 0) & (truth < classes)
        if active is not None:
            valid = valid & host_to_device(torch.tensor(active), truth.device).reshape(members, 1)
        if mask is not None:
            per_sample = target.reshape(target.shape[0], -1).shape[1]  # pixels per sample (segmentation)
            valid = valid & mask.reshape(members, -1, 1).expand(-1, -1, per_sample).reshape(members, -1)
        if self.offsets is None or self.offsets.device != truth.device:
            self.offsets = torch.arange(members, device=truth.device).reshape(members, 1) * cells
        pairs = torch.where(valid, truth * classes + predicted, cells - 1) + self.offsets
        counts = count_cells(pairs.reshape(-1), members * cells)
        if self.counts is None:
            self.counts = counts
        else:
            self.counts += counts

    def compute(self) -> list[dict[str, Any]]:
        if not self.applies or self.counts is None:
            return [{} for _ in range(self.members)]
        per_member = self.counts.reshape(self.members, -1)[:, :-1].cpu().numpy().astype(np.int64)
        classes = int(round(per_member.shape[1] ** 0.5))
        results = []
        for counts in per_member:
            matrix = counts.reshape(classes, classes)
            results.append({"accuracy": accuracy(matrix), "IoU": mean_iou(matrix), "confusion_matrix": matrix})
        return results


def count_cells(pairs: torch.Tensor, cells: int) -> torch.Tensor:
    """``torch.bincount(pairs, minlength=cells)`` for indices known to lie in ``[0, cells)``.

    On CUDA, ``bincount`` reads the indices' range back to the host to size its result: a
    device synchronisation per batch. The size is known here, so an ``index_add_`` into a
    zeroed vector counts the same without one (integer sums: exact in any order).
    """
    if pairs.is_cuda:
        return torch.zeros(cells, dtype=torch.int64, device=pairs.device).index_add_(0, pairs, torch.ones_like(pairs))
    return torch.bincount(pairs, minlength=cells)


def accuracy(matrix: np.ndarray) -> float:
    """Percentage of samples on the diagonal."""
    total = matrix.sum()
    return float(100.0 * np.trace(matrix) / total) if total else 0.0


def mean_iou(matrix: np.ndarray) -> float:
    """Mean over the classes present in truth or prediction of TP / (TP + FP + FN)."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else 0.0


@hookimpl
def izitorch_register_metrics(register) -> None:
    register("loss", LossMeter)
    register("classification", ConfusionMeter)
