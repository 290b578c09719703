"""``izitorch.results.load`` and ``izitorch report``: every number against values recomputed here
from the run's own files (confusion matrices with scikit-learn, the split with numpy, the
corrected resampled t-test with scipy), in every format.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score

from conftest import cli, error_of
from izitorch.models import MLP
from izitorch.results import load

K = 3
MODELS = [{"name": "a"}, {"name": "b", "optimizer": {"lr": 3e-3}}, {"name": "wide", "params": {"hidden": 32}}]


@pytest.fixture(scope="module")
def kfold(tmp_path_factory):
    """Three models over 3 folds: "a" and "b" one vectorized stack, "wide" alone."""
    from conftest import make_manifest
    from izitorch.cli import main

    folder = tmp_path_factory.mktemp("kfold")
    path = make_manifest(folder, {"plugins.enable": ["kfold"], "plugins.kfold": {"k": K}, "run.multi_model": "auto"}, models=MODELS)
    assert main(["run", str(path)]) == 0
    return folder / "res"


def folder(res, name, fold):
    return res / name / f"FOLD_{fold}"


def truth_and_predictions(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (y_true, y_pred) pairs a confusion matrix counts, for scikit-learn."""
    rows, cols = np.nonzero(matrix)
    counts = matrix[rows, cols]
    return np.repeat(rows, counts), np.repeat(cols, counts)


