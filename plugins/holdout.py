"""Holdout split (default): one split by ``data.train_ratio``, or the given splits as they are.

With ``data.validation``, the samples not trained on are halved: one half validates every
epoch, the other is the test set. With ``data.stratify`` (unset: for integer class labels at
hand) every part keeps the class proportions (:mod:`izitorch.splits`); else the split is a
permutation drawn from a generator seeded with ``run.rdm_seed``, never from the global RNG.
"""

from __future__ import annotations

from izitorch import splits
from izitorch.errors import ManifestError
from izitorch.hookspecs import hookimpl
from izitorch.state import Run, Split


@hookimpl(trylast=True)
def izitorch_make_splits(run: Run, dataset) -> list[Split]:
    data = run.config.data
    if data.group_by is not None:
        raise ManifestError("group_by keeps groups apart in k-fold splits only; enable the kfold plugin ([plugins.kfold]) or drop group_by", "data.group_by")
    given = splits.given_parts(dataset)
    if given is not None:  # the dataset's own split: nothing is drawn
        if data.validation and "val" not in given:
            raise ManifestError(
                "validation = true with given splits needs the validation set: set [data] val (or enable k-fold over the training set)", "data.validation"
            )
        return [Split(train=given["train"], val=given.get("val"), test=given["test"])]
    labels = splits.class_labels(run.config, dataset)
    return [splits.holdout(len(dataset), data.train_ratio, data.validation, run.config.run.rdm_seed, labels)]
