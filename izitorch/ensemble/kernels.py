"""Batched computations of a vectorized group that do without ``vmap``: the forward of a plain
stack of layers, and losses of the common criteria, per member and per member's samples.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


class PlainStack:
    """The forward of a model that is a stack of ``Linear`` layers, elementwise activations,
    ``Dropout`` and ``Flatten``, run for K members with batched matrix products.

    ``vmap(functional_call(...))`` costs a fixed amount of Python and dispatch per call, which
    dominates for small models; ``torch.baddbmm`` on the stacked ``[K, out, in]`` weights
    computes the same thing in one kernel per layer. Applies to an ``nn.Sequential`` (nested
    ones are flattened) and to a model that says what its forward is by a method
    ``izitorch_plain_stack() -> nn.Sequential`` of its own layers (``izitorch.models.MLP`` does).
    Layer types are matched exactly (a subclass may change ``forward``); anything else keeps the
    ``vmap`` path, and so does an input the stack does not expect (one tensor, 2-D at each Linear).
    """

    ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Identity)

    def __init__(self, layers: list[nn.Module], names: dict[int, str]) -> None:
        self.layers = layers
        self.linear_names = {
            id(layer): (names[id(layer.weight)], names[id(layer.bias)] if layer.bias is not None else None) for layer in layers if type(layer) is nn.Linear
        }

    @classmethod
    def of(cls, model: nn.Module) -> "PlainStack | None":
        declared = getattr(model, "izitorch_plain_stack", None)
        stack = model if type(model) is nn.Sequential else declared() if callable(declared) else None
        if not isinstance(stack, nn.Sequential):
            return None
        layers = _flat_layers(stack)
        if layers is None or not any(type(layer) is nn.Linear for layer in layers):
            return None
        names = {id(param): name for name, param in model.named_parameters()}
        if any(id(p) not in names for layer in layers for p in layer.parameters()):
            return None  # the declared stack holds layers that are not the model's own
        return cls(layers, names)

    def __call__(self, params: dict[str, torch.Tensor], x: Any, members: int) -> torch.Tensor | None:
        """``[K, B, out]`` for a shared input ``x`` of ``[B, ...]``, or None when it does not apply."""
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            return None
        h, shared = x, True  # shared: no member dimension yet (the input is everyone's)
        for layer in self.layers:
            kind = type(layer)
            if kind is nn.Linear:
                if h.ndim != (2 if shared else 3):
                    return None
                weight_name, bias_name = self.linear_names[id(layer)]
                weight = params[weight_name].transpose(1, 2)  # [K, in, out]
                if shared:
                    h = h.unsqueeze(0).expand(members, -1, -1)
                    shared = False
                h = torch.baddbmm(params[bias_name].unsqueeze(1), h, weight) if bias_name else torch.bmm(h, weight)
            elif kind is nn.Flatten:
                offset = 0 if shared else 1
                start = layer.start_dim + offset if layer.start_dim >= 0 else layer.start_dim
                end = layer.end_dim + offset if layer.end_dim >= 0 else layer.end_dim
                h = h.flatten(start, end)
            elif kind is nn.Dropout:
                if layer.training and layer.p > 0:
                    if shared:  # each member draws its own mask
                        h = h.unsqueeze(0).expand(members, *h.shape)
                        shared = False
                    h = nn.functional.dropout(h, layer.p, training=True)
            else:
                h = layer(h)
        return h.unsqueeze(0).expand(members, *h.shape) if shared else h


def _flat_layers(stack: nn.Sequential) -> list[nn.Module] | None:
    layers: list[nn.Module] = []
    for layer in stack:
        if type(layer) is nn.Sequential:
            inner = _flat_layers(layer)
            if inner is None:
                return None
            layers += inner
        elif type(layer) in (nn.Linear, nn.Flatten, nn.Dropout, *PlainStack.ELEMENTWISE) and not layer._buffers:
            layers.append(layer)
        else:
            return None
    return layers


def _per_sample_cross_entropy(criterion: nn.CrossEntropyLoss, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[K, B]``: each member's cross-entropy on each sample (``reduction="none"``).

    On the CPU torch's ``log_softmax`` kernel is slower than ``logsumexp`` for few classes, and
    a group computes K*B rows; without class weights or label smoothing the loss is
    ``logsumexp(x) - x[target]`` instead (the same value up to float rounding).
    """
    size = outputs.shape[0]
    if criterion.weight is None and criterion.label_smoothing == 0.0:
        kept = target != criterion.ignore_index
        safe = torch.where(kept, target, 0).view(1, -1, 1).expand(size, -1, 1)
        return torch.where(kept, torch.logsumexp(outputs, 2) - outputs.gather(2, safe).squeeze(2), 0.0)
    return nn.functional.cross_entropy(
        outputs.flatten(0, 1),
        target.repeat(size),
        weight=criterion.weight,
        ignore_index=criterion.ignore_index,
        reduction="none",
        label_smoothing=criterion.label_smoothing,
    ).view(size, -1)


