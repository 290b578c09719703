"""``[plugins.checkpoint]``: the best and the last epoch side by side (``policy =
"best_and_last"``), the K best epochs (``top_k``, deleting only files the run wrote), and the
choices made on the test set when there is no validation set: refused for these options, one
warning line for the original izitorch's ``policy = "best"`` and early stopping.

Saved weights are checked against the trainlog with scores computed here in plain PyTorch
(``conftest.plain_scores``)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, error_of, plain_scores
from izitorch.errors import IzitorchError
from izitorch.io import owned_by, remove, write_text
from izitorch.models import MLP
from izitorch.ownership import Ledger, read_record

NOISY_SGD = {"class": "torch.optim:SGD", "lr": 0.5}  # a large step: the validation scores go up and down
WARNING = "izitorch: warning: "


def read(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    with open(path, "rb") as handle:
        return pickle.load(handle)


def scores_of(folder: Path, file: str, rows) -> dict[str, float]:
    return plain_scores(MLP(hidden=16), folder / file, rows)


def test_best_and_last_keep_the_best_and_the_last_epoch_side_by_side(manifest, capsys):
    """``metric = "acc"`` picks the best epoch for this policy too (it stands for ``[run]
    best_metric``); the final test scores the last weights, as ``test_weights`` is unset."""
    path = manifest(
        run={"epochs": 4},
        data={"validation": True, "stratify": False},
        models=[{"optimizer": NOISY_SGD}],
        plugins={"checkpoint": {"policy": "best_and_last", "metric": "acc"}},
    )
    code, _, err = cli(capsys, "run", path)
    assert code == 0 and err == "", err
    folder = path.parent / "res" / "mlp"
    _, val, test = read(path.parent / "res" / "Dataset_split.pkl")[0]
    log = read(folder / "trainlog.json")
    best = int(np.argmax([log[str(epoch)]["val_accuracy"] for epoch in range(1, 5)])) + 1
    assert best < 4, "precondition: this set-up must peak before the last epoch"
    assert not (folder / "model.pth.tar").exists()
    assert read(folder / "best_epoch.json") == {"epoch": best, "metric": "accuracy", "value": log[str(best)]["val_accuracy"], "phase": "val"}
    assert torch.load(folder / "model_best.pth.tar", weights_only=True)["epoch"] == best
    assert torch.load(folder / "model_last.pth.tar", weights_only=True)["epoch"] == 4
    assert scores_of(folder, "model_best.pth.tar", val)["accuracy"] == pytest.approx(log[str(best)]["val_accuracy"])
    assert scores_of(folder, "model_last.pth.tar", val)["loss"] == pytest.approx(log["4"]["val_loss"], rel=1e-5)
    final = read(folder / "test_metrics.json")
    assert final["epoch"] == 4 and final["loss"] == pytest.approx(scores_of(folder, "model_last.pth.tar", test)["loss"], rel=1e-5)


@pytest.mark.parametrize("parallel", [False, True], ids=["holdout", "parallel-folds"])
def test_top_k_keeps_the_k_best_epochs_and_deletes_the_others(manifest, capsys, parallel):
    plugins = {"checkpoint": {"top_k": 2, "metric": "loss"}}
    if parallel:  # each fold keeps its own K best (its plugin state is swapped around its hooks)
        plugins |= {"enable": ["kfold"], "kfold": {"k": 3, "parallel": True}}
    path = manifest(run={"epochs": 5}, data={"validation": True}, models=[{"optimizer": NOISY_SGD}], plugins=plugins)
    code, _, err = cli(capsys, "run", path)
    assert code == 0 and err == "", err
    res = path.parent / "res"
    record = read_record(res / ".izitorch" / "owned.txt")
    for index, (_, val, _) in enumerate(read(res / "Dataset_split.pkl")):
        folder = res / "mlp" / f"FOLD_{index + 1}" if parallel else res / "mlp"
        log = read(folder / "trainlog.json")
        ranked = sorted(range(1, 6), key=lambda epoch: log[str(epoch)]["val_loss"])  # stable: an earlier epoch first on a tie
        kept = ranked[:2]
        assert sorted(p.name for p in folder.glob("model_epoch*.pth.tar")) == sorted(f"model_epoch{e}.pth.tar" for e in kept)
        assert read(folder / "top_k.json") == {"metric": "loss", "phase": "val", "epochs": [{"epoch": e, "value": log[str(e)]["val_loss"]} for e in kept]}
        for epoch in kept:
            assert scores_of(folder, f"model_epoch{epoch}.pth.tar", val)["loss"] == pytest.approx(log[str(epoch)]["val_loss"], rel=1e-5)
        assert torch.load(folder / "model.pth.tar", weights_only=True)["epoch"] == 5  # the policy ("last") as before
        dropped = [e for e in range(1, 6) if e not in kept and (folder / f"model_epoch{e}.pth.tar").relative_to(res).as_posix() in record]
        assert dropped, "precondition: some epoch entered the top 2 and fell out"
    ledger = Ledger(res)
    assert list(ledger.foreign()) == [] and ledger.missing() == []  # deleted files are neither foreign nor missing
    code, _, err = cli(capsys, "run", path, "--resume")  # a complete run says so, and no file is missing
    assert code == 0 and "were deleted" not in err


def test_a_file_the_run_did_not_write_is_never_deleted(tmp_path):
    ledger = Ledger(tmp_path)
    mine, theirs = tmp_path / "m" / "model_epoch1.pth.tar", tmp_path / "m" / "model_epoch2.pth.tar"
    with owned_by(ledger):
        write_text(mine, "weights")
        theirs.write_text("the user's")
        with pytest.raises(IzitorchError, match="this run did not write it"):
            remove(theirs)
        remove(mine)
        remove(mine)  # removed already: still the run's, and gone (a resumed run repeats its deletions)
    assert theirs.read_text() == "the user's" and not mine.exists()
    lines = (tmp_path / ".izitorch" / "owned.txt").read_text().splitlines()
    assert lines[-1] == "/removed m/model_epoch1.pth.tar" and lines.count("/removed m/model_epoch1.pth.tar") == 1


def test_a_resumed_run_deletes_again_what_its_retrained_epochs_deleted(tmp_path):
    """A kill after the removal of a top_k file was recorded (or done), before the resume state
    of that epoch was on disk: the resumed run trains the epoch again and deletes the file again,
    whether the kill left it on disk or not."""
    left, gone = tmp_path / "m" / "model_epoch1.pth.tar", tmp_path / "m" / "model_epoch2.pth.tar"
    with owned_by(Ledger(tmp_path)):
        write_text(left, "weights")
        write_text(gone, "weights")
        remove(gone)
    Ledger(tmp_path).forget(left)  # ... and killed before the file went
    with owned_by(Ledger(tmp_path)):  # the resumed run
        remove(left)
        remove(gone)
    assert not left.exists() and not gone.exists()
    assert list(Ledger(tmp_path).foreign()) == [] and Ledger(tmp_path).missing() == []


def test_a_file_whose_removal_a_kill_cut_short_is_still_the_runs(tmp_path):
    """The removal is recorded before the file is deleted: a kill in between leaves a file that
    ``--overwrite`` still deletes and that is not reported missing."""
    ledger = Ledger(tmp_path)
    stale = tmp_path / "m" / "model_epoch1.pth.tar"
    with owned_by(ledger):
        write_text(stale, "weights")
    ledger.forget(stale)  # ... and killed before the file went
    reread = Ledger(tmp_path)
    assert list(reread.foreign()) == [] and reread.missing() == [] and reread.recorded(stale)
    reread.remove_all()
    assert not stale.exists()


REFUSALS = [
    (
        "top-k-and-all",
        {"data.validation": True, "plugins": {"checkpoint": {"policy": "all", "top_k": 2}}},
        'plugins.checkpoint.top_k: policy = "all" keeps every epoch, top_k the best K of them (deleting the others): use one of the two',
    ),
    (
        "best-and-last-on-the-test-set",
        {"plugins": {"checkpoint": {"policy": "best_and_last"}}},
        "plugins.checkpoint.policy: saves the best epochs by [run] best_metric on the evaluated set; without a validation set that is the "
        'test set, whose scores it would then bias: set [data] validation = true (or use policy = "last")',
    ),
    ("top-k-negative", {"data.validation": True, "plugins": {"checkpoint": {"top_k": -1}}}, "plugins.checkpoint.top_k: expected an integer >= 0, got -1"),
]


@pytest.mark.parametrize("settings, expected", [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_options_that_cannot_work_are_refused_in_one_line(manifest, capsys, settings, expected):
    path = manifest(settings)
    code, out, err = cli(capsys, "validate", path)
    assert (code, error_of(err), out) == (2, f"{path}: {expected}", "")


WARNED = [
    ("policy-best", {"plugins": {"checkpoint": {"policy": "best"}}}, 'plugins.checkpoint.policy: without a validation set, policy = "best" chooses'),
    ("early-stop", {"plugins": {"early_stop": {"patience": 2}}}, "plugins.early_stop: without a validation set, early stopping chooses"),
    (
        "both",
        {"plugins": {"checkpoint": {"policy": "best"}, "early_stop": {}}},
        'plugins.checkpoint.policy, plugins.early_stop: without a validation set, policy = "best" and early stopping choose',
    ),
]


@pytest.mark.parametrize("settings, start", [case[1:] for case in WARNED], ids=[case[0] for case in WARNED])
def test_the_original_choices_on_the_test_set_run_after_one_warning_line(manifest, capsys, settings, start):
    path = manifest(settings)
    code, out, err = cli(capsys, "validate", path)
    assert code == 0 and out.startswith(f"{path}: OK")
    assert err.splitlines() == [f"{WARNING}{path}: {start} epochs on the test set, so the test scores reported are biased upward; set [data] validation = true"]
    code, _, err = cli(capsys, "validate", path, "--set", "data.validation=true")
    assert (code, err) == (0, "")


def test_the_warning_is_given_once_per_run(manifest, capsys):
    path = manifest(plugins={"kfold": {"k": 2}, "checkpoint": {"policy": "best"}}, run={"epochs": 1})
    code, _, err = cli(capsys, "run", path)
    assert code == 0
    assert [line for line in err.splitlines() if line.startswith(WARNING)] == [line for line in err.splitlines()]
    assert len(err.splitlines()) == 1 and "Traceback" not in err
