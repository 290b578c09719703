"""Runs launched by torchrun with ``distributed = "models"``: the stacks and folds spread over the
ranks give each model exactly what one process gives it, resume with any number of ranks, and
what cannot run under torchrun yet is refused in one line.

Two-process runs go through ``python -m torch.distributed.run`` (torchrun) on the CPU with gloo;
the checks that need no second process join a process group of one in this process.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli, error_of, make_manifest
from izitorch import distributed
from izitorch.cli import main
from izitorch.errors import IzitorchError
from izitorch.ownership import LOCK_NAME, Ledger

RANK_RECORDER = """\
import os
from pathlib import Path
from izitorch import hookimpl

@hookimpl
def izitorch_fold_start(run, fold):
    names = "+".join(slot.name for slot in fold.slots)
    Path(os.environ["RANK_RECORD"], f"rank{os.environ.get('RANK', '-')}.fold{fold.index + 1}.{names}").touch()
"""

RANK_KILLER = """\
import os, signal, time
from izitorch import hookimpl

sent = []

@hookimpl
def izitorch_batch_finish(run, fold, step, losses):
    if os.environ.get("RANK") == os.environ.get("KILL_RANK") and fold.epoch == 2 and step == 2 and not sent:
        sent.append(True)
        if os.environ.get("KILL_HOW") == "launcher":  # SIGTERM to torchrun, which passes it to every rank
            os.kill(os.getppid(), signal.SIGTERM)
            # until torchrun has passed it on to this rank: a busy machine could otherwise finish
            # epoch 2 first (under distributed = "data" the other rank waits for this one's step)
            deadline = time.monotonic() + 60
            while getattr(run.stop_flag, "signum", None) is None and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
"""

# "a" and "b" share an architecture (one vectorized group), "c" trains alone: 2 stacks x 2 folds
MODELS = [
    {"name": "a"},
    {"name": "b", "optimizer": {"class": "torch.optim:Adam", "lr": 3e-3}},
    {"name": "c", "params": {"hidden": 8, "layers": 2}},
]
TIMES = {"train_step_time", "inference_time", "train_time", "eval_time"}


def spread_manifest(folder: Path, *plugins: str, **tables) -> Path:
    (folder / "recorder.py").write_text(RANK_RECORDER)
    (folder / "killer.py").write_text(RANK_KILLER)
    return make_manifest(
        folder,
        models=MODELS,
        run={"epochs": 3, "background_writes": False},
        plugins={"enable": ["recorder.py", *plugins], "kfold": {"k": 2}},
        **tables,
    )


def torchrun(manifest: Path, *args: str, nproc: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "izitorch", "run", str(manifest), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def become_the_only_rank(monkeypatch) -> None:
    """This process as the only rank torchrun started (a process group of one, gloo)."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def one_rank(monkeypatch):
    become_the_only_rank(monkeypatch)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same manifest trained in one process, without torchrun: what every spread run must equal."""
    folder = tmp_path_factory.mktemp("single")
    (folder / "records").mkdir()
    manifest = spread_manifest(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANK_RECORD", str(folder / "records"))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            patch.delenv(name, raising=False)
        assert main(["run", str(manifest)]) == 0
    return folder / "res"


def assert_same_models(run: Path, reference: Path) -> None:
    """Every model's weights and optimizer state, trainlog (times aside), confusion matrix and
    final scores equal the reference run's; the files are the same ones."""

    def files(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".izitorch" not in p.parts}

    assert files(run) == files(reference)
    checked = 0
    for model in ("a", "b", "c"):
        for fold in (1, 2):
            here, there = run / model / f"FOLD_{fold}", reference / model / f"FOLD_{fold}"
            mine, theirs = (torch.load(f / "model.pth.tar", weights_only=False) for f in (here, there))
            assert mine["epoch"] == theirs["epoch"]
            for key, value in theirs["state_dict"].items():
                assert torch.equal(mine["state_dict"][key], value), (model, fold, key)
            for index, state in theirs["optimizer"]["state"].items():
                for key, value in state.items():
                    assert torch.equal(torch.as_tensor(mine["optimizer"]["state"][index][key]), torch.as_tensor(value)), (model, fold, key)
            logs = [json.loads((f / "trainlog.json").read_text()) for f in (here, there)]
            for epochs in logs:
                for entry in epochs.values():
                    for phase in [entry, *[v for v in entry.values() if isinstance(v, dict)]]:
                        for key in TIMES & set(phase):
                            del phase[key]
            assert logs[0] == logs[1] and len(logs[1]) == 3
            matrices = [pickle.loads((f / "confusion_matrix.pkl").read_bytes()) for f in (here, there)]
            assert (matrices[0] == matrices[1]).all() and matrices[1].sum() > 0
            checked += 1
    assert checked == 6
    results = [json.loads((root / "results.json").read_text()) for root in (run, reference)]
    for summary in results:
        for entry in summary.values():
            for stat in entry.values():
                if isinstance(stat, dict):
                    for key in TIMES & set(stat):
                        del stat[key]
    assert results[0] == results[1]
    assert not list(Ledger(run).foreign())  # every file the ranks wrote is recorded as the run's


