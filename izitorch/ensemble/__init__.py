"""Vectorized model groups: K models of one architecture trained as one batched model.

- :mod:`~izitorch.ensemble.grouping`: which slots can share a group (the rules);
- :mod:`~izitorch.ensemble.planning`: the groups a run builds, ``run.multi_model``'s plan;
- :mod:`~izitorch.ensemble.group`: :class:`VectorGroup`, the stacked parameters and their members;
- :mod:`~izitorch.ensemble.optimizer`: :class:`StackedOptimizer`, one update for all members;
- :mod:`~izitorch.ensemble.kernels`: batched forwards and losses that do without ``vmap``;
- :mod:`~izitorch.ensemble.snapshots`: a member's checkpoint built at the flush from a CPU copy of its rows.
"""

from izitorch.ensemble.group import VectorGroup
from izitorch.ensemble.grouping import VECTORIZED_OPTIMIZERS, why_not_vectorizable
from izitorch.ensemble.planning import group_slots, plan
from izitorch.ensemble.kernels import PlainStack, masked_loss, supports_masked_loss
from izitorch.ensemble.optimizer import StackedOptimizer
from izitorch.state import standalone  # a member as a lone model, part of this package's public names

__all__ = [
    "VectorGroup",
    "StackedOptimizer",
    "group_slots",
    "standalone",
    "why_not_vectorizable",
    "masked_loss",
    "supports_masked_loss",
    "plan",
    "PlainStack",
    "VECTORIZED_OPTIMIZERS",
]
