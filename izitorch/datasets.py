"""Bundled datasets that need no download, for the example manifests and the tests.

scikit-learn's bundled sets (digits, breast cancer, diabetes) and generated ones (shapes). The
datasets that come with their own split (``breast_cancer``, ``digit_images``) take a ``split``
parameter, as a benchmark's loader would, and draw that split the same way on every call (a
fixed, seeded, stratified split), so ``[data] train`` and ``test`` name disjoint samples. Every
callable takes ``limit``: only the first ``limit`` samples of the source are used (quick tests).
A downloaded torchvision dataset is :func:`izitorch.vision.torchvision_dataset`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from izitorch.augment import gaussian_noise, random_affine
from izitorch.vision import torchvision_dataset

__all__ = ["breast_cancer", "diabetes", "digit_images", "digits", "shapes", "torchvision_dataset", "given_split_rows", "DigitImages"]

SPLITS = ("train", "val", "test")


def digits(images: bool = False, normalize: bool = True, limit: int | None = None) -> TensorDataset:
    """scikit-learn's 1,797 8x8 handwritten digits (10 classes), as a ``TensorDataset``.

    ``images=True`` gives ``(N, 1, 8, 8)`` inputs, else flat ``(N, 64)``; ``normalize`` scales the
    0..16 pixel values to [0, 1]; ``limit`` keeps the first N samples (quick tests).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32)
    if normalize:
        inputs = inputs / 16.0
    targets = torch.tensor(data.target, dtype=torch.long)
    if limit is not None:
        inputs, targets = inputs[:limit], targets[:limit]
    if images:
        inputs = inputs.reshape(-1, 1, 8, 8)
    return TensorDataset(inputs, targets)


def given_split_rows(labels: np.ndarray, split: str, sizes: dict[str, float], seed: int) -> np.ndarray:
    """The rows of ``split`` in a fixed split of ``len(labels)`` samples: each part of ``sizes``
    (its share of all the samples, e.g. ``{"val": 0.1, "test": 0.2}``) is drawn in turn, keeping
    the class proportions (scikit-learn's ``train_test_split(stratify=...)``, ``random_state=seed``),
    and ``train`` is what is left. The same arguments give the same rows on every call; sorted."""
    from sklearn.model_selection import train_test_split

    if split not in ("train", *sizes):
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in ('train', *sizes))}, got {split!r}")
    rest = np.arange(len(labels))
    for part, share in sizes.items():
        count, classes = max(1, round(share * len(labels))), len(np.unique(labels[rest]))
        if count < classes or len(rest) - count < classes:
            raise ValueError(
                f"a {part} share of {share} leaves {count} of {len(rest)} samples apart: too few for one of each of the {classes} classes "
                "on both sides; use more samples (limit) or another share"
            )
        rest, drawn = train_test_split(rest, test_size=count, stratify=labels[rest], random_state=seed)
        if part == split:
            return np.sort(drawn)
    return np.sort(rest)


def breast_cancer(split: str = "train", test_size: float = 0.2, standardize: bool = True, seed: int = 0, limit: int | None = None) -> TensorDataset:
    """scikit-learn's Wisconsin breast cancer set: 569 tumours, 30 features, 2 classes (212
    malignant = 0, 357 benign = 1), with a given split.

    ``split`` is ``"train"`` or ``"test"``: a stratified ``test_size`` share of the samples tests,
    drawn with ``seed`` (the same on every call). ``standardize`` centres and scales every feature
    with the mean and standard deviation of the TRAINING split only, in both splits, so nothing of
    the test set leaks into training. Inputs ``(N, 30)`` float32, targets ``(N,)`` int64;
    ``rows`` holds each sample's row in scikit-learn's table, ``mean`` and ``std`` the statistics.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features, labels = data.data[:limit], data.target[:limit]
    rows = given_split_rows(labels, split, {"test": test_size}, seed)
    train = given_split_rows(labels, "train", {"test": test_size}, seed)
    mean, std = features[train].mean(axis=0), features[train].std(axis=0)
    std[std == 0] = 1.0
    inputs = (features[rows] - mean) / std if standardize else features[rows]
    dataset = TensorDataset(torch.tensor(inputs, dtype=torch.float32), torch.tensor(labels[rows], dtype=torch.long))
    dataset.rows, dataset.mean, dataset.std = rows, mean, std
    return dataset


def diabetes(limit: int | None = None) -> TensorDataset:
    """scikit-learn's diabetes regression set: 442 patients, 10 baseline features (as scikit-learn
    ships them: each column centred and scaled), and a measure of disease progression one year
    later (25 to 346) to predict. Inputs ``(N, 10)`` float32, targets ``(N, 1)`` float32 in the
    original units, so RMSE and MAE read in them."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    inputs = torch.tensor(data.data[:limit], dtype=torch.float32)
    targets = torch.tensor(data.target[:limit], dtype=torch.float32).unsqueeze(1)
    return TensorDataset(inputs, targets)


