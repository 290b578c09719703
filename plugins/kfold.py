"""k-fold cross-validation: ``[plugins.kfold] k = 5``.

The k test sets partition the dataset (every sample is tested exactly once); they keep the class
proportions with ``data.stratify`` and each group of ``data.group_by`` in one fold
(:mod:`izitorch.splits`). With ``data.validation``, fold i validates on chunk i+1 (mod k) and
trains on the other k-2 chunks.
Every fold starts from the models' initial weights with fresh optimizers (done by the core).

``parallel = true`` trains the k folds at once, as vectorized groups over one pass of the data,
each fold's model blind to its own test (and validation) samples: see :mod:`izitorch.parallel`.
"""

from __future__ import annotations

import attrs
import numpy as np

from izitorch import splits as splitting
from izitorch.hookspecs import hookimpl
from izitorch.state import Run, Split
from izitorch.config import at_least, doc
from izitorch.errors import IzitorchError
from izitorch.options import plugin_options
from izitorch.parallel import check as check_parallel
from izitorch.parallel import run_parallel


@attrs.frozen
class KFoldOptions:
    k: int = attrs.field(default=5, validator=at_least(2), metadata=doc("number of folds; each sample is tested once"))
    parallel: bool = attrs.field(default=False, metadata=doc("train the k folds at once, as vectorized groups"))


class KFoldPlugin:
    """Answers ``izitorch_make_splits`` before holdout (which is ``trylast``)."""

    izitorch_options = KFoldOptions  # what `izitorch plugins` lists

    def __init__(self) -> None:
        self.options = KFoldOptions()

    @hookimpl
    def izitorch_configure(self, config) -> None:
        self.options = plugin_options(config, "kfold", KFoldOptions)

    @hookimpl
    def izitorch_run_folds(self, run: Run, resuming: bool) -> dict[str, list[dict]] | None:
        """With ``parallel``, all folds at once; else None, and the core takes them in turn."""
        return run_parallel(run, resuming) if self.options.parallel else None

    @hookimpl
    def izitorch_make_splits(self, run: Run, dataset) -> list[Split]:
        k, size = self.options.k, len(dataset)
        minimum = k if not run.config.data.validation else max(k, 3)
        if size < minimum:
            raise IzitorchError(f"k = {k} needs at least {minimum} samples, the dataset has {size}; lower k", "plugins.kfold.k")
        if run.config.data.validation and k < 3:
            raise IzitorchError("k must be >= 3 with data.validation (one chunk tests, one validates, the rest trains)", "plugins.kfold.k")
        if self.options.parallel:  # refuse before anything is written, and say how the models run
            check_parallel(run)
            run.grouping = [f"parallel folds: the {k} folds of each model train at once as members of vectorized groups"]
        labels, groups = splitting.class_labels(run.config, dataset), splitting.sample_groups(run.config, dataset)
        chunks = splitting.kfold_chunks(size, k, run.config.run.rdm_seed, labels, groups)
        splits = []
        for i, test in enumerate(chunks):
            if run.config.data.validation:
                val = chunks[(i + 1) % k]
                train = np.concatenate([c for j, c in enumerate(chunks) if j not in (i, (i + 1) % k)])
                splits.append(Split(train=np.sort(train), val=val, test=test))
            else:
                train = np.concatenate([c for j, c in enumerate(chunks) if j != i])
                splits.append(Split(train=np.sort(train), test=test))
        return splits
