"""What a failure inside a step says: one line naming the model, the shapes and what to do.

A model or criterion may raise anything (a shape mistake, a label out of range, a bug). The
stacks catch it where it happens and build the line with these helpers, so that the user reads
which model failed on which shapes instead of a traceback.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from izitorch.errors import error_text, first_line

FIT_CLASSES = "check that the model's output size matches num_classes and that labels lie in [0, num_classes)"
GROUP_FAILED = 'check the output size against num_classes, or set multi_model = "sequential" to see which model fails'


def too_few_classes(criterion: Any, output: Any, target: Any, classes: int | None, class_dim: int) -> bool:
    """Whether a class-index criterion may meet a label beyond the output's classes (labels
    were checked against ``num_classes`` before training).

    Decided from shapes on the host, before the criterion runs: on CUDA that mistake is a
    device-side assert, which kills the process with a traceback and loses the CUDA context.
    Without ``num_classes`` the criterion is left to find it.
    """
    return (
        classes is not None
        and isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss))
        and isinstance(output, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and not target.is_floating_point()
        and output.dim() > class_dim
        and output.shape[class_dim] < classes
    )


def shape(value: Any) -> str:
    """A value's shape as the error lines show it: ``(32, 10)``, nested for tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(shape(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shape(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def what(error: BaseException) -> str:
    """An error's first line, after its type's name unless it is of the kinds a shape or value
    mistake raises (whose messages say enough)."""
    if isinstance(error, (RuntimeError, ValueError, TypeError, IndexError)):
        return first_line(error)
    return error_text(error)


def hint(error: BaseException) -> str:
    """The way out of the failures that have one whatever the model: memory, determinism, a
    parameter that data-parallel training never sees used."""
    text = str(error).lower()
    if "out of memory" in text or "can't allocate memory" in text:
        return "; out of memory: lower batch_size, or train fewer or smaller models at once"
    if "deterministic" in text and "use_deterministic_algorithms" in text:
        return "; this operation has no deterministic algorithm: set deterministic = false in [run]"
    if "expected to have finished reduction in the prior iteration" in text:
        return (
            '; under distributed = "data" every trainable parameter of a model must take part in its loss (DistributedDataParallel): '
            "freeze the unused ones (requires_grad = False) or remove them"
        )
    return ""