def test_spread_gives_each_rank_the_least_loaded_share():
    costs = [5.0, 1.0, 4.0, 3.0, 3.0]
    shares = distributed.spread(costs, 2)
    assert sorted(i for share in shares for i in share) == list(range(5))
    # longest first: 5 -> r0, 4 -> r1, 3 (index 3) -> r1 (4 < 5), 3 (index 4) -> r0 (5 < 7), 1 -> r0 (8 vs 7: r1)
    assert shares == [[0, 4], [1, 2, 3]]
    assert distributed.spread(costs, 2) == shares  # the same on every rank
    assert distributed.spread(costs, 8)[5:] == [[], [], []]


def test_two_ranks_train_each_model_as_one_process_does(tmp_path, reference):
    records = tmp_path / "records"
    records.mkdir()
    manifest = spread_manifest(tmp_path)
    done = torchrun(manifest, env={"RANK_RECORD": str(records)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_models(tmp_path / "res", reference)
    # every unit (stack x fold) trained once, on one rank, and both ranks trained
    units = sorted(p.name.split(".", 1)[1] for p in records.iterdir())
    assert units == ["fold1.a+b", "fold1.c", "fold2.a+b", "fold2.c"]
    assert {p.name.split(".")[0] for p in records.iterdir()} == {"rank0", "rank1"}
    # rank 0 alone printed: one final table
    assert done.stdout.count("final test scores:") == 1


def test_a_killed_rank_then_resume_with_another_world_size_gives_the_uninterrupted_run(tmp_path, reference, capsys, monkeypatch):
    (tmp_path / "records").mkdir()
    manifest = spread_manifest(tmp_path, "killer.py")
    env = {"RANK_RECORD": str(tmp_path / "records"), "KILL_RANK": "1"}
    killed = torchrun(manifest, env=env)
    assert killed.returncode != 0
    # rank 0 stopped on torchrun's SIGTERM (still training), or saw rank 1 vanish (its share done)
    assert "interrupted by SIGTERM; every finished epoch is saved" in killed.stderr or "another rank stopped before it finished its share" in killed.stderr
    assert "exitcode  : -9" in killed.stderr  # torchrun's summary names the killed rank
    states = sorted(p.name for p in (tmp_path / "res" / ".izitorch").glob("*.pth.tar"))
    assert states and all(name.startswith("fold_") and ".stack_" in name for name in states)
    assert not (tmp_path / "res" / "results.json").exists()

    # resumed without torchrun: refused, nothing changed
    monkeypatch.setenv("RANK_RECORD", str(tmp_path / "records"))
    code, _, err = cli(capsys, "run", manifest, "--resume")
    assert code == 2 and "resume it under torchrun" in error_of(err) and "run.distributed" in error_of(err)
    assert sorted(p.name for p in (tmp_path / "res" / ".izitorch").glob("*.pth.tar")) == states

    # resumed under torchrun with one process instead of two
    become_the_only_rank(monkeypatch)
    code, out, err = cli(capsys, "run", manifest, "--resume")
    assert code == 0, err
    assert_same_models(tmp_path / "res", reference)


def test_sigterm_to_torchrun_stops_every_rank_which_saves_and_resumes(tmp_path, reference, capsys, monkeypatch):
    (tmp_path / "records").mkdir()
    manifest = spread_manifest(tmp_path, "killer.py")
    stopped = torchrun(manifest, env={"RANK_RECORD": str(tmp_path / "records"), "KILL_RANK": "1", "KILL_HOW": "launcher"})
    assert stopped.returncode != 0
    # rank 1 stopped after its step and said so; rank 0 too, or it saw rank 1 go once its share was done
    assert "izitorch: error: rank 1: interrupted by SIGTERM; every finished epoch is saved" in stopped.stderr, stopped.stderr[-3000:]
    assert "izitorch: error: interrupted by SIGTERM" in stopped.stderr or "izitorch: error: another rank stopped" in stopped.stderr
    assert "torchrun --nproc_per_node=<N> -m izitorch run" in stopped.stderr
    assert not (tmp_path / "res" / "results.json").exists()
    monkeypatch.setenv("RANK_RECORD", str(tmp_path / "records"))
    become_the_only_rank(monkeypatch)
    code, _, err = cli(capsys, "run", manifest, "--resume")
    assert code == 0, err
    assert_same_models(tmp_path / "res", reference)


def test_a_single_process_run_is_not_resumed_under_torchrun(tmp_path, capsys, monkeypatch):
    manifest = make_manifest(tmp_path, run={"epochs": 1})
    assert cli(capsys, "run", manifest)[0] == 0
    become_the_only_rank(monkeypatch)
    code, _, err = cli(capsys, "run", manifest, "--resume", "--set", "run.epochs=2")
    assert code == 2
    assert 'this run was trained in one process, not with distributed = "data"; resume it as it ran: without torchrun' in error_of(err)
    code, _, err = cli(capsys, "run", manifest, "--resume", "--set", 'run.distributed="models"')
    assert code == 2
    assert 'this run was not spread over processes (distributed = "models"); resume it as it ran: without torchrun' in error_of(err)


@pytest.mark.parametrize(
    ("tables", "key", "words"),
    [
        ({"plugins": {"csv": {}}}, "plugins.csv", "the csv plugin writes one log for the whole run"),
        ({"plugins": {"kfold": {"k": 2, "parallel": True}}}, "plugins.kfold.parallel", "set parallel = false"),
    ],
)
def test_what_cannot_run_under_torchrun_is_one_line(tmp_path, capsys, one_rank, tables, key, words):
    manifest = make_manifest(tmp_path, **tables)
    code, _, err = cli(capsys, "run", manifest)
    message = error_of(err)
    assert code == 2 and key in message and words in message, message
    assert not (tmp_path / "res" / "conf.json").exists()


def test_outside_torchrun_nothing_changes(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    manifest = make_manifest(tmp_path, run={"epochs": 1, "distributed": "models"})
    assert cli(capsys, "run", manifest)[0] == 0
    assert [p.name for p in (tmp_path / "res" / ".izitorch").glob("*.pth.tar")] == ["fold_1.pth.tar"]


def test_an_unknown_strategy_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "run", make_manifest(tmp_path), "--set", 'run.distributed="everything"')
    message = error_of(err)
    assert code == 2 and "run.distributed" in message and '"models"' in message and '"data"' in message, message


def test_an_error_line_of_a_rank_other_than_0_names_the_rank(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing.toml"
    for rank in ("0", "1"):
        for name, value in {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank}.items():
            monkeypatch.setenv(name, value)
        code, _, err = cli(capsys, "run", missing)
        message = error_of(err)
        assert code == 2 and "missing.toml" in message
        assert message.startswith("rank 1: ") == (rank == "1"), message


def test_a_rank_that_is_not_a_number_is_one_line_without_a_rank_label(tmp_path, capsys, monkeypatch):
    for name, value in {"RANK": "abc", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    code, _, err = cli(capsys, "run", make_manifest(tmp_path))
    message = error_of(err)
    assert code == 2 and message.endswith("RANK, WORLD_SIZE and LOCAL_RANK must be integers: launch with torchrun, which sets them"), message
    assert not message.startswith("rank "), message
    assert not (tmp_path / "res").exists()


def test_a_unit_that_left_no_final_state_fails_the_end_of_the_run_in_one_line(tmp_path, capsys, one_rank):
    """A plugin that answers izitorch_run_fold for fold 2 without training it: rank 0 finds no
    finished state for that unit when it gathers the results, a failure of training (exit 1)."""
    (tmp_path / "skip.py").write_text(
        "from izitorch import hookimpl\n\n@hookimpl(tryfirst=True)\ndef izitorch_run_fold(run, fold):\n    return {} if fold.index == 1 else None\n"
    )
    manifest = make_manifest(tmp_path, run={"epochs": 1}, plugins={"enable": ["skip.py"], "kfold": {"k": 2}})
    code, _, err = cli(capsys, "run", manifest)
    message = error_of(err.splitlines()[-1])  # after rank 0's line on how the run is spread
    assert "Traceback" not in err
    assert code == 1 and "fold_2.stack_1.pth.tar holds no finished fold" in message and "--resume" in message, message
    assert not (tmp_path / "res" / "results.json").exists()


def test_a_rank_that_does_not_see_rank_0s_res_dir_is_refused(tmp_path):
    """On a node without the shared file system, res_dir is another folder: its lock is not rank 0's."""
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    rank1 = distributed.Ranks(rank=1, world=2, local_rank=0, strategy="models")
    with pytest.raises(IzitorchError) as refused:
        distributed.check_shared_res_dir(res_dir, '{"pid": 1, "host": "node0"}', rank1)
    assert refused.value.path == "run.res_dir" and "rank 1" in refused.value.message and "every node shares" in refused.value.message
    (res_dir / LOCK_NAME).write_text('{"pid": 1, "host": "node0"}')
    distributed.check_shared_res_dir(res_dir, '{"pid": 1, "host": "node0"}', rank1)  # the same folder: no error
