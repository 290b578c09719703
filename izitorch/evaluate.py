"""``izitorch evaluate RES_DIR``: score every model (every fold) of a finished run.

By default each fold's model is scored on that fold's recorded test split (``Dataset_split.pkl``)
of the run's own dataset, with the weights its final test scored, so the numbers reproduce
``test_metrics.json``; ``--data "module:callable"`` scores every sample of another dataset
instead. The metrics are the run's: its plugin manager is rebuilt from its configuration and
asked for them (``izitorch_register_metrics``), and they accumulate exactly as in a run's
evaluation pass (a lone model's :class:`~izitorch.stacks.LoneStack`, the run's precision). The
run is not modified: nothing is written unless ``--out FILE.json`` asks for it, outside RES_DIR.

:func:`batches` and :func:`evaluation_data` serve ``predict`` too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from izitorch import precision
from izitorch.errors import IzitorchError, TrainingError, located_in
from izitorch.trained import TrainedRun, load_weights, read_splits


@attrs.frozen
class EvaluationData:
    """The dataset scored and, per fold, the indices of its samples to score."""

    dataset: Dataset
    indices: list[np.ndarray]
    label: str  # how the table and the JSON name it


def evaluation_data(run: TrainedRun, data: str | None) -> EvaluationData:
    """With ``data`` (``"module:callable"``, ``"file.py:callable"`` from the working directory,
    called with ``data.params``): all its samples, for every fold. Without: the run's dataset
    and each fold's recorded test split."""
    from izitorch.data import build_dataset

    config = run.config
    if data is not None:
        where = "--data"
        dataset = _called(data, config.data.params, where)
        config = attrs.evolve(config, data=attrs.evolve(config.data, dataset=dataset))
        with _setup(where):
            dataset = build_dataset(config)
        every = np.arange(len(dataset), dtype=np.int64)
        return EvaluationData(dataset, [every] * run.folds, data)
    from izitorch.trained import is_reference

    if not is_reference(config.data.dataset):
        raise IzitorchError(
            'the run\'s dataset was given to the Rack as a Python object, which conf.json cannot rebuild: pass --data "module:callable"',
            "data.dataset",
            str(run.conf_file),
        )
    run.check_reference(config.data.dataset, "data.dataset")
    with located_in(str(run.conf_file)), _setup():
        dataset = build_dataset(config)
    splits = read_splits(run.res_dir)
    if len(splits) != run.folds:
        raise IzitorchError(
            f"holds {len(splits)} split(s) but conf.json records {run.folds}; not the split of this run", source=str(run.res_dir / "Dataset_split.pkl")
        )
    tests = [split[-1] for split in splits]
    size = len(dataset)
    for fold, indices in enumerate(tests):
        if len(indices) and (indices.min() < 0 or indices.max() >= size):
            raise IzitorchError(
                f"the test split of fold {fold + 1} reaches sample {int(indices.max())}, but the dataset built from conf.json has {size} samples: "
                'it changed since the run; restore it, or pass --data "module:callable" to score other data',
                "data.dataset",
                str(run.conf_file),
            )
    return EvaluationData(dataset, tests, "test split")


def _called(reference: str, params: dict, where: str) -> Dataset:
    """The dataset ``reference`` names, called with ``params`` (checked against its signature)."""
    from izitorch.errors import ManifestError, join_path
    from izitorch.references import check_arguments, resolve

    try:
        factory = resolve(reference, os.getcwd())
    except ManifestError as error:
        raise IzitorchError(error.message, where) from None
    if not callable(factory):
        raise IzitorchError(f'"{reference}" is not callable', where)
    try:
        check_arguments(factory, params)
    except ManifestError as error:
        raise IzitorchError(error.message, join_path("data.params", error.path)) from None
    try:
        return factory(**params)
    except Exception as error:
        raise IzitorchError(f"{reference}(...) raised {type(error).__name__}: {error}", where) from None


@contextlib.contextmanager
def _setup(where: str = "") -> Iterator[None]:
    """Inside, a failure that a run would count as one of training (a forward that does not fit
    the data, a sample that does not load) is a set-up mistake here: the data given does not
    fit the model. Exit 2, same line."""
    try:
        yield
    except TrainingError as error:
        raise IzitorchError(error.message, error.path or where, error.source) from None


