"""Never lose a run (issue 4): faults during a run and the one-line errors they give.

- Outputs are never half-written: a write that fails mid-way (a patched ``os.replace``, a full
  disk, a permission error, an interrupt) leaves the previous file intact and no temporary file.
- A full disk during training stops the run with exit 1 and one line; the finished epochs stay
  on disk and ``--resume`` continues once there is room again.
- ``nan_policy``: a diverging model stops (default), skips its non-finite batches, or ends the
  run, while the other models are unaffected.
- Out-of-memory, shapes that do not fit the criterion, labels outside ``num_classes``, empty
  data or splits, impossible k-folds, bad ranges, factories that raise, a resume state from
  another architecture, a dataset that does not yield pairs: each is one line on stderr
  (``izitorch: error: ...``), exit 2 (1 once training has started), and every finished epoch
  stays on disk.

NaN, OOM and shape faults are injected deterministically by ``models.py:Flaky``, which counts its
training-mode forward calls (200 digits, holdout 160/40, batch 32: five steps per epoch, so
call 8 is epoch 2, step 3). Most runs go in-process through ``izitorch.cli.main`` (what
``python -m izitorch`` calls); the ones where a stray traceback would show run as subprocesses.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import signal
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import izitorch
from izitorch.cohort import Cohort
from izitorch.stacks import LoneStack
from izitorch import held
from izitorch import io as izio
from izitorch import resume
from izitorch.data import build_slot
from izitorch.errors import IzitorchError, TrainingError
from izitorch.models import MLP
from izitorch.state import Fold, Run, Split, deep_equal

from conftest import cli, error_of, make_manifest, replaced_by_thread, run_cli

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = 5  # training steps per epoch of the runs below (160 training samples, batch 32)

MODELS = '''\
"""Test models and datasets that fail on purpose, at a chosen training-mode forward call."""
import os
import signal

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


class Flaky(nn.Module):
    """A one-hidden-layer MLP whose training forward call number N misbehaves.

    ``nan_at``: calls whose output is multiplied by NaN; ``nan_from``: every call from then on;
    ``oom_at``: raise CUDA's out-of-memory error; ``narrow_at``: from then on return only
    3 classes; ``sigint_at``: send SIGINT to this process.
    """

    def __init__(self, hidden: int = 16, num_classes: int = 10, nan_at: list = (), nan_from: int = 0,
                 oom_at: int = 0, narrow_at: int = 0, sigint_at: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.nan_at, self.nan_from, self.oom_at = set(nan_at), nan_from, oom_at
        self.narrow_at, self.sigint_at = narrow_at, sigint_at
        self.calls = 0

    def forward(self, x):
        out = self.net(x.flatten(1))
        if not self.training:
            return out
        self.calls += 1
        if self.calls == self.oom_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.calls == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
        if self.narrow_at and self.calls >= self.narrow_at:
            out = out[:, :3]
        if self.calls in self.nan_at or (self.nan_from and self.calls >= self.nan_from):
            out = out * float("nan")
        return out


class Boom(nn.Module):
    def __init__(self, hidden: int = 16):
        raise ValueError("hidden must be even")


class Triples(Dataset):
    """Items (input, label, index): not the (input, target) pairs izitorch needs."""

    def __init__(self, n: int = 40):
        self.x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 10, i


class Bare(Triples):
    """Items that are bare tensors."""

    def __getitem__(self, i):
        return self.x[i]


def empty():
    return TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))


def broken(limit: int = 1):
    raise FileNotFoundError("data/train.csv")
'''


def flaky(name: str = "flaky", **params) -> dict:
    """A ``[[models]]`` entry for ``models.py:Flaky`` with the given parameters (only those)."""
    return {"name": name, "model": "models.py:Flaky", "params": {"hidden": None, **params}}


def write_run(
    tmp_path: Path,
    models: list[dict] | None = None,
    *,
    epochs: int = 3,
    limit: int = 200,
    run: dict | None = None,
    plugins: dict | None = None,
    res: str = "res",
    name: str = "m.toml",
) -> Path:
    """A manifest (and ``models.py``) in tmp_path: digits[:limit], holdout 80/20, batch 32;
    ``models`` laid over the tiny run's MLP (default: that MLP alone)."""
    (tmp_path / "models.py").write_text(MODELS, encoding="utf-8")
    tables = {"plugins": plugins} if plugins else {}
    return make_manifest(
        tmp_path,
        name=name,
        models=models or [{}],
        data={"params": {"limit": limit}},
        run={"res_dir": (tmp_path / res).as_posix(), "epochs": epochs, **(run or {})},
        **tables,
    )


def trainlog(res: Path, model: str) -> dict:
    return json.loads((res / model / "trainlog.json").read_text(encoding="utf-8"))


def without_times(log: dict) -> dict:
    return {epoch: {k: v for k, v in entry.items() if not k.endswith("_time")} for epoch, entry in log.items()}


def saved_state(res: Path, fold: int = 1) -> dict:
    return torch.load(res / ".izitorch" / f"fold_{fold}.pth.tar", weights_only=True)


