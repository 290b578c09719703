"""Metrics of ``torchmetrics`` named in the manifest, as first-class izitorch metrics.

``[plugins.metrics] extra = [{ class = "torchmetrics.classification:MulticlassAUROC",
num_classes = 10, direction = "higher", name = "AUROC" }]``: each entry names a
``torchmetrics.Metric`` class, the direction that is better, and optionally the value's name
(default: the class name); its other keys are the class's arguments. The value is shown, logged,
tabled, and usable as ``[run] best_metric`` or ``[plugins.early_stop] metric``.

torchmetrics is an optional extra (``pip install 'izitorch[torchmetrics]'``). Each member of a
stack gets its own instance, fed each batch's outputs of that member (its own samples, with a
sample mask: boolean indexing, so one device synchronisation per batch and member).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from izitorch.errors import ManifestError, TrainingError, describe, error_text, join_path
from izitorch.references import check_arguments, resolve

DIRECTIONS = ("higher", "lower")
INSTALL = "pip install 'izitorch[torchmetrics]'"


def factories(entries: list[Any], source: str = "", base_dir: str = ".") -> list[tuple[str, type]]:
    """``(value name, factory)`` of each entry of ``extra`` (a ``"file.py:Class"`` relative to
    ``base_dir``, the manifest's folder); a one-line ``ManifestError`` at
    ``plugins.metrics.extra[i].<key>`` for an entry that does not fit."""
    built = []
    for index, entry in enumerate(entries):
        path = join_path("plugins.metrics.extra", index)
        try:
            name, factory = _factory(entry, base_dir)
        except ManifestError as error:
            raise error.located(source=source, prefix=path) from None
        factory.where = path
        built.append((name, factory))
    return built


def check_one_number(factory: type[TorchMetricMeter], outputs: torch.Tensor, target: torch.Tensor) -> None:
    """Feed a metric the dry run's batch (:func:`izitorch.checks.dry_run`): one whose
    ``compute()`` gives more than one number (``average = "none"``) is refused at its entry
    before training. A metric that fails, or warns, on so few samples (a class without
    positives) is left to the epoch's real data: its warnings are not shown."""
    meter = factory(members=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meter.update(outputs.detach().float().unsqueeze(0), target, torch.zeros(1))
            meter.compute()
    except TrainingError as error:
        raise ManifestError(str(error), factory.where) from None
    except Exception:  # four samples may not be enough for it: the epoch's data will tell
        return


def _factory(entry: Any, base_dir: str) -> tuple[str, type]:
    if not isinstance(entry, dict):
        raise ManifestError(
            f'expected a table such as {{ class = "torchmetrics.classification:MulticlassAUROC", direction = "higher" }}, found {describe(entry)}'
        )
    params = dict(entry)
    reference, direction, name = params.pop("class", None), params.pop("direction", None), params.pop("name", None)
    if not isinstance(reference, str):
        raise ManifestError(f'expected a "module:Class" reference to a torchmetrics metric, found {describe(reference)}', "class")
    if direction not in DIRECTIONS:
        raise ManifestError(f'expected "higher" or "lower" (which way is better), found {describe(direction)}', "direction")
    try:
        import torchmetrics
    except ImportError:
        raise ManifestError(f"names a torchmetrics metric, and torchmetrics is not installed: {INSTALL}", "class") from None
    try:
        cls = resolve(reference, base_dir)
    except ManifestError as error:
        raise error.located(prefix="class") from None
    if not (isinstance(cls, type) and issubclass(cls, torchmetrics.Metric)):
        raise ManifestError(f"{describe(reference)} is not a torchmetrics.Metric class", "class")
    check_arguments(cls, params)
    try:  # torchmetrics checks its keyword arguments when built (a signature of **kwargs says nothing)
        cls(**params)
    except Exception as error:
        raise ManifestError(f"building {cls.__name__} failed: {error_text(error)}; fix its arguments") from None
    name = cls.__name__ if name is None else name
    if not isinstance(name, str) or not name:
        raise ManifestError(f"expected the value's name, found {describe(name)}", "name")
    return name, type(f"{cls.__name__}Meter", (TorchMetricMeter,), {"names": {name: direction}, "metric_class": cls, "params": params})


class TorchMetricMeter:
    """One ``torchmetrics.Metric`` per member, as a meter of the metric protocol; subclassed by
    :func:`factories` with ``names``, ``metric_class`` and ``params``."""

    names: dict[str, str] = {}
    metric_class: Any = None
    params: dict[str, Any] = {}
    where = "plugins.metrics.extra"  # the entry's key path (set by factories)

    @classmethod
    def merge_problem(cls) -> str | None:
        """Why torchmetrics' ``merge_state`` cannot add up two ranks' states of this metric
        exactly (None when it can): a state updated as a whole, or reduced otherwise than by a
        sum, a concatenation, a maximum or a minimum (a mean of two ranks' means is not the mean)."""
        from torchmetrics.utilities.data import dim_zero_cat, dim_zero_max, dim_zero_min, dim_zero_sum

        metric = cls.metric_class(**cls.params)
        if metric.full_state_update is not False or metric.dist_sync_on_step:
            return f"torchmetrics' {cls.metric_class.__name__} updates its state as a whole (full_state_update)"
        exact = (dim_zero_sum, dim_zero_cat, dim_zero_max, dim_zero_min)
        inexact = [name for name, reduce in metric._reductions.items() if reduce not in exact]
        if inexact:
            return f"torchmetrics' {cls.metric_class.__name__} reduces its state {inexact[0]} otherwise than by a sum or a concatenation"
        return None

    def __init__(self, num_classes: int | None = None, members: int = 1) -> None:
        self.metrics = [self.metric_class(**self.params) for _ in range(members)]
        for metric in self.metrics:  # under torchrun izitorch merges the ranks' states itself (merge)
            metric.sync_on_compute = False
        self.counted = [False] * members
        self.device: torch.device | None = None

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if self.device != outputs.device:
            self.metrics = [metric.to(outputs.device) for metric in self.metrics]
            self.device = outputs.device
        for k, metric in enumerate(self.metrics):
            if mask is None:
                metric.update(outputs[k], target)
            elif bool(mask[k].any()):
                metric.update(outputs[k][mask[k]], target[mask[k]])
            else:
                continue
            self.counted[k] = True

    def merge(self, other: "TorchMetricMeter") -> None:
        """Count what ``other`` (the same members' meter on another rank) counted, with
        torchmetrics' own ``merge_state``."""
        for k, (theirs, counted) in enumerate(zip(other.metrics, other.counted)):
            if not counted:
                continue
            if self.counted[k]:
                self.metrics[k].merge_state(theirs)
            else:
                self.metrics[k], self.counted[k] = theirs, True

    def compute(self) -> list[dict[str, Any]]:
        name = next(iter(self.names))
        values = []
        for metric, counted in zip(self.metrics, self.counted):
            if not counted:
                values.append({})
                continue
            value = metric.compute()
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TrainingError(
                    f'metric "{name}": {type(metric).__name__}.compute() returned {describe(value)}, not one number; choose an average that gives one'
                )
            values.append({name: float(value)})
        return values
