"""A small model zoo for the demo manifests, the tests and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``in_features -> hidden (x layers) -> num_classes`` with ReLU and optional dropout."""

    def __init__(self, in_features: int = 64, hidden: int = 64, num_classes: int = 10, layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                blocks.append(nn.Dropout(dropout))
            width = hidden
        blocks.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def izitorch_plain_stack(self) -> nn.Sequential:
        """What ``forward`` computes, as layers: vectorized groups then run it with batched
        matrix products instead of ``vmap`` (see ``izitorch.ensemble.PlainStack``)."""
        return nn.Sequential(nn.Flatten(1), self.net)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a linear head for ``side x side`` single-channel images.

    Flat inputs ``(N, side*side)`` are reshaped, so it shares a data stream with :class:`MLP`.
    """

    def __init__(self, num_classes: int = 10, channels: int = 16, side: int = 8, batch_norm: bool = False) -> None:
        super().__init__()
        self.side = side
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            norm(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            norm(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * channels * (side // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.reshape(-1, 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))