def batches(run: TrainedRun, dataset: Dataset, indices: np.ndarray, device: torch.device, batch_size: int | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(inputs, target)`` batches of ``dataset[indices]`` in order, on ``device``: a
    ``TensorDataset`` by slicing its tensors (as a run's evaluation does), any other through a
    ``DataLoader``. A sample that fails to load is one line naming it."""
    from izitorch.cohort import read, unpack
    from izitorch.data import Guarded, loading_error, to_device

    size = batch_size or run.config.run.batch_size
    if isinstance(dataset, torch.utils.data.TensorDataset):
        rows = torch.as_tensor(indices, dtype=torch.long)
        for start in range(0, len(rows), size):
            chosen = rows[start : start + size]
            with _setup("--data"):
                inputs, target = unpack(tuple(t.index_select(0, chosen) for t in dataset.tensors))
            yield to_device(inputs, device, False), to_device(target, device, False)
        return
    loader = DataLoader(Subset(Guarded(dataset), indices.tolist()), batch_size=size, shuffle=False, num_workers=run.config.run.num_workers)
    for batch in read(loader, lambda error: _as_setup_error(loading_error(run.config, error, "the evaluated set"))):
        with _setup("--data"):
            inputs, target = unpack(batch)
        yield to_device(inputs, device, False), to_device(target, device, False)


def _as_setup_error(failure: IzitorchError) -> IzitorchError:
    """A dataset failing under ``evaluate`` is the user's data to fix (exit 2), not a training failure."""
    return IzitorchError(failure.message, failure.path)


def score(run: TrainedRun, slot: Any, data: EvaluationData, fold: int, factories: dict, device: torch.device) -> dict[str, Any]:
    """Every registered metric of ``slot``'s model on fold ``fold``'s samples of ``data``, as the
    run's evaluation pass computes them (a lone model's stack, the run's precision)."""
    from izitorch.metrics import compute_all, meters_for
    from izitorch.stacks import LoneStack

    classes = run.config.data.num_classes
    stack = LoneStack(slot, classes)
    meters = meters_for(factories, classes, 1)
    autocast = precision.autocast(run.config.run.precision, device)
    with torch.no_grad(), _setup("--data"):
        for inputs, target in batches(run, data.dataset, data.indices[fold], device):
            with autocast:
                outputs = stack.forward(inputs)
                losses = stack.losses(outputs, target)
            for meter in meters:
                meter.update(outputs, target, losses, None)
        return compute_all(meters, 1)[0]


@attrs.frozen
class Evaluation:
    """Each model's scores per fold, with what the table shows beside them."""

    scores: dict[str, list[dict[str, Any]]]
    epochs: dict[str, list[int]]
    parameters: dict[str, int]
    directions: dict[str, str]
    data: str


def evaluate(res_dir: str | os.PathLike, data: str | None = None, overrides: Iterable[str] = (), which: str | None = None) -> Evaluation:
    """Score every model and fold of the finished run in ``res_dir`` (see the module docstring)."""
    from izitorch.data import pick_device
    from izitorch.metrics import directions
    from izitorch.pluginmanager import make_plugin_manager
    from izitorch.runner import registered_metrics

    run = TrainedRun(res_dir, overrides, other_data=data is not None)
    config = run.config
    with located_in(str(run.conf_file)):
        device = pick_device(config.run.device)
        precision.check(config.run.precision, device)
        pm, _ = make_plugin_manager(config)
        factories = registered_metrics(pm, config)
    evaluated = evaluation_data(run, data)
    scores: dict[str, list[dict[str, Any]]] = {}
    epochs: dict[str, list[int]] = {}
    parameters: dict[str, int] = {}
    for name in run.names:
        slot = run.build(name, with_criterion=True)
        parameters[name] = slot.parameter_count()
        for fold in range(run.folds):
            checkpoint = run.checkpoint(name, fold, which)
            load_weights(slot.model, checkpoint)
            slot.model.to(device)
            if isinstance(slot.criterion, torch.nn.Module):
                slot.criterion.to(device)
            values = score(run, slot, evaluated, fold, factories, device)
            scores.setdefault(name, []).append({**values, "epoch": checkpoint.epoch})
            epochs.setdefault(name, []).append(checkpoint.epoch)
    return Evaluation(scores, epochs, parameters, directions(factories), evaluated.label)


def check_out(out: str | os.PathLike, res_dir: str | os.PathLike, overwrite: bool, where: str = "--out") -> Path:
    """Where ``--out`` may write: not inside the run's ``res_dir`` (which holds only what the run
    wrote: a file of yours there would stop a later ``--overwrite``), not over an existing file
    unless ``overwrite``, not over a folder."""
    path = Path(out)
    if path.resolve().is_relative_to(Path(res_dir).resolve()):
        raise IzitorchError(
            f"{path} is inside the run's res_dir, which holds only what the run wrote (a file of yours there would stop a later --overwrite); write it elsewhere",
            where,
        )
    if path.is_dir():
        raise IzitorchError(f"{path} is a folder; give a file name", where)
    if path.exists() and not overwrite:
        raise IzitorchError(f"{path} exists; pass --overwrite to replace it, or choose another name", where)
    return path


def report(evaluation: Evaluation, which: str | None) -> dict[str, Any]:
    """What ``--out FILE.json`` holds: per model, each fold's scores (with the epoch of the
    weights scored and the confusion matrix where the metrics give one), their mean and std."""
    from izitorch.table import is_metric

    models = {}
    for name, folds in evaluation.scores.items():
        keys = [key for key, value in folds[0].items() if is_metric(key, value) and all(key in fold for fold in folds)]
        models[name] = {
            "folds": [{key: (value.tolist() if hasattr(value, "tolist") else value) for key, value in fold.items()} for fold in folds],
            "mean": {key: float(np.mean([fold[key] for fold in folds])) for key in keys},
            "std": {key: float(np.std([fold[key] for fold in folds])) for key in keys},
        }
    return {"data": evaluation.data, "which": which or "tested", "models": models, "directions": evaluation.directions}
