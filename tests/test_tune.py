"""``izitorch.tune.optimize``: an Optuna study's trials trained ``per_run`` at a time, each run an
ordinary izitorch run, each trial told its model's final score as the run's files record it."""

from __future__ import annotations

import json
import sys

import pytest

optuna = pytest.importorskip("optuna")

from izitorch.errors import IzitorchError  # noqa: E402
from izitorch.tune import optimize  # noqa: E402


def space(trial):
    return {"optimizer.lr": trial.suggest_float("lr", 1e-3, 3e-2, log=True), "params.hidden": trial.suggest_categorical("hidden", [8, 16])}


def test_trials_train_per_run_at_a_time_and_the_study_gets_their_scores(manifest):
    path = manifest({"run.epochs": 2})
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    optimize(path, space, trials=5, per_run=2, study=study)
    res = path.parent / "res"
    assert sorted(p.name for p in res.iterdir()) == ["trials_0-1", "trials_2-3", "trials_4-4"]
    assert len(study.trials) == 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for trial in study.trials:
        first = trial.number - trial.number % 2
        run = res / f"trials_{first}-{min(first + 1, 4)}"
        name = f"mlp_t{trial.number}"
        final = json.loads((run / name / "test_metrics.json").read_text())
        assert trial.value == final["accuracy"]  # the task's headline metric, one fold
        summary = json.loads((run / "results.json").read_text())[name]
        assert summary["sweep"] == {"optimizer.lr": trial.params["lr"], "params.hidden": trial.params["hidden"]}
        conf = json.loads((run / "conf.json").read_text())
        table = next(model for model in conf["config"]["models"] if model["name"] == name)
        assert table["optimizer"]["lr"] == trial.params["lr"] and table["params"]["hidden"] == trial.params["hidden"]
    assert study.best_value == max(trial.value for trial in study.trials)


def test_a_new_study_takes_the_metrics_direction(manifest):
    path = manifest({"run.epochs": 1})
    assert optimize(path, space, trials=1).direction == optuna.study.StudyDirection.MAXIMIZE  # accuracy
    study = optimize(path, space, trials=1, metric="loss", res_dir=path.parent / "by_loss")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    final = json.loads((path.parent / "by_loss" / "trials_0-0" / "mlp_t0" / "test_metrics.json").read_text())
    assert study.trials[0].value == final["loss"]


def test_without_optuna_one_line_names_the_extra(manifest, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(IzitorchError, match=r'pip install "izitorch\[optuna\]"'):
        optimize(manifest(), space, trials=1)


def test_a_trial_without_a_finite_score_is_told_as_failed(manifest, monkeypatch):
    import izitorch.tune as tune

    trained = []

    def train(config):  # the run's results, one model without a finite score
        trained.append([spec.name for spec in config.models])
        return {"mlp_t0": [{"accuracy": float("nan")}], "mlp_t1": [{"accuracy": 50.0}, {"accuracy": 70.0}]}

    monkeypatch.setattr(tune, "_train", train)
    study = optimize(manifest(), space, trials=2, per_run=2)
    assert trained == [["mlp_t0", "mlp_t1"]]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert study.trials[1].value == 60.0  # the mean over folds


@pytest.mark.parametrize("returned", [0.01, {"": 1}, None])
def test_a_space_that_returns_no_dict_of_keys_is_one_error(manifest, returned):
    with pytest.raises(IzitorchError, match=r"space\(trial\) must return a dict of dotted keys"):
        optimize(manifest(), lambda trial: returned, trials=1)
