"""The metric accumulators of plugins/metrics.py against scikit-learn, batch by batch.

The meters follow the metric protocol (izitorch/metrics.py): outputs ``[K, B, ...]``, losses
``[K]``, an optional ``[K, B]`` mask, one dict per member; a lone model is K = 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score

from izitorch.plugins import metrics
from izitorch.regression import RegressionMeter
from izitorch.plugins.metrics import ConfusionMeter, LossMeter, _scores, accuracies, accuracy, izitorch_register_metrics, mean_iou, mean_ious

BATCHES = (7, 32, 1, 50, 13)  # uneven, with a batch of one


def split(tensor: torch.Tensor, sizes=BATCHES):
    assert sum(sizes) == tensor.shape[0]
    return torch.split(tensor, list(sizes))


def sk_iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean IoU over the labels present in truth or prediction, per scikit-learn."""
    labels = np.union1d(truth, predicted)
    return float(np.mean(jaccard_score(truth, predicted, labels=labels, average=None)))


def accumulate(meter, outputs, targets, losses=None):
    """Feed a lone model's batches (K = 1) and return its values."""
    for i, (output, target) in enumerate(zip(outputs, targets)):
        meter.update(output.unsqueeze(0), target, (losses[i] if losses is not None else torch.tensor(0.0)).reshape(1))
    values = meter.compute()
    assert len(values) == 1
    return values[0]


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("num_classes", [None, 6])
def test_classification_against_sklearn_over_uneven_batches(generator, num_classes):
    n, classes = sum(BATCHES), 6
    logits = torch.randn(n, classes, generator=generator)
    targets = torch.randint(0, classes, (n,), generator=generator)
    # make the predictions informative but imperfect, so the matrix has a structure
    logits[torch.arange(n), targets] += torch.rand(n, generator=generator) * 2
    values = accumulate(ConfusionMeter(num_classes), split(logits), split(targets))
    truth, predicted = targets.numpy(), logits.argmax(1).numpy()
    assert 0 < accuracy_score(truth, predicted) < 1
    expected = confusion_matrix(truth, predicted, labels=list(range(classes)))
    assert values["confusion_matrix"].dtype == np.int64
    assert values["confusion_matrix"].shape == (classes, classes)
    assert (values["confusion_matrix"] == expected).all()
    assert values["accuracy"] == pytest.approx(accuracy_score(truth, predicted) * 100)
    assert values["IoU"] == pytest.approx(sk_iou(truth, predicted))
    once = ConfusionMeter(num_classes)
    once.update(logits.unsqueeze(0), targets, torch.zeros(1))
    (at_once,) = once.compute()
    assert (at_once["confusion_matrix"] == values["confusion_matrix"]).all()
    assert at_once["accuracy"] == pytest.approx(values["accuracy"])
    assert at_once["IoU"] == pytest.approx(values["IoU"])


def test_iou_averages_only_over_classes_present(generator):
    # 5 classes, but class 4 never appears in truth or prediction: it must not count as IoU 0
    n = sum(BATCHES)
    targets = torch.randint(0, 4, (n,), generator=generator)
    logits = torch.randn(n, 5, generator=generator)
    logits[:, 4] = -100.0
    values = accumulate(ConfusionMeter(5), split(logits), split(targets))
    truth, predicted = targets.numpy(), logits.argmax(1).numpy()
    assert 4 not in predicted
    assert values["confusion_matrix"].shape == (5, 5)
    assert values["IoU"] == pytest.approx(sk_iou(truth, predicted))
    all_labels = float(np.mean(jaccard_score(truth, predicted, labels=list(range(5)), average=None, zero_division=0)))
    assert values["IoU"] != pytest.approx(all_labels)


def test_num_classes_is_inferred_from_the_output(generator):
    logits = torch.randn(40, 7, generator=generator)
    targets = torch.zeros(40, dtype=torch.long)  # only class 0 in truth
    values = accumulate(ConfusionMeter(None), split(logits, (25, 15)), split(targets, (25, 15)))
    assert values["confusion_matrix"].shape == (7, 7)
    assert values["confusion_matrix"].sum() == 40


