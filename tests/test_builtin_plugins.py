"""Built-in plugins in isolation and end to end: grad_clip, early_stop, the scheduler step,
console, holdout and kfold."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import izitorch
from izitorch import IzitorchError, ManifestError, Slot
from izitorch.models import MLP
from izitorch.state import Scores
from izitorch.plugins import holdout
from izitorch.plugins.grad_clip import GradClipOptions, GradClipPlugin
from izitorch.plugins.kfold import KFoldOptions, KFoldPlugin

from conftest import run_cli

SIZE = 300

ADAM = {"class": "torch.optim:Adam", "lr": 1e-2}
FROZEN = {"class": "torch.optim:SGD", "lr": 0.0}


def two_models(
    manifest, *, epochs=2, display_step=1000, first="a", second="b", first_optimizer=ADAM, second_optimizer=ADAM, second_model=None, plugins=None
) -> Path:
    """The tiny run with two MLPs (16 and 24 hidden units); ``second_model`` adds keys to the second."""
    models = [{"name": first, "optimizer": first_optimizer}, {"name": second, "params": {"hidden": 24}, "optimizer": second_optimizer, **(second_model or {})}]
    return manifest(run={"epochs": epochs, "display_step": display_step}, models=models, **({"plugins": plugins} if plugins else {}))


def run_manifest(path: Path, *sets: str):
    config = izitorch.load_manifest(path, sets)
    return Path(config.run.res_dir), izitorch.run(config)


def read(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    with open(path, "rb") as handle:
        return pickle.load(handle)


# -- grad_clip ------------------------------------------------------------------------------------


def slot_with_grads(scale: float = 100.0) -> Slot:
    """A real slot whose model holds large gradients after one backward pass."""
    torch.manual_seed(0)
    model = MLP(hidden=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    slot = Slot("m", None, model, torch.nn.CrossEntropyLoss(), optimizer)
    inputs, targets = torch.randn(16, 64) * scale, torch.randint(0, 10, (16,))
    slot.criterion(model(inputs), targets).backward()
    return slot


def clip_plugin(**options) -> GradClipPlugin:
    plugin = GradClipPlugin()
    plugin.options = GradClipOptions(**options)
    return plugin


def total_norm(grads) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def test_grad_clip_by_value_on_a_slot():
    slot = slot_with_grads()
    before = [g.clone() for g in slot.grads()]
    assert max(g.abs().max().item() for g in before) > 0.0625
    clip_plugin(value=0.0625).izitorch_before_optimizer_step(run=None, slot=slot)
    after = slot.grads()
    assert len(after) == len(before)
    for old, new in zip(before, after):
        assert new.abs().max().item() <= 0.0625
        assert torch.equal(new, old.clamp(-0.0625, 0.0625))
    assert [p.grad for p in slot.model.parameters()][0] is after[0]  # in place on the model's grads


def test_grad_clip_by_norm_on_a_slot():
    slot = slot_with_grads()
    before = [g.clone() for g in slot.grads()]
    raw = total_norm(before)
    assert raw > 1.0
    clip_plugin(max_norm=1.0).izitorch_before_optimizer_step(run=None, slot=slot)
    after = slot.grads()
    assert total_norm(after) <= 1.0
    assert total_norm(after) == pytest.approx(1.0, rel=1e-4)
    flat_before, flat_after = torch.cat([g.flatten() for g in before]), torch.cat([g.flatten() for g in after])
    cosine = torch.nn.functional.cosine_similarity(flat_before, flat_after, dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)  # direction preserved
    assert torch.allclose(flat_after, flat_before * (total_norm(after) / raw), rtol=1e-4, atol=1e-7)


def test_grad_clip_by_norm_leaves_small_gradients_alone():
    slot = slot_with_grads(scale=1.0)
    before = [g.clone() for g in slot.grads()]
    max_norm = total_norm(before) * 10
    clip_plugin(max_norm=max_norm).izitorch_before_optimizer_step(run=None, slot=slot)
    for old, new in zip(before, slot.grads()):
        assert torch.allclose(old, new)


GRAD_RECORDER = """\
import pickle
import torch
from izitorch import hookimpl

OUT = {out!r}
records = []


@hookimpl(wrapper=True)
def izitorch_before_optimizer_step(run, slot):
    before = [g.detach().clone() for g in slot.grads()]
    result = yield  # every plain implementation, grad_clip included, has run
    after = [g.detach().clone() for g in slot.grads()]
    records.append((slot.name, before, after))
    return result


