"""Image augmentation in plain torch, for datasets that augment their training split.

torchvision is an optional extra (``izitorch[vision]``); these few transforms need only torch, so
the bundled image example runs wherever izitorch does. Each draws from torch's global generator,
which izitorch seeds before every fold and carries in its resume state (DataLoader workers seed
theirs from the loader's generator), so an augmented run is the same from run to run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(image: torch.Tensor, shift: float = 0.0, degrees: float = 0.0, scale: float = 0.0) -> torch.Tensor:
    """``image`` (``[C, H, W]``) moved by up to ``shift`` pixels along each axis, turned by up to
    ``degrees`` and zoomed by a factor in ``[1 - scale, 1 + scale]``, each drawn uniformly; what
    comes in from outside the image is zero (``affine_grid`` + bilinear ``grid_sample``)."""
    height, width = image.shape[-2:]
    angle, zoom, dx, dy = (torch.rand(4) * 2 - 1).tolist()
    angle, zoom = math.radians(angle * degrees), 1.0 + zoom * scale
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    # affine_grid maps output coordinates in [-1, 1] to input ones: a shift of one pixel is 2 / size
    theta = torch.tensor([[cos, -sin, 2 * dx * shift / width], [sin, cos, 2 * dy * shift / height]], dtype=image.dtype)
    grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def gaussian_noise(image: torch.Tensor, std: float) -> torch.Tensor:
    """``image`` plus independent normal noise of standard deviation ``std`` on every pixel."""
    return image + std * torch.randn_like(image) if std else image