def test_segmentation_outputs(generator):
    n, classes, h, w = 9, 4, 5, 6
    logits = torch.randn(n, classes, h, w, generator=generator)
    targets = torch.randint(0, classes, (n, h, w), generator=generator)
    values = accumulate(ConfusionMeter(classes), split(logits, (4, 2, 3)), split(targets, (4, 2, 3)))
    truth, predicted = targets.reshape(-1).numpy(), logits.argmax(1).reshape(-1).numpy()
    assert values["confusion_matrix"].sum() == n * h * w
    assert (values["confusion_matrix"] == confusion_matrix(truth, predicted, labels=list(range(classes)))).all()
    assert values["accuracy"] == pytest.approx(accuracy_score(truth, predicted) * 100)
    assert values["IoU"] == pytest.approx(sk_iou(truth, predicted))


@pytest.mark.parametrize("ignore", [-100, -1, 5])
def test_targets_outside_the_classes_are_ignored(generator, ignore):
    n, classes, h, w = 6, 5, 4, 4
    logits = torch.randn(n, classes, h, w, generator=generator)
    targets = torch.randint(0, classes, (n, h, w), generator=generator)
    mask = torch.rand(n, h, w, generator=generator) < 0.3
    targets[mask] = ignore
    values = accumulate(ConfusionMeter(classes), split(logits, (1, 5)), split(targets, (1, 5)))
    keep = ~mask.reshape(-1)
    truth = targets.reshape(-1)[keep].numpy()
    predicted = logits.argmax(1).reshape(-1)[keep].numpy()
    assert values["confusion_matrix"].sum() == int(keep.sum()) < n * h * w
    assert (values["confusion_matrix"] == confusion_matrix(truth, predicted, labels=list(range(classes)))).all()
    assert values["accuracy"] == pytest.approx(accuracy_score(truth, predicted) * 100)
    assert values["IoU"] == pytest.approx(sk_iou(truth, predicted))


def test_float_targets_produce_only_the_loss(generator):
    outputs = torch.randn(30, 3, generator=generator)
    targets = torch.randn(30, 3, generator=generator)
    loss_fn = torch.nn.MSELoss()
    batches = list(zip(split(outputs, (10, 20)), split(targets, (10, 20))))
    meters = [LossMeter(None), ConfusionMeter(None)]
    for output, target in batches:
        for meter in meters:
            meter.update(output.unsqueeze(0), target, loss_fn(output, target).reshape(1))
    values = {}
    for meter in meters:
        values.update(meter.compute()[0])
    assert set(values) == {"loss"}
    assert values["loss"] == pytest.approx(loss_fn(outputs, targets).item(), rel=1e-5)


def test_loss_meter_is_sample_weighted(generator):
    logits = torch.randn(sum(BATCHES), 4, generator=generator)
    targets = torch.randint(0, 4, (sum(BATCHES),), generator=generator)
    criterion = torch.nn.CrossEntropyLoss()
    outputs, truths = split(logits), split(targets)
    losses = [criterion(o, t) for o, t in zip(outputs, truths)]
    values = accumulate(LossMeter(4), outputs, truths, losses)
    assert set(values) == {"loss"}
    assert values["loss"] == pytest.approx(criterion(logits, targets).item(), rel=1e-5)
    batch_mean = float(np.mean([loss.item() for loss in losses]))
    assert values["loss"] != pytest.approx(batch_mean, rel=1e-5)  # not the mean of batch means


def test_meters_without_updates_report_nothing():
    assert LossMeter(3).compute() == [{}]
    assert ConfusionMeter(3).compute() == [{}]
    assert LossMeter(3, members=2).compute() == [{}, {}]
    assert ConfusionMeter(3, members=2).compute() == [{}, {}]


def test_accuracy_and_iou_helpers():
    matrix = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]], dtype=np.int64)
    assert accuracy(matrix) == pytest.approx(500 / 6)
    assert mean_iou(matrix) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert accuracy(np.zeros((3, 3), dtype=np.int64)) == 0.0
    assert mean_iou(np.zeros((3, 3), dtype=np.int64)) == 0.0