@hookimpl
def izitorch_run_finish(run, results):
    with open(OUT, "wb") as handle:
        pickle.dump(records, handle)
"""


def run_with_grad_recorder(manifest, tmp_path: Path, clip: dict | None):
    plugin = tmp_path / "grad_recorder.py"
    plugin.write_text(GRAD_RECORDER.format(out=str(tmp_path / "grads.pkl")), encoding="utf-8")
    plugins = {"enable": [plugin.as_posix()], **({"grad_clip": clip} if clip else {})}
    high = {"class": "torch.optim:SGD", "lr": 0.5}
    path = two_models(manifest, epochs=1, first_optimizer=high, second_optimizer=high, plugins=plugins)
    run_manifest(path)
    records = read(tmp_path / "grads.pkl")
    assert {name for name, _, _ in records} == {"a", "b"}
    assert len(records) == 2 * 8  # 240 training samples in batches of 32, two models
    return records


def test_grad_clip_by_value_end_to_end(manifest, tmp_path):
    records = run_with_grad_recorder(manifest, tmp_path, {"value": 0.0078125})
    clipped = 0
    for _, before, after in records:
        for old, new in zip(before, after):
            assert new.abs().max().item() <= 0.0078125
            assert torch.equal(new, old.clamp(-0.0078125, 0.0078125))
            clipped += int((old.abs() > 0.0078125).sum())
    assert clipped > 0  # the raw gradients did exceed the bound


def test_grad_clip_by_norm_end_to_end_is_per_model(manifest, tmp_path):
    records = run_with_grad_recorder(manifest, tmp_path, {"max_norm": 0.2})
    clipped = 0
    for _, before, after in records:
        raw, now = total_norm(before), total_norm(after)
        assert now <= 0.2 * (1 + 1e-5)
        # each model is clipped on its own norm, not on the norm of all models together
        assert now == pytest.approx(min(raw, 0.2), rel=1e-4)
        clipped += raw > 0.2
        flat_before, flat_after = torch.cat([g.flatten() for g in before]), torch.cat([g.flatten() for g in after])
        assert torch.allclose(flat_after, flat_before * (now / raw), rtol=1e-4, atol=1e-8)
    assert clipped > 0


def test_without_grad_clip_gradients_are_untouched(manifest, tmp_path):
    records = run_with_grad_recorder(manifest, tmp_path, None)
    assert all(all(torch.equal(o, n) for o, n in zip(before, after)) for _, before, after in records)
    assert max(g.abs().max().item() for _, before, _ in records for g in before) > 0.01


@pytest.mark.parametrize(
    "table,message",
    [
        ({"value": 1.0, "max_norm": 1.0}, "set exactly one of value"),
        ({"norm_type": 2.0}, "set exactly one of value"),
        ({"value": -1.0}, "plugins.grad_clip.value: expected a number > 0"),
    ],
)
def test_grad_clip_options_are_checked(manifest, tmp_path, table, message):
    path = two_models(manifest, plugins={"grad_clip": table})
    with pytest.raises(ManifestError) as caught:
        run_manifest(path)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "res" / "a").exists()


# -- early_stop -----------------------------------------------------------------------------------


def test_early_stop_is_per_model(manifest, tmp_path):
    plugins = {"early_stop": {"patience": 2, "metric": "loss"}}
    path = two_models(manifest, epochs=5, first="frozen", second="learner", first_optimizer=FROZEN, second_optimizer=ADAM, plugins=plugins)
    res, results = run_manifest(path)
    frozen, learner = read(res / "frozen" / "trainlog.json"), read(res / "learner" / "trainlog.json")
    # the learner trains and is evaluated every epoch
    assert list(learner) == ["1", "2", "3", "4", "5"]
    assert all("loss" in entry and "stopped" not in entry for entry in learner.values())
    assert "stopped" not in read(res / "learner" / "test_metrics.json")
    # the frozen model: first evaluation sets the best, then `patience` evaluations without improvement
    assert len({frozen[e]["test_loss"] for e in frozen}) == 1
    trained = [int(e) for e, entry in frozen.items() if "loss" in entry]
    assert trained == [1, 2, 3]
    assert list(frozen) == ["1", "2", "3", "4", "5"]  # still evaluated while the other trains
    assert "stopped" in frozen["5"] and "epoch 3" in frozen["5"]["stopped"]
    metrics = read(res / "frozen" / "test_metrics.json")
    assert "early stop at epoch 3" in metrics["stopped"]
    assert torch.load(res / "frozen" / "model.pth.tar", weights_only=True)["epoch"] == 3
    assert torch.load(res / "learner" / "model.pth.tar", weights_only=True)["epoch"] == 5
    assert set(results) == {"frozen", "learner"}


def test_fold_ends_when_every_model_stopped(manifest, tmp_path, capsys):
    plugins = {"early_stop": {"patience": 1}}
    path = two_models(manifest, epochs=5, first_optimizer=FROZEN, second_optimizer=FROZEN, plugins=plugins)
    res, _ = run_manifest(path)
    for name in ("a", "b"):
        log = read(res / name / "trainlog.json")
        assert list(log) == ["1", "2"]
        metrics = read(res / name / "test_metrics.json")
        assert metrics["epoch"] == 2 and "early stop at epoch 2" in metrics["stopped"]
    assert "every model stopped early" in capsys.readouterr().out


def test_early_stop_uses_validation_and_min_delta(manifest, tmp_path):
    # a learner whose improvements are all below min_delta counts as not improving
    plugins = {"early_stop": {"patience": 1, "metric": "acc", "min_delta": 1000.0}}
    path = two_models(manifest, epochs=4, plugins=plugins)
    res, _ = run_manifest(path, "data.validation=true")
    for name in ("a", "b"):
        log = read(res / name / "trainlog.json")
        assert list(log) == ["1", "2"]
        assert "val_accuracy" in log["2"] and "test_accuracy" not in log["2"]


# -- scheduler ------------------------------------------------------------------------------------


def test_scheduler_steps_once_per_epoch_after_the_optimizer(manifest, tmp_path):
    scheduler = {"scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.5}}
    plugins = {"checkpoint": {"policy": "all"}, "kfold": {"k": 2}}
    path = two_models(manifest, epochs=3, second_model=scheduler, plugins=plugins)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res, _ = run_manifest(path)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "lr_scheduler.step()" in m], messages
    for fold in ("FOLD_1", "FOLD_2"):  # the second fold starts with a fresh scheduler
        for epoch in (1, 2, 3):
            checkpoint = torch.load(res / "b" / fold / f"model_epoch{epoch}.pth.tar", weights_only=True)
            assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.5**epoch)
            assert checkpoint["scheduler"]["last_epoch"] == epoch
            unscheduled = torch.load(res / "a" / fold / f"model_epoch{epoch}.pth.tar", weights_only=True)
            assert unscheduled["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2)
            assert "scheduler" not in unscheduled


def test_scheduler_before_optimizer_would_be_detected():
    """The warning the test above looks for is real in this torch version."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with pytest.warns(UserWarning, match=r"lr_scheduler\.step\(\)"):
        scheduler.step()


