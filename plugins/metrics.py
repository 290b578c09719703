"""Loss, accuracy (%), IoU (fraction) and the confusion matrix, from accumulated counts.

The built-in metrics, written to the metric protocol of :mod:`izitorch.metrics` (K members,
optional sample mask; a lone model is K = 1). Accumulators stay on the model's device and never
call ``.item()`` per batch; values are read once per phase. Accuracy and IoU come from the epoch's confusion matrix, not from averaging
per-batch means, so they are exact whatever the batch sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from izitorch.hookspecs import hookimpl
from izitorch.data import host_to_device


#: Predictions (or losses) kept before they are counted in bulk: bounds the memory a phase
#: holds (8 MB of int64 predictions) while counting only a few times a phase.
FLUSH_ELEMENTS = 1 << 20
FLUSH_BATCHES = 1024


class _WeightedSums:
    """Per-member sums of ``value * weight`` and of ``weight``, added up in bulk.

    Adding a batch's losses to running totals takes a few small tensor operations per batch,
    as much as a small model's forward pass; here a batch is appended to a list and the sums
    take one ``stack`` per ``FLUSH_BATCHES`` batches. A weight of 0 (a member that did not
    count the batch) leaves out its value, even a NaN.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.pending: list[tuple[torch.Tensor, int | torch.Tensor]] = []

    def add(self, values: torch.Tensor, weight: int | torch.Tensor) -> None:
        self.pending.append((values, weight))
        if len(self.pending) >= FLUSH_BATCHES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v for v, _ in self.pending]).float()  # [S, *shape]
        weights = [w for _, w in self.pending]
        if all(isinstance(w, int) for w in weights):
            weights = host_to_device(torch.tensor(weights, dtype=torch.float32), values.device)
            weights = weights.reshape(-1, *([1] * (values.ndim - 1))).expand_as(values)
        else:
            weights = torch.stack([w.float() if isinstance(w, torch.Tensor) else torch.full_like(values[0], w) for w in weights])
        total = torch.where(weights > 0, values * weights, 0.0).sum(0)
        count = weights.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count = count if self.count is None else self.count + count
        self.pending = []

    def means(self) -> list[float | None] | None:
        """Each member's weighted mean (None for a member with no weight), or None if nothing was added."""
        self.flush()
        if self.total is None:
            return None
        return [total / count if count else None for total, count in zip(self.total.reshape(-1).tolist(), self.count.reshape(-1).tolist())]