def test_scores_of_a_stack_equal_each_matrix_on_its_own():
    """A group's scores are computed for all members at once; each must equal the plain
    formula applied to its own matrix (empty matrices and absent classes included)."""
    rng = np.random.default_rng(0)
    matrices = rng.integers(0, 5, size=(7, 4, 4)) * (rng.random((7, 4, 4)) < 0.5)
    matrices[2] = 0  # nothing counted
    matrices[3, :, 1] = matrices[3, 1, :] = 0  # class 1 absent in truth and prediction
    for matrix, acc, iou in zip(matrices, accuracies(matrices), mean_ious(matrices)):
        total = matrix.sum()
        assert acc == (100.0 * np.trace(matrix) / total if total else 0.0)
        tp = np.diag(matrix).astype(np.float64)
        union = matrix.sum(0) + matrix.sum(1) - tp
        # the same up to the order of the additions (absent classes are zeros in the sum)
        assert iou == pytest.approx((tp[union > 0] / union[union > 0]).mean() if (union > 0).any() else 0.0, rel=1e-14)
    for k, scores in enumerate(_scores(matrices)):
        assert scores["accuracy"] == accuracy(matrices[k]) and scores["IoU"] == mean_iou(matrices[k])
        np.testing.assert_array_equal(scores["confusion_matrix"], matrices[k])


def test_register_metrics_registers_loss_classification_and_regression(monkeypatch):
    monkeypatch.setattr(metrics, "_options", metrics.MetricsOptions())  # no [plugins.metrics] table (an earlier test's run may have set one)
    monkeypatch.setattr(metrics, "_extra", [])
    registered = {}
    izitorch_register_metrics(register=registered.__setitem__)
    assert registered == {"loss": LossMeter, "classification": ConfusionMeter, "regression": RegressionMeter}
    assert LossMeter.names == {"loss": "lower"}
    assert ConfusionMeter.names == {
        "accuracy": "higher",
        "IoU": "higher",
        "balanced_accuracy": "higher",
        "precision": "higher",
        "recall": "higher",
        "F1": "higher",
    }


def stacked_batches(generator, members=3, classes=5, sizes=BATCHES):
    """Uneven batches of K members' outputs ``[K, B, C]``, shared targets, per-member losses,
    parallel-fold masks and, on some batches, members left out (``active``: frozen)."""
    batches = []
    for i, size in enumerate(sizes):
        outputs = torch.randn(members, size, classes, generator=generator)
        target = torch.randint(-1, classes, (size,), generator=generator)  # -1: an ignored label
        losses = torch.rand(members, generator=generator)
        mask = torch.rand(members, size, generator=generator) < 0.7
        active = [True, i % 2 == 0, True][:members] if i % 3 == 1 else None
        batches.append((outputs, target, losses, mask, active))
    return batches


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_stacked_meters_equal_one_meter_per_member(generator, monkeypatch, flush, masked):
    """Member k of a stacked meter counts what a lone meter fed only member k's own samples of
    the batches it trained on counts; counting in bulk (flush) or batch by batch agrees."""
    if flush:  # count every few batches instead of once at the end
        monkeypatch.setattr(metrics, "FLUSH_ELEMENTS", 40)
        monkeypatch.setattr(metrics, "FLUSH_BATCHES", 2)
    batches = stacked_batches(generator)
    stacked = [LossMeter(5, 3), ConfusionMeter(5, 3)]
    alone = [[LossMeter(5), ConfusionMeter(5)] for _ in range(3)]
    for outputs, target, losses, mask, active in batches:
        given = mask if masked else None
        if active is not None:  # frozen members count nothing: an all-False row, as the engine passes
            rows = torch.tensor(active).reshape(-1, 1).expand(3, target.shape[0])
            given = rows if given is None else given & rows
        for meter in stacked:
            meter.update(outputs, target, losses, given)
        for k in range(3):
            if active is not None and not active[k]:
                continue
            rows = mask[k] if masked else slice(None)
            if masked and not rows.any():
                continue
            for meter in alone[k]:
                meter.update(outputs[k][rows].unsqueeze(0), target[rows], losses[k].reshape(1))
    merged = [{**loss, **confusion} for loss, confusion in zip(*(meter.compute() for meter in stacked))]
    for k in range(3):
        expected = {**alone[k][0].compute()[0], **alone[k][1].compute()[0]}
        assert merged[k]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert (merged[k]["confusion_matrix"] == expected["confusion_matrix"]).all()
        assert merged[k]["accuracy"] == pytest.approx(expected["accuracy"])
    assert merged[1]["confusion_matrix"].sum() < merged[0]["confusion_matrix"].sum()  # member 1 sat batches out


def test_a_member_left_out_of_a_batch_keeps_its_nan_loss_out(generator):
    meter = LossMeter(None, 2)
    meter.update(torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 2.0]))
    frozen = torch.tensor([[False] * 4, [True] * 4])
    meter.update(torch.zeros(2, 4, 3), torch.zeros(4, dtype=torch.long), torch.tensor([float("nan"), 4.0]), frozen)
    assert [m["loss"] for m in meter.compute()] == [1.0, 3.0]


