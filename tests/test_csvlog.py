"""The ``csv`` plugin: ``metrics.csv`` holds every epoch's scores of every model and fold, the
same values as the trainlogs, and a run killed with SIGKILL then resumed writes the same rows as
an uninterrupted one (no row twice, none missing)."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import KILLER, cli, error_of, run_cli

LAYOUTS = {
    "kfold": {"plugins.enable": ["kfold", "csv"], "plugins.kfold": {"k": 2}},
    "parallel": {"plugins.enable": ["kfold", "csv"], "plugins.kfold": {"k": 2, "parallel": True}},
    "holdout": {"plugins.enable": ["csv"], "data.validation": True},
}
MODELS = [{"name": "a"}, {"name": "b", "optimizer": {"lr": 3e-3}}]


def rows(res) -> list[dict]:
    with (res / "metrics.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def expected_rows(res, folds: int) -> set[tuple]:
    """Every numeric value of every trainlog, as (model, fold, epoch, phase, metric, value)."""
    out = set()
    for model in MODELS:
        for fold in range(1, folds + 1):
            folder = res / model["name"] if folds == 1 else res / model["name"] / f"FOLD_{fold}"
            for epoch, entry in json.loads((folder / "trainlog.json").read_text()).items():
                for key, value in entry.items():
                    if key in ("inference_time", "eval_time"):
                        phase, metric = ("val" if any(k.startswith("val_") for k in entry) else "test"), key
                    else:
                        prefix = next((p for p in ("val_", "test_") if key.startswith(p)), "")
                        phase, metric = (prefix[:-1] or "train"), key[len(prefix) :]
                    out.add((model["name"], str(fold), epoch, phase, metric, repr(float(value))))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_metrics_csv_holds_the_trainlogs_values(manifest, capsys, layout):
    path = manifest({"run.epochs": 3, **LAYOUTS[layout]}, models=MODELS)
    assert cli(capsys, "run", path)[0] == 0
    res = path.parent / "res"
    got = rows(res)
    assert list(got[0]) == ["model", "fold", "epoch", "phase", "metric", "value"]
    folds = 1 if layout == "holdout" else 2
    assert {tuple(row.values()) for row in got} == expected_rows(res, folds)
    assert len(got) == len(expected_rows(res, folds))  # no row twice
    assert {row["metric"] for row in got} >= {"loss", "accuracy", "lr"}


def without_times(res) -> list[tuple]:
    return [tuple(row.values()) for row in rows(res) if not row["metric"].endswith("_time")]


# sequential folds (a finished fold's rows read back from the file) and parallel folds (the fold
# states swapped around their hooks); a holdout is the first case without the earlier folds
@pytest.mark.parametrize(("layout", "kill_at"), [("kfold", "2,2,3"), ("parallel", "1,2,2")])
def test_a_killed_then_resumed_run_writes_the_same_rows(manifest, tmp_path, layout, kill_at):
    (tmp_path / "killer.py").write_text(KILLER, encoding="utf-8")
    # files written in line: with the writer's thread, the epoch before the kill may still be in
    # flight (io.py's promise), and the check below that the resume keeps it would be a race
    settings = {"run.epochs": 3, "run.background_writes": False, **LAYOUTS[layout]}
    settings["plugins.enable"] = [*settings["plugins.enable"], "killer.py"]
    whole = manifest({**settings, "run.res_dir": str(tmp_path / "whole")}, models=MODELS, name="whole.toml")
    assert run_cli("run", str(whole), cwd=tmp_path).returncode == 0
    killed = manifest({**settings, "run.res_dir": str(tmp_path / "killed")}, models=MODELS, name="killed.toml")
    done = run_cli("run", str(killed), cwd=tmp_path, env={"KILL_AT": kill_at, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr
    fold, epoch, _ = kill_at.split(",")
    before = {(row["fold"], row["epoch"]) for row in rows(tmp_path / "killed")}
    assert (fold, str(int(epoch) - 1)) in before  # the epoch before the kill is on disk: the resume must keep it
    done = run_cli("run", str(killed), "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert without_times(tmp_path / "killed") == without_times(tmp_path / "whole")


def test_a_key_in_its_table_is_refused_not_ignored(manifest, capsys):
    path = manifest({"plugins.enable": ["csv"], "plugins.csv": {"path": "other.csv"}})
    code, _, err = cli(capsys, "validate", path)
    assert (code, error_of(err)) == (2, f'{path}: plugins.csv.path: unknown key "path"')