class DigitImages(Dataset):
    """Single-channel images ``[1, side, side]`` and their classes; with ``augment``, each read of
    a sample is a new random variant of it (:func:`izitorch.augment.random_affine` and noise), so
    only the split built with ``augment = true`` changes from epoch to epoch."""

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, rows: np.ndarray, augment: bool, shift: float, degrees: float, zoom: float, noise: float
    ) -> None:
        self.images, self.targets, self.rows = images, targets, rows
        self.augment, self.shift, self.degrees, self.zoom, self.noise = augment, shift, degrees, zoom, noise

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment:
            image = gaussian_noise(random_affine(image, shift=self.shift, degrees=self.degrees, scale=self.zoom), self.noise)
        return image, self.targets[index]


def digit_images(
    split: str = "train",
    side: int = 16,
    augment: bool = False,
    shift: float = 2.0,
    degrees: float = 10.0,
    zoom: float = 0.1,
    noise: float = 0.05,
    val_size: float = 0.1,
    test_size: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
) -> DigitImages:
    """scikit-learn's 8x8 digits as ``side x side`` images (bilinear upsampling, values in [0, 1]),
    with a given split, like an image benchmark's: ``split`` is ``"train"``, ``"val"`` or
    ``"test"``, stratified shares ``val_size`` and ``test_size`` of the samples drawn with ``seed``.

    ``augment`` (for the training split) moves each image by up to ``shift`` pixels, turns it by
    up to ``degrees``, zooms it by a factor in ``[1 - zoom, 1 + zoom]`` and adds noise of standard deviation ``noise`` at
    every read; without it a split's samples are the same at every read."""
    from sklearn.datasets import load_digits

    data = load_digits()
    labels = data.target[:limit]
    rows = given_split_rows(labels, split, {"val": val_size, "test": test_size}, seed)
    images = torch.tensor(data.images[rows], dtype=torch.float32).unsqueeze(1) / 16.0
    if side != 8:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    return DigitImages(images, torch.tensor(labels[rows], dtype=torch.long), rows, augment, shift, degrees, zoom, noise)


def shapes(count: int = 1000, side: int = 24, max_shapes: int = 3, noise: float = 0.1, seed: int = 0, limit: int | None = None) -> TensorDataset:
    """Generated images for semantic segmentation: ``count`` noisy ``side x side`` images of 1 to
    ``max_shapes`` squares and discs, each of a random size, place and brightness (0.5 to 1), the
    later drawn over the earlier; the target marks every pixel 0 (background), 1 (square) or 2
    (disc). Squares and discs look alike pixel by pixel: telling them apart takes their outline.

    Inputs ``(N, 1, side, side)`` float32, targets ``(N, side, side)`` int64. ``shapes`` lists, per
    image, the ``(class, centre_y, centre_x, radius, brightness)`` drawn: a square covers the
    pixels within ``radius`` of its centre along both axes, a disc those within ``radius`` of it.
    Drawn from a generator seeded with ``seed``: the first N images are the same for every
    ``count`` and ``limit``."""
    rng = np.random.default_rng(seed)
    total = count if limit is None else min(count, limit)
    ys, xs = np.mgrid[0:side, 0:side]
    images = np.zeros((total, side, side), dtype=np.float32)
    masks = np.zeros((total, side, side), dtype=np.int64)
    drawn: list[list[tuple[int, float, float, float, float]]] = []
    for image, mask in zip(images, masks):
        items = []
        for _ in range(rng.integers(1, max_shapes + 1)):
            kind = int(rng.integers(1, 3))
            radius = float(rng.uniform(2.0, side / 5))
            cy, cx = (float(v) for v in rng.uniform(radius, side - 1 - radius, size=2))
            brightness = float(rng.uniform(0.5, 1.0))
            inside = _inside(kind, cy, cx, radius, ys, xs)
            image[inside], mask[inside] = brightness, kind
            items.append((kind, cy, cx, radius, brightness))
        drawn.append(items)
        image += noise * rng.standard_normal(image.shape).astype(np.float32)  # per image: the first N do not depend on the count
    dataset = TensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(masks))
    dataset.shapes = drawn
    return dataset


def _inside(kind: int, cy: float, cx: float, radius: float, ys: Any, xs: Any) -> Any:
    """The pixels a square (``kind`` 1) or a disc (2) of ``radius`` centred at ``(cy, cx)`` covers."""
    if kind == 1:
        return (abs(ys - cy) <= radius) & (abs(xs - cx) <= radius)
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
