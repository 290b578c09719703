"""Every reference option of issue 15, given something that does not fit: one line, exit 2.

``data.collate_fn``, ``data.sampler``, ``data.group_by``, ``data.train`` / ``val`` / ``test``,
``models[i].scheduler.class`` and ``plugins.metrics.extra[i].class``, each given (a) a module that
does not import, (b) a name that does not exist, (c) a callable with the wrong signature or one
that returns the wrong thing. ``validate`` and ``run`` give the same one line
``izitorch: error: <file>: <key.path>: ...``, with exit 2, and ``run`` leaves no ``res_dir``
behind. Cases already covered elsewhere are not repeated here: a missing name of collate_fn,
sampler and group_by and a collate_fn returning three elements (test_loader_options), a
group_by giving too few groups or raising (test_splits), a scheduler class of another kind
(test_hostile_validate), an extra that is not a torchmetrics.Metric (test_task_metrics).
"""

from __future__ import annotations

import warnings

import pytest

from conftest import make_manifest
from izitorch import cli

HELPERS = """\
import torch
from torch.utils.data import TensorDataset

from izitorch.datasets import digits


def takes_two(items, extra):
    return items


def stacked(items):
    return torch.stack([x for x, _ in items])


def no_arguments():
    return None


def five(split, generator=None):
    return 5


def no_groups(dataset):
    return None


def part(split="train"):
    inputs, targets = digits(limit=300).tensors
    rows = {"train": slice(0, 200), "val": slice(200, 250), "test": slice(250, 300)}[split]
    return TensorDataset(inputs[rows], targets[rows])


def needs_root(root):
    return part()


def numbers(split="train"):
    return list(range(50))
"""

BROKEN = 'raise ImportError("cannot import name ops")\n'
GIVEN = {"data.dataset": "helpers.py:part", "data.params": None, "data.train": {"split": "train"}, "data.test": {"split": "test"}}
KFOLD = {"plugins.kfold.k": 3}
AUROC = {"direction": "higher", "name": "X"}


def given(split: str, value) -> dict:
    extra = {"data.val": {"split": "val"}, "data.validation": True} if split == "val" else {}
    return {**GIVEN, **extra, f"data.{split}": value}


def scheduler(reference: str) -> dict:
    return {"models": [{"scheduler": {"class": reference}}]}


def extra(reference: str, **params) -> dict:
    return {"plugins.metrics": {"extra": [{"class": reference, **AUROC, **params}]}}


NOT_IMPORTED = 'loading "broken.py" failed: ImportError: cannot import name ops'
NO_MODULE = "cannot import module \"no_such_module\" (No module named 'no_such_module'); check the spelling or install it"
PAIRS = "izitorch expects (input, target) pairs from __getitem__"

