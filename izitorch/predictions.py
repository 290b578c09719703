"""The final test's per-sample predictions of a classification, kept for paired comparisons.

``izitorch report`` compares two models of a holdout run by McNemar's test on the samples one
classifies right and the other wrong, and gives each model a bootstrap confidence interval of its
accuracy: both need each sample's prediction, not the confusion counts. The final test pass
records them (:class:`PredictionRecord`) and the trainlog plugin writes them to
``test_predictions.json``: ``{"target": [...], "predicted": [...]}`` in the test loader's order,
the same order for every model of a fold.
"""

from __future__ import annotations

from typing import Any

import torch


class PredictionRecord:
    """Each member's predicted class (the arg-max of its scores) for every sample it counts, with
    the target, over one pass. Class scores ``[K, B, C]`` against integer targets ``[B]`` only:
    other outputs (regression, segmentation) record nothing."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.applies = True

    def update(self, outputs: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
        if not self.applies:
            return
        if target.is_floating_point() or target.ndim != 1 or outputs.ndim != 3 or outputs.shape[1] != target.shape[0]:
            self.applies = False
            return
        self.batches.append((outputs.argmax(2), target, mask))

    def compute(self) -> list[dict[str, Any]]:
        """``{"predictions": {"target", "predicted"}}`` (int64 tensors on the CPU) per member; empty
        when nothing was recorded."""
        if not self.applies or not self.batches:
            return [{} for _ in range(self.members)]
        predicted = torch.cat([batch[0] for batch in self.batches], dim=1).cpu()
        target = torch.cat([batch[1] for batch in self.batches]).cpu()
        masks = [batch[2] if batch[2] is not None else torch.ones_like(batch[0], dtype=torch.bool) for batch in self.batches]
        mask = torch.cat(masks, dim=1).cpu()
        # tensors, not lists: the final scores are copied into the resume state element by element
        return [{"predictions": {"target": target[mask[k]], "predicted": predicted[k][mask[k]]}} for k in range(self.members)]
