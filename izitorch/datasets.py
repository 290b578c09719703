"""Bundled datasets that need no download, for the demo manifests and the tests."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


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