@pytest.mark.parametrize("flush", [False, True])
def test_single_meters_count_in_bulk_as_batch_by_batch(generator, monkeypatch, flush):
    if flush:
        monkeypatch.setattr(metrics, "FLUSH_ELEMENTS", 16)
        monkeypatch.setattr(metrics, "FLUSH_BATCHES", 1)
    logits = torch.randn(sum(BATCHES), 4, generator=generator)
    targets = torch.randint(0, 4, (sum(BATCHES),), generator=generator)
    losses = list(torch.rand(len(BATCHES), generator=generator))
    values = {**accumulate(LossMeter(4), split(logits), split(targets), losses), **accumulate(ConfusionMeter(4), split(logits), split(targets))}
    sizes = torch.tensor(BATCHES, dtype=torch.float32)
    assert values["loss"] == pytest.approx(float((torch.stack(losses) * sizes).sum() / sizes.sum()), rel=1e-6)
    assert (values["confusion_matrix"] == confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=list(range(4)))).all()


@pytest.mark.parametrize("flush", [False, True])
def test_masked_stack_against_sklearn(generator, monkeypatch, flush):
    """K = 3 members with sample masks, ignored targets (-1 and C) and integer targets of
    another dtype: each member's confusion matrix, accuracy and IoU are scikit-learn's on its
    own samples with a valid target, its loss the sample-weighted mean of its batch losses."""
    if flush:
        monkeypatch.setattr(metrics, "FLUSH_ELEMENTS", 30)
        monkeypatch.setattr(metrics, "FLUSH_BATCHES", 2)
    members, classes = 3, 5
    loss_meter, confusion = LossMeter(classes, members), ConfusionMeter(classes, members)
    kept: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(members)]
    weighted = np.zeros(members)
    weights = np.zeros(members)
    for i, size in enumerate(BATCHES):
        outputs = torch.randn(members, size, classes, generator=generator)
        target = torch.randint(-1, classes + 1, (size,), generator=generator)
        if i == 2:
            target = target.clamp(0, classes - 1).to(torch.int32)
        losses = torch.rand(members, generator=generator)
        mask = torch.rand(members, size, generator=generator) < 0.6
        mask[1] = mask[1] & (i % 2 == 0)  # member 1 sits out every other batch
        for meter in (loss_meter, confusion):
            meter.update(outputs, target, losses, mask)
        for k in range(members):
            rows = mask[k].numpy()
            truth, predicted = target.numpy()[rows].astype(np.int64), outputs[k].argmax(1).numpy()[rows]
            valid = (truth >= 0) & (truth < classes)
            kept[k].append((truth[valid], predicted[valid]))
            weighted[k] += float(losses[k]) * rows.sum()
            weights[k] += rows.sum()
    values = [{**loss, **scores} for loss, scores in zip(loss_meter.compute(), confusion.compute())]
    for k in range(members):
        truth = np.concatenate([t for t, _ in kept[k]])
        predicted = np.concatenate([p for _, p in kept[k]])
        assert 0 < len(truth) < sum(BATCHES)
        np.testing.assert_array_equal(values[k]["confusion_matrix"], confusion_matrix(truth, predicted, labels=list(range(classes))))
        assert values[k]["accuracy"] == pytest.approx(accuracy_score(truth, predicted) * 100)
        assert values[k]["IoU"] == pytest.approx(sk_iou(truth, predicted))
        assert values[k]["loss"] == pytest.approx(weighted[k] / weights[k], rel=1e-6)
    assert values[1]["confusion_matrix"].sum() < values[0]["confusion_matrix"].sum()


def test_narrow_integer_targets_count_in_their_cells(generator):
    """uint8 labels of many classes: a cell index (target * C + prediction) beyond 255 lands
    in its own cell, not in a wrapped-around one."""
    classes = 30
    logits = torch.randn(200, classes, generator=generator)
    targets = torch.randint(0, classes, (200,), generator=generator)
    values = accumulate(ConfusionMeter(classes), split(logits, (120, 80)), split(targets.to(torch.uint8), (120, 80)))
    expected = confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=list(range(classes)))
    np.testing.assert_array_equal(values["confusion_matrix"], expected)
