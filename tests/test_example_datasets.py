"""The bundled example datasets are what they claim, checked against independent computations:
given splits that are disjoint, cover their source and keep its class shares; statistics of the
training split only; augmentation of the training split only; masks that match the shapes drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.preprocessing import StandardScaler

from izitorch.augment import random_affine
from izitorch.config import Config
from izitorch.data import build_dataset
from izitorch.datasets import breast_cancer, diabetes, digit_images, shapes
from izitorch.manifest import load_manifest

from conftest import ROOT


def _assert_partition(parts: list[np.ndarray], size: int) -> None:
    """The parts are disjoint and together hold every row of ``range(size)`` once."""
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == size
    assert set(joined.tolist()) == set(range(size))


def _assert_stratified(labels: np.ndarray, rows: np.ndarray) -> None:
    """Each class's count in ``rows`` is its share of all the labels, to within one sample."""
    for value in np.unique(labels):
        expected = (labels == value).mean() * len(rows)
        assert abs((labels[rows] == value).sum() - expected) <= 1.0


# -- breast cancer: a given split, standardised with the training split's statistics ------------


@pytest.mark.parametrize("limit", [None, 400])
def test_breast_cancer_splits_partition_the_rows_and_keep_the_class_shares(limit):
    raw = load_breast_cancer()
    size = len(raw.target) if limit is None else limit
    train, test = breast_cancer("train", limit=limit), breast_cancer("test", limit=limit)
    _assert_partition([train.rows, test.rows], size)
    assert len(test) == round(0.2 * size) and len(train) == size - len(test)
    _assert_stratified(raw.target[:size], test.rows)
    for split in (train, test):  # each sample's label is its row's
        assert torch.equal(split.tensors[1], torch.as_tensor(raw.target[split.rows]))
    assert np.array_equal(breast_cancer("test", limit=limit).rows, test.rows)  # the same split on every call


