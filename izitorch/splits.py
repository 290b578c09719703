"""How the samples are split: at random, keeping the class proportions, or keeping groups apart.

The holdout and k-fold plugins draw their splits here, with scikit-learn's splitters seeded by
``rdm_seed``. ``[data] stratify`` keeps each class's share in every part (unset: whenever the
dataset's integer labels are at hand, :func:`izitorch.data.dataset_labels`); ``group_by`` keeps
the samples of one group (a patient, a site) in one fold. A class or a set of groups too small
for the split asked is refused in one line naming it.

A resumed run trains on the split its first run recorded in ``Dataset_split.pkl``
(:func:`recorded_splits`), not on one drawn again: a state written before the split was
stratified (or by another scikit-learn) keeps its split, and with it what its folds tested on.
"""

from __future__ import annotations

import inspect
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold, train_test_split

from izitorch.config import Config
from izitorch.data import dataset_labels
from izitorch.errors import IzitorchError, ManifestError, describe, error_text
from izitorch.references import resolve
from izitorch.state import Split

SPLIT_RECORD = "Dataset_split.pkl"


# -- what a split keeps together or apart ------------------------------------------------------


def class_labels(config: Config, dataset: Any) -> np.ndarray | None:
    """The class of every sample when the split keeps class proportions, else None.

    ``stratify`` unset stratifies when the labels are one integer per sample and at hand (a
    ``TensorDataset``'s last tensor, a ``targets`` attribute): a classification dataset. Set to
    true, labels that are not at hand are an error; set to false, nothing is stratified."""
    stratify = config.data.stratify
    if stratify is False:
        return None
    labels = dataset_labels(dataset)
    if labels is None or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or len(labels) != len(dataset):
        if stratify:
            raise ManifestError(
                "stratify = true needs one integer class per sample at hand: a TensorDataset whose last tensor holds them, "
                "or a `targets` attribute; set stratify = false, or give the dataset its targets",
                "data.stratify",
            )
        return None
    return labels.cpu().numpy()


def sample_groups(config: Config, dataset: Any) -> np.ndarray | None:
    """The group of every sample (``[data] group_by``), or None without one."""
    group_by = config.data.group_by
    if group_by is None:
        return None
    if callable(group_by) or ":" in group_by:
        try:
            factory = resolve(group_by, config.base_dir) if isinstance(group_by, str) else group_by
        except ManifestError as error:
            raise ManifestError(error.message, "data.group_by") from None
        try:
            groups = factory(dataset)
        except Exception as error:
            raise IzitorchError(
                f"{describe(group_by) if isinstance(group_by, str) else 'group_by'}(dataset) raised {error_text(error)}", "data.group_by"
            ) from None
    elif hasattr(dataset, group_by):
        groups = getattr(dataset, group_by)
    else:
        raise ManifestError(
            f'the dataset ({type(dataset).__name__}) has no attribute "{group_by}"; name a per-sample attribute or a "module:callable"', "data.group_by"
        )
    try:
        groups = groups.cpu().numpy() if isinstance(groups, torch.Tensor) else np.asarray(groups)
    except Exception:  # noqa: BLE001 - anything that is not a sequence of values
        groups = np.asarray(None)
    if groups.ndim != 1 or len(groups) != len(dataset):
        got = f"{len(groups)} values" if groups.ndim == 1 else describe(groups.tolist() if groups.ndim == 0 else f"an array of shape {groups.shape}")
        raise IzitorchError(f"group_by gives {got} for {len(dataset)} samples; it must give one group per sample", "data.group_by")
    return groups


def given_parts(dataset: Any) -> dict[str, np.ndarray] | None:
    """Each given split's indices in the joined dataset (:class:`izitorch.data.GivenSplits`),
    or None when the run splits one dataset."""
    return getattr(dataset, "izitorch_parts", None)


def check_class_counts(labels: np.ndarray, needed: int, what: str, advice: str) -> None:
    """Every class must have ``needed`` samples; the least populated is named otherwise."""
    values, counts = np.unique(labels, return_counts=True)
    low = int(np.argmin(counts))
    if counts[low] < needed:
        raise IzitorchError(
            f"class {values[low]} has {counts[low]} sample(s): {what} needs at least {needed} of every class; {advice}, or set stratify = false",
            "data.stratify",
        )


# -- holdout ------------------------------------------------------------------------------------


