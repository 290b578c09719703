"""Task metrics against scikit-learn on the same predictions: macro precision / recall / F1,
balanced accuracy, per-class scores and top-k accuracy from the classification meters; MAE,
MSE, RMSE and R^2 from the regression meter; K > 1 members with sample masks throughout."""

from __future__ import annotations

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

from izitorch.plugins.metrics import ConfusionMeter, top_k_meter
from izitorch.plugins.regression import RegressionMeter

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
