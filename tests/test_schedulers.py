"""Learning-rate schedulers: per epoch, per optimizer step (``interval = "step"``) and
``ReduceLROnPlateau`` on the monitored metric, for a lone model, a vectorized group and parallel
folds; each epoch's learning rate in the trainlog; their refusals; kill -9 and ``--resume``.

References are hand-written PyTorch loops with the same scheduler, on the same batches (no
shuffling, seeded initial weights), computed here."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from torch import nn

from conftest import KILLER, cli, error_of, run_cli
from izitorch.datasets import digits
from test_engine_capabilities import MODELS  # a small MLP seeded by its own parameter

# The digits with NaN pixels in their first rows: a training batch holding one has a NaN loss.
NAN_DATA = """
import torch
from izitorch.datasets import digits


def nan_digits(limit):
    x, y = digits(limit=limit).tensors
    x = x.clone()
    x[:6] = float("nan")
    return torch.utils.data.TensorDataset(x, y)
"""

SAMPLES = 240  # digits kept: a 0.8 holdout trains on 192 = 6 batches of 32
ONE_CYCLE = "torch.optim.lr_scheduler:OneCycleLR"
PLATEAU = "torch.optim.lr_scheduler:ReduceLROnPlateau"


def model(seed: int, lr: float, scheduler: dict | None = None, optimizer: str = "torch.optim:SGD", **extra) -> dict:
    entry = {"name": f"m{seed}", "model": "nets.py:Net", "params": {"seed": seed}, "optimizer": {"class": optimizer, "lr": lr, **extra}}
    if scheduler is not None:
        entry["scheduler"] = scheduler
    return entry


def write(tmp_path: Path, name: str, models: list[dict], *, data: dict | None = None, plugins: dict | None = None, **run: object) -> Path:
    """A manifest of ``models`` on SAMPLES digits, batches of 32 in split order (no shuffling)."""
    (tmp_path / "nets.py").write_text(MODELS, encoding="utf-8")
    manifest = {
        "run": {"res_dir": (tmp_path / name).as_posix(), "epochs": 2, "batch_size": 32, "shuffle": False, "display_step": 1000, **run},
        "data": {"dataset": "izitorch.datasets:digits", "params": {"limit": SAMPLES}, "num_classes": 10, **(data or {})},
        "models": models,
        "plugins": plugins or {},
    }
    path = tmp_path / f"{name}.toml"
    path.write_bytes(tomli_w.dumps(manifest).encode())
    return path


def net(seed: int) -> nn.Module:
    namespace: dict = {}
    exec(MODELS, namespace)
    return namespace["Net"](seed=seed)


def splits(res: Path) -> list:
    with open(res / "Dataset_split.pkl", "rb") as handle:
        return pickle.load(handle)


def trainlog(res: Path, name: str) -> dict:
    return json.loads((res / name / "trainlog.json").read_text())


def saved(res: Path, name: str, file: str = "model.pth.tar") -> dict:
    return torch.load(res / name / file, weights_only=True)


def chunks(rows, size: int) -> list[np.ndarray]:
    rows = np.asarray(rows)
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def plain(seed: int, lr: float, windows: list[np.ndarray], epochs: int, scheduler, per_step: bool, x=None, y=None, **sgd) -> tuple[dict, list[float]]:
    """Plain PyTorch: one SGD step per window of rows (its mean loss), the scheduler stepped
    after each optimizer step (``per_step``) or each epoch. Returns the weights and each epoch's
    first learning rate."""
    if x is None:
        x, y = digits(limit=SAMPLES).tensors
    network = net(seed)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, **sgd)
    schedule = scheduler(optimizer)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for rows in windows:
            if len(rows) == 0:
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(network(x[rows]), y[rows]).backward()
            optimizer.step()
            if per_step:
                schedule.step()
        if not per_step:
            schedule.step()
    return network.state_dict(), lrs


def assert_close(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for key in found:
        torch.testing.assert_close(found[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def one_cycle(total: int, max_lr: float):
    return lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total)


# -- interval = "step" ----------------------------------------------------------------------------

MAX_LRS = (0.5, 0.3)


@pytest.mark.parametrize(
    "models, accumulate, parallel", [(1, 1, False), (1, 2, False), (2, 1, False), (1, 1, True)], ids=["alone", "accumulate", "vectorized", "parallel"]
)
def test_a_step_scheduler_steps_after_every_optimizer_step_as_in_plain_pytorch(tmp_path, capsys, models, accumulate, parallel):
    """OneCycleLR (which also cycles SGD's momentum) stepped per optimizer step: once per window
    of ``accumulate`` batches, per member of a vectorized group, per fold of parallel folds (a
    fold steps on the batches holding samples of its own)."""
    epochs = 2
    steps = epochs * (8 if parallel else 6 // accumulate)  # parallel folds: one pass over all 240 samples
    entries = [model(k, 0.1, {"class": ONE_CYCLE, "max_lr": MAX_LRS[k], "total_steps": steps, "interval": "step"}, momentum=0.9) for k in range(models)]
    plugins = {"enable": ["kfold"], "kfold": {"k": 3, "parallel": True}} if parallel else None
    code, out, err = cli(capsys, "run", write(tmp_path, "res", entries, plugins=plugins, accumulate=accumulate, epochs=epochs))
    assert code == 0, err
    res = tmp_path / "res"
    if models == 2:
        assert "vectorized group of 2" in out
    folds = splits(res)
    shared = np.unique(np.concatenate([np.asarray(fold[0]) for fold in folds]))  # parallel folds' one training pass
    for index, fold in enumerate(folds):
        own = np.asarray(fold[0])
        windows = [w[np.isin(w, own)] for w in chunks(shared, 32)] if parallel else chunks(own, 32 * accumulate)
        for k in range(models):
            name = f"m{k}/FOLD_{index + 1}" if parallel else f"m{k}"
            expected, lrs = plain(k, 0.1, windows, epochs, one_cycle(steps, MAX_LRS[k]), per_step=True, momentum=0.9)
            checkpoint = saved(res, name)
            assert_close(checkpoint["state_dict"], expected)
            assert checkpoint["scheduler"]["last_epoch"] == sum(len(w) > 0 for w in windows) * epochs
            assert [entry["lr"] for entry in trainlog(res, name).values()] == pytest.approx(lrs, rel=1e-12)
            assert lrs[1] > lrs[0]  # the cycle warms up within the first epoch


def test_a_window_skipped_by_the_nan_policy_does_not_step_the_scheduler(tmp_path, capsys):
    """In a vectorized group too: m1's learning rate makes its loss non-finite after a few
    steps, from where it skips every batch while m0 goes on; the batches holding a NaN sample
    are skipped by both."""
    (tmp_path / "nandata.py").write_text(NAN_DATA, encoding="utf-8")
    scheduler = {"class": "torch.optim.lr_scheduler:LinearLR", "start_factor": 1.0, "end_factor": 0.1, "total_iters": 12, "interval": "step"}
    path = write(tmp_path, "res", [model(0, 0.1, scheduler), model(1, 1e30, scheduler)], data={"dataset": "nandata.py:nan_digits"}, nan_policy="skip_batch")
    code, out, err = cli(capsys, "run", path)
    assert code == 0 and "vectorized group of 2" in out, err
    res = tmp_path / "res"
    skipped = {name: [entry.get("skipped_batches", 0) for entry in trainlog(res, name).values()] for name in ("m0", "m1")}
    assert 0 < skipped["m0"][0] < 6 and skipped["m0"] == [skipped["m0"][0]] * 2  # the same batches each epoch (no shuffling)
    assert sum(skipped["m1"]) > sum(skipped["m0"])
    for name in ("m0", "m1"):
        assert saved(res, name)["scheduler"]["last_epoch"] == 12 - sum(skipped[name])
    x, y = digits(limit=SAMPLES).tensors
    x = x.clone()
    x[:6] = float("nan")
    windows = [rows for rows in chunks(splits(res)[0][0], 32) if not (rows < 6).any()]
    expected, lrs = plain(0, 0.1, windows, 2, lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.1, total_iters=12), per_step=True, x=x, y=y)
    assert [entry["lr"] for entry in trainlog(res, "m0").values()] == pytest.approx(lrs, rel=1e-12)
    assert_close(saved(res, "m0")["state_dict"], expected)


def test_an_fp16_step_skipped_for_overflow_does_not_step_the_scheduler(tmp_path, capsys, monkeypatch):
    from izitorch import precision

    # a loss scale so large that every step overflows (and stays so after halving it each time)
    monkeypatch.setattr(precision, "new_scaler", lambda *_: torch.amp.GradScaler("cpu", init_scale=2.0**120))
    scheduler = {"class": ONE_CYCLE, "max_lr": 0.5, "total_steps": 12, "interval": "step"}
    path = write(tmp_path, "res", [model(0, 0.1, scheduler)], precision="fp16")
    code, _, err = cli(capsys, "run", path)
    assert code == 0, err
    checkpoint = saved(tmp_path / "res", "m0")
    assert checkpoint["scheduler"]["last_epoch"] == 0  # OneCycleLR's own step at construction only
    assert_close(checkpoint["state_dict"], net(0).state_dict())


# -- ReduceLROnPlateau ----------------------------------------------------------------------------

PLATEAU_LRS = (0.3, 0.2)


@pytest.mark.parametrize("models", [1, 2], ids=["alone", "vectorized"])
def test_reduce_on_plateau_steps_on_the_validation_metric_in_its_direction(tmp_path, capsys, models):
    """``best_metric = "acc"`` (higher is better): the scheduler gets mode "max" without being
    told, and steps after each evaluation with the validation accuracy."""
    epochs = 5
    # a relative threshold of 30 %: the accuracy soon stops improving enough, and the lr drops
    entries = [model(k, PLATEAU_LRS[k], {"class": PLATEAU, "patience": 0, "factor": 0.5, "threshold": 0.3}) for k in range(models)]
    path = write(tmp_path, "res", entries, data={"validation": True}, epochs=epochs, best_metric="acc")
    code, out, err = cli(capsys, "run", path)
    assert code == 0, err
    res = tmp_path / "res"
    train, val, _ = splits(res)[0]
    x, y = digits(limit=SAMPLES).tensors
    for k in range(models):
        network = net(k)
        optimizer = torch.optim.SGD(network.parameters(), lr=PLATEAU_LRS[k])
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=0, factor=0.5, threshold=0.3)
        lrs = []
        for _ in range(epochs):
            lrs.append(optimizer.param_groups[0]["lr"])
            for rows in chunks(train, 32):
                optimizer.zero_grad()
                nn.functional.cross_entropy(network(x[rows]), y[rows]).backward()
                optimizer.step()
            with torch.no_grad():
                accuracy = 100.0 * float((network(x[val]).argmax(1) == y[val]).double().mean())
            plateau.step(accuracy)
        assert len(set(lrs)) > 1  # the plateau was met: the test means something
        log = trainlog(res, f"m{k}")
        assert [entry["lr"] for entry in log.values()] == lrs
        checkpoint = saved(res, f"m{k}")
        assert checkpoint["scheduler"]["mode"] == "max" and checkpoint["scheduler"]["last_epoch"] == epochs
        assert_close(checkpoint["state_dict"], network.state_dict())


def test_reduce_on_plateau_steps_on_evaluated_epochs_only(tmp_path, capsys):
    path = write(tmp_path, "res", [model(0, 0.1, {"class": PLATEAU})], data={"validation": True}, epochs=4, test_epoch=2)
    assert cli(capsys, "run", path)[0] == 0
    checkpoint = saved(tmp_path / "res", "m0")
    # epochs 2 and 4; unset best_metric: the classification's accuracy, better higher
    assert (checkpoint["scheduler"]["last_epoch"], checkpoint["scheduler"]["mode"]) == (2, "max")


# -- refusals -------------------------------------------------------------------------------------

REFUSALS = [
    (
        "plateau-without-validation",
        {"class": PLATEAU},
        {},
        "models[0].scheduler: ReduceLROnPlateau steps on [run] best_metric of the evaluated set; without a validation set that "
        "is the test set, whose scores would then steer training: set [data] validation = true",
    ),
    (
        "plateau-mode-disagrees",
        {"class": PLATEAU, "mode": "min"},
        {"data": {"validation": True}, "best_metric": "acc"},
        'models[0].scheduler.mode: ReduceLROnPlateau has mode = "min" but watches [run] best_metric "accuracy", which is better higher: '
        'use mode = "max", or leave mode out (izitorch sets it)',
    ),
    (
        "plateau-per-step",
        {"class": PLATEAU, "interval": "step"},
        {"data": {"validation": True}},
        "models[0].scheduler.interval: ReduceLROnPlateau steps on [run] best_metric after each evaluated epoch, not per optimizer step: "
        'remove interval = "step"',
    ),
    (
        "interval-misspelt",
        {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "interval": "steps"},
        {},
        'models[0].scheduler.interval: expected one of "epoch", "step", got "steps" (did you mean "step"?)',
    ),
    (
        "interval-not-a-string",
        {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "interval": 1},
        {},
        "models[0].scheduler.interval: expected a string, got 1",
    ),
]


@pytest.mark.parametrize("scheduler, settings, expected", [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_a_scheduler_that_cannot_work_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys, scheduler, settings, expected):
    settings = dict(settings)
    path = write(tmp_path, "res", [model(0, 0.1, scheduler)], **settings)
    for command in ("validate", "run"):
        code, _, err = cli(capsys, command, path)
        assert (code, error_of(err)) == (2, f"{path}: {expected}"), command
    assert not (tmp_path / "res" / "m0").exists()


def test_a_total_steps_shorter_than_the_run_is_refused_before_training(tmp_path, capsys):
    scheduler = {"class": ONE_CYCLE, "max_lr": 0.5, "total_steps": 5, "interval": "step"}
    path = write(tmp_path, "res", [model(0, 0.1, scheduler)], accumulate=2)
    code, _, err = cli(capsys, "run", path)
    assert (code, error_of(err)) == (
        2,
        f"{path}: models[0].scheduler.total_steps: OneCycleLR has total_steps = 5, fewer than the 6 steps of this run "
        "(2 epochs of 3 optimizer steps: 6 batches, accumulate = 2); set total_steps = 6",
    )
    assert not (tmp_path / "res" / "m0" / "trainlog.json").exists()


def test_a_later_fold_with_one_batch_more_is_refused_before_the_first_trains(tmp_path, capsys):
    """241 samples in 3 folds train on 160, 161 and 161: 5 batches of 32 in fold 1, 6 after."""
    scheduler = {"class": ONE_CYCLE, "max_lr": 0.5, "total_steps": 10, "interval": "step"}
    path = write(tmp_path, "res", [model(0, 0.1, scheduler)], data={"params": {"limit": 241}}, plugins={"kfold": {"k": 3}})
    code, _, err = cli(capsys, "run", path)
    assert (code, error_of(err)) == (
        2,
        f"{path}: models[0].scheduler.total_steps: OneCycleLR has total_steps = 10, fewer than the 12 steps of this run "
        "(2 epochs of 6 optimizer steps); set total_steps = 12",
    )
    assert [len(fold[0]) for fold in splits(tmp_path / "res")] == [160, 161, 161]
    assert not (tmp_path / "res" / "m0" / "FOLD_1" / "trainlog.json").exists()


def test_the_rack_checks_a_built_plateau_and_steps_a_built_scheduler_per_step(tmp_path):
    import izitorch

    def rack(scheduler_of, interval: str, **args) -> izitorch.Rack:
        network = net(0)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        built = izitorch.Rack()
        built.set_args({"res_dir": str(tmp_path / "res"), "epochs": 1, "batch_size": 32, "validation": 1, "shuffle": 0, **args})
        built.set_dataset(digits(limit=SAMPLES))
        built.add_model_configs([izitorch.ModelConfig("m0", network, nn.CrossEntropyLoss(), optimizer, scheduler_of(optimizer), scheduler_interval=interval)])
        return built

    plateau = rack(lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min"), "epoch", save_best=1, metric_best="acc")
    with pytest.raises(izitorch.IzitorchError) as caught:
        plateau.launch()
    assert str(caught.value).startswith('Rack: models[0].scheduler: ReduceLROnPlateau has mode = "min" but watches [run] best_metric "accuracy"')
    assert not (tmp_path / "res" / "m0").exists()
    rack(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.5, total_iters=100), "step").launch()
    assert saved(tmp_path / "res", "m0")["scheduler"]["last_epoch"] == 6  # 1 epoch of 6 batches (train 192 of 240)


# -- kill -9 and --resume ---------------------------------------------------------------------------


def test_step_and_plateau_schedulers_and_top_k_resume_bit_for_bit_after_kill_9(tmp_path, capsys):
    """Killed in the middle of epoch 2 of 3, the resumed run ends with the weights, scheduler
    states, trainlog (learning rates included) and kept files of an uninterrupted one."""
    (tmp_path / "killer.py").write_text(KILLER, encoding="utf-8")
    entries = [
        model(0, 0.1, {"class": ONE_CYCLE, "max_lr": 0.5, "total_steps": 18, "interval": "step"}, momentum=0.9),
        model(1, 0.3, {"class": PLATEAU, "patience": 0, "factor": 0.5, "threshold": 0.3}),
        model(2, 0.05, {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.5}, optimizer="torch.optim:Adam"),
    ]
    settings = {"data": {"validation": True}, "plugins": {"enable": ["killer.py"], "checkpoint": {"policy": "best_and_last", "top_k": 2}}}
    # files written in line: the state of epoch 1 is on disk when the kill comes
    reference = write(tmp_path, "reference", entries, epochs=3, background_writes=False, **settings)
    killed = write(tmp_path, "killed", entries, epochs=3, background_writes=False, **settings)
    assert cli(capsys, "run", reference)[0] == 0
    done = run_cli("run", str(killed), cwd=tmp_path, env={"KILL_AT": "1,2,3", "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr
    assert torch.load(tmp_path / "killed" / ".izitorch" / "fold_1.pth.tar", weights_only=True)["epoch"] == 1
    code, _, err = cli(capsys, "run", killed, "--resume")
    assert code == 0, err
    assert "were deleted" not in err
    for k in range(3):
        folder, other = tmp_path / "reference" / f"m{k}", tmp_path / "killed" / f"m{k}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in other.iterdir())
        for file in folder.glob("*.pth.tar"):
            mine, theirs = torch.load(file, weights_only=True), torch.load(other / file.name, weights_only=True)
            assert mine["epoch"] == theirs["epoch"] and mine["scheduler"] == theirs["scheduler"], file.name
            for key, value in mine["state_dict"].items():
                assert torch.equal(value, theirs["state_dict"][key]), (file.name, key)
        for file in ("top_k.json", "best_epoch.json"):
            assert (folder / file).read_text() == (other / file).read_text()
        untimed = [untimed_log(trainlog(tmp_path / run, f"m{k}")) for run in ("reference", "killed")]
        assert untimed[0] == untimed[1] and all("lr" in entry for entry in untimed[0].values())


def untimed_log(log: dict) -> dict:
    return {epoch: {key: value for key, value in entry.items() if not key.endswith("_time")} for epoch, entry in log.items()}


def test_a_state_written_before_interval_existed_resumes_while_it_keeps_its_default():
    from izitorch import resume

    older = {"models[0].scheduler.target": "torch.optim.lr_scheduler:StepLR", "models[0].scheduler.params.step_size": "2"}
    current = {**older, "models[0].scheduler.interval": "epoch"}
    assert resume.first_difference(older, current) is None
    assert resume.first_difference(older, {**current, "models[0].scheduler.interval": "step"}) == "models[0].scheduler.interval changed (epoch -> step)"
