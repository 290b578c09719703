"""A run's results as tables: ``izitorch.results.load(res_dir)``, what ``izitorch report`` reads.

A run folder holds ``conf.json`` (the models, the splits, the task), and per model and fold a
``trainlog.json`` (every epoch's scores) and, once the fold finished, ``test_metrics.json`` (the
final test). :func:`load` reads any such folder, finished or interrupted, holdout or k-fold, and
returns three tables:

- ``epochs``: one row per (model, fold, epoch, phase, metric) with its ``value``, the long
  format that plotting and pandas' ``pivot`` take;
- ``folds``: one row per (model, fold) that has a final test, with the ``epoch`` it scored, one
  column per metric and, where it was measured (CPU runs), ``train_time``: the model's seconds of
  training per epoch (in a vectorized group, its share of the group's);
- ``models``: one row per model: ``params``, ``folds``, the ``sweep`` values, the ``epochs``
  each fold's final test scored, and per metric ``<metric>_mean`` and ``<metric>_std`` (over
  folds, ``ddof = 0``, as ``results.json`` has them).

They are pandas DataFrames when pandas is installed (``pip install "izitorch[pandas]"``) and
``frames`` is not False, lists of dicts otherwise.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import attrs

from izitorch.errors import IzitorchError, describe
from izitorch.table import is_metric
from izitorch.tasks import headline as task_headline

#: The prefix of each evaluated phase's keys in ``trainlog.json`` (training's keys have none).
PHASES = (("val_", "val"), ("test_", "test"))
#: Entries of a trainlog epoch that are the training pass's, without a prefix, but no metric.
TRAIN_EXTRAS = ("lr", "train_step_time", "train_time")
#: Timings of the evaluated pass in a trainlog epoch, without a prefix.
EVAL_TIMES = ("inference_time", "eval_time")


@attrs.frozen
class Results:
    """One run's tables (see the module's docstring) and what reading them needs."""

    res_dir: Path
    task: str | None
    headline: str | None  # the metric models are ranked by
    directions: dict[str, str]  # metric -> "higher" / "lower"
    splits: list[dict[str, int]]  # per fold: samples in train / val / test
    epochs: Any
    folds: Any
    models: Any


def load(res_dir: str | os.PathLike, frames: bool | None = None) -> Results:
    """Read the run in ``res_dir`` (see the module's docstring); a folder that holds no run is
    one line naming it. ``frames``: pandas DataFrames (None: when pandas is installed)."""
    res_dir = Path(res_dir)
    conf = _read(res_dir / "conf.json", required=True)
    models = [model.get("name") for model in (conf.get("config") or {}).get("models", []) if isinstance(model, dict)]
    if not models or not all(isinstance(name, str) for name in models):
        raise IzitorchError("names no models: not a conf.json izitorch wrote", source=str(res_dir / "conf.json"))
    splits = [split for split in conf.get("splits") or [] if isinstance(split, dict)] or [{}]
    summary = _read(res_dir / "results.json", required=False) or {}
    task = conf.get("task") if isinstance(conf.get("task"), str) else None
    directions: dict[str, str] = {}
    for entry in summary.values():
        if isinstance(entry, dict) and isinstance(entry.get("directions"), dict):
            directions.update(entry["directions"])
    epochs, folds, rows = [], [], []
    for name, spec in zip(models, conf["config"]["models"]):
        model_folds = []
        for fold in range(len(splits)):
            folder = _fold_folder(res_dir, name, fold + 1, len(splits))
            epochs.extend(_epoch_rows(name, fold + 1, _read(folder / "trainlog.json", required=False) or {}))
            final = _read(folder / "test_metrics.json", required=False)
            if final:
                scores = {key: value for key, value in final.items() if is_metric(key, value) and key != "inference_time"}
                timed = {"train_time": final["train_time"]} if is_number(final.get("train_time")) else {}
                model_folds.append({"model": name, "fold": fold + 1, "epoch": final.get("epoch"), **scores, **timed})
        folds.extend(model_folds)
        rows.append(_model_row(name, spec, model_folds, _read(res_dir / name / "conf.json", required=False) or {}, res_dir))
    headline = task_headline(task)
    if headline is None:
        headline = next((entry.get("headline") for entry in summary.values() if isinstance(entry, dict) and isinstance(entry.get("headline"), str)), None)
    return Results(res_dir, task, headline, directions, splits, *(_table(table, frames) for table in (epochs, folds, rows)))


def model_folder(results: Results, model: str, fold: int) -> Path:
    """``res_dir/<model>``, or ``res_dir/<model>/FOLD_<fold>`` (1-based) in a run of several folds."""
    return _fold_folder(results.res_dir, model, fold, len(results.splits))


def _fold_folder(res_dir: Path, model: str, fold: int, folds: int) -> Path:
    return res_dir / model if folds == 1 else res_dir / model / f"FOLD_{fold}"


def predictions(results: Results, model: str, fold: int = 1) -> dict[str, list[int]] | None:
    """A model's final test predictions in ``fold`` (1-based): ``{"target", "predicted"}``
    from ``test_predictions.json`` (a classification's), or None where the run has none."""
    path = model_folder(results, model, fold) / "test_predictions.json"
    record = _read(path, required=False)
    if not record or not all(isinstance(record.get(key), list) for key in ("target", "predicted")) or len(record["target"]) != len(record["predicted"]):
        return None
    return record


def per_class(results: Results, names: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """Each classifier's per-class scores (precision, recall, F1, IoU: one value per class), the
    mean over its folds' ``test_metrics.json`` and, for a group of ``names`` (a sweep's
    replicas), over all of theirs; keyed by model name, or by ``names[0]``'s group when given."""
    out: dict[str, dict[str, list[float]]] = {}
    groups = {name: [name] for name in (row["name"] for row in results.models)} if names is None else {names[0]: names}
    for key, members in groups.items():
        tables = []
        for name in members:
            for fold in range(1, len(results.splits) + 1):
                table = (_read(model_folder(results, name, fold) / "test_metrics.json", required=False) or {}).get("per_class")
                if isinstance(table, dict):
                    tables.append(table)
        scores = {}
        for metric in dict.fromkeys(metric for table in tables for metric in table):
            values = [table[metric] for table in tables if isinstance(table.get(metric), list)]
            if values and len({len(v) for v in values}) == 1:
                scores[metric] = [math.fsum(column) / len(column) for column in zip(*values)]
        if scores:
            out[key] = scores
    return out


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read(path: Path, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise IzitorchError(f'not found: "{path.parent}" holds no izitorch run (every run writes conf.json when it starts)', source=str(path))
        return None
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, OSError) as error:
        raise IzitorchError(f"cannot be read ({type(error).__name__}); run the manifest again (--overwrite) to rewrite it", source=str(path)) from None
    if not isinstance(value, dict):
        raise IzitorchError(f"expected a table, found {describe(value)}; run the manifest again (--overwrite) to rewrite it", source=str(path))
    return value


def _epoch_rows(name: str, fold: int, log: dict) -> list[dict]:
    rows = []
    for epoch, entry in sorted(((int(k), v) for k, v in log.items() if str(k).isdigit() and isinstance(v, dict)), key=lambda item: item[0]):
        evaluated = next((phase for prefix, phase in PHASES if any(key.startswith(prefix) for key in entry)), "test")
        for key, value in entry.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            phase, metric = next(((phase, key[len(prefix) :]) for prefix, phase in PHASES if key.startswith(prefix)), ("train", key))
            if key in EVAL_TIMES:
                phase = evaluated
            rows.append({"model": name, "fold": fold, "epoch": epoch, "phase": phase, "metric": metric, "value": float(value)})
    return rows


def _model_row(name: str, spec: dict, folds: list[dict], model_conf: dict, res_dir: Path) -> dict:
    metrics: dict[str, list[float]] = {}
    for fold in folds:
        for key, value in fold.items():
            if key not in ("model", "fold", "epoch"):
                metrics.setdefault(key, []).append(float(value))
    row: dict[str, Any] = {
        "name": name,
        "params": model_conf.get("parameters"),
        "folds": len(folds),
        "sweep": {**(spec.get("swept") or {}), **({"seed": spec["seed"]} if spec.get("seed") is not None else {})},
        "epochs": [fold.get("epoch") for fold in folds],
    }
    for key, (mean, std) in spread(metrics).items():
        row[f"{key}_mean"], row[f"{key}_std"] = mean, std
    return row


def spread(metrics: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Each metric's mean and standard deviation (``ddof = 0``, as ``results.json`` has it) over its values."""
    out = {}
    for key, values in metrics.items():
        mean = math.fsum(values) / len(values)
        out[key] = (mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values)))
    return out


def _table(rows: list[dict], frames: bool | None) -> Any:
    if frames is False:
        return rows
    try:
        import pandas
    except ImportError:
        if frames:
            raise IzitorchError('tables as DataFrames need pandas: pip install "izitorch[pandas]"') from None
        return rows
    return pandas.DataFrame(rows)