class _CellCounts:
    """Confusion counts of K members' predictions against one truth, counted in bulk.

    Counting a batch as it comes takes several small tensor operations, as much as a vectorized
    group's optimizer step; here a batch costs the ``argmax`` done by the caller and a list
    append, and the counting runs once per ``FLUSH_ELEMENTS`` predictions, at the latest
    when the phase's values are read. Out-of-range targets (an ``ignore_index``) and samples
    that ``keep`` leaves out go to one extra cell per member that is dropped: no boolean
    indexing, so no data-dependent shape and no device synchronisation.
    """

    def __init__(self, members: int, classes: int) -> None:
        self.members, self.classes = members, classes
        self.cells = classes * classes + 1
        self.counts: torch.Tensor | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.pending_elements = 0

    def add(self, predicted: torch.Tensor, truth: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """``predicted`` ``[K, n]`` class indices, ``truth`` ``[n]``, ``keep`` ``[K, n]`` bool or None."""
        self.pending.append((predicted, truth, keep))
        self.pending_elements += predicted.numel()
        if self.pending_elements >= FLUSH_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        predicted = _cat([p for p, _, _ in self.pending], 1)
        truth = _cat([t for _, t, _ in self.pending], 0).reshape(1, -1)
        valid = (truth >= 0) & (truth < self.classes)
        if any(keep is not None for _, _, keep in self.pending):
            valid = valid & _cat([torch.ones_like(p, dtype=torch.bool) if k is None else k for p, _, k in self.pending], 1)
        offsets = torch.arange(self.members, device=predicted.device).reshape(-1, 1) * self.cells
        pairs = torch.where(valid, truth * self.classes + predicted, self.cells - 1) + offsets
        counts = count_cells(pairs.reshape(-1), self.members * self.cells)
        self.counts = counts if self.counts is None else self.counts + counts
        self.pending, self.pending_elements = [], 0

    def matrices(self) -> np.ndarray | None:
        """``[K, C, C]`` int64 confusion matrices (rows true), or None if nothing was added."""
        self.flush()
        if self.counts is None:
            return None
        per_member = self.counts.reshape(self.members, self.cells)[:, :-1]
        return per_member.reshape(self.members, self.classes, self.classes).cpu().numpy().astype(np.int64)


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _scores(matrices: np.ndarray) -> list[dict[str, Any]]:
    """Each member's scores from its ``[C, C]`` matrix of ``matrices`` ``[K, C, C]``, computed
    for all K at once (one numpy operation each, not one per member)."""
    return [
        {"accuracy": acc, "IoU": iou, "confusion_matrix": matrix}
        for acc, iou, matrix in zip(accuracies(matrices).tolist(), mean_ious(matrices).tolist(), matrices)
    ]


class LossMeter:
    """The sample-weighted mean of each member's criterion (mean-reduced) batch losses.

    A batch weighs its size; with ``mask``, member ``k``'s batch weighs the samples it counts,
    ``mask[k].sum()``, and a member with none (frozen in this batch) leaves out its loss, even
    a NaN.
    """

    names = {"loss": "lower"}

    def __init__(self, num_classes: int | None = None, members: int = 1) -> None:
        self.members = members
        self.sums = _WeightedSums()

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        weight = mask.sum(1) if mask is not None else target.shape[0] if target.ndim else 1
        self.sums.add(losses.detach(), weight)

    def compute(self) -> list[dict[str, Any]]:
        means = self.sums.means()
        if means is None:
            return [{} for _ in range(self.members)]
        return [{} if mean is None else {"loss": mean} for mean in means]


class ConfusionMeter:
    """Each member's confusion matrix (rows true, columns predicted) for class scores
    ``[K, B, C, ...]``, with accuracy (%) and mean IoU (fraction) from it.

    Integer targets only; other targets (regression) produce no classification metrics.
    ``num_classes`` defaults to the output's class dimension. Targets outside ``[0, C)`` (an
    ``ignore_index``) are left out; with ``mask``, member ``k`` counts only its own samples.
    """

    names = {"accuracy": "higher", "IoU": "higher"}

    def __init__(self, num_classes: int | None = None, members: int = 1) -> None:
        self.num_classes = num_classes
        self.members = members
        self.cells: _CellCounts | None = None
        self.applies = True

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if not self.applies:
            return
        if target.is_floating_point() or outputs.ndim < 3 or outputs.shape[1] != target.shape[0]:
            self.applies = False
            return
        members = outputs.shape[0]
        if self.cells is None:
            self.cells = _CellCounts(members, self.num_classes or outputs.shape[2])
        predicted = outputs.argmax(dim=2).reshape(members, -1)
        keep = None
        if mask is not None:
            per_sample = target.reshape(target.shape[0], -1).shape[1]  # pixels per sample (segmentation)
            keep = mask.reshape(members, -1, 1).expand(-1, -1, per_sample).reshape(members, -1)
        self.cells.add(predicted, target.reshape(-1), keep)

    def compute(self) -> list[dict[str, Any]]:
        matrices = self.cells.matrices() if self.applies and self.cells is not None else None
        if matrices is None:
            return [{} for _ in range(self.members)]
        return _scores(matrices)


def count_cells(pairs: torch.Tensor, cells: int) -> torch.Tensor:
    """``torch.bincount(pairs, minlength=cells)`` for indices known to lie in ``[0, cells)``.

    On CUDA, ``bincount`` reads the indices' range back to the host to size its result: a
    device synchronisation per call (per flush of :class:`_CellCounts`). The size is known
    here, so an ``index_add_`` into a zeroed vector counts the same without one (integer sums:
    exact in any order).
    """
    if pairs.is_cuda:
        return torch.zeros(cells, dtype=torch.int64, device=pairs.device).index_add_(0, pairs, torch.ones_like(pairs))
    return torch.bincount(pairs, minlength=cells)


def accuracy(matrix: np.ndarray) -> float:
    """Percentage of samples on the diagonal."""
    return float(accuracies(matrix[None])[0])


def mean_iou(matrix: np.ndarray) -> float:
    """Mean over the classes present in truth or prediction of TP / (TP + FP + FN)."""
    return float(mean_ious(matrix[None])[0])


def accuracies(matrices: np.ndarray) -> np.ndarray:
    """:func:`accuracy` of each ``[C, C]`` matrix of ``matrices`` ``[K, C, C]`` (0 where empty)."""
    totals = matrices.sum(axis=(1, 2))
    correct = np.trace(matrices, axis1=1, axis2=2)
    return np.divide(100.0 * correct, totals, out=np.zeros(len(matrices)), where=totals > 0)


def mean_ious(matrices: np.ndarray) -> np.ndarray:
    """:func:`mean_iou` of each ``[C, C]`` matrix of ``matrices`` ``[K, C, C]`` (0 where empty).

    Absent classes count as zeros in each row's sum, so numpy adds the ratios in another order
    than a mean over the present classes alone: the two may differ in the last bit (~1e-16).
    """
    tp = np.diagonal(matrices, axis1=1, axis2=2).astype(np.float64)
    union = matrices.sum(axis=1) + matrices.sum(axis=2) - tp
    present = union > 0
    ious = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    classes = present.sum(axis=1)
    return np.divide(ious.sum(axis=1), classes, out=np.zeros(len(matrices)), where=classes > 0)


@hookimpl
def izitorch_register_metrics(register) -> None:
    register("loss", LossMeter)
    register("classification", ConfusionMeter)
