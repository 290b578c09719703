"""Task metrics against scikit-learn on the same predictions: macro precision / recall / F1,
balanced accuracy, per-class scores and top-k accuracy from the classification meters; MAE,
MSE, RMSE and R^2 from the regression meter; K > 1 members with sample masks throughout."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    balanced_accuracy_score,
    jaccard_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
    root_mean_squared_error,
    top_k_accuracy_score,
)

from conftest import make_manifest
from izitorch.cli import main
from izitorch.plugins.metrics import ConfusionMeter, top_k_meter
from izitorch.regression import RegressionMeter
from izitorch.table import comparison_table
from izitorch.tasks import headline, infer

BATCHES = (7, 32, 1, 50, 13)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def masked_batches(generator, members, classes, low=-1, high=None):
    """Class scores ``[K, B, C]``, integer targets (some outside ``[0, C)``) and masks, with
    member 1 sitting out every other batch."""
    high = classes + 1 if high is None else high
    for i, size in enumerate(BATCHES):
        outputs = torch.randn(members, size, classes, generator=generator)
        target = torch.randint(low, high, (size,), generator=generator)
        outputs[:, torch.arange(size), target.clamp(0, classes - 1)] += 0.5  # informative, imperfect
        mask = torch.rand(members, size, generator=generator) < 0.7
        mask[1] = mask[1] & (i % 2 == 0)
        yield outputs, target, mask


def kept(outputs, target, mask, k, classes):
    rows = mask[k].numpy() & (target.numpy() >= 0) & (target.numpy() < classes)
    return target.numpy()[rows], outputs[k].numpy()[rows]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # class 5, never true: on purpose
def test_classification_scores_against_sklearn_with_masks(generator):
    """K = 3 members, masks, ignored targets; class 4 is never predicted by anyone (its
    precision is 0, sklearn's zero_division=0) and class 5 never occurs in truth."""
    members, classes = 3, 6
    meter = ConfusionMeter(classes, members)
    seen = [([], []) for _ in range(members)]
    for outputs, target, mask in masked_batches(generator, members, classes):
        target = torch.where(target == 5, 0, target)  # class 5: never true
        outputs[:, :, 4] = -1e9  # class 4: never predicted
        meter.update(outputs, target, torch.zeros(members), mask)
        for k in range(members):
            truth, scores = kept(outputs, target, mask, k, classes)
            seen[k][0].append(truth)
            seen[k][1].append(scores.argmax(1))
    values = meter.compute()
    for k in range(members):
        truth, predicted = np.concatenate(seen[k][0]), np.concatenate(seen[k][1])
        assert 4 in truth and 4 not in predicted and 5 not in truth
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
        assert values[k]["precision"] == pytest.approx(p, abs=1e-12)
        assert values[k]["recall"] == pytest.approx(r, abs=1e-12)
        assert values[k]["F1"] == pytest.approx(f, abs=1e-12)
        assert values[k]["balanced_accuracy"] == pytest.approx(100 * balanced_accuracy_score(truth, predicted), abs=1e-10)
        labels = list(range(classes))
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, labels=labels, average=None, zero_division=0)
        per_class = values[k]["per_class"]
        np.testing.assert_allclose(per_class["precision"], p, atol=1e-12)
        np.testing.assert_allclose(per_class["recall"], r, atol=1e-12)
        np.testing.assert_allclose(per_class["F1"], f, atol=1e-12)
        np.testing.assert_allclose(per_class["IoU"], jaccard_score(truth, predicted, labels=labels, average=None, zero_division=0), atol=1e-12)
        assert per_class["precision"][4] == 0.0 and all(isinstance(v, float) for v in per_class["F1"])
    assert values[0]["precision"] != values[2]["precision"]  # each member its own predictions


def test_segmentation_scores_count_pixels(generator):
    """Per-pixel class scores ``[K, B, C, H, W]``: the scores are sklearn's over the pixels."""
    members, classes = 2, 3
    meter = ConfusionMeter(classes, members)
    outputs = torch.randn(members, 5, classes, 4, 4, generator=generator)
    target = torch.randint(0, classes, (5, 4, 4), generator=generator)
    meter.update(outputs, target, torch.zeros(members))
    for k, values in enumerate(meter.compute()):
        truth, predicted = target.reshape(-1).numpy(), outputs[k].argmax(1).reshape(-1).numpy()
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
        assert (values["precision"], values["recall"], values["F1"]) == pytest.approx((p, r, f))