# -- console --------------------------------------------------------------------------------------


def test_console_epoch_step_lines_and_final_table(manifest, capsys):
    path = two_models(manifest, epochs=3, display_step=3, first="alpha", second="beta")
    _, results = run_manifest(path)
    out = capsys.readouterr().out
    lines = out.splitlines()
    epochs = [int(m.group(1)) for m in (re.match(r"^epoch (\d+)/3: ", line) for line in lines) if m]
    assert epochs == [1, 2, 3]
    steps = [int(m.group(1)) for m in (re.match(r"^\s*step (\d+)/8 ", line) for line in lines) if m]
    assert steps == [3, 6] * 3  # 240 samples / 32 = 8 steps per epoch, a line every 3
    step_line = next(line for line in lines if re.match(r"^\s*step ", line))
    assert "alpha" in step_line and "beta" in step_line
    table = out.split("final test scores:", 1)[1].splitlines()
    rows = {line.split()[0]: line.split() for line in table if line.strip() and line.split()[0] in results}
    assert set(rows) == {"alpha", "beta"}
    for name, row in rows.items():
        assert f"{results[name][0]['accuracy']:.2f}" in row
        assert f"{results[name][0]['loss']:.4f}" in row


def test_console_display_step_larger_than_an_epoch_prints_no_step_lines(manifest, capsys):
    run_manifest(two_models(manifest, epochs=1, display_step=1000))
    out = capsys.readouterr().out
    assert not re.search(r"^\s*step ", out, re.M)
    assert re.search(r"^epoch 1/1: ", out, re.M)


class RecordingBar:
    """Stands for tqdm: records each bar's total, description and updates."""

    made: list["RecordingBar"] = []

    def __init__(self, total, desc, disable=None, **_options):
        self.total, self.desc, self.updates, self.closed = total, desc, 0, False
        self.disable = False  # drawn as on a terminal: tqdm's None resolves to False there
        RecordingBar.made.append(self)

    def update(self, count):
        self.updates += count

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def clear(self):
        pass

    def refresh(self):
        pass

    def close(self):
        self.closed = True