CASES = [
    # (a) a module that does not import
    ("collate_fn-broken", {"data.collate_fn": "broken.py:f"}, f"data.collate_fn: {NOT_IMPORTED}"),
    ("collate_fn-no-module", {"data.collate_fn": "no_such_module:f"}, f"data.collate_fn: {NO_MODULE}"),
    ("sampler-broken", {"data.sampler": "broken.py:f"}, f"data.sampler: {NOT_IMPORTED}"),
    ("sampler-table-broken", {"data.sampler": {"class": "broken.py:f", "share": 1}}, f"data.sampler.class: {NOT_IMPORTED}"),
    ("group_by-broken", {**KFOLD, "data.group_by": "broken.py:f"}, f"data.group_by: {NOT_IMPORTED}"),
    ("train-broken", given("train", "broken.py:f"), f"data.train: {NOT_IMPORTED}"),
    ("val-no-module", given("val", "no_such_module:f"), f"data.val: {NO_MODULE}"),
    ("test-broken", given("test", "broken.py:f"), f"data.test: {NOT_IMPORTED}"),
    ("scheduler-broken", scheduler("broken.py:f"), f"models[0].scheduler.class: {NOT_IMPORTED}"),
    ("scheduler-no-module", scheduler("no_such_module:f"), f"models[0].scheduler.class: {NO_MODULE}"),
    ("extra-broken", extra("broken.py:f"), f"plugins.metrics.extra[0].class: {NOT_IMPORTED}"),
    ("extra-no-module", extra("no_such_module:f"), f"plugins.metrics.extra[0].class: {NO_MODULE}"),
    # (b) a name that does not exist
    ("train-no-name", given("train", "helpers.py:nope"), 'data.train: "helpers.py" has no attribute "nope"'),
    ("val-no-name", given("val", "helpers.py:nope"), 'data.val: "helpers.py" has no attribute "nope"'),
    (
        "scheduler-no-name",
        scheduler("torch.optim.lr_scheduler:StepLRR"),
        'models[0].scheduler.class: "torch.optim.lr_scheduler" has no attribute "StepLRR" (did you mean "StepLR"?)',
    ),
    ("extra-no-name", extra("torchmetrics.regression:Nope"), 'plugins.metrics.extra[0].class: "torchmetrics.regression" has no attribute "Nope"'),
    # (c) the wrong signature, or the wrong thing returned
    (
        "collate_fn-signature",
        {"data.collate_fn": "helpers.py:takes_two"},
        "data.collate_fn: \"helpers.py:takes_two\"(4 samples) raised TypeError: takes_two() missing 1 required positional argument: 'extra'",
    ),
    (
        "collate_fn-returns-a-tensor",
        {"data.collate_fn": "helpers.py:stacked"},
        'data.collate_fn: "helpers.py:stacked" returned a Tensor; a collate_fn must return an (inputs, target) pair',
    ),
    (
        "sampler-signature",
        {"data.sampler": "helpers.py:no_arguments"},
        'data.sampler: "helpers.py:no_arguments"(...) raised TypeError: no_arguments() takes 0 positional arguments but 1 was given',
    ),
    (
        "sampler-returns-a-number",
        {"data.sampler": "helpers.py:five"},
        'data.sampler: "helpers.py:five" gave 5, not a sampler (an iterable of positions with a len())',
    ),
    (
        "group_by-signature",
        {**KFOLD, "data.group_by": "helpers.py:takes_two"},
        "data.group_by: \"helpers.py:takes_two\"(dataset) raised TypeError: takes_two() missing 1 required positional argument: 'extra'",
    ),
    (
        "group_by-returns-none",
        {**KFOLD, "data.group_by": "helpers.py:no_groups"},
        "data.group_by: group_by gives None for 300 samples; it must give one group per sample",
    ),
    ("train-signature", given("train", "helpers.py:needs_root"), 'data.train: missing argument "root" for helpers.py:needs_root'),
    ("test-signature", given("test", "helpers.py:needs_root"), 'data.test: missing argument "root" for helpers.py:needs_root'),
    ("train-returns-numbers", given("train", "helpers.py:numbers"), f'data.train: "helpers.py:numbers" yields int items; {PAIRS}'),
    ("val-returns-numbers", given("val", "helpers.py:numbers"), f'data.val: "helpers.py:numbers" yields int items; {PAIRS}'),
    ("test-returns-numbers", given("test", {"class": "helpers.py:numbers", "split": "test"}), f'data.test: "helpers.py:numbers" yields int items; {PAIRS}'),
    (
        "scheduler-signature",
        scheduler("helpers.py:no_arguments"),
        "models[0].scheduler: helpers.py:no_arguments(...) raised TypeError: no_arguments() takes 0 positional arguments but 1 was given",
    ),
    (
        "extra-not-one-number",
        extra("torchmetrics.classification:MulticlassAccuracy", num_classes=10, average="none"),
        'plugins.metrics.extra[0]: metric "X": MulticlassAccuracy.compute() returned tensor(',
    ),
]


@pytest.mark.parametrize("overrides, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_reference_option_that_does_not_fit_is_one_line_in_validate_and_run(tmp_path, capsys, overrides, expected):
    if "torchmetrics" in str(overrides):
        pytest.importorskip("torchmetrics")
    (tmp_path / "helpers.py").write_text(HELPERS, encoding="utf-8")
    (tmp_path / "broken.py").write_text(BROKEN, encoding="utf-8")
    overrides = dict(overrides)
    path = make_manifest(tmp_path, overrides, models=overrides.pop("models", None))
    lines = []
    for command in ("validate", "run"):
        code = cli.main([command, str(path)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (command, code, err)
        lines.append(err.rstrip("\n"))
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"izitorch: error: {path}: {expected}"), lines[0]
    assert not (tmp_path / "res").exists()


def test_validate_feeds_a_torchmetrics_metric_its_batch_without_a_word(tmp_path, capsys):
    """Four samples leave classes without positives: the metrics' warnings about it are not
    shown by validate (the epoch's data decide)."""
    pytest.importorskip("torchmetrics")
    entries = [
        {"class": "torchmetrics.classification:MulticlassAUROC", "num_classes": 10, **AUROC},
        {"class": "torchmetrics.classification:MulticlassAveragePrecision", "num_classes": 10, "direction": "higher", "name": "AP"},
    ]
    path = make_manifest(tmp_path, {"plugins.metrics": {"extra": entries}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["validate", str(path)]) == 0
    assert capsys.readouterr().err == "" and [str(w.message) for w in caught] == []