def holdout(size: int, ratio: float, validation: bool, seed: int, labels: np.ndarray | None) -> Split:
    """``floor(ratio * size)`` samples to train on; the rest tests, or is halved into
    validation and test with ``validation``. With ``labels``, each part keeps the class
    proportions (``train_test_split(stratify=...)``): the test set is drawn first, then the
    validation set from what is left, where every class has more samples to share."""
    n_train = int(math.floor(ratio * size))
    held = size - n_train
    needed = 2 if validation else 1
    if n_train < 1 or held < needed:
        raise IzitorchError(
            f"{ratio} leaves {n_train} training and {held} held-out samples out of {size}; use more data or a ratio that leaves both sides non-empty",
            "data.train_ratio",
        )
    if labels is None:
        order = np.random.default_rng(seed).permutation(size)
        train, rest = order[:n_train], order[n_train:]
        half = len(rest) // 2
        return Split(train=train, val=rest[:half], test=rest[half:]) if validation else Split(train=train, test=rest)
    check_class_counts(labels, 3 if validation else 2, "a stratified holdout" + (" with validation" if validation else ""), "add samples")
    n_val = held // 2 if validation else 0
    n_test = held - n_val
    _check_sides(size - n_test, n_test, labels, f"train_ratio = {ratio}")
    rest, test = train_test_split(np.arange(size), train_size=size - n_test, test_size=n_test, stratify=labels, random_state=seed)
    if not validation:
        return Split(train=rest, test=test)
    check_class_counts(labels[rest], 2, "drawing the validation set from the samples left after the test set", "lower train_ratio")
    _check_sides(n_train, n_val, labels[rest], f"the validation set of train_ratio = {ratio}")
    train, val = train_test_split(rest, train_size=n_train, test_size=n_val, stratify=labels[rest], random_state=seed)
    return Split(train=train, val=val, test=test)


def _check_sides(first: int, second: int, labels: np.ndarray, what: str) -> None:
    """Both parts of a stratified split need room for one sample of every class."""
    classes = len(np.unique(labels))
    if min(first, second) < classes:
        raise IzitorchError(
            f"{what} splits {first + second} samples into {first} and {second}: too few for one sample of each of the {classes} classes "
            "on both sides; use more data, another ratio, or set stratify = false",
            "data.train_ratio",
        )


# -- k-fold -------------------------------------------------------------------------------------


def kfold_chunks(size: int, k: int, seed: int, labels: np.ndarray | None, groups: np.ndarray | None) -> list[np.ndarray]:
    """The k test chunks of a k-fold over ``size`` samples: they partition the samples; with
    ``labels`` each keeps the class proportions, with ``groups`` no group is in two chunks."""
    indices = np.arange(size)
    if labels is not None:
        check_class_counts(labels, k, f"a stratified {k}-fold", "lower k")
    if groups is not None:
        count = len(np.unique(groups))
        if count < k:
            raise IzitorchError(f"group_by gives {count} group(s): a grouped {k}-fold needs at least {k}; lower k or group more finely", "data.group_by")
        if labels is not None:
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        elif "shuffle" in inspect.signature(GroupKFold).parameters:  # scikit-learn 1.6 and later
            splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
        else:
            splitter = GroupKFold(n_splits=k)
    elif labels is not None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # what scikit-learn warns about is refused above, in one line
        warnings.simplefilter("ignore")
        return [test for _, test in splitter.split(indices, labels, groups)]


# -- the record of a run's split ----------------------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """Lists, tuples and integers only: the record is read without running anything it names."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a split record")


def recorded_splits(res_dir: Path, made: list[Split]) -> list[Split]:
    """The splits a resumed run trains on: those its first run recorded in ``Dataset_split.pkl``
    when they fit the ones made now (as many folds, the same parts), else ``made``.

    The configuration and the dataset are checked by the resume fingerprint; what is left to
    differ is how a split is drawn (a stratified default, another scikit-learn), and a resumed
    fold must keep testing on the samples it did not train on."""
    path = res_dir / SPLIT_RECORD
    try:
        with open(path, "rb") as handle:
            record = _PlainUnpickler(handle).load()
        splits = [Split(*(np.asarray(part, dtype=np.int64) for part in _ordered(entry))) for entry in record]
    except Exception:  # noqa: BLE001 - no record (deleted), or not one izitorch wrote: the split made now
        return made
    fits = len(splits) == len(made) and all((a.val is None) == (b.val is None) for a, b in zip(splits, made))
    return splits if fits else made


def _ordered(entry: Any) -> tuple:
    """A record entry ``(train, test)`` or ``(train, val, test)`` as ``Split``'s (train, test, val)."""
    if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
        raise ValueError("not a split")
    return (entry[0], entry[1]) if len(entry) == 2 else (entry[0], entry[2], entry[1])
