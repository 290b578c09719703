"""The ``tensorboard`` plugin: ``res_dir/tensorboard`` holds every epoch's values of every model
and fold (the trainlogs' values, read back with TensorBoard's own reader), each model's
hyper-parameters in the hparams view, only files the run recorded as its own, and after a kill -9
and ``--resume`` the same curves as an uninterrupted run (no epoch twice)."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import numpy as np
import pytest

from conftest import cli, error_of, run_cli

pytest.importorskip("tensorboard", reason='the tensorboard extra: pip install "izitorch[tensorboard]"')

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

SWEEP = [{"name": "mlp", "sweep": {"optimizer.lr": [1e-2, 3e-3]}}]
NAMES = ["mlp_lr0.01", "mlp_lr0.003"]


def scalars(folder) -> list[tuple[str, int, float]]:
    """Every scalar TensorBoard shows for one run folder, as (tag, step, value), sorted; what a
    resumed writer purged is not shown."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return sorted((tag, event.step, event.value) for tag in events.Tags()["scalars"] for event in events.Scalars(tag))


def hparams(folder) -> dict[str, dict]:
    """The hparams view's records of one run folder: the hyper-parameters of its session and
    the metrics of the experiment."""
    events = EventAccumulator(str(folder))
    events.Reload()
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in events.PluginTagToContent("hparams").items()}
    start = content["_hparams_/session_start_info"].session_start_info.hparams
    values = {key: value.string_value or value.number_value for key, value in start.items()}
    metrics = [info.name.tag for info in content["_hparams_/experiment"].experiment.metric_infos]
    return {"hparams": values, "metrics": metrics}


def expected(folder, test_metrics) -> list[tuple[str, int, float]]:
    """What a model's trainlog.json and test_metrics.json say, as TensorBoard scalars (float32)."""
    out = []
    log = json.loads((folder / "trainlog.json").read_text())
    for epoch, entry in log.items():
        evaluated = "val" if any(key.startswith("val_") for key in entry) else "test"
        for key, value in entry.items():
            if key in ("lr", "inference_time", "eval_time"):
                tag = "lr" if key == "lr" else f"{key}/{evaluated}"
            else:
                prefix = next((p for p in ("val_", "test_") if key.startswith(p)), "")
                tag = f"{key[len(prefix) :]}/{prefix[:-1] or 'train'}"
            out.append((tag, int(epoch), float(np.float32(value))))
    final = json.loads((folder / "test_metrics.json").read_text())
    out += [(f"{key}/final_test", int(max(log, key=int)), float(np.float32(final[key]))) for key in test_metrics]
    return sorted(out)


@pytest.mark.parametrize("layout", ["holdout", "kfold"])
def test_scalars_and_hparams_of_every_model_and_fold(manifest, capsys, layout):
    kfold = {"plugins.enable": ["tensorboard", "kfold"], "plugins.kfold": {"k": 2}}
    settings = kfold if layout == "kfold" else {"plugins.enable": ["tensorboard"], "data.validation": True}
    path = manifest(settings, models=SWEEP)
    assert cli(capsys, "run", path)[0] == 0
    res = path.parent / "res"
    folds = [f"FOLD_{k}" for k in (1, 2)] if layout == "kfold" else [""]
    runs = sorted(p.parent.relative_to(res / "tensorboard").as_posix() for p in (res / "tensorboard").rglob("events.out.tfevents.*"))
    assert runs == sorted(f"{name}/{fold}".rstrip("/") for name in NAMES for fold in folds)  # one writer per model and fold
    for name, lr in zip(NAMES, (1e-2, 3e-3)):
        for fold in folds:
            got = hparams(res / "tensorboard" / name / fold)
            final = [tag.split("/")[0] for tag in got["metrics"]]
            assert final[:2] == ["loss", "accuracy"] and all(tag.endswith("/final_test") for tag in got["metrics"])
            assert scalars(res / "tensorboard" / name / fold) == expected(res / name / fold, final)
            hyper = {"optimizer": "Adam", "optimizer.lr": lr, "params.hidden": 16, "model": "MLP", "criterion": "CrossEntropyLoss"}
            assert got["hparams"] == {**hyper, "run.batch_size": 32, "run.epochs": 2, **({"fold": int(fold[-1])} if fold else {})}