def test_breast_cancer_is_standardised_with_the_training_split_only():
    raw = load_breast_cancer().data
    train, test = breast_cancer("train"), breast_cancer("test")
    scaler = StandardScaler().fit(raw[train.rows])  # fitted on the training rows alone
    np.testing.assert_allclose(train.tensors[0].numpy(), scaler.transform(raw[train.rows]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(test.tensors[0].numpy(), scaler.transform(raw[test.rows]), rtol=1e-5, atol=1e-5)
    # the training split is centred and scaled; the test split, standardised with another set's
    # statistics, is not exactly
    np.testing.assert_allclose(train.tensors[0].mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.tensors[0].std(0, unbiased=False).numpy(), 1.0, atol=1e-4)
    assert test.tensors[0].mean(0).abs().max() > 0.01
    everything = StandardScaler().fit(raw)  # statistics of every row would differ from those used
    assert not np.allclose(scaler.mean_, everything.mean_)
    raw_test = breast_cancer("test", standardize=False)
    np.testing.assert_allclose(raw_test.tensors[0].numpy(), raw[test.rows], rtol=1e-6)


def test_the_breast_cancer_manifest_joins_its_given_splits_in_order():
    """What the manifest builds: the training rows, then the test rows, with their labels."""
    config = load_manifest(ROOT / "manifests" / "breast_cancer_kfold.toml")
    dataset = build_dataset(config)
    train, test = breast_cancer("train"), breast_cancer("test")
    assert np.array_equal(dataset.izitorch_parts["train"], np.arange(len(train)))
    assert np.array_equal(dataset.izitorch_parts["test"], np.arange(len(train), len(train) + len(test)))
    assert torch.equal(dataset.tensors[0], torch.cat([train.tensors[0], test.tensors[0]]))
    assert np.array_equal(dataset.rows, np.concatenate([train.rows, test.rows]))


# -- diabetes ------------------------------------------------------------------------------------


def test_diabetes_targets_are_the_progression_in_its_units_one_column():
    raw = load_diabetes()
    dataset = diabetes(limit=400)
    inputs, targets = dataset.tensors
    assert targets.shape == (400, 1) and targets.dtype == torch.float32
    np.testing.assert_allclose(targets[:, 0].numpy(), raw.target[:400])
    np.testing.assert_allclose(inputs.numpy(), raw.data[:400], rtol=1e-6)
    assert len(diabetes()) == 442


# -- digit images: given splits, augmentation of the training split only -------------------------


def test_digit_image_splits_partition_the_digits_and_keep_the_class_shares():
    labels = load_digits().target
    parts = {name: digit_images(name) for name in ("train", "val", "test")}
    _assert_partition([part.rows for part in parts.values()], len(labels))
    assert len(parts["val"]) == round(0.1 * len(labels)) and len(parts["test"]) == round(0.2 * len(labels))
    for part in parts.values():
        assert torch.equal(part.targets, torch.as_tensor(labels[part.rows]))
    _assert_stratified(labels, parts["test"].rows)
    limited = [digit_images(name, limit=400).rows for name in ("train", "val", "test")]
    _assert_partition(limited, 400)


def test_digit_images_are_the_digits_upsampled():
    """Each 16x16 image is its 8x8 digit upsampled bilinearly, computed here by hand."""
    raw = load_digits().images / 16.0
    test = digit_images("test")
    image = test[0][0][0].numpy()
    source = raw[test.rows[0]]
    # an independent bilinear upsampling (align_corners=False): output x -> source (x + 0.5) / 2 - 0.5
    coords = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, 7)
    weight = coords - low
    rows = source[low] * (1 - weight)[:, None] + source[high] * weight[:, None]
    expected = rows[:, low] * (1 - weight)[None, :] + rows[:, high] * weight[None, :]
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_augmentation_changes_the_training_split_only():
    train, test = digit_images("train", augment=True), digit_images("test")
    first, second = train[5][0], train[5][0]
    assert not torch.equal(first, second)  # a new variant at every read
    assert train[5][1] == train.targets[5] == load_digits().target[train.rows[5]]  # of the same sample
    plain = digit_images("train")
    assert not torch.equal(first, plain[5][0]) and torch.equal(plain[5][0], plain[5][0])
    assert torch.equal(test[5][0], test[5][0]) and torch.equal(test[5][0], test.images[5])


def test_the_images_manifest_augments_its_training_split_only():
    """Through the manifest: the joined dataset izitorch trains on changes at every read of a
    training sample, never of a validation or test one."""
    config = load_manifest(ROOT / "manifests" / "images_augmented.toml")
    dataset = build_dataset(config)
    parts = dataset.izitorch_parts
    assert {name: len(part) for name, part in parts.items()} == {"train": 1258, "val": 180, "test": 359}
    train_index, val_index, test_index = (int(parts[name][3]) for name in ("train", "val", "test"))
    assert not torch.equal(dataset[train_index][0], dataset[train_index][0])
    for index in (val_index, test_index):
        assert torch.equal(dataset[index][0], dataset[index][0])


def test_random_affine_moves_rotates_and_leaves_alone_as_asked(monkeypatch):
    image = torch.rand(1, 12, 12)
    assert torch.allclose(random_affine(image), image, atol=1e-6)  # no shift, angle or zoom: the image
    # the draws in [0, 1) map to [-1, 1): 0.5 is no change, 1.0 the largest; here dx = +1
    monkeypatch.setattr(torch, "rand", lambda n: torch.tensor([0.5, 0.5, 1.0, 0.5]))
    moved = random_affine(image, shift=2.0, degrees=30.0, scale=0.5)
    torch.testing.assert_close(moved[:, :, :-2], image[:, :, 2:], atol=1e-6, rtol=0)  # read 2 pixels to the right
    assert torch.equal(moved[:, :, -2:], torch.zeros(1, 12, 2))  # what came from outside is zero
    monkeypatch.setattr(torch, "rand", lambda n: torch.tensor([1.0, 0.5, 0.5, 0.5]))
    turned = random_affine(image, degrees=90.0)  # a quarter turn of a square image: a transposition and a flip
    assert torch.allclose(turned, torch.rot90(image, k=1, dims=(1, 2)), atol=1e-5) or torch.allclose(turned, torch.rot90(image, k=-1, dims=(1, 2)), atol=1e-5)


# -- shapes: masks of the shapes drawn ----------------------------------------------------------


def test_shapes_masks_match_the_shapes_drawn():
    dataset = shapes(count=60, side=20, noise=0.05, seed=3)
    images, masks = dataset.tensors
    assert images.shape == (60, 1, 20, 20) and masks.shape == (60, 20, 20) and masks.dtype == torch.long
    residuals = []
    for index, drawn in enumerate(dataset.shapes):
        expected = np.zeros((20, 20), dtype=np.int64)
        brightness = np.zeros((20, 20))
        for kind, cy, cx, radius, value in drawn:  # drawn in order: a later shape covers an earlier one
            for y in range(20):
                for x in range(20):
                    if (kind == 1 and max(abs(y - cy), abs(x - cx)) <= radius) or (kind == 2 and np.hypot(y - cy, x - cx) <= radius):
                        expected[y, x], brightness[y, x] = kind, value
        assert np.array_equal(masks[index].numpy(), expected), index
        residuals.append(images[index, 0].numpy() - brightness)
    residuals = np.stack(residuals)  # what is left is the noise alone: centred, of the std asked
    assert abs(residuals.mean()) < 0.01 and 0.045 < residuals.std() < 0.055
    assert set(masks.unique().tolist()) == {0, 1, 2}
    counts = [len(drawn) for drawn in dataset.shapes]
    assert min(counts) == 1 and max(counts) == 3


def test_shapes_limit_keeps_the_first_images():
    full, limited = shapes(count=30, seed=1), shapes(count=30, seed=1, limit=10)
    assert len(limited) == 10
    for a, b in zip(full.tensors, limited.tensors):
        assert torch.equal(a[:10], b)
    assert full.shapes[:10] == limited.shapes


def test_every_example_dataset_takes_limit():
    """test_bundled runs every manifest with data.params.limit = 400: each keeps that many."""
    for manifest in ("breast_cancer_kfold", "diabetes_regression", "images_augmented", "shapes_segmentation"):
        config: Config = load_manifest(ROOT / "manifests" / f"{manifest}.toml", overrides=["data.params.limit=400"])
        assert len(build_dataset(config)) == 400, manifest


def test_a_given_split_too_small_for_its_classes_is_one_clear_error():
    with pytest.raises(ValueError, match="a val share of 0.1 leaves 4 of 40 samples apart: too few for one of each of the 10 classes"):
        digit_images("train", limit=40)