@pytest.mark.parametrize("parallel", [False, True])
def test_console_shows_one_bar_per_pass_over_the_training_data(manifest, monkeypatch, parallel):
    """Sequential folds: a bar per fold and epoch. Parallel folds share one pass: one bar an
    epoch, filled once per batch of that pass (not once per fold), and closed."""
    from izitorch.plugins import console

    RecordingBar.made = []
    monkeypatch.setattr(console, "tqdm", RecordingBar)
    run_manifest(two_models(manifest, epochs=2, plugins={"enable": ["kfold"], "kfold": {"k": 3, "parallel": parallel}}))
    bars = RecordingBar.made
    # parallel: the pass goes over all 300 samples (each a training sample of two folds); sequential: 200
    batches = -(-300 // 32) if parallel else -(-200 // 32)
    expected = ["folds 1-3 epoch 1/2", "folds 1-3 epoch 2/2"] if parallel else [f"fold {f}/3 epoch {e}/2" for f in (1, 2, 3) for e in (1, 2)]
    assert [bar.desc for bar in bars] == expected
    assert all(bar.total == bar.updates == batches and bar.closed for bar in bars), [(b.total, b.updates) for b in bars]


# -- holdout / kfold -------------------------------------------------------------------------------


def fake_run(seed=1, ratio=0.8, validation=False):
    return SimpleNamespace(
        config=SimpleNamespace(run=SimpleNamespace(rdm_seed=seed), data=SimpleNamespace(train_ratio=ratio, validation=validation, stratify=None, group_by=None))
    )


@pytest.mark.parametrize("size,ratio", [(101, 0.6), (300, 0.8), (10, 0.5)])
def test_holdout_with_validation_halves_the_held_out_part(size, ratio):
    (split,) = holdout.izitorch_make_splits(run=fake_run(ratio=ratio, validation=True), dataset=range(size))
    n_train = int(np.floor(ratio * size))
    assert len(split.train) == n_train
    held = size - n_train
    assert len(split.val) == held // 2 and len(split.test) == held - held // 2
    parts = [set(split.train.tolist()), set(split.val.tolist()), set(split.test.tolist())]
    assert sum(len(p) for p in parts) == size and set().union(*parts) == set(range(size))


def test_holdout_is_seeded():
    first = holdout.izitorch_make_splits(run=fake_run(seed=5), dataset=range(50))[0]
    again = holdout.izitorch_make_splits(run=fake_run(seed=5), dataset=range(50))[0]
    other = holdout.izitorch_make_splits(run=fake_run(seed=6), dataset=range(50))[0]
    assert first.as_lists() == again.as_lists() and first.val is None
    assert first.as_lists() != other.as_lists()


def test_holdout_refuses_an_empty_side():
    with pytest.raises(IzitorchError, match="train_ratio"):
        holdout.izitorch_make_splits(run=fake_run(ratio=0.1), dataset=range(5))
    with pytest.raises(IzitorchError, match="train_ratio"):
        holdout.izitorch_make_splits(run=fake_run(ratio=0.9, validation=True), dataset=range(10))


def kfold_plugin(k: int) -> KFoldPlugin:
    plugin = KFoldPlugin()
    plugin.options = KFoldOptions(k=k)
    return plugin


@pytest.mark.parametrize("k", [3, 4])
def test_kfold_with_validation_rotates_val_and_test(k):
    splits = kfold_plugin(k).izitorch_make_splits(run=fake_run(validation=True), dataset=range(50))
    assert len(splits) == k
    tests = [s.test.tolist() for s in splits]
    vals = [s.val.tolist() for s in splits]
    assert sorted(sum(tests, [])) == list(range(50))  # every sample tested once
    assert sorted(sum(vals, [])) == list(range(50))  # and validated once
    for split in splits:
        train, val, test = (set(p) for p in split.as_lists())
        assert not (train & val or train & test or val & test) and len(train | val | test) == 50


def test_kfold_with_validation_needs_k_at_least_3():
    with pytest.raises(IzitorchError, match=r"k must be >= 3 with data.validation"):
        kfold_plugin(2).izitorch_make_splits(run=fake_run(validation=True), dataset=range(50))
    splits = kfold_plugin(2).izitorch_make_splits(run=fake_run(validation=False), dataset=range(50))
    assert len(splits) == 2 and all(s.val is None for s in splits)


def test_kfold_with_validation_and_k_2_fails_on_the_cli(manifest, tmp_path):
    path = manifest()
    done = run_cli("run", str(path), "--set", "plugins.kfold.k=2", "--set", "data.validation=true", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "k must be >= 3 with data.validation" in done.stderr
    assert not (tmp_path / "res" / "mlp" / "trainlog.json").exists()


def test_kfold_k_below_2_is_a_manifest_error(manifest):
    with pytest.raises(ManifestError, match=r"plugins\.kfold\.k: expected an integer >= 2, got 1"):
        run_manifest(manifest(), "plugins.kfold.k=1")


def test_the_epoch_at_which_a_model_stops_early_says_so_in_its_trainlog(manifest, tmp_path):
    path = manifest(
        run={"epochs": 6, "display_step": None},
        data={"params": {"limit": 200}},
        models=[{"name": "frozen", "params": None, "optimizer": FROZEN}],
        plugins={"early_stop": {"patience": 2}},
    )
    izitorch.run(izitorch.load_manifest(path))
    log = json.loads((tmp_path / "res" / "frozen" / "trainlog.json").read_text())
    assert list(log) == ["1", "2", "3"]  # lr = 0: no improvement after epoch 1, patience 2
    assert "stopped" not in log["2"]
    assert log["3"]["stopped"] == "early stop at epoch 3: no loss improvement for 2 evaluations"


def test_the_trainlog_encodes_each_epoch_once_and_its_text_is_the_log(tmp_path, monkeypatch):
    """trainlog.json and the saved state are the entries' encodings joined: an epoch's entry is
    encoded once however long the run (re-encoding the whole log every epoch made a 50-epoch
    sweep quadratic), and text, state and parse agree, NaN and a late stop included."""
    from izitorch.plugins import trainlog

    encoded = []
    real_dumps = json.dumps
    monkeypatch.setattr(trainlog.json, "dumps", lambda value, *a, **k: encoded.append(value) or real_dumps(value, *a, **k))
    plugin = trainlog.TrainlogPlugin()
    slots = [SimpleNamespace(name=name, stopped=None, kept_epoch=None) for name in ("a", "b")]
    fold = SimpleNamespace(slots=slots, index=0)
    run = SimpleNamespace(model_dir=lambda slot, _fold: tmp_path / slot.name)
    plugin.izitorch_fold_start(run=run, fold=fold)
    for epoch in range(1, 6):
        scores = {
            slot.name: {"train": {"loss": 1.0 / epoch, "train_step_time": 0.1}, "test": {"acc": float("nan") if epoch == 3 else 50.0 + epoch}} for slot in slots
        }
        plugin.izitorch_epoch_finish(run=run, fold=fold, epoch=epoch, scores=Scores(epoch, scores))
    assert len(encoded) == 5 * 2 * 2  # per epoch and model: its key and its entry, once
    written = json.loads((tmp_path / "a" / "trainlog.json").read_text(encoding="utf-8"))
    assert list(written) == ["1", "2", "3", "4", "5"] and written["2"] == {"loss": 0.5, "train_step_time": 0.1, "test_acc": 52.0}
    assert np.isnan(written["3"]["test_acc"])
    state = plugin.izitorch_state_dict(run=run)
    resumed = trainlog.TrainlogPlugin()
    encoded.clear()
    resumed.izitorch_load_state_dict(run=run, state=state)
    assert encoded == []  # the lines come back from the text (parallel folds swap logs in and out)
    assert resumed.logs["a"].text() == plugin.logs["a"].text()
    assert resumed.logs["a"].entries.keys() == plugin.logs["a"].entries.keys()
    assert resumed.logs["a"].entries["2"] == plugin.logs["a"].entries["2"]
    # a stop decided after the last epoch was logged is added to that epoch's entry
    slots[1].stopped = "loss is nan"
    resumed.izitorch_fold_finish(run=run, fold=SimpleNamespace(slots=[slots[1]], final_scores={"b": {"loss": 0.2}}, epoch=5))
    written = json.loads((tmp_path / "b" / "trainlog.json").read_text(encoding="utf-8"))
    assert written["5"]["stopped"] == "loss is nan" and "stopped" not in written["4"]
    # a state saved by izitorch 0.2.0 held the entries themselves
    old = trainlog.TrainlogPlugin()
    old.izitorch_load_state_dict(run=run, state={"trainlog": {"logs": {"a": {"1": {"loss": 2.0}}}}})
    assert json.loads(old.logs["a"].text()) == {"1": {"loss": 2.0}}
