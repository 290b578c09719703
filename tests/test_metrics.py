"""The metric accumulators of plugins/metrics.py against scikit-learn, batch by batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, jaccard_score

from izitorch.plugins.metrics import ConfusionMeter, LossMeter, accuracy, izitorch_register_metrics, mean_iou

BATCHES = (7, 32, 1, 50, 13)  # uneven, with a batch of one


def split(tensor: torch.Tensor, sizes=BATCHES):
    assert sum(sizes) == tensor.shape[0]
    return torch.split(tensor, list(sizes))


def sk_iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean IoU over the labels present in truth or prediction, per scikit-learn."""
    labels = np.union1d(truth, predicted)
    return float(np.mean(jaccard_score(truth, predicted, labels=labels, average=None)))


def accumulate(meter, outputs, targets, losses=None):
    for i, (output, target) in enumerate(zip(outputs, targets)):
        meter.update(output, target, losses[i] if losses is not None else torch.tensor(0.0))
    return meter.compute()


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
    once.update(logits, targets, torch.tensor(0.0))
    at_once = once.compute()
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
            meter.update(output, target, loss_fn(output, target))
    values = {}
    for meter in meters:
        values.update(meter.compute())
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
    batch_mean = float(np.mean([l.item() for l in losses]))
    assert values["loss"] != pytest.approx(batch_mean, rel=1e-5)  # not the mean of batch means


def test_meters_without_updates_report_nothing():
    assert LossMeter(3).compute() == {}
    assert ConfusionMeter(3).compute() == {}


def test_accuracy_and_iou_helpers():
    matrix = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]], dtype=np.int64)
    assert accuracy(matrix) == pytest.approx(500 / 6)
    assert mean_iou(matrix) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert accuracy(np.zeros((3, 3), dtype=np.int64)) == 0.0


def test_register_metrics_registers_loss_and_classification():
    registered = {}
    izitorch_register_metrics(register=registered.__setitem__)
    assert registered == {"loss": LossMeter, "classification": ConfusionMeter}
