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


class TinyFCN(nn.Module):
    """A small fully convolutional net for semantic segmentation: ``[B, in_channels, H, W]`` to
    class scores ``[B, num_classes, H, W]`` (H and W even).

    Two 3x3 convolutions at full resolution, then two at half resolution (the second dilated, to
    see a shape's outline from its inside), upsampled and joined with the full-resolution
    features (a one-level U-Net), and a 1x1 convolution per class.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, channels: int = 16) -> None:
        super().__init__()
        self.near = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.far = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        )
        self.head = nn.Sequential(nn.Conv2d(3 * channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        near = self.near(x)
        return self.head(torch.cat([near, self.far(near)], dim=1))