@pytest.mark.parametrize("k", [2, 5])
def test_top_k_against_sklearn_with_masks(generator, k):
    members, classes = 3, 8
    meter = top_k_meter(k)(classes, members)
    assert meter.names == {f"top{k}_accuracy": "higher"}
    seen = [([], []) for _ in range(members)]
    for outputs, target, mask in masked_batches(generator, members, classes):
        meter.update(outputs, target, torch.zeros(members), mask)
        for m in range(members):
            truth, scores = kept(outputs, target, mask, m, classes)
            seen[m][0].append(truth)
            seen[m][1].append(scores)
    values = meter.compute()
    for m in range(members):
        truth, scores = np.concatenate(seen[m][0]), np.concatenate(seen[m][1])
        expected = 100 * top_k_accuracy_score(truth, scores, k=k, labels=list(range(classes)))
        assert values[m][f"top{k}_accuracy"] == pytest.approx(expected)
        assert 0 < expected < 100


def test_top_k_needs_more_classes_than_k(generator):
    """With C <= k every sample is in its top k: no value, rather than a meaningless 100 %."""
    meter = top_k_meter(5)(None, 1)
    meter.update(torch.randn(1, 10, 5, generator=generator), torch.randint(0, 5, (10,), generator=generator), torch.zeros(1))
    assert meter.compute() == [{}]


@pytest.mark.parametrize("columns", [None, 1, 3])
def test_regression_against_sklearn_with_masks(generator, columns):
    """K = 3 members, masks (member 1 sits out every other batch, and a left-out value is a
    NaN), targets ``[B]``, ``[B, 1]`` against ``[K, B]`` / ``[K, B, 1]`` outputs, and multi-output
    ``[B, 3]`` (sklearn's uniform average). The targets sit far from 0, where a plain
    ``sum(t^2) - sum(t)^2 / n`` would lose R^2's digits in float32."""
    members = 3
    meter = RegressionMeter(None, members)
    seen = [([], []) for _ in range(members)]
    shape = () if columns is None else (columns,)
    for i, size in enumerate(BATCHES):
        target = 1000 + torch.randn(size, *shape, generator=generator)
        outputs = target + 0.5 * torch.randn(members, size, *shape, generator=generator)
        mask = torch.rand(members, size, generator=generator) < 0.7
        mask[1] = mask[1] & (i % 2 == 0)
        outputs[~mask] = float("nan")
        meter.update(outputs, target, torch.zeros(members), mask)
        for k in range(members):
            rows = mask[k].numpy()
            seen[k][0].append(target.numpy()[rows].astype(np.float64))
            seen[k][1].append(outputs[k].numpy()[rows].astype(np.float64))
    values = meter.compute()
    for k in range(members):
        truth, predicted = np.concatenate(seen[k][0]), np.concatenate(seen[k][1])
        assert values[k]["MAE"] == pytest.approx(mean_absolute_error(truth, predicted), rel=1e-9)
        assert values[k]["MSE"] == pytest.approx(mean_squared_error(truth, predicted), rel=1e-9)
        assert values[k]["RMSE"] == pytest.approx(root_mean_squared_error(truth, predicted), rel=1e-9)
        assert values[k]["R2"] == pytest.approx(r2_score(truth, predicted), rel=1e-9)
        assert 0 < values[k]["R2"] < 1
    assert values[0]["MSE"] != values[2]["MSE"]


def test_regression_output_with_a_trailing_column_and_constant_targets(generator):
    """Outputs ``[K, B, 1]`` against targets ``[B]``; a constant target column has R^2 1 when
    predicted exactly and 0 otherwise (sklearn's force_finite)."""
    meter = RegressionMeter(None, 2)
    target = torch.full((6,), 3.0)
    outputs = torch.stack([target, target + torch.arange(6.0)]).unsqueeze(-1)
    meter.update(outputs, target, torch.zeros(2))
    exact, off = meter.compute()
    assert exact == {"MAE": 0.0, "MSE": 0.0, "RMSE": 0.0, "R2": r2_score(target.numpy(), target.numpy())} and exact["R2"] == 1.0
    assert off["R2"] == r2_score(target.numpy(), (target + torch.arange(6.0)).numpy()) == 0.0
    assert off["MAE"] == pytest.approx(mean_absolute_error(target.numpy(), (target + torch.arange(6.0)).numpy()))


def test_regression_meter_leaves_class_scores_alone(generator):
    """Integer labels against class scores: no regression values (the classification meter's)."""
    meter = RegressionMeter(None, 1)
    meter.update(torch.randn(1, 4, 3, generator=generator), torch.tensor([0, 1, 2, 1]), torch.zeros(1))
    assert meter.compute() == [{}]


