"""Gradient clipping per model: ``[plugins.grad_clip] value = 1.0`` or ``max_norm = 1.0``.

``value`` clamps each gradient element to [-value, value] (the original izitorch's
``grad_clip``); ``max_norm`` rescales a model's gradients when their total ``norm_type`` norm
exceeds it. Acts on ``slot.grads()`` so that each model is clipped on its own gradients.
"""

from __future__ import annotations

import attrs
import torch

from izitorch.hookspecs import hookimpl
from izitorch.config import FieldError, doc
from izitorch.errors import ManifestError
from izitorch.options import plugin_options


def _positive(_instance, attribute, value) -> None:
    if value is not None and value <= 0:
        raise FieldError(attribute.name, f"expected a number > 0, got {value}")


@attrs.frozen
class GradClipOptions:
    value: float | None = attrs.field(default=None, validator=_positive, metadata=doc("clip each gradient element to [-value, value]"))
    max_norm: float | None = attrs.field(default=None, validator=_positive, metadata=doc("clip the gradients' total norm (set value or max_norm)"))
    norm_type: float = attrs.field(default=2.0, validator=_positive, metadata=doc("the norm max_norm measures"))


class GradClipPlugin:
    izitorch_options = GradClipOptions  # what `izitorch plugins` lists

    def __init__(self) -> None:
        self.options = GradClipOptions()

    @hookimpl
    def izitorch_configure(self, config) -> None:
        options = plugin_options(config, "grad_clip", GradClipOptions)
        if (options.value is None) == (options.max_norm is None):
            raise ManifestError("set exactly one of value (clip each element) or max_norm (clip the norm)", "plugins.grad_clip", config.source)
        self.options = options

    @hookimpl
    def izitorch_before_optimizer_step(self, run, slot) -> None:
        grads = slot.grads()
        if not grads:
            return
        if self.options.value is not None:
            for grad in grads:
                grad.clamp_(-self.options.value, self.options.value)
            return
        clip_by_norm(grads, self.options.max_norm, self.options.norm_type)


def clip_by_norm(grads: list[torch.Tensor], max_norm: float, norm_type: float) -> torch.Tensor:
    """Rescale ``grads`` in place so their joint norm is at most ``max_norm``; return the norm."""
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type) for g in grads])
    total = torch.linalg.vector_norm(norms, norm_type)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(scale)
    return total