def test_load_reads_every_fold_as_the_run_wrote_it(kfold):
    results = load(kfold, frames=False)
    assert results.task == "classification" and results.headline == "accuracy"
    assert {(row["model"], row["fold"]) for row in results.folds} == {(m["name"], f) for m in MODELS for f in range(1, K + 1)}
    for row in results.folds:
        where = folder(kfold, row["model"], row["fold"])
        matrix = np.asarray(pickle.loads((where / "confusion_matrix.pkl").read_bytes()))
        truth, predicted = truth_and_predictions(matrix)
        assert row["accuracy"] == pytest.approx(100 * accuracy_score(truth, predicted))
        assert row["F1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
        assert row["epoch"] == 2
    log = json.loads((folder(kfold, "wide", 2) / "trainlog.json").read_text())
    epochs = [row for row in results.epochs if (row["model"], row["fold"]) == ("wide", 2)]
    assert {(row["epoch"], row["phase"], row["metric"]) for row in epochs} >= {(2, "test", "accuracy"), (1, "train", "loss"), (1, "train", "lr")}
    for row in epochs:
        key = row["metric"] if row["phase"] == "train" or row["metric"] in ("inference_time", "eval_time") else f"{row['phase']}_{row['metric']}"
        assert row["value"] == log[str(row["epoch"])][key]
    models = {row["name"]: row for row in results.models}
    assert models["wide"]["params"] == sum(p.numel() for p in MLP(hidden=32).parameters())
    assert json.loads((kfold / "results.json").read_text())["wide"]["params"] == models["wide"]["params"]
    accuracies = [row["accuracy"] for row in results.folds if row["model"] == "b"]
    assert models["b"]["accuracy_mean"] == pytest.approx(np.mean(accuracies)) and models["b"]["accuracy_std"] == pytest.approx(np.std(accuracies))


def test_load_gives_data_frames_with_pandas(kfold):
    pandas = pytest.importorskip("pandas")
    results = load(kfold)
    assert isinstance(results.epochs, pandas.DataFrame) and list(results.epochs.columns) == ["model", "fold", "epoch", "phase", "metric", "value"]
    assert set(results.folds["model"]) == {"a", "b", "wide"} and len(results.folds) == 3 * K
    assert results.models.set_index("name").loc["a", "folds"] == K


def nadeau_bengio(a, b, n_train, n_test) -> float:
    d = np.asarray(a) - np.asarray(b)
    t = d.mean() / np.sqrt((1 / len(d) + n_test / n_train) * d.var(ddof=1))
    return float(2 * stats.t.sf(abs(t), len(d) - 1))


def test_report_json_ranks_and_tests_the_lead(kfold, capsys):
    code, out, err = cli(capsys, "report", kfold, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["schema"] == 1 and report["metric"] == "accuracy" and report["direction"] == "higher"
    scores = {m["name"]: [json.loads((folder(kfold, m["name"], f) / "test_metrics.json").read_text())["accuracy"] for f in range(1, K + 1)] for m in MODELS}
    ranked = sorted(scores, key=lambda name: -np.mean(scores[name]))
    assert [model["name"] for model in report["models"]] == ranked
    for model in report["models"]:
        assert model["metrics"]["accuracy"]["values"] == scores[model["name"]]
        assert model["metrics"]["accuracy"]["std"] == pytest.approx(np.std(scores[model["name"]]))
    splits = pickle.loads((kfold / "Dataset_split.pkl").read_bytes())
    n_train, n_test = sum(len(s[0]) for s in splits), sum(len(s[-1]) for s in splits)
    best = ranked[0]
    comparisons = {c["other"]: c for c in report["comparisons"]}
    assert set(comparisons) == set(ranked[1:]) and all(c["best"] == best for c in comparisons.values())
    for other in ranked[1:]:
        if np.ptp(np.subtract(scores[best], scores[other])) > 0:
            assert comparisons[other]["p"] == pytest.approx(nadeau_bengio(scores[best], scores[other], n_train, n_test))


def test_report_table_markdown_and_csv_show_the_same_numbers(kfold, capsys):
    code, table, _ = cli(capsys, "report", kfold)
    assert code == 0 and table.startswith("final test scores:\n")
    assert "corrected resampled t-test" in table
    code, markdown, _ = cli(capsys, "report", kfold, "--format", "markdown")
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | params | folds | epoch | s/epoch | loss | acc % |") and len(rows) == 1 + len(MODELS)
    code, text, _ = cli(capsys, "report", kfold, "--format", "csv", "--metric", "loss")
    records = list(csv.DictReader(io.StringIO(text)))
    losses = {
        m["name"]: np.mean([json.loads((folder(kfold, m["name"], f) / "test_metrics.json").read_text())["loss"] for f in range(1, K + 1)]) for m in MODELS
    }
    assert [r["model"] for r in records] == sorted(losses, key=losses.get)  # lower is better
    times = {
        m["name"]: np.mean([json.loads((folder(kfold, m["name"], f) / "test_metrics.json").read_text())["train_time"] for f in range(1, K + 1)]) for m in MODELS
    }
    for record in records:
        assert float(record["loss_mean"]) == pytest.approx(losses[record["model"]], rel=1e-12)
        assert float(record["train_time"]) == pytest.approx(times[record["model"]], rel=1e-12)
    assert records[0]["p_vs_best"] == "" and all(0.0 <= float(r["p_vs_best"]) <= 1.0 for r in records[1:])


def test_report_of_an_interrupted_run_uses_the_folds_it_finished(kfold, tmp_path, capsys):
    copy = tmp_path / "res"
    shutil.copytree(kfold, copy)
    (copy / "results.json").unlink()
    for model in MODELS:
        (folder(copy, model["name"], 3) / "test_metrics.json").unlink()
    code, out, err = cli(capsys, "report", copy, "--format", "json")
    assert code == 0, err
    for model in json.loads(out)["models"]:
        assert model["folds"] == 2 and len(model["metrics"]["accuracy"]["values"]) == 2


def test_report_of_several_runs_names_each_models_run(kfold, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(kfold, other)
    code, out, _ = cli(capsys, "report", kfold, other, "--format", "json")
    names = [model["name"] for model in json.loads(out)["models"]]
    assert code == 0 and sorted(names) == sorted(f"{run}/{m['name']}" for run in (kfold.name, "other") for m in MODELS)


def test_replicas_are_pooled_over_their_seeds(manifest, capsys):
    path = manifest(models=[{"sweep": {"optimizer.lr": [1e-3, 1e-2]}, "seeds": 2}])
    assert cli(capsys, "run", path)[0] == 0
    res = path.parent / "res"
    code, out, _ = cli(capsys, "report", res, "--format", "json")
    report = json.loads(out)
    assert code == 0 and {m["name"] for m in report["models"]} == {"mlp_lr0.001", "mlp_lr0.01"}
    for model in report["models"]:
        accuracies = [json.loads((res / f"{model['name']}_s{seed}" / "test_metrics.json").read_text())["accuracy"] for seed in (1, 2)]
        assert model["seeds"] == 2 and model["metrics"]["accuracy"]["values"] == accuracies
        assert model["metrics"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    code, table, _ = cli(capsys, "report", res)
    assert "mlp_lr0.01 (2 seeds)" in table and " ± " in table


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--metric", "acuracy"], '--metric: "acuracy" is not among the run\'s final scores'),
        (["--format", "xml"], '--format: expected one of table, markdown, csv, json, got "xml"'),
    ],
)
def test_a_report_option_that_does_not_fit_is_one_line(kfold, capsys, argv, says):
    code, out, err = cli(capsys, "report", kfold, *argv)
    assert (code, out) == (2, "") and says in error_of(err) and "Traceback" not in err


def test_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "report", tmp_path)
    assert code == 2 and error_of(err) == f'{tmp_path / "conf.json"} not found: "{tmp_path}" holds no izitorch run (a run writes conf.json when it starts)'


def test_torch_is_not_needed_to_read_the_tables(kfold):
    """The tables hold plain numbers: nothing in them needs torch to be read back."""
    results = load(kfold, frames=False)
    assert all(not isinstance(value, torch.Tensor) for row in results.folds + results.models for value in row.values())


# -- holdout: per-sample predictions, McNemar, bootstrap ------------------------------------------


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    """Three models on one holdout split, 3 epochs, their final test predictions recorded."""
    from conftest import make_manifest
    from izitorch.cli import main

    folder = tmp_path_factory.mktemp("holdout")
    models = [{"name": "a"}, {"name": "slow", "optimizer": {"lr": 1e-4}}, {"name": "wide", "params": {"hidden": 32}}]
    path = make_manifest(folder, {"run.epochs": 3}, models=models)
    assert main(["run", str(path)]) == 0
    return folder / "res"


def recorded(res, name, fold=None):
    base = res / name if fold is None else folder(res, name, fold)
    record = json.loads((base / "test_predictions.json").read_text())
    matrix = np.asarray(pickle.loads((base / "confusion_matrix.pkl").read_bytes()))
    return np.asarray(record["target"]), np.asarray(record["predicted"]), matrix


def test_the_predictions_are_the_confusion_matrixs_samples(holdout, kfold):
    splits = pickle.loads((kfold / "Dataset_split.pkl").read_bytes())
    cases = [(holdout, name, None, None) for name in ("a", "slow", "wide")]
    cases += [(kfold, m["name"], f, len(splits[f - 1][-1])) for m in MODELS for f in range(1, K + 1)]
    for res, name, fold, size in cases:
        target, predicted, matrix = recorded(res, name, fold)
        counted = np.zeros_like(matrix)
        np.add.at(counted, (target, predicted), 1)
        assert np.array_equal(counted, matrix)
        assert size is None or len(target) == size


def test_a_holdout_lead_is_tested_by_mcnemar_and_each_accuracy_has_an_interval(holdout, capsys):
    code, out, _ = cli(capsys, "report", holdout, "--format", "json")
    report = json.loads(out)
    best = report["models"][0]["name"]
    target, best_predicted, _ = recorded(holdout, best)
    for comparison in report["comparisons"]:
        _, other_predicted, _ = recorded(holdout, comparison["other"])
        b = int(np.sum((best_predicted == target) & (other_predicted != target)))
        c = int(np.sum((best_predicted != target) & (other_predicted == target)))
        assert (comparison["test"], comparison["only_best_right"], comparison["only_other_right"]) == ("McNemar", b, c)
        assert comparison["p"] == pytest.approx(min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5)) if b + c else 1.0)
    rng = np.random.default_rng(0)
    for model in report["models"]:
        target, predicted, _ = recorded(holdout, model["name"])
        right = (predicted == target).astype(float)
        resampled = right[rng.integers(0, len(right), size=(20000, len(right)))].mean(axis=1) * 100
        low, high = np.percentile(resampled, [2.5, 97.5])
        step = 100 / len(right)  # one sample's share: the exact interval and 20,000 resamples agree to it
        assert model["accuracy_interval"][0] == pytest.approx(low, abs=step) and model["accuracy_interval"][1] == pytest.approx(high, abs=step)
    code, table, _ = cli(capsys, "report", holdout)
    assert "McNemar" in table and "95% CI acc %" in table


