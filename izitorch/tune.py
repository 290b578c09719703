"""Optuna studies trained K trials at a time, as one run: ``izitorch.tune.optimize``.

A study's sampler proposes hyper-parameters; izitorch asks it for ``per_run`` trials at once,
writes each as a ``[[models]]`` table (the manifest's model with the trial's values at their
dotted keys, as a sweep does, named ``<model>_t<trial number>``), trains them together in one
run, where models of one shape share a vectorized stack, and tells the study each trial's final
score: the mean over folds of the task's headline metric (accuracy, RMSE, IoU), or ``metric``.
A trial whose model stopped on a non-finite loss, or scored NaN, is told as failed; the others
of its run are told as usual.

Each run writes into its own folder, ``<res_dir>/trials_<first>-<last>`` (``res_dir`` is the
manifest's ``[run] res_dir`` unless given): an ordinary izitorch run that ``izitorch report``
compares, with each trial's values in ``results.json`` under ``sweep``.

``pip install "izitorch[optuna]"``.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Callable

from izitorch.errors import IzitorchError, ManifestError
from izitorch.manifest import config_from_dict, read_manifest
from izitorch.sweeps import model_with

#: ``space(trial)``: the trial's values, by dotted key inside the model's table
#: (``{"optimizer.lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True)}``).
Space = Callable[[Any], dict[str, Any]]


def optimize(
    manifest: str | os.PathLike,
    space: Space,
    trials: int,
    per_run: int = 8,
    *,
    study: Any = None,
    metric: str | None = None,
    model: int = 0,
    res_dir: str | os.PathLike | None = None,
) -> Any:
    """Run ``trials`` trials of ``study`` (a new one, in the metric's direction, when None) on
    the manifest's ``model``-th ``[[models]]`` table, ``per_run`` trials to a run; return the
    study. ``metric``: a final test score (default: the task's headline metric)."""
    optuna = _optuna()
    if trials < 1 or per_run < 1:
        raise IzitorchError(f"trials and per_run must be at least 1, got {trials} and {per_run}")
    path = Path(manifest)
    raw = read_manifest(path)
    tables = raw.get("models")
    if not isinstance(tables, list) or not 0 <= model < len(tables) or not isinstance(tables[model], dict):
        raise ManifestError(
            f"no [[models]] table number {model} to tune (the manifest has {len(tables) if isinstance(tables, list) else 0})", "models", str(path)
        )
    base = {key: value for key, value in tables[model].items() if key not in ("sweep", "sweep_mode", "seeds")}
    folder = Path(res_dir) if res_dir is not None else Path(str(raw.get("run", {}).get("res_dir", "results")))  # as a run takes it
    key, direction = _objective(raw, path, metric)
    if study is None:
        study = optuna.create_study(direction="minimize" if direction == "lower" else "maximize")
    done = 0
    while done < trials:
        asked = [study.ask() for _ in range(min(per_run, trials - done))]
        chosen = [_values(space(trial)) for trial in asked]
        first, last = asked[0].number, asked[-1].number
        run = copy.deepcopy(raw)
        run["models"] = [model_with(base, values, f"{base['name']}_t{trial.number}") for trial, values in zip(asked, chosen)]
        run.setdefault("run", {})["res_dir"] = str(folder / f"trials_{first}-{last}")
        results = _train(config_from_dict(run, source=str(path), base_dir=str(path.parent)))
        for trial, table in zip(asked, run["models"]):
            value = _score(results.get(table["name"], []), key)
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, value)
        done += len(asked)
    return study


def _values(values: Any) -> dict[str, Any]:
    if not isinstance(values, dict) or not all(isinstance(key, str) and key for key in values):
        raise IzitorchError(f'space(trial) must return a dict of dotted keys inside the model\'s table ({{"optimizer.lr": ...}}), got {values!r:.80}')
    return values


def _train(config: Any) -> dict[str, list[dict]]:
    from izitorch.runner import run

    return run(config)


def _score(folds: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the folds' final scores; None where a fold lacks a finite one."""
    values = [fold.get(key) for fold in folds]
    if not values or not all(isinstance(value, (int, float)) and math.isfinite(value) for value in values):
        return None
    return math.fsum(values) / len(values)


def _objective(raw: dict, path: Path, metric: str | None) -> tuple[str, str]:
    """The value key the trials are scored by and whether higher or lower is better: ``metric``,
    or the task's headline metric (the task settled by a dry run of the manifest)."""
    from izitorch.checks import dry_run
    from izitorch.data import pick_device
    from izitorch.metrics import directions, resolve
    from izitorch.pluginmanager import make_plugin_manager
    from izitorch.runner import registered_metrics
    from izitorch.selection import default_metric

    config = config_from_dict(raw, source=str(path), base_dir=str(path.parent))
    pm, _ = make_plugin_manager(config)
    factories = registered_metrics(pm, config)
    if metric is None:
        _, _, task, _ = dry_run(config, pick_device(config.run.device), factories)
        key = default_metric(task, factories)
    else:
        key = resolve(metric, factories, "metric")
    return key, directions(factories)[key]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise IzitorchError('tuning needs Optuna: pip install "izitorch[optuna]"') from None
    return optuna
