"""Holdout split (default): one shuffled split by ``data.train_ratio``.

With ``data.validation``, the samples not trained on are halved: the first half validates every
epoch, the second half is the test set. The permutation comes from a generator seeded with
``run.rdm_seed``, never from the global RNG.
"""

from __future__ import annotations

import math

import numpy as np

from izitorch.hookspecs import hookimpl
from izitorch.state import Run, Split
from izitorch.errors import IzitorchError


@hookimpl(trylast=True)
def izitorch_make_splits(run: Run, dataset) -> list[Split]:
    size = len(dataset)
    ratio = run.config.data.train_ratio
    order = np.random.default_rng(run.config.run.rdm_seed).permutation(size)
    n_train = int(math.floor(ratio * size))
    held_out = order[n_train:]
    needed = 2 if run.config.data.validation else 1
    if n_train < 1 or len(held_out) < needed:
        raise IzitorchError(
            f"{ratio} leaves {n_train} training and {len(held_out)} held-out samples out of {size}; use more data or a ratio that leaves both sides non-empty",
            "data.train_ratio",
        )
    if run.config.data.validation:
        half = len(held_out) // 2
        return [Split(train=order[:n_train], val=held_out[:half], test=held_out[half:])]
    return [Split(train=order[:n_train], test=held_out)]