# a local plugin that SIGKILLs the run while the resume state of KILL_AT="fold,epoch" is being
# gathered: that epoch's scalars are on disk, its state is not, so the resume trains it again
KILL_BEFORE_STATE = """\
import os, signal
from izitorch import hookimpl

LAST = []


@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    LAST.append(f"{fold.index + 1},{epoch}")


@hookimpl
def izitorch_state_dict(run):
    if LAST and os.environ.get("KILL_AT") == LAST[-1]:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_then_resumed_run_shows_the_same_curves(manifest, tmp_path, capsys):
    (tmp_path / "killer.py").write_text(KILL_BEFORE_STATE, encoding="utf-8")
    settings = {"run.background_writes": False, "plugins.enable": ["kfold", "tensorboard", "killer.py"], "plugins.kfold": {"k": 2}}
    models = [{"name": "a"}, {"name": "b", "optimizer": {"lr": 3e-3}}]
    whole = manifest({**settings, "run.res_dir": str(tmp_path / "whole")}, models=models, name="whole.toml")
    assert cli(capsys, "run", whole)[0] == 0  # in this process, as the resume below: KILL_AT is not set here
    killed = manifest({**settings, "run.res_dir": str(tmp_path / "killed")}, models=models, name="killed.toml")
    done = run_cli("run", str(killed), cwd=tmp_path, env={"KILL_AT": "2,2", "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr
    fold2 = tmp_path / "killed" / "tensorboard" / "a" / "FOLD_2"
    assert ("loss/train", 2) in {(tag, step) for tag, step, _ in scalars(fold2)}  # the epoch the resume trains again is on disk
    assert cli(capsys, "run", killed, "--resume")[0] == 0
    assert len(list(fold2.glob("events.out.tfevents.*"))) == 2  # the killed writer's file and the resumed one's
    for name in ("a", "b"):
        for fold in ("FOLD_1", "FOLD_2"):
            timeless = [(tag, step, value) for tag, step, value in scalars(tmp_path / "whole" / "tensorboard" / name / fold) if "_time/" not in tag]
            resumed = [(tag, step, value) for tag, step, value in scalars(tmp_path / "killed" / "tensorboard" / name / fold) if "_time/" not in tag]
            assert resumed == timeless  # a list: an epoch shown twice would differ
            assert hparams(tmp_path / "killed" / "tensorboard" / name / fold) == hparams(tmp_path / "whole" / "tensorboard" / name / fold)


def test_a_resumed_writer_file_sorts_after_the_killed_ones_even_within_their_second(tmp_path):
    """TensorBoard reads a folder's event files in the order of their names, which start with
    the second they were made in: the resumed writer's file must come after the killed one's."""
    from izitorch.plugins.tensorboard import open_writer

    # made this very second on this host, by a process whose number sorts after any real one
    killed = tmp_path / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.9999999.0"
    killed.write_bytes(b"")
    writer = open_writer(tmp_path, purge_step=2)
    writer.close()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names[0] == killed.name and len(names) == 2


def test_overwrite_replaces_the_event_files_and_refuses_a_foreign_one(manifest, capsys):
    path = manifest({"plugins.enable": ["tensorboard"]})
    res = path.parent / "res"
    assert cli(capsys, "run", path)[0] == 0
    first = sorted(res.rglob("events.out.tfevents.*"))
    assert len(first) == 1 and first[0].parent == res / "tensorboard" / "mlp"
    mine = res / "tensorboard" / "mlp" / "events.out.tfevents.mine"
    mine.write_bytes(b"a file izitorch did not write")
    code, _, err = cli(capsys, "run", path, "--overwrite")
    assert code == 2 and "(tensorboard/mlp/events.out.tfevents.mine)" in error_of(err)
    assert sorted(res.rglob("events.out.tfevents.*")) == sorted([*first, mine])  # nothing deleted
    mine.unlink()
    assert cli(capsys, "run", path, "--overwrite")[0] == 0
    again = sorted(res.rglob("events.out.tfevents.*"))
    assert len(again) == 1 and again[0] not in first and again[0].parent == res / "tensorboard" / "mlp"


ENDS_IN_EPOCH_2 = """\
import signal
from izitorch import hookimpl


@hookimpl
def izitorch_epoch_start(run, fold, epoch):
    if epoch == 2:
        run.stop_flag.signum = signal.SIGINT  # what Ctrl-C does: the loop stops at the next batch
"""


def test_an_interrupted_run_closes_its_writers_with_its_epochs_on_disk(manifest, capsys, tmp_path):
    (tmp_path / "ctrl_c.py").write_text(ENDS_IN_EPOCH_2, encoding="utf-8")
    path = manifest({"run.epochs": 3, "plugins.enable": ["tensorboard", "ctrl_c.py"]})
    code, _, err = cli(capsys, "run", path)
    assert code != 0 and "interrupted by SIGINT" in err
    assert {step for tag, step, _ in scalars(path.parent / "res" / "tensorboard" / "mlp")} == {1}
    assert not [thread for thread in threading.enumerate() if type(thread).__module__.startswith("tensorboard")]  # every writer closed


@pytest.mark.parametrize("command", ["run", "validate"])
def test_without_tensorboard_installed_one_line_names_the_extra(manifest, capsys, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it fails
    path = manifest({"plugins.enable": ["tensorboard"]})
    code, _, err = cli(capsys, command, path)
    assert code == 2
    assert error_of(err) == f'{path}: plugins.enable: the tensorboard plugin needs TensorBoard: pip install "izitorch[tensorboard]"'
    assert not (path.parent / "res").exists()


def test_a_key_in_its_table_is_refused_not_ignored(manifest, capsys):
    path = manifest({"plugins.enable": ["tensorboard"], "plugins.tensorboard": {"flush_secs": 5}})
    code, _, err = cli(capsys, "validate", path)
    assert (code, error_of(err)) == (2, f'{path}: plugins.tensorboard.flush_secs: unknown key "flush_secs"')
