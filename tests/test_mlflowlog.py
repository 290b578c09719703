"""The ``mlflow`` plugin, read back from its local file store with MLflow's own client: one run
per model (a nested run per fold with k-fold) whose params are the manifest's, whose metric
histories hold the trainlogs' values once per epoch, with the final test scores and the kept
checkpoint; nothing outside res_dir; FINISHED / FAILED / KILLED; a run killed with SIGKILL then
resumed leaves no run and no (metric, step) twice; one line and exit 2 without the extra."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import sys

import pytest

from conftest import KILLER, ROOT, cli, error_of, run_cli

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason='needs pip install "izitorch[mlflow]"')

MODELS = [{"name": "a", "optimizer": {"lr": 3e-3}}, {"name": "b", "sweep": {"optimizer.lr": [1e-2, 3e-2]}}]
NAMES = ["a", "b_lr0.01", "b_lr0.03"]
LAYOUTS = {
    "holdout": {"plugins.enable": ["mlflow"], "data.validation": True},
    "kfold": {"plugins.enable": ["kfold", "mlflow"], "plugins.kfold": {"k": 2}},
}


def store(res, monkeypatch):
    """The client of the run's file store, and its experiment's runs by name."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores without it (the plugin sets it during a run)
    client = MlflowClient(tracking_uri=(res / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(res.name)
    runs = client.search_runs([experiment.experiment_id])
    by_name = {run.info.run_name: run for run in runs}
    assert len(by_name) == len(runs)  # no run twice
    return client, by_name


def history(client, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as its (step, value) pairs, in step order."""
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}


def trainlog(folder, without_times: bool = False) -> dict[str, list[tuple[int, float]]]:
    """``trainlog.json`` as (step, value) pairs per key, its numbers only."""
    out: dict[str, list] = {}
    for epoch, entry in json.loads((folder / "trainlog.json").read_text()).items():
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not (without_times and key.endswith("_time")):
                out.setdefault(key, []).append((int(epoch), float(value)))
    return {key: sorted(pairs) for key, pairs in out.items()}


def final_name(key: str) -> str:
    """A final score's MLflow name: the test's metrics, and the training time per epoch."""
    return "final_train_time" if key == "train_time" else f"final_test_{key}"


@needs_mlflow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_run_per_model_holds_the_trainlogs_values(manifest, capsys, monkeypatch, tmp_path, layout):
    monkeypatch.chdir(tmp_path)  # MLflow writing anything in the working folder would show below
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    path = manifest({"run.epochs": 2, **LAYOUTS[layout]}, models=MODELS)
    assert cli(capsys, "run", path)[0] == 0
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set for the run only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml", "res"]  # nothing outside res_dir
    res = tmp_path / "res"
    client, runs = store(res, monkeypatch)
    folds = 1 if layout == "holdout" else 2
    expected = set(NAMES) | ({f"{name} fold {k}" for name in NAMES for k in (1, 2)} if folds > 1 else set())
    assert set(runs) == expected
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    results = json.loads((res / "results.json").read_text())
    for name in NAMES:
        parent = runs[name]
        lr = {"a": 3e-3, "b_lr0.01": 1e-2, "b_lr0.03": 3e-2}[name]
        params = {"batch_size": "32", "epochs": "2", "model": "izitorch.models:MLP", "params.hidden": "16", "optimizer": "torch.optim:Adam"}
        params |= {"optimizer.lr": str(lr), "criterion": "torch.nn:CrossEntropyLoss"} | ({"sweep.optimizer.lr": str(lr)} if name != "a" else {})
        assert parent.data.params == params
        assert parent.data.tags["izitorch.res_dir"] == str(res)
        for fold in range(1, folds + 1):
            run = parent if folds == 1 else runs[f"{name} fold {fold}"]
            folder = res / name if folds == 1 else res / name / f"FOLD_{fold}"
            if folds > 1:
                assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.params == params
            got, final = history(client, run), json.loads((folder / "test_metrics.json").read_text())
            kept = {final_name(key): [(final["epoch"], float(value))] for key, value in final.items() if isinstance(value, (int, float)) and key != "epoch"}
            assert got == trainlog(folder) | kept  # every epoch once, the same values; the final scores at the kept epoch
            assert {"loss", "accuracy", "lr", ("val_loss" if folds == 1 else "test_loss")} <= set(got)
            local = client.download_artifacts(run.info.run_id, "checkpoint/model.pth.tar", str(tmp_path / "down" / run.info.run_id))
            assert open(local, "rb").read() == (folder / "model.pth.tar").read_bytes()
        if folds > 1:  # the model's run: each final metric's mean and std over the folds, as results.json has them
            means = {key: value for key, value in parent.data.metrics.items() if not key.endswith("_std")}
            assert means == pytest.approx({final_name(key): value for key, value in results[name]["mean"].items() if key != "epoch"}, rel=1e-12)
            assert parent.data.metrics["final_test_accuracy_std"] == pytest.approx(results[name]["std"]["accuracy"], rel=1e-12)
            assert not math.isnan(parent.data.metrics["final_test_loss_std"])


@needs_mlflow
def test_overwrite_removes_the_store_and_nothing_else(manifest, capsys, monkeypatch, tmp_path):
    path = manifest(LAYOUTS["holdout"], models=[{"name": "a"}])
    assert cli(capsys, "run", path)[0] == 0
    (tmp_path / "res" / "mlruns" / "notes.txt").write_text("mine")  # inside the claimed folder: the run's to delete
    assert cli(capsys, "run", path, "--overwrite")[0] == 0
    client, runs = store(tmp_path / "res", monkeypatch)
    assert list(runs) == ["a"] and not (tmp_path / "res" / "mlruns" / "notes.txt").exists()


FAILING = """\
import os, signal
from izitorch import hookimpl

@hookimpl
def izitorch_batch_finish(run, fold, step, losses):
    if fold.epoch == 2 and step == 1:
        if os.environ["HOW"] == "error":
            raise RuntimeError("boom")
        os.kill(os.getpid(), signal.SIGINT)
"""


@needs_mlflow
@pytest.mark.parametrize(("how", "code", "status"), [("error", 1, "FAILED"), ("ctrl-c", 130, "KILLED")])
def test_a_failed_or_interrupted_run_ends_its_mlflow_runs_so(manifest, capsys, monkeypatch, tmp_path, how, code, status):
    (tmp_path / "failing.py").write_text(FAILING, encoding="utf-8")
    monkeypatch.setenv("HOW", how)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    path = manifest({"plugins.enable": ["mlflow", "failing.py"]}, models=[{"name": "a"}])
    got, _, err = cli(capsys, "run", path)
    assert got == code and "Traceback" not in err
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    client, runs = store(tmp_path / "res", monkeypatch)
    assert runs["a"].info.status == status
    assert [step for step, _ in history(client, runs["a"])["loss"]] == [1]  # the finished epoch


@needs_mlflow
def test_a_killed_then_resumed_run_logs_each_epoch_once_to_the_same_runs(manifest, capsys, tmp_path, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER, encoding="utf-8")
    # held files (flush_interval): fold 2's first epoch is logged to MLflow but its resume state is
    # not on disk when the kill comes, so the resume trains it again; fold 2's run was created
    # after the last saved state
    settings = {**LAYOUTS["kfold"], "run.epochs": 2, "run.flush_interval": 600, "plugins.enable": ["kfold", "mlflow", "killer.py"]}
    path = manifest(settings, models=[{"name": "a"}])
    done = run_cli("run", str(path), cwd=tmp_path, env={"KILL_AT": "2,2,2", "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr
    client, runs = store(tmp_path / "res", monkeypatch)
    assert [step for step, _ in history(client, runs["a fold 2"])["loss"]] == [1]  # logged before the kill
    assert not (tmp_path / "res" / "a" / "FOLD_2" / "trainlog.json").exists()  # trained again by the resume
    monkeypatch.delenv("KILL_AT", raising=False)
    assert cli(capsys, "run", path, "--resume")[0] == 0  # in this process: the resume needs no real kill
    client, runs = store(tmp_path / "res", monkeypatch)
    assert set(runs) == {"a", "a fold 1", "a fold 2"}  # the same three runs, reopened
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    for fold in (1, 2):
        got = {key: pairs for key, pairs in history(client, runs[f"a fold {fold}"]).items() if not key.endswith("_time") and not key.startswith("final_")}
        assert got == trainlog(tmp_path / "res" / "a" / f"FOLD_{fold}", without_times=True)  # one value per epoch, the resumed run's


def test_without_mlflow_installed_one_line_names_the_extra(manifest, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    path = manifest({"plugins.enable": ["mlflow"]})
    for command in ("validate", "run"):
        code, out, err = cli(capsys, command, path)
        assert code == 2
        assert error_of(err) == f'{path}: plugins.enable: the mlflow plugin needs MLflow: pip install "izitorch[mlflow]"'
    assert not (path.parent / "res").exists()


@needs_mlflow
def test_a_tracking_uri_of_res_dir_itself_is_refused(manifest, capsys, tmp_path):
    path = manifest({"plugins.enable": ["mlflow"], "plugins.mlflow": {"tracking_uri": str(tmp_path / "res")}})
    code, _, err = cli(capsys, "run", path)
    assert code == 2 and "plugins.mlflow.tracking_uri: is res_dir itself" in error_of(err)


def test_the_plugin_module_imports_mlflow_only_inside_its_functions():
    """Loading the plugin (``izitorch plugins`` loads every entry point) must not pay MLflow's
    import: mlflow is imported where the plugin is configured, never at the module's top."""
    tree = ast.parse((ROOT / "plugins" / "mlflowlog.py").read_text(encoding="utf-8"))
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in top if isinstance(node, ast.ImportFrom)]
    assert names and not [name for name in names if name == "mlflow" or name.startswith("mlflow.")]