# -- --plots ----------------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header, checked to be one."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_pngs_of_the_reports_values(kfold, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from izitorch.plots import write_plots
    from izitorch.report import build

    res = tmp_path / "res"
    shutil.copytree(kfold, res)
    code, _, err = cli(capsys, "report", res, "--plots")
    assert code == 0 and "figure(s) written to" in err
    files = {path.name for path in (res / "plots").glob("*.png")}
    assert files == {"learning_curves.png", "per_class.png"} | {f"confusion_{m['name']}.png" for m in MODELS}
    for name in files:
        width, height = png_size(res / "plots" / name)
        assert 300 <= width <= 2000 and 300 <= height <= 2000

    plotted = write_plots(load(res, frames=False), build([str(res)]))  # again: its own files are rewritten
    curve = plotted["learning_curves.png"]["accuracy"][("wide", "test")]
    logs = [json.loads((folder(res, "wide", f) / "trainlog.json").read_text()) for f in range(1, K + 1)]
    assert curve["epoch"] == [1, 2]
    assert curve["mean"] == pytest.approx([np.mean([log[str(e)]["test_accuracy"] for log in logs]) for e in (1, 2)])
    assert curve["low"] == pytest.approx([min(log[str(e)]["test_accuracy"] for log in logs) for e in (1, 2)])
    total = sum(np.asarray(pickle.loads((folder(res, "a", f) / "confusion_matrix.pkl").read_bytes())) for f in range(1, K + 1))
    assert plotted["confusion_a.png"] == pytest.approx(total / total.sum(axis=1, keepdims=True))
    finals = [json.loads((folder(res, "b", f) / "test_metrics.json").read_text())["per_class"]["F1"] for f in range(1, K + 1)]
    assert plotted["per_class.png"]["b"] == pytest.approx(np.mean(finals, axis=0))