def saved_fold(res: Path, fold: int = 1) -> dict:
    """The entry of fold ``fold`` (1-based) in its resume state: its models, plugins, scores."""
    return saved_state(res, fold)["folds"][0]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def assert_tensors_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_finished_epochs_on_disk(res: Path, models: list[str], epochs: int) -> None:
    """Epochs 1..epochs are in every trainlog and in the resume state; the lock is released."""
    for name in models:
        assert list(trainlog(res, name)) == [str(e) for e in range(1, epochs + 1)], name
    state = saved_fold(res)
    assert state["epoch"] == epochs and state["final_scores"] is None
    assert set(state["slots"]) == set(models)
    for name in models:
        assert all(torch.isfinite(v).all() for v in state["slots"][name]["model"].values())
    assert not (res / ".izitorch.lock").exists()
    assert leftovers(res) == []


# -- outputs are never half-written -------------------------------------------------------------


def weights(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"epoch": seed, "state_dict": MLP(hidden=4).state_dict()}


def test_a_failed_replace_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "mlp" / "model.pth.tar"
    izio.save_torch(path, weights(1))
    seen = []

    def replace(src, dst):
        seen.append(torch.load(src, weights_only=True))  # the new file was complete...
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # ...when moving it failed

    monkeypatch.setattr(izio.os, "replace", replace)
    with pytest.raises(IzitorchError) as info:
        izio.save_torch(path, weights(2))
    assert type(info.value) is IzitorchError and info.value.exit_code == 2
    assert str(info.value) == f"cannot write {path}: Input/output error; check the permissions of res_dir or choose another one"
    assert seen and seen[0]["epoch"] == 2
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 1
    assert_tensors_equal(kept["state_dict"], weights(1)["state_dict"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth.tar"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit, ValueError])
def test_a_write_cut_short_leaves_the_previous_file_and_no_temporary(tmp_path, interrupt):
    path = tmp_path / "trainlog.json"
    izio.write_json(path, {"1": {"loss": 1.5}})
    before = path.read_bytes()

    def half(handle):
        handle.write(b'{"1": {"loss": 1.5}, "2": {"lo')
        raise interrupt("cut")

    with pytest.raises(interrupt):  # not an OSError: passed through as it is
        izio.atomic_write(path, half)
    assert path.read_bytes() == before
    assert json.loads(path.read_text()) == {"1": {"loss": 1.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["trainlog.json"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_a_training_error_and_the_previous_checkpoint_is_intact(tmp_path, code):
    path = tmp_path / "mlp" / "model.pth.tar"
    izio.save_torch(path, weights(1))

    def full(handle):
        handle.write(b"\0" * 4096)
        raise OSError(code, os.strerror(code))

    with pytest.raises(TrainingError) as info:
        izio.atomic_write(path, full)
    assert info.value.exit_code == 1
    message = str(info.value)
    assert message == (f"no space left on the device while writing {path}; the previous version is intact: free some space, then continue with --resume")
    assert "\n" not in message
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth.tar"]


def test_a_permission_error_is_a_one_line_izitorch_error(tmp_path, monkeypatch):
    path = tmp_path / "conf.json"
    izio.write_json(path, {"a": 1})

    real_open = os.open

    def denied(name, *args, **kwargs):
        if str(name).endswith(".tmp"):  # the temporary file izitorch creates next to conf.json
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(izio.os, "open", denied)
    with pytest.raises(IzitorchError) as info:
        izio.write_json(path, {"a": 2})
    assert type(info.value) is IzitorchError and info.value.exit_code == 2
    assert str(info.value) == f"cannot write {path}: Permission denied; check the permissions of res_dir or choose another one"
    assert json.loads(path.read_text()) == {"a": 1}


def test_outputs_get_the_mode_a_plain_open_would_give_them(tmp_path):
    """Results stay readable as with open() (0666 & ~umask), not 0600 like tempfile.mkstemp's."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "results.json"
    izio.write_json(path, {"a": 1})
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    izio.write_json(path, {"a": 2})  # a rewrite keeps it
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_checkpoint_rewrite_failing_in_a_run_keeps_the_last_one(tmp_path, monkeypatch, capsys):
    """A 2-epoch run, extended to 3 with --resume; the epoch-3 checkpoint hits a full disk
    (when the run's held files are flushed, at its end: the resume state after it is dropped)."""
    path = write_run(tmp_path, epochs=2)
    res = tmp_path / "res"
    assert cli(capsys, "run", path)[0] == 0
    before = torch.load(res / "mlp" / "model.pth.tar", weights_only=True)
    assert before["epoch"] == 2
    real_write = izio._write

    def full_for_checkpoints(target, write, snapshot_bytes):
        if Path(target).name != "model.pth.tar":
            return real_write(target, write, snapshot_bytes)

        def full(handle):
            handle.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real_write(target, full, snapshot_bytes)

    monkeypatch.setattr(izio, "_write", full_for_checkpoints)
    code, _, err = cli(capsys, "run", path, "--resume", "--set", "run.epochs=3")
    assert code == 1
    assert error_of(err) == (
        f"{path}: no space left on the device while writing {res / 'mlp' / 'model.pth.tar'}; "
        "the previous version is intact: free some space, then continue with --resume"
    )
    after = torch.load(res / "mlp" / "model.pth.tar", weights_only=True)
    assert after["epoch"] == 2
    assert_tensors_equal(after["state_dict"], before["state_dict"])
    assert saved_state(res)["epoch"] == 2  # the resume state is written after the plugins: still epoch 2
    assert leftovers(res) == [] and not (res / ".izitorch.lock").exists()
    monkeypatch.undo()  # space freed
    code, _, err = cli(capsys, "run", path, "--resume", "--set", "run.epochs=3")
    assert code == 0, err
    assert torch.load(res / "mlp" / "model.pth.tar", weights_only=True)["epoch"] == 3
    assert list(trainlog(res, "mlp")) == ["1", "2", "3"]


FULL_DISK_PLUGIN = '''\
"""Test plugin: while the file "disk_full" exists next to it, every write from epoch 3 on fails."""
import errno
import os
from pathlib import Path

import izitorch.io as io
from izitorch import hookimpl

MARKER = Path(__file__).with_name("disk_full")
_real_atomic_write = io.atomic_write
_epoch = [0]


def _atomic_write(path, write):
    if _epoch[0] >= 3 and MARKER.exists():
        def full(handle):
            handle.write(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real_atomic_write(path, full)
    return _real_atomic_write(path, write)


io.atomic_write = _atomic_write


@hookimpl
def izitorch_epoch_start(run, fold, epoch):
    _epoch[0] = epoch
'''


def test_a_full_disk_at_epoch_3_exits_1_keeps_epochs_1_2_and_resume_completes(tmp_path, capsys):
    (tmp_path / "full_disk.py").write_text(FULL_DISK_PLUGIN, encoding="utf-8")
    (tmp_path / "disk_full").touch()
    plugins = {"enable": ["full_disk.py"]}
    path = write_run(tmp_path, epochs=4, plugins=plugins)
    res = tmp_path / "res"
    done = run_cli("run", path.name, cwd=tmp_path, env=ENV)
    assert done.returncode == 1, done.stderr
    log_file = res / "mlp" / "trainlog.json"  # the first write of epoch 3
    assert error_of(done.stderr) == (
        f"m.toml: no space left on the device while writing {log_file}; the previous version is intact: free some space, then continue with --resume"
    )
    assert_finished_epochs_on_disk(res, ["mlp"], 2)
    assert torch.load(res / "mlp" / "model.pth.tar", weights_only=True)["epoch"] == 2
    assert not (res / "results.json").exists()

    (tmp_path / "disk_full").unlink()  # space freed
    done = run_cli("run", path.name, "--resume", cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    resumed = trainlog(res, "mlp")
    assert list(resumed) == ["1", "2", "3", "4"]
    assert json.loads((res / "results.json").read_text())["mlp"]["folds"] == 1

    # the same run never interrupted (in this process, without the plugin) logs the same scores
    reference = write_run(tmp_path, epochs=4, res="ref", name="ref.toml")
    assert cli(capsys, "run", reference)[0] == 0
    assert without_times(resumed) == without_times(trainlog(tmp_path / "ref", "mlp"))


CUT_WRITE_PLUGIN = '''\
"""Test plugin: with CUT="<file name>:<n>", the n-th write of that file puts half of its bytes in
its temporary file, on disk, then SIGKILLs the process: a machine dying in the middle of a write."""
import os
import signal
from io import BytesIO

import izitorch.io as io

_name, _, _nth = os.environ.get("CUT", "").partition(":")
_real_stage_file, _seen = io._stage_file, [0]


def _stage_file(path, write, *spares):
    if path.name == _name:
        _seen[0] += 1
        if _seen[0] == int(_nth):
            def half_then_die(handle):
                whole = BytesIO()
                write(whole)
                data = whole.getvalue()
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return _real_stage_file(path, half_then_die, *spares)
    return _real_stage_file(path, write, *spares)


if _name:
    io._stage_file = _stage_file
'''


def test_a_kill_in_the_middle_of_a_write_keeps_the_previous_file_and_resume_completes(tmp_path, capsys):
    """Killed while epoch 2's resume state is half written (on the writer thread, while epoch 3
    trains): epoch 1's state is intact, and --resume ends with the uninterrupted run's results."""
    target = ".izitorch/fold_1.pth.tar"
    (tmp_path / "cut_write.py").write_text(CUT_WRITE_PLUGIN, encoding="utf-8")
    path = write_run(tmp_path, epochs=3, run={"flush_interval": 0}, plugins={"enable": ["cut_write.py"]})
    res = tmp_path / "res"
    file = res / target
    killed = run_cli("run", path.name, cwd=tmp_path, env={**ENV, "CUT": f"{file.name}:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    halves = list(file.parent.glob(f".{file.name}.*.tmp"))
    assert len(halves) == 1 and halves[0].stat().st_size > 0  # the cut write, left as it was
    with pytest.raises(Exception):  # noqa: B017 -- whatever torch says of half a file
        torch.load(halves[0], weights_only=True)
    assert torch.load(file, weights_only=True)["epoch"] == 1  # the previous version, whole

    resumed = run_cli("run", path.name, "--resume", cwd=tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert leftovers(res) == [] and not (res / ".izitorch.lock").exists()
    reference = write_run(tmp_path, epochs=3, res="ref", name="ref.toml")
    assert cli(capsys, "run", reference)[0] == 0
    ref = tmp_path / "ref"
    assert without_times(trainlog(res, "mlp")) == without_times(trainlog(ref, "mlp"))
    saved, expected = (torch.load(folder / "mlp" / "model.pth.tar", weights_only=True) for folder in (res, ref))
    assert saved["epoch"] == expected["epoch"] == 3
    assert_tensors_equal(saved["state_dict"], expected["state_dict"])
    assert (
        json.loads((res / "results.json").read_text())["mlp"]["mean"]["accuracy"] == json.loads((ref / "results.json").read_text())["mlp"]["mean"]["accuracy"]
    )


# -- nan_policy -----------------------------------------------------------------------------------

NAN_AT_EPOCH_2_STEP_3 = STEPS + 3
STOPPED = 'loss is nan at fold 1, epoch 2, step 3 (nan_policy = "stop")'


def test_nan_stop_stops_that_model_and_the_other_trains_as_if_alone(tmp_path, capsys):
    path = write_run(tmp_path, [{}, flaky(nan_from=NAN_AT_EPOCH_2_STEP_3)])
    res = tmp_path / "res"
    code, out, err = cli(capsys, "run", path)
    assert code == 0, err
    assert f"izitorch: flaky stopped: {STOPPED}" in out.splitlines()
    log = trainlog(res, "flaky")
    assert list(log) == ["1", "2", "3"]
    assert "stopped" not in log["1"]
    assert log["2"]["stopped"] == log["3"]["stopped"] == STOPPED
    assert "loss" in log["2"] and "loss" not in log["3"]  # two steps trained in epoch 2, none in 3
    assert all(torch.isfinite(torch.tensor(v)) for e in log.values() for v in e.values() if isinstance(v, float))
    metrics = json.loads((res / "flaky" / "test_metrics.json").read_text())
    assert metrics["stopped"] == STOPPED and metrics["epoch"] == 3
    checkpoint = torch.load(res / "flaky" / "model.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 2  # not rewritten once stopped
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert saved_fold(res)["slots"]["flaky"]["stopped"] == STOPPED

    mlp_log = trainlog(res, "mlp")
    assert list(mlp_log) == ["1", "2", "3"] and not any("stopped" in e for e in mlp_log.values())
    alone = write_run(tmp_path, res="alone", name="alone.toml")
    assert cli(capsys, "run", alone)[0] == 0
    assert without_times(mlp_log) == without_times(trainlog(tmp_path / "alone", "mlp"))
    summary = json.loads((res / "results.json").read_text())
    assert set(summary) == {"mlp", "flaky"}


@pytest.mark.parametrize("policy", ["stop", "skip_batch"])
def test_the_models_listed_around_a_diverging_one_train_as_if_it_did_not_diverge(tmp_path, capsys, policy):
    """Stepped one after another, the models before and after the diverging one (listed in the
    middle) log and save exactly what they do next to the same model that stays finite."""
    after = {"name": "after", "params": {"hidden": 8}}
    run = {"multi_model": "sequential", "nan_policy": policy}
    diverging = write_run(tmp_path, [{}, flaky(nan_from=NAN_AT_EPOCH_2_STEP_3), after], run=run)
    finite = write_run(tmp_path, [{}, flaky(), after], run=run, res="finite", name="finite.toml")
    assert cli(capsys, "run", diverging)[0] == 0
    assert cli(capsys, "run", finite)[0] == 0
    res, ref = tmp_path / "res", tmp_path / "finite"
    assert any("stopped" in entry or "skipped_batches" in entry for entry in trainlog(res, "flaky").values())  # it diverged
    for name in ("mlp", "after"):
        assert without_times(trainlog(res, name)) == without_times(trainlog(ref, name)), name
        saved, reference = (torch.load(folder / name / "model.pth.tar", weights_only=True) for folder in (res, ref))
        assert saved["epoch"] == reference["epoch"] == 3
        assert_tensors_equal(saved["state_dict"], reference["state_dict"])


def test_nan_skip_batch_skips_exactly_the_bad_batches_and_keeps_training(tmp_path, capsys):
    bad = [3, STEPS + 2, STEPS + 4]  # epoch 1 step 3, epoch 2 steps 2 and 4
    path = write_run(tmp_path, [{}, flaky(nan_at=bad)], run={"nan_policy": "skip_batch"})
    res = tmp_path / "res"
    code, out, err = cli(capsys, "run", path)
    assert code == 0, err
    assert "stopped" not in out
    log = trainlog(res, "flaky")
    assert [log[e].get("skipped_batches") for e in ("1", "2", "3")] == [1.0, 2.0, None]
    assert all("stopped" not in entry and torch.isfinite(torch.tensor(entry["loss"])) for entry in log.values())
    assert not any("skipped_batches" in entry for entry in trainlog(res, "mlp").values())
    checkpoint = torch.load(res / "flaky" / "model.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    assert "stopped" not in json.loads((res / "flaky" / "test_metrics.json").read_text())


def test_nan_raise_exits_1_naming_the_model_and_keeps_epoch_1(tmp_path):
    path = write_run(tmp_path, [{}, flaky(nan_from=NAN_AT_EPOCH_2_STEP_3)], run={"nan_policy": "raise"})
    done = run_cli("run", path.name, cwd=tmp_path, env=ENV)
    assert done.returncode == 1
    assert error_of(done.stderr) == (
        'm.toml: model flaky: loss is nan at fold 1, epoch 2, step 3; lower the learning rate, clip gradients, or set nan_policy = "stop" / "skip_batch"'
    )
    assert_finished_epochs_on_disk(tmp_path / "res", ["mlp", "flaky"], 1)


def test_when_every_model_stops_the_fold_ends_early(tmp_path, capsys):
    models = [flaky("a", nan_from=NAN_AT_EPOCH_2_STEP_3), flaky("b", hidden=8, nan_from=2 * STEPS + 2)]
    path = write_run(tmp_path, models, epochs=5)
    res = tmp_path / "res"
    code, out, err = cli(capsys, "run", path)
    assert code == 0, err
    lines = out.splitlines()
    assert "izitorch: fold 1 stopped: every model stopped (epoch 3)" in lines
    assert f"izitorch: a stopped: {STOPPED}" in lines
    assert 'izitorch: b stopped: loss is nan at fold 1, epoch 3, step 2 (nan_policy = "stop")' in lines
    assert not any(line.startswith("epoch 4/5") for line in lines)
    for name in ("a", "b"):
        assert list(trainlog(res, name)) == ["1", "2", "3"]
        assert "stopped" in json.loads((res / name / "test_metrics.json").read_text())
    state = saved_fold(res)
    assert state["stop_reason"] == "every model stopped (epoch 3)" and state["final_scores"] is not None
    assert set(json.loads((res / "results.json").read_text())) == {"a", "b"}


# -- one line, the right exit code, finished epochs kept ------------------------------------------


def test_out_of_memory_names_the_model_and_suggests_a_smaller_batch(tmp_path):
    path = write_run(tmp_path, [{}, flaky(oom_at=STEPS + 2)])
    done = run_cli("run", path.name, cwd=tmp_path, env=ENV)
    assert done.returncode == 1
    assert error_of(done.stderr) == (
        "m.toml: model flaky: forward failed on input of shape (32, 64): CUDA out of memory. "
        "Tried to allocate 2.00 GiB; out of memory: lower batch_size, or train fewer or "
        "smaller models at once"
    )
    assert_finished_epochs_on_disk(tmp_path / "res", ["mlp", "flaky"], 1)


def test_an_output_that_does_not_fit_the_criterion_names_model_shapes_and_num_classes(tmp_path, capsys):
    """Decided from shapes before the criterion runs: on CUDA the criterion itself would hit a
    device-side assert (a traceback and a lost CUDA context) instead of raising."""
    path = write_run(tmp_path, [{}, flaky(narrow_at=2 * STEPS + 1)])  # 3 classes from epoch 3 on
    code, _, err = cli(capsys, "run", path)
    assert code == 1
    assert error_of(err) == (
        f"{path}: model flaky: output (32, 3) has 3 classes but num_classes = 10 (target (32,)); check that the "
        "model's output size matches num_classes and that labels lie in [0, num_classes)"
    )
    assert_finished_epochs_on_disk(tmp_path / "res", ["mlp", "flaky"], 2)


def test_a_vectorized_group_whose_output_is_too_narrow_is_named_before_its_criterion_runs(tmp_path, capsys, monkeypatch):
    narrow = {"params": {"num_classes": 4}}
    path = write_run(tmp_path, [narrow, {**narrow, "name": "mlp2"}], run={"multi_model": "vectorized"})
    code, _, err = cli(capsys, "run", path)
    assert code == 1  # the dry run before training finds it first, model by model
    assert error_of(err) == (
        f"{path}: model mlp: output (4, 4) has 4 classes but num_classes = 10 (target (4,)); check that "
        "the model's output size matches num_classes and that labels lie in [0, num_classes)"
    )
    monkeypatch.setattr("izitorch.checks.forward_loss", lambda *args: (None, None))  # an output that narrows during training
    code, _, err = cli(capsys, "run", path, "--overwrite")
    assert code == 1
    assert error_of(err) == (
        f"{path}: models mlp, mlp2 (vectorized): output (2, 32, 4) has 4 classes but num_classes = 10; check that "
        "the model's output size matches num_classes and that labels lie in [0, num_classes)"
    )


def test_a_criterion_that_fails_on_the_output_is_named_with_both_shapes(tmp_path, capsys):
    mse = [{"criterion": "torch.nn:MSELoss"}]
    path = write_run(tmp_path, mse)
    code, _, err = cli(capsys, "run", path)
    assert code == 1
    assert error_of(err).startswith(f"{path}: model mlp: the criterion failed on output (4, 10) and target (4,): ")  # in the dry run
    assert error_of(err).endswith("; check that the model's output size matches num_classes and that labels lie in [0, num_classes)")


def test_labels_outside_num_classes_are_refused_before_training(tmp_path, capsys):
    path = write_run(tmp_path)
    code, _, err = cli(capsys, "run", path, "--set", "data.num_classes=5")
    assert code == 2
    assert error_of(err) == (
        f"{path}: data.num_classes: labels range from 0 to 9 but num_classes = 5; labels must lie in [0, num_classes): fix num_classes or the labels"
    )
    assert not (tmp_path / "res" / "mlp").exists()


@pytest.mark.parametrize(
    "sets, code, expected",
    [
        (['data.dataset="models.py:empty"', "data.params={}"], 2, "{path}: data.dataset: the dataset is empty; check its path or parameters"),
        (['data.dataset="models.py:broken"'], 2, "{path}: data.dataset: models.py:broken(...) raised FileNotFoundError: data/train.csv"),
        (
            ["data.params.limit=5", "data.train_ratio=0.1"],
            2,
            "{path}: data.train_ratio: 0.1 leaves 0 training and 5 held-out samples out of 5; use more data or a ratio that leaves both sides non-empty",
        ),
        (
            ["data.params.limit=5", "data.train_ratio=0.9", "data.validation=true"],
            2,
            "{path}: data.train_ratio: 0.9 leaves 4 training and 1 held-out samples out of 5; use more data or a ratio that leaves both sides non-empty",
        ),
        (["data.params.limit=5", "plugins.kfold.k=10"], 2, "{path}: plugins.kfold.k: k = 10 needs at least 10 samples, the dataset has 5; lower k"),
        (["run.batch_size=0"], 2, "{path}: run.batch_size: expected an integer >= 1, got 0"),
        (["run.batch_size=-3"], 2, "{path}: run.batch_size: expected an integer >= 1, got -3"),
        (["data.train_ratio=0"], 2, "{path}: data.train_ratio: expected a number between 0 and 1 (exclusive), got 0.0"),
        (["data.train_ratio=1"], 2, "{path}: data.train_ratio: expected a number between 0 and 1 (exclusive), got 1.0"),
        (['models[0].model="models.py:Boom"'], 2, "{path}: models[0].model: models.py:Boom(...) raised ValueError: hidden must be even"),
        (
            ['data.dataset="models.py:Triples"', "data.params={}"],
            2,
            '{path}: data.dataset: "models.py:Triples" yields items of 3 elements; izitorch expects (input, target) pairs from __getitem__',
        ),
        (
            ['data.dataset="models.py:Bare"', "data.params={}"],
            2,
            '{path}: data.dataset: "models.py:Bare" yields Tensor items; izitorch expects (input, target) pairs from __getitem__',
        ),
    ],
)
def test_one_line_errors_before_or_at_the_first_step(tmp_path, capsys, sets, code, expected):
    path = write_run(tmp_path, epochs=1)
    args = [arg for s in sets for arg in ("--set", s)]
    got, _, err = cli(capsys, "run", path, *args)
    assert got == code
    assert error_of(err) == expected.format(path=path)
    res = tmp_path / "res"
    assert not (res / ".izitorch.lock").exists()
    assert not (res / "mlp" / "trainlog.json").exists() and not list(res.glob(".izitorch/*.pth.tar"))  # no epoch saved


def test_resuming_with_another_architecture_is_refused_naming_the_key(tmp_path, capsys):
    path = write_run(tmp_path, epochs=2)
    res = tmp_path / "res"
    assert cli(capsys, "run", path)[0] == 0
    files = {p: p.read_bytes() for p in res.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "run", path, "--resume", "--set", "models[0].params.hidden=32", "--set", "run.epochs=3")
    assert code == 2
    assert error_of(err) == (
        f"{path}: cannot resume: models[0].params.hidden changed (16 -> 32) since the interrupted run; restore it, or start over with --overwrite"
    )
    assert {p: p.read_bytes() for p in res.rglob("*") if p.is_file()} == files


def test_a_state_of_the_previous_format_still_resumes_and_an_unknown_one_is_refused(tmp_path, capsys):
    """Format 3 kept the fingerprint and the trainlog as nested data (format 4: JSON text); such a
    state must still be checked against the manifest and resumed, and a format this version does
    not know refused."""
    path = write_run(tmp_path, epochs=2)
    res = tmp_path / "res"
    assert cli(capsys, "run", path)[0] == 0
    state_file = res / ".izitorch" / "fold_1.pth.tar"
    state = saved_state(res)
    assert state["format"] == 5 and isinstance(state["fingerprint"], str)
    fold = state["folds"][0]  # formats 3 and 4 kept a sequential fold's entries at the top
    state = {
        "format": 3,
        "fingerprint": json.loads(state["fingerprint"]),
        "fold": 0,
        "groups": state["groups"],
        "rng": state["rng"],
        **{key: fold[key] for key in ("epoch", "stop_reason", "final_scores", "slots", "plugins")},
    }
    state["plugins"]["trainlog"] = {"logs": {name: json.loads(text) for name, text in state["plugins"]["trainlog"]["texts"].items()}}
    torch.save(state, state_file)
    code, _, err = cli(capsys, "run", path, "--resume", "--set", "models[0].params.hidden=32", "--set", "run.epochs=3")
    assert code == 2 and "cannot resume: models[0].params.hidden changed (16 -> 32)" in error_of(err)
    code, _, err = cli(capsys, "run", path, "--resume", "--set", "run.epochs=3")
    assert code == 0, err
    log = trainlog(res, "mlp")
    assert list(log) == ["1", "2", "3"] and saved_state(res)["epoch"] == 3
    assert log["1"] == state["plugins"]["trainlog"]["logs"]["mlp"]["1"]  # the earlier epochs come from the old state
    state = saved_state(res)
    state["format"] = 99
    torch.save(state, state_file)
    code, _, err = cli(capsys, "run", path, "--resume")
    assert code == 2 and error_of(err) == (f"{state_file}: written by another izitorch version (format 99); start over with --overwrite")


def test_restoring_a_state_from_another_architecture_names_the_model(tmp_path, capsys):
    path = write_run(tmp_path, epochs=1)
    assert cli(capsys, "run", path)[0] == 0
    state = saved_state(tmp_path / "res")
    config = izitorch.load_manifest(path, ["models[0].params.hidden=32"])
    slot = build_slot(config.models[0], 0, torch.device("cpu"), config.base_dir)
    run = Run(config, pm=None, device=torch.device("cpu"), res_dir=tmp_path / "res")
    fold = Fold(0, 1, Split(train=list(range(8)), test=[8, 9]), {}, [slot])
    cohort = Cohort([fold], [LoneStack(slot, None)], {}, tmp_path / "state.pth.tar")
    with pytest.raises(IzitorchError) as info:
        resume.restore(run, cohort, state)
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        "model mlp: the saved state does not fit the model (size mismatch for net.0.weight: copying a param "
        "with shape torch.Size([16, 64]) from checkpoint, the shape in current model is torch.Size([32, 64])); "
        "the architecture changed since the interrupted run: start over with --overwrite"
    )


def test_a_model_file_changed_between_run_and_resume_is_refused(tmp_path, capsys):
    """Same manifest, but the model's code now builds another architecture: the state does not fit."""
    path = write_run(tmp_path, [flaky("net")], epochs=2)
    res = tmp_path / "res"
    assert cli(capsys, "run", path)[0] == 0
    log = trainlog(res, "net")
    wider = MODELS.replace("nn.Linear(64, hidden)", "nn.Linear(64, 2 * hidden)")
    (tmp_path / "models.py").write_text(wider.replace("nn.Linear(hidden, num_classes)", "nn.Linear(2 * hidden, num_classes)"))
    done = run_cli("run", path.name, "--resume", "--set", "run.epochs=3", cwd=tmp_path, env=ENV)
    assert done.returncode == 2
    assert error_of(done.stderr) == (
        "m.toml: model net: the saved state does not fit the model (size mismatch for net.0.weight: "
        "copying a param with shape torch.Size([16, 64]) from checkpoint, the shape in current "
        "model is torch.Size([32, 64])); the architecture changed since the interrupted run: "
        "start over with --overwrite"
    )
    assert trainlog(res, "net") == log and saved_state(res)["epoch"] == 2


# -- files written behind training (run.background_writes) -----------------------------------------


@pytest.mark.parametrize("background, thread", [(True, "izitorch-writer"), (False, "MainThread")])
def test_a_run_writes_its_files_behind_training_unless_told_not_to(tmp_path, capsys, monkeypatch, background, thread):
    seen = replaced_by_thread(monkeypatch)
    path = write_run(tmp_path, run={"background_writes": background})
    code, _, err = cli(capsys, "run", path)
    assert code == 0, err
    threads = {name: {t for n, t in seen if n == name} for name, _ in seen}
    for name in ("conf.json", "trainlog.json", "model.pth.tar", "fold_1.pth.tar", "test_metrics.json", "results.json"):
        assert threads[name] == {thread}, (name, threads[name])
    assert list(trainlog(tmp_path / "res", "mlp")) == ["1", "2", "3"]  # every file is there when run() returns
    assert saved_fold(tmp_path / "res")["final_scores"] is not None
    assert leftovers(tmp_path / "res") == []


def test_a_full_disk_met_by_the_writer_thread_stops_the_run_and_nothing_after_it_lands(tmp_path, capsys, monkeypatch):
    """Epoch 3's checkpoint fails on the writer thread: exit 1 with the one line, and epoch 3's
    resume state, queued after it, is not written; --resume then completes the run."""
    path = write_run(tmp_path, epochs=3, run={"flush_interval": 0})
    res = tmp_path / "res"
    failed_on = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "model.pth.tar" and torch.load(src, weights_only=True)["epoch"] == 3:
            failed_on.append(threading.current_thread().name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(izio.os, "replace", replace)
    code, _, err = cli(capsys, "run", path)
    assert code == 1 and failed_on == ["izitorch-writer"]
    assert error_of(err) == (
        f"{path}: no space left on the device while writing {res / 'mlp' / 'model.pth.tar'}; "
        "the previous version is intact: free some space, then continue with --resume"
    )
    assert torch.load(res / "mlp" / "model.pth.tar", weights_only=True)["epoch"] == 2
    assert saved_state(res)["epoch"] == 2
    assert leftovers(res) == [] and not (res / ".izitorch.lock").exists() and not (res / "results.json").exists()
    monkeypatch.undo()
    code, _, err = cli(capsys, "run", path, "--resume")
    assert code == 0, err
    assert torch.load(res / "mlp" / "model.pth.tar", weights_only=True)["epoch"] == 3
    assert list(trainlog(res, "mlp")) == ["1", "2", "3"]


# -- files held between flushes (run.flush_interval) ------------------------------------------------


def test_a_run_flushes_its_files_at_the_first_epoch_end_past_the_interval(tmp_path, capsys, monkeypatch):
    """A clock read once when the run starts and once at each epoch end moves one second a read:
    with an interval of 2.5 s, nothing lands before epoch 3 ends; then epoch 3's files land
    together (the resume state last), and the rest when the run ends."""
    ticks = itertools.count()
    monkeypatch.setattr(held, "monotonic", lambda: float(next(ticks)))  # start 0, epochs 1..4 at 1..4, the final state at 5
    landed: list[tuple[str, Any]] = []
    real_replace = os.replace

    def replace(src, dst):
        name = Path(dst).name
        content = None
        if name == "fold_1.pth.tar":
            content = torch.load(src, weights_only=True)["epoch"]
        elif name == "trainlog.json":
            content = list(json.loads(Path(src).read_text()))
        landed.append((name, content))
        real_replace(src, dst)

    monkeypatch.setattr(izio.os, "replace", replace)
    path = write_run(tmp_path, epochs=4, run={"flush_interval": 2.5})
    code, _, err = cli(capsys, "run", path)
    assert code == 0, err
    first = [name for name, _ in landed].index("fold_1.pth.tar")
    assert landed[: first + 1] == [
        ("conf.json", None),
        ("manifest.toml", None),
        ("Dataset_split.pkl", None),
        ("conf.json", None),  # mlp/conf.json
        ("trainlog.json", ["1", "2", "3"]),  # the first trainlog on disk is epoch 3's
        ("model.pth.tar", None),
        ("fold_1.pth.tar", 3),
    ]
    assert [content for name, content in landed if name == "fold_1.pth.tar"] == [3, 4]  # epoch 4's and the final one: one file
    assert [content for name, content in landed if name == "trainlog.json"] == [["1", "2", "3"], ["1", "2", "3", "4"]]
    assert saved_state(tmp_path / "res")["final"] and torch.load(tmp_path / "res" / "mlp" / "model.pth.tar", weights_only=True)["epoch"] == 4


MUTATOR = '''\
"""Keeps a state that it changes, with the model and its optimizer, after the run's last save
(before the run's files are flushed); records what they were at that save in record.pkl."""
import copy
import pickle
from pathlib import Path

import torch

from izitorch import hookimpl

DATA = {"values": [1, 2], "tensor": torch.zeros(3)}


@hookimpl
def izitorch_state_dict(run):
    return {"mutable": DATA}


@hookimpl
def izitorch_run_finish(run, results):
    slot = run.slots[0]
    record = {
        "plugin": copy.deepcopy(DATA),
        "model": {key: value.clone() for key, value in slot.model.state_dict().items()},
        "optimizer": copy.deepcopy(slot.optimizer.state_dict()),
        "rng": torch.get_rng_state(),
    }
    Path(__file__).with_name("record.pkl").write_bytes(pickle.dumps(record))
    DATA["values"].append(3)
    DATA["tensor"] += 1
    with torch.no_grad():
        for parameter in slot.model.parameters():
            parameter.add_(1)
    for state in slot.optimizer.state.values():
        for value in state.values():
            value.add_(1)
    for group in slot.optimizer.param_groups:
        group["lr"], group["betas"] = 123.0, (0.5, 0.5)
    torch.rand(100)
'''


def test_the_files_flushed_later_hold_what_was_saved_at_the_call(tmp_path, capsys, monkeypatch):
    """The resume state and the checkpoint are serialised when the run ends, after a plugin
    changed in place its own state, the model's weights, the optimizer's state and
    hyper-parameters and the generator: the files hold the values of the last save."""
    monkeypatch.setattr(held, "monotonic", lambda: 0.0)  # the interval never passes
    (tmp_path / "mutator.py").write_text(MUTATOR, encoding="utf-8")
    saved = []
    monkeypatch.setattr(izio.torch, "save", lambda obj, f, *a, real=torch.save, **k: (saved.append(type(obj).__name__), real(obj, f, *a, **k))[1])
    path = write_run(tmp_path, epochs=2, run={"flush_interval": 3600.0}, plugins={"enable": ["mutator.py"]})
    code, _, err = cli(capsys, "run", path)
    assert code == 0, err
    # the checkpoint and the state, each serialised once, at the end (pickling the record of
    # tensors calls torch.save on their storages)
    assert [name for name in saved if name != "TypedStorage"] == ["dict", "dict"]
    record = pickle.loads((tmp_path / "record.pkl").read_bytes())
    fold = saved_fold(tmp_path / "res")
    assert fold["plugins"]["mutable"]["values"] == [1, 2] and torch.equal(fold["plugins"]["mutable"]["tensor"], torch.zeros(3))
    assert torch.equal(saved_state(tmp_path / "res")["rng"]["torch"], record["rng"])
    checkpoint = torch.load(tmp_path / "res" / "mlp" / "model.pth.tar", weights_only=True)
    for model, optimizer in [(fold["slots"]["mlp"]["model"], fold["slots"]["mlp"]["optimizer"]), (checkpoint["state_dict"], checkpoint["optimizer"])]:
        assert_tensors_equal(model, record["model"])
        assert deep_equal(optimizer, record["optimizer"])


def test_a_run_may_resume_with_another_flush_interval(tmp_path):
    """The interval changes when files reach the disk, not what they hold: the resume fingerprint
    leaves it out (a manifest's and the Rack's)."""
    path = write_run(tmp_path)
    configs = [izitorch.load_manifest(path, [f"run.flush_interval={value}"]) for value in (0, 30, 1e9)]
    assert configs[0].run.flush_interval == 0 and configs[2].run.flush_interval == 1e9
    assert resume.fingerprint(configs[0]) == resume.fingerprint(configs[1]) == resume.fingerprint(configs[2])
    assert not any("flush_interval" in key for key in resume.fingerprint(configs[0]))
    assert {"run.flush_interval", "args.flush_interval"} <= resume.TOLERATED
