"""Loss, accuracy (%), IoU (fraction) and the confusion matrix, from accumulated counts.

The built-in metrics, written to the metric protocol of :mod:`izitorch.metrics` (K members,
optional sample mask; a lone model is K = 1). Accumulators stay on the model's device and never
call ``.item()`` per batch; values are read once per phase. Accuracy and IoU come from the epoch's confusion matrix, not from averaging
per-batch means, so they are exact whatever the batch sizes.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch

from izitorch.config import at_least, doc
from izitorch.data import host_to_device
from izitorch.hookspecs import hookimpl
from izitorch.options import plugin_options
from izitorch import torchmetrics_bridge
from izitorch.regression import RegressionMeter


#: Predictions (or losses) kept before they are counted in bulk: bounds the memory a phase
#: holds (8 MB of int64 predictions) while counting only a few times a phase.
FLUSH_ELEMENTS = 1 << 20
FLUSH_BATCHES = 1024


class _WeightedSums:
    """Per-member sums of ``value * weight`` and of ``weight``, added up in bulk.

    Adding a batch's losses to running totals takes a few small tensor operations per batch,
    as much as a small model's forward pass; here a batch is appended to a list and the sums
    take one ``stack`` per ``FLUSH_BATCHES`` batches. A weight of 0 (a member that did not
    count the batch) leaves out its value, even a NaN. Integer weights (a batch's size: no
    sample mask) are summed on the host.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | int = 0
        self.values: list[torch.Tensor] = []
        self.weights: list[int | torch.Tensor] = []

    def add(self, values: torch.Tensor, weight: int | torch.Tensor) -> None:
        self.values.append(values)
        self.weights.append(weight)
        if len(self.values) >= FLUSH_BATCHES:
            self.flush()

    def flush(self) -> None:
        if not self.values:
            return
        values = torch.stack(self.values).float()  # [S, *shape]
        weights = self.weights
        if all(type(w) is int for w in weights):
            count: torch.Tensor | int = sum(weights)
            column = host_to_device(torch.tensor(weights, dtype=torch.float32), values.device).reshape(-1, *([1] * (values.ndim - 1)))
            weighted = values * column
            total = (weighted if min(weights) > 0 else torch.where(column > 0, weighted, 0.0)).sum(0)
        else:
            stacked = torch.stack([w.float() if isinstance(w, torch.Tensor) else torch.full_like(values[0], w) for w in weights])
            total = torch.where(stacked > 0, values * stacked, 0.0).sum(0)
            count = stacked.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count = self.count + count
        self.values, self.weights = [], []

    def merge(self, other: "_WeightedSums") -> None:
        """Add ``other``'s sums (another rank's) to these."""
        self.flush()
        other.flush()
        if other.total is None:
            return
        self.total = other.total if self.total is None else self.total + other.total
        self.count = self.count + other.count

    def means(self) -> list[float | None] | None:
        """Each member's weighted mean (None for a member with no weight), or None if nothing was added."""
        self.flush()
        if self.total is None:
            return None
        totals = self.total.reshape(-1).tolist()
        counts = self.count.reshape(-1).tolist() if isinstance(self.count, torch.Tensor) else [self.count] * len(totals)
        return [total / count if count else None for total, count in zip(totals, counts)]


