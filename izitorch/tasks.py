"""What a run learns: classification, regression or segmentation, declared or seen in the data.

``[run] task`` names it; unset, the dry run infers it from one batch's output and target where
the pair is clear (:func:`infer`): integer targets ``[B]`` and class scores ``[B, C]`` are a
classification; integer targets ``[B, *pixels]`` and scores ``[B, C, *pixels]`` a segmentation;
float targets of the output's shape (or ``[B]`` against ``[B, 1]``) a regression. A declared
task the data contradicts is refused in one line (:func:`settle`).

The task chooses the headline metric (:data:`HEADLINE`): the comparison table ranks the models
by it. Which values are computed follows the data itself (each meter counts only the outputs
and targets it applies to), so a regression shows MAE, MSE, RMSE and R^2 and no accuracy.
"""

from __future__ import annotations

from typing import Any

import torch

from izitorch.config import Config
from izitorch.errors import ManifestError

TASKS = ("classification", "regression", "segmentation")
#: Each task's headline metric: the comparison table's ranking.
HEADLINE = {"classification": "accuracy", "regression": "RMSE", "segmentation": "IoU"}


def infer(output: Any, target: Any) -> str | None:
    """The task one batch's ``output`` (one model's) and ``target`` show, or None where unclear
    (a model returning several tensors, a criterion of its own with another layout)."""
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor) or target.ndim == 0:
        return None
    if _class_scores(output, target):
        return "classification" if target.ndim == 1 else "segmentation"
    if target.is_floating_point() and _same_shape(output, target):
        return "regression"
    return None


def settle(config: Config, output: Any, target: Any) -> str | None:
    """The run's task: ``[run] task`` when set, checked against one batch, else :func:`infer`'s."""
    seen = infer(output, target)
    declared = config.run.task
    if declared is None:
        return seen
    if declared == "regression" and seen in ("classification", "segmentation"):
        problem = f"the target holds integer class labels {_shape(target)} and the output has a class dimension {_shape(output)}"
        advice = 'set task = "classification" (or "segmentation"), or give float targets of the output\'s shape'
    elif (
        declared != "regression"
        and isinstance(target, torch.Tensor)
        and isinstance(output, torch.Tensor)
        and not _class_scores(output, target)
        and not _same_shape(output, target)
    ):
        problem = f"expects class scores [B, C, ...] for integer targets [B, ...], found an output {_shape(output)} and a target {_shape(target)}"
        advice = 'set task = "regression", or return one score per class'
    elif declared == "classification" and seen == "regression" and not _probabilities(output, target):
        problem = f"the target is a float of the output's shape {_shape(output)}, one value per sample: a regression"
        advice = 'set task = "regression", or give integer class labels'
    else:
        return declared
    raise ManifestError(f'"{declared}" does not fit the data: {problem}; {advice}', "run.task", config.source)


def headline(task: str | None) -> str | None:
    """The metric the comparison table ranks by for ``task`` (None: its own default)."""
    return HEADLINE.get(task) if task else None


def _class_scores(output: torch.Tensor, target: torch.Tensor) -> bool:
    """Integer targets ``[B, *rest]`` against scores ``[B, C, *rest]``."""
    return (
        not target.is_floating_point()
        and output.ndim == target.ndim + 1
        and output.shape[0] == target.shape[0]
        and tuple(output.shape[2:]) == tuple(target.shape[1:])
    )


def _same_shape(output: torch.Tensor, target: torch.Tensor) -> bool:
    return tuple(output.shape) == tuple(target.shape) or (target.ndim == 1 and tuple(output.shape) == (target.shape[0], 1))


def _probabilities(output: torch.Tensor, target: torch.Tensor) -> bool:
    """Float targets of the output's shape with a class dimension of 2 or more: soft labels."""
    return output.ndim >= 2 and output.shape[1] >= 2 and tuple(output.shape) == tuple(target.shape)


def _shape(tensor: Any) -> str:
    return str(list(tensor.shape)) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
