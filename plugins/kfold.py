"""k-fold cross-validation: ``[plugins.kfold] k = 5``.

The k test sets partition the dataset (every sample is tested exactly once); they keep the class
proportions with ``data.stratify`` and each group of ``data.group_by`` in one fold
(:mod:`izitorch.splits`). With ``data.validation``, fold i validates on chunk i+1 (mod k) and
trains on the other k-2 chunks. With given splits (``[data] train`` and ``test``), the folds share
out the training set, every fold tests on the given test set, and with ``data.validation`` fold i
validates on its own chunk (without, that chunk is left out of the fold).
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
from izitorch.errors import IzitorchError, ManifestError
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
        if self.options.parallel and run.ranks.launched:
            raise ManifestError(
                "parallel folds train in one process; under torchrun the folds are spread over the processes instead: set parallel = false",
                "plugins.kfold.parallel",
                run.config.source,
            )
        k, validation = self.options.k, run.config.data.validation
        given = splitting.given_parts(dataset)
        if given is not None and "val" in given:
            raise ManifestError("k-fold validates each fold on a chunk of the given training set; drop [data] val (or the kfold plugin)", "data.val")
        pool = np.arange(len(dataset)) if given is None else given["train"]  # the samples the folds share out
        size = len(pool)
        minimum = k if not validation or given is not None else max(k, 3)
        if size < minimum:
            where = "the dataset has" if given is None else "the given training set has"
            raise IzitorchError(f"k = {k} needs at least {minimum} samples, {where} {size}; lower k", "plugins.kfold.k")
        if validation and k < 3 and given is None:
            raise IzitorchError("k must be >= 3 with data.validation (one chunk tests, one validates, the rest trains)", "plugins.kfold.k")
        if self.options.parallel:  # refuse before anything is written, and say how the models run
            check_parallel(run)
            run.grouping = [f"parallel folds: the {k} folds of each model train at once as members of vectorized groups"]
        labels, groups = splitting.class_labels(run.config, dataset), splitting.sample_groups(run.config, dataset)
        labels, groups = (None if values is None else values[pool] for values in (labels, groups))
        chunks = [pool[chunk] for chunk in splitting.kfold_chunks(size, k, run.config.run.rdm_seed, labels, groups)]
        if given is not None:  # every fold tests on the given test set; its own chunk validates, or is left out
            return [
                Split(train=np.sort(np.concatenate([c for j, c in enumerate(chunks) if j != i])), val=chunk if validation else None, test=given["test"])
                for i, chunk in enumerate(chunks)
            ]
        splits = []
        for i, test in enumerate(chunks):
            if validation:
                val = chunks[(i + 1) % k]
                train = np.concatenate([c for j, c in enumerate(chunks) if j not in (i, (i + 1) % k)])
                splits.append(Split(train=np.sort(train), val=val, test=test))
            else:
                train = np.concatenate([c for j, c in enumerate(chunks) if j != i])
                splits.append(Split(train=np.sort(train), test=test))
        return splits