def diabetes(limit: int = 200, columns: int = 1):
    """scikit-learn's bundled diabetes regression (float targets ``[N, columns]``), standardised."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    inputs = torch.tensor(data.data[:limit], dtype=torch.float32)
    target = torch.tensor(data.target[:limit], dtype=torch.float32)
    target = ((target - target.mean()) / target.std()).reshape(-1, 1).repeat(1, columns)
    return torch.utils.data.TensorDataset((inputs - inputs.mean(0)) / inputs.std(0), target)


REGRESSION = {
    "data.dataset": "test_task_metrics:diabetes",
    "data.params": {"limit": 200},
    "data.num_classes": None,
}
REGRESSORS = [
    {"name": "wide", "params": {"in_features": 10, "hidden": 32, "num_classes": 1}, "criterion": {"class": "torch.nn:MSELoss"}},
    {"name": "slow", "params": {"in_features": 10, "hidden": 32, "num_classes": 1}, "criterion": {"class": "torch.nn:MSELoss"}, "optimizer": {"lr": 1e-4}},
]


def test_a_regression_run_shows_and_ranks_regression_metrics(tmp_path, capsys):
    """Inferred task: MAE, MSE, RMSE and R^2 in the epoch lines, the table (ranked by RMSE,
    lower first) and the outputs; no accuracy or IoU anywhere. The two models train as one
    vectorized group (same architecture and optimizer)."""
    manifest = make_manifest(tmp_path, REGRESSION, models=REGRESSORS)
    assert main(["run", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "acc" not in out and "IoU" not in out and "precision" not in out
    assert "izitorch: vectorized group of 2: wide, slow" in out
    table = out[out.index("final test scores:") :].splitlines()
    assert table[1].split()[3:] == ["loss", "MAE↓", "MSE↓", "RMSE↓", "R2"]
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    assert all(entry["headline"] == "RMSE" for entry in summary.values())
    order = sorted(summary, key=lambda name: summary[name]["mean"]["RMSE"])
    assert [line.split()[0] for line in table[3:5]] == order
    assert summary["wide"]["directions"] == {"loss": "lower", "MAE": "lower", "MSE": "lower", "RMSE": "lower", "R2": "higher"}
    final = json.loads((tmp_path / "res" / "wide" / "test_metrics.json").read_text())
    assert set(final) >= {"MAE", "MSE", "RMSE", "R2"} and "accuracy" not in final
    assert final["RMSE"] == pytest.approx(final["MSE"] ** 0.5)
    assert final["MSE"] == pytest.approx(final["loss"], rel=1e-5)  # MSELoss over the same samples


def test_a_classification_run_writes_per_class_scores_and_top_k(tmp_path, capsys):
    manifest = make_manifest(tmp_path, {"plugins.metrics": {"top_k": 3}, "run.task": "classification"})
    assert main(["run", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "top3_accuracy" in out and " F1 " in out
    final = json.loads((tmp_path / "res" / "mlp" / "test_metrics.json").read_text())
    assert {key: len(values) for key, values in final["per_class"].items()} == {"precision": 10, "recall": 10, "F1": 10, "IoU": 10}
    assert final["accuracy"] <= final["top3_accuracy"] <= 100
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    assert summary["mlp"]["headline"] == "accuracy" and summary["mlp"]["directions"]["F1"] == "higher"


@pytest.mark.parametrize(
    ("overrides", "models", "expected"),
    [
        ({"run.task": "regression"}, None, 'run.task: "regression" does not fit the data: the target holds integer class labels [4]'),
        (
            {**REGRESSION, "run.task": "classification"},
            REGRESSORS[:1],
            'run.task: "classification" does not fit the data: the target is a float of the output\'s shape [4, 1]',
        ),
        ({"run.task": "guess"}, None, "run.task"),
        ({"plugins.metrics": {"top_k": 1}}, None, "plugins.metrics.top_k"),
    ],
)
def test_a_task_the_data_contradicts_is_one_line(tmp_path, capsys, overrides, models, expected):
    manifest = make_manifest(tmp_path, overrides, models=models)
    assert main(["validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"izitorch: error: {manifest}: ")


@pytest.mark.parametrize(
    ("output", "target", "task"),
    [
        (torch.zeros(4, 10), torch.zeros(4, dtype=torch.long), "classification"),
        (torch.zeros(4, 3, 8, 8), torch.zeros(4, 8, 8, dtype=torch.long), "segmentation"),
        (torch.zeros(4, 1), torch.zeros(4), "regression"),
        (torch.zeros(4, 3), torch.zeros(4, 3), "regression"),
        (torch.zeros(4, 10), torch.zeros(4, 3, dtype=torch.long), None),  # another layout: a loss of its own
        ((torch.zeros(4, 10),), torch.zeros(4, dtype=torch.long), None),  # several outputs
    ],
)
def test_the_task_is_inferred_where_the_batch_makes_it_clear(output, target, task):
    assert infer(output, target) == task


def test_the_table_ranks_by_the_task_headline():
    """A segmentation ranks by IoU even where pixel accuracy orders the models the other way;
    without a headline, accuracy ranks as before."""
    results = {"a": [{"loss": 0.5, "accuracy": 90.0, "IoU": 0.4}], "b": [{"loss": 0.6, "accuracy": 80.0, "IoU": 0.6}]}
    rows = lambda text: [line.split()[0] for line in text.splitlines()[3:]]  # noqa: E731
    assert rows(comparison_table(results, headline=headline("segmentation"))) == ["b", "a"]
    assert rows(comparison_table(results)) == rows(comparison_table(results, headline=headline("classification"))) == ["a", "b"]


AUROC = {"class": "torchmetrics.classification:MulticlassAUROC", "num_classes": 10, "direction": "higher", "name": "AUROC"}


def test_a_torchmetrics_metric_against_sklearn_with_masks(generator):
    """Each member's instance sees its own samples: macro one-vs-rest AUROC as sklearn's."""
    pytest.importorskip("torchmetrics")
    from sklearn.metrics import roc_auc_score

    from izitorch.torchmetrics_bridge import factories

    ((name, factory),) = factories([{**AUROC, "num_classes": 5}])
    assert name == "AUROC" and factory.names == {"AUROC": "higher"}
    members, classes = 2, 5
    meter = factory(classes, members)
    seen = [([], []) for _ in range(members)]
    for outputs, target, mask in masked_batches(generator, members, classes, low=0, high=classes):
        probabilities = outputs.softmax(2)
        meter.update(probabilities, target, torch.zeros(members), mask)
        for k in range(members):
            rows = mask[k].numpy()
            seen[k][0].append(target.numpy()[rows])
            seen[k][1].append(probabilities[k].numpy()[rows])
    values = meter.compute()
    for k in range(members):
        truth, scores = np.concatenate(seen[k][0]), np.concatenate(seen[k][1])
        assert values[k]["AUROC"] == pytest.approx(roc_auc_score(truth, scores, multi_class="ovr", average="macro"), abs=1e-5)


def test_a_torchmetrics_metric_is_first_class(tmp_path, capsys):
    """Shown, logged, tabled, with its direction, and it picks the best epoch."""
    pytest.importorskip("torchmetrics")
    manifest = make_manifest(tmp_path, {"plugins.metrics": {"extra": [AUROC]}, "run.best_metric": "AUROC", "data.validation": True})
    assert main(["run", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert " AUROC " in out.split("final test scores:")[1].splitlines()[1]
    final = json.loads((tmp_path / "res" / "mlp" / "test_metrics.json").read_text())
    assert 0.5 < final["AUROC"] <= 1
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    assert summary["mlp"]["directions"]["AUROC"] == "higher" and 0.5 < summary["mlp"]["mean"]["AUROC"] <= 1


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({**AUROC, "direction": "up"}, 'plugins.metrics.extra[0].direction: expected "higher" or "lower"'),
        ({**AUROC, "num_clases": 10}, "plugins.metrics.extra[0]: building MulticlassAUROC failed: "),
        ({**AUROC, "class": "torch.nn:Linear"}, 'plugins.metrics.extra[0].class: "torch.nn:Linear" is not a torchmetrics.Metric class'),
        ({**AUROC, "name": "F1"}, 'metrics "classification" and "torchmetrics:F1" both compute "F1"'),
    ],
)
def test_a_torchmetrics_entry_that_does_not_fit_is_one_line(tmp_path, capsys, extra, expected):
    pytest.importorskip("torchmetrics")
    manifest = make_manifest(tmp_path, {"plugins.metrics": {"extra": [extra]}})
    assert main(["validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_torchmetrics_metric_without_torchmetrics_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics fails, as when not installed
    manifest = make_manifest(tmp_path, {"plugins.metrics": {"extra": [AUROC]}})
    assert main(["validate", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"izitorch: error: {manifest}: plugins.metrics.extra[0].class: names a torchmetrics metric, and torchmetrics is not installed: "
        "pip install 'izitorch[torchmetrics]'\n"
    )