def test_a_sweep_plot_shows_the_ranking_metric_against_each_value(manifest, capsys):
    pytest.importorskip("matplotlib")
    path = manifest(models=[{"sweep": {"optimizer.lr": [1e-3, 1e-2], "params.hidden": [8, 16]}}])
    assert cli(capsys, "run", path)[0] == 0
    res = path.parent / "res"
    code, out, _ = cli(capsys, "report", res, "--plots", "--format", "json")
    assert code == 0
    from izitorch.plots import write_plots

    plotted = write_plots(load(res, frames=False), json.loads(out))
    data = plotted["sweep_optimizer.lr.png"]
    accuracy = {
        name: json.loads((res / name / "test_metrics.json").read_text())["accuracy"] for name in (p.name for p in res.iterdir() if p.name.startswith("mlp_"))
    }
    expected = sorted((float(name.split("_lr")[1].split("_")[0]), score) for name, score in accuracy.items())
    got = sorted(zip(data["x"], data["y"]))
    assert [x for x, _ in got] == [x for x, _ in expected] and [y for _, y in got] == pytest.approx([y for _, y in expected])
    assert png_size(res / "plots" / "sweep_params.hidden.png")[0] >= 300


def test_plots_never_replace_a_file_of_the_users(kfold, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    res = tmp_path / "res"
    shutil.copytree(kfold, res)
    (res / "plots").mkdir()
    (res / "plots" / "per_class.png").write_bytes(b"mine")
    code, _, err = cli(capsys, "report", res, "--plots")
    assert code == 2 and error_of(err).endswith("per_class.png is not a figure izitorch wrote: move it away, or leave out --plots")
    assert (res / "plots" / "per_class.png").read_bytes() == b"mine"


def test_plots_without_matplotlib_name_the_extra(kfold, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    code, out, err = cli(capsys, "report", kfold, "--plots")
    assert (code, out) == (2, "") and error_of(err) == '--plots: plots need matplotlib: pip install "izitorch[plots]"'
    assert not (kfold / "plots").exists()


def test_per_class_scores_are_each_folds_mean_by_scikit_learn(kfold, capsys):
    from sklearn.metrics import precision_recall_fscore_support

    code, out, _ = cli(capsys, "report", kfold, "--per-class", "--format", "json")
    assert code == 0
    for model in json.loads(out)["models"]:
        folds = []
        for f in range(1, K + 1):
            truth, predicted = truth_and_predictions(np.asarray(pickle.loads((folder(kfold, model["name"], f) / "confusion_matrix.pkl").read_bytes())))
            folds.append(precision_recall_fscore_support(truth, predicted, labels=range(10), average=None, zero_division=0))
        for index, metric in enumerate(("precision", "recall", "F1")):
            assert model["per_class"][metric] == pytest.approx(np.mean([fold[index] for fold in folds], axis=0))
    code, table, _ = cli(capsys, "report", kfold, "--per-class")
    block = table.split("\nwide, per class:\n", 1)[1].splitlines()
    assert block[0].split() == ["class", "precision", "recall", "F1", "IoU"] and [line.split()[0] for line in block[2:12]] == [str(c) for c in range(10)]