class _CellCounts:
    """Confusion counts of K members' predictions against one truth, counted in bulk.

    Counting a batch as it comes takes several small tensor operations, as much as a vectorized
    group's optimizer step; here a batch costs the ``argmax`` done by the caller and a list
    append, and the counting (one ``bincount``) runs once per ``FLUSH_ELEMENTS`` predictions,
    at the latest when the phase's values are read. Each member counts into ``C + 2`` rows of
    ``C`` cells: a row per true class, and two rows that are dropped: before them, targets
    below 0 (an ``ignore_index``) and the samples that ``keep`` leaves out; after them, targets
    from ``C`` up. No boolean indexing, so no data-dependent shape and no device
    synchronisation.
    """

    def __init__(self, members: int, classes: int) -> None:
        self.members, self.classes = members, classes
        self.cells = (classes + 2) * classes  # per member
        self.counts: torch.Tensor | None = None
        self.shift: torch.Tensor | int | None = None  # member k's first cell plus one row ([K, 1]; a number for K = 1)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.pending_elements = 0
        self.masked = False

    def add(self, predicted: torch.Tensor, truth: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """``predicted`` ``[K, n]`` class indices, ``truth`` ``[n]``, ``keep`` ``[K, n]`` bool or None."""
        self.pending.append((predicted, truth, keep))
        self.pending_elements += predicted.numel()
        if keep is not None:
            self.masked = True
        if self.pending_elements >= FLUSH_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        predicted = _cat([p for p, _, _ in self.pending], 1)
        row = _cat([t for _, t, _ in self.pending], 0).long().clamp(-1, self.classes)  # -1 and C: the dropped rows
        if self.masked:
            keep = _cat([torch.ones_like(p, dtype=torch.bool) if k is None else k for p, _, k in self.pending], 1)
            row = torch.where(keep, row, -1)
        if self.shift is None:
            self.shift = self.classes if self.members == 1 else (torch.arange(self.members, device=predicted.device) * self.cells + self.classes).reshape(-1, 1)
        index = torch.add(predicted, row, alpha=self.classes).add_(self.shift)
        counts = count_cells(index.reshape(-1), self.members * self.cells)
        self.counts = counts if self.counts is None else self.counts + counts
        self.pending, self.pending_elements, self.masked = [], 0, False

    def merge(self, other: "_CellCounts") -> None:
        """Add ``other``'s counts (another rank's) to these."""
        self.flush()
        other.flush()
        if other.counts is not None:
            self.counts = other.counts if self.counts is None else self.counts + other.counts

    def matrices(self) -> np.ndarray | None:
        """``[K, C, C]`` int64 confusion matrices (rows true), or None if nothing was added."""
        self.flush()
        if self.counts is None:
            return None
        counts = self.counts.cpu().numpy().reshape(self.members, self.classes + 2, self.classes)
        return counts[:, 1:-1].astype(np.int64)


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _scores(matrices: np.ndarray) -> list[dict[str, Any]]:
    """Each member's scores from its ``[C, C]`` matrix of ``matrices`` ``[K, C, C]``
    (:func:`_ratios`), with its matrix and its per-class ratios (lists of C, in ``per_class``)."""
    ratios, heads = _ratios(matrices)
    precision, recall, f1, iou = ratios.tolist()
    return [
        {
            "accuracy": head[0],
            "IoU": head[1],
            "balanced_accuracy": head[2],
            "precision": head[3],
            "recall": head[4],
            "F1": head[5],
            "confusion_matrix": matrices[k],
            "per_class": {"precision": precision[k], "recall": recall[k], "F1": f1[k], "IoU": iou[k]},
        }
        for k, head in enumerate(heads.T.tolist())
    ]


def _ratios(matrices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-class ratios ``[4, K, C]`` (precision, recall, F1, IoU) and the headline scores
    ``[6, K]`` (accuracy %, mean IoU, balanced accuracy %, macro precision, recall and F1) of
    each ``[C, C]`` matrix of ``matrices`` ``[K, C, C]`` (rows true), 0 where empty. Computed
    for all K and all ratios at once (a few numpy operations in all: with small matrices each
    call's fixed cost is what the phase pays).

    A ratio is 0 where it has nothing to divide by (a class never predicted, or absent:
    scikit-learn's ``zero_division=0``). The means average over the classes present in truth
    or prediction (scikit-learn's default labels), balanced accuracy over those present in
    truth; a ratio is 0 for a class absent from both, so the sums over every class are the sums
    over the present ones.
    """
    counts = matrices.astype(np.float64)  # integer counts: exact in float64
    tp = np.diagonal(counts, axis1=1, axis2=2)
    truths, predictions = counts.sum(axis=2), counts.sum(axis=1)
    both = truths + predictions
    numerators = np.stack([tp, tp, 2 * tp, tp])
    denominators = np.stack([predictions, truths, both, both - tp])
    ratios = np.divide(numerators, denominators, out=np.zeros_like(numerators), where=denominators > 0)
    sums = ratios.sum(axis=2)  # [4, K]
    present, in_truth = (both > 0).sum(axis=1), (truths > 0).sum(axis=1)
    totals = np.stack([100.0 * tp.sum(axis=1), sums[3], sums[1], sums[0], sums[1], sums[2]])
    divisors = np.stack([truths.sum(axis=1), present, in_truth, present, present, present])
    heads = np.divide(totals, divisors, out=np.zeros_like(totals), where=divisors > 0)
    heads[2] *= 100.0  # a mean recall, as a percentage
    return ratios, heads


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
        self.sums.add(losses, mask.sum(1) if mask is not None else target.shape[0] if target.ndim else 1)

    def merge(self, other: "LossMeter") -> None:
        """Count what ``other`` (the same members' meter on another rank) counted."""
        self.sums.merge(other.sums)

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

    names = {"accuracy": "higher", "IoU": "higher", "balanced_accuracy": "higher", "precision": "higher", "recall": "higher", "F1": "higher"}

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
        predicted = outputs.argmax(2)
        if predicted.ndim != 2:  # segmentation: [K, B, *pixels]
            predicted = predicted.reshape(members, -1)
        if target.ndim != 1:
            if mask is not None:
                per_sample = target.reshape(target.shape[0], -1).shape[1]  # pixels per sample
                mask = mask.reshape(members, -1, 1).expand(-1, -1, per_sample).reshape(members, -1)
            target = target.reshape(-1)
        self.cells.add(predicted, target, mask)

    def merge(self, other: "ConfusionMeter") -> None:
        """Count what ``other`` (the same members' meter on another rank) counted."""
        self.applies = self.applies and other.applies
        if other.cells is not None:
            if self.cells is None:
                self.cells = other.cells
            else:
                self.cells.merge(other.cells)

    def compute(self) -> list[dict[str, Any]]:
        matrices = self.cells.matrices() if self.applies and self.cells is not None else None
        if matrices is None:
            return [{} for _ in range(self.members)]
        return _scores(matrices)


class TopKMeter:
    """Top-k accuracy (%): the share of samples whose true class is among a member's k highest
    class scores, for class scores ``[K, B, C, ...]`` and integer targets, when ``C > k``.

    One ``topk`` per batch, counted on the device; targets outside ``[0, C)`` are left out, and
    with ``mask`` member ``k`` counts only its own samples. Registered by
    ``[plugins.metrics] top_k`` (:func:`top_k_meter` names the value ``top<k>_accuracy``).
    """

    k = 5
    names: dict[str, str] = {}

    def __init__(self, num_classes: int | None = None, members: int = 1) -> None:
        self.members = members
        self.hits: torch.Tensor | None = None
        self.counted: torch.Tensor | None = None
        self.applies = True

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if not self.applies:
            return
        if target.is_floating_point() or outputs.ndim < 3 or outputs.shape[1] != target.shape[0] or outputs.shape[2] <= self.k:
            self.applies = False
            return
        classes = outputs.shape[2]
        best = outputs.topk(self.k, dim=2).indices  # [K, B, k, ...]
        hit = (best == target.unsqueeze(1).unsqueeze(0)).any(2)  # [K, B, ...]
        valid = (target >= 0) & (target < classes)
        keep = valid.unsqueeze(0).expand_as(hit)
        if mask is not None:
            keep = keep & mask.reshape(*mask.shape, *([1] * (hit.ndim - 2)))
        hits, counted = (hit & keep).reshape(self.members, -1).sum(1), keep.reshape(self.members, -1).sum(1)
        self.hits = hits if self.hits is None else self.hits + hits
        self.counted = counted if self.counted is None else self.counted + counted

    def merge(self, other: "TopKMeter") -> None:
        """Count what ``other`` (the same members' meter on another rank) counted."""
        self.applies = self.applies and other.applies
        if other.hits is not None:
            self.hits = other.hits if self.hits is None else self.hits + other.hits
            self.counted = other.counted if self.counted is None else self.counted + other.counted

    def compute(self) -> list[dict[str, Any]]:
        if not self.applies or self.hits is None:
            return [{} for _ in range(self.members)]
        name = next(iter(self.names))
        return [{name: 100.0 * hits / counted} if counted else {} for hits, counted in zip(self.hits.tolist(), self.counted.tolist())]


def top_k_meter(k: int) -> type[TopKMeter]:
    """The :class:`TopKMeter` factory of ``k``, declaring its value ``top<k>_accuracy``."""
    return type(f"Top{k}Meter", (TopKMeter,), {"k": k, "names": {f"top{k}_accuracy": "higher"}})


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
    return _ratios(matrices)[1][0]


def mean_ious(matrices: np.ndarray) -> np.ndarray:
    """:func:`mean_iou` of each ``[C, C]`` matrix of ``matrices`` ``[K, C, C]`` (0 where empty).

    Absent classes count as zeros in each row's sum, so numpy adds the ratios in another order
    than a mean over the present classes alone: the two may differ in the last bit (~1e-16).
    """
    return _ratios(matrices)[1][1]


@attrs.frozen
class MetricsOptions:
    top_k: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(at_least(2)),
        metadata=doc("also count top-k accuracy (top<k>_accuracy, %) for this k, where there are more than k classes"),
    )
    extra: list = attrs.field(
        factory=list, metadata=doc('torchmetrics metrics: [{ class = "torchmetrics.classification:MulticlassAUROC", num_classes = 10, direction = "higher" }]')
    )


izitorch_options = MetricsOptions  # what `izitorch plugins` lists

#: The options of the run being configured: the module is the plugin, and ``izitorch_configure``
#: runs before ``izitorch_register_metrics`` in every run.
_options = MetricsOptions()
_extra: list[tuple[str, type]] = []  # (name, factory) of each torchmetrics metric of ``extra``


@hookimpl
def izitorch_configure(config) -> None:
    global _options, _extra
    options = plugin_options(config, "metrics", MetricsOptions)
    extra = torchmetrics_bridge.factories(options.extra, config.source, config.base_dir) if options.extra else []
    _options, _extra = options, extra  # both or neither: a refused table leaves no half of itself


@hookimpl
def izitorch_register_metrics(register) -> None:
    register("loss", LossMeter)
    register("classification", ConfusionMeter)
    register("regression", RegressionMeter)
    if _options.top_k is not None:
        register("top_k", top_k_meter(_options.top_k))
    for name, factory in _extra:
        register(f"torchmetrics:{name}", factory)