def _class_indices(outputs: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``[K, B, C]`` outputs and a ``[B]`` target of class indices fit (cross-entropy)."""
    return outputs.ndim == 3 and target.ndim == 1 and not target.is_floating_point() and outputs.shape[1] == target.shape[0]


def batched_loss(criterion: Any, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``[K]`` losses of ``criterion`` without vmap, for the criteria it knows, else None."""
    kind = type(criterion)
    if kind is nn.CrossEntropyLoss:
        if criterion.weight is not None or criterion.reduction not in ("mean", "sum") or not _class_indices(outputs, target):
            return None
        total = _per_sample_cross_entropy(criterion, outputs, target).sum(1)
        # torch's mean divides by the number of targets that are not ignored
        return total / (target != criterion.ignore_index).sum() if criterion.reduction == "mean" else total
    if kind in (nn.MSELoss, nn.L1Loss):
        if criterion.reduction not in ("mean", "sum") or outputs.shape[1:] != target.shape:
            return None
        function = nn.functional.mse_loss if kind is nn.MSELoss else nn.functional.l1_loss
        per_element = function(outputs, target.expand_as(outputs), reduction="none").flatten(1)
        return per_element.mean(1) if criterion.reduction == "mean" else per_element.sum(1)
    return None


def masked_loss(criterion: Any, outputs: Any, target: Any, mask: torch.Tensor) -> torch.Tensor | None:
    """``[K]`` losses of ``criterion`` where member ``k`` only counts the samples ``mask[k]``
    selects, reduced as the criterion reduces (a mean over no sample is 0); None for a
    criterion this does not know (see :func:`supports_masked_loss`)."""
    if not supports_masked_loss(criterion) or not isinstance(outputs, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None
    mean = criterion.reduction == "mean"
    if type(criterion) is nn.CrossEntropyLoss:
        if not _class_indices(outputs, target):
            return None
        per_sample = _per_sample_cross_entropy(criterion, outputs, target)
        total = torch.where(mask, per_sample, 0.0).sum(1)
        if not mean:
            return total
        # torch's mean divides by the summed class weights of the targets that are not ignored
        counted = (target != criterion.ignore_index).to(per_sample.dtype)
        if criterion.weight is not None:
            counted = counted * criterion.weight[target.clamp(0, outputs.shape[2] - 1)]
        return total / torch.where(mask, counted, 0.0).sum(1).clamp_min(torch.finfo(per_sample.dtype).tiny)
    if outputs.shape[1:] != target.shape or outputs.ndim < 2:
        return None
    function = nn.functional.mse_loss if type(criterion) is nn.MSELoss else nn.functional.l1_loss
    per_element = function(outputs, target.expand_as(outputs), reduction="none").flatten(2)
    per_sample = per_element.mean(2) if mean else per_element.sum(2)
    total = torch.where(mask, per_sample, 0.0).sum(1)
    return total / mask.sum(1).clamp_min(1) if mean else total


def supports_masked_loss(criterion: Any) -> bool:
    """Whether :func:`masked_loss` knows ``criterion`` (what parallel folds need)."""
    return type(criterion) in (nn.CrossEntropyLoss, nn.MSELoss, nn.L1Loss) and criterion.reduction in ("mean", "sum")


def inactive_rows(active: torch.Tensor | Sequence[bool] | None, size: int) -> list[int]:
    if active is None:
        return []
    flags = active.tolist() if isinstance(active, torch.Tensor) else list(active)
    if len(flags) != size:
        raise ValueError(f"active has {len(flags)} entries for a group of {size}")
    return [k for k, flag in enumerate(flags) if not flag]
