"""Spare files (izitorch/spares.py): made ahead of time by the writer's thread, taken by writes.

Each guarantee is checked on the files themselves (inode numbers, modes, what is left on disk),
never by timing: a test that needs spares ready waits until the writer has made them.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

from izitorch import io as izio
from izitorch import spares as spares_module
from izitorch.ownership import Ledger, read_lines
from izitorch.spares import MAX_SPARES, Spares
from izitorch.writer import BackgroundWriter

from conftest import KILLER, cli, make_manifest, run_cli

WAIT = 10.0  # seconds: generous for a loaded CI machine; a passing test never waits this long


def wait_until(condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def opened(folder: Path) -> Spares:
    spares, claimed = Spares(), []
    spares.open(folder, claimed.append)
    assert claimed == [folder]
    return spares


def made(spares: Spares) -> None:
    """Every spare wanted, made as the writer's thread makes them (the first call makes the folder)."""
    for _ in range(2 * MAX_SPARES):
        if not spares.make_one():
            break


# -- the pool ------------------------------------------------------------------------------------


def test_twice_the_distinct_files_written_are_wanted_up_to_the_cap(tmp_path):
    spares = opened(tmp_path / "spare")
    assert not spares.pending()
    assert spares.written(tmp_path / "a") and spares.written(tmp_path / "b")
    assert spares.written(tmp_path / "a") and spares._wanted == 4  # a file written again wants no more
    made(spares)
    assert not spares.written(tmp_path / "b")  # all made: nothing for the writer to do
    names = os.listdir(tmp_path / "spare")
    assert len(names) == 4 and all(name.startswith(f"{os.getpid()}-") for name in names)
    assert all((tmp_path / "spare" / name).stat().st_size == 0 for name in os.listdir(tmp_path / "spare"))
    for n in range(MAX_SPARES):
        spares.written(tmp_path / f"f{n}")
    assert spares._wanted == MAX_SPARES


def test_a_spare_is_moved_to_the_temporary_name_emptied_and_open_for_writing(tmp_path):
    spares = opened(tmp_path / "spare")
    spares.written(tmp_path / "a")
    made(spares)
    (spare,) = [p for p in (tmp_path / "spare").iterdir()][:1]
    spare.write_bytes(b"left over")  # whatever it holds is gone once taken
    inode = spare.stat().st_ino
    spares._ready.clear()
    spares._ready.append(str(spare))
    target = tmp_path / "out" / ".a.json.1-1.tmp"
    made_folders = []
    fd = spares.take(str(target), lambda: (made_folders.append(1), target.parent.mkdir()))
    os.write(fd, b"new")
    os.close(fd)
    assert made_folders == [1] and not spare.exists()
    assert target.read_bytes() == b"new" and target.stat().st_ino == inode
    assert spares.take(str(tmp_path / "out" / ".b.tmp"), lambda: None) is None  # none left


def test_a_spare_that_cannot_be_moved_stays_and_the_write_creates_its_file(tmp_path, monkeypatch):
    spares = opened(tmp_path / "spare")
    spares.written(tmp_path / "a")
    made(spares)

    def other_file_system(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(spares_module.os, "rename", other_file_system)
    assert spares.take(str(tmp_path / ".a.tmp"), lambda: None) is None
    assert len(spares._ready) == 2 and Path(spares._ready[0]).exists()


def test_a_killed_runs_empty_spares_are_taken_again_and_anything_else_is_left_alone(tmp_path):
    folder = tmp_path / "spare"
    folder.mkdir()
    (folder / "1-1").touch()
    (folder / "1-2").write_bytes(b"not a spare")
    (folder / "sub").mkdir()
    spares = opened(folder)
    assert list(spares._ready) == [str(folder / "1-1")]
    spares.close()
    assert sorted(p.name for p in folder.iterdir()) == ["1-2", "sub"]  # the folder stays: not empty


def test_close_deletes_the_spares_not_taken_and_their_folder(tmp_path):
    spares = opened(tmp_path / "spare")
    for name in "abc":
        spares.written(tmp_path / name)
    made(spares)
    assert len(list((tmp_path / "spare").iterdir())) == 6
    spares.close()
    assert not (tmp_path / "spare").exists()


def test_spares_are_not_made_where_the_folder_cannot_be_written(tmp_path):
    (tmp_path / "spare").write_text("a file, not a folder")
    spares = opened(tmp_path / "spare")
    assert not spares.written(tmp_path / "a")
    assert not spares.make_one() and not spares.pending()
    assert spares.take(str(tmp_path / ".a.tmp"), lambda: None) is None


# -- the writer's idle work ------------------------------------------------------------------------


def test_idle_work_runs_after_a_poke_until_it_says_it_is_done():
    calls, done = [], threading.Event()

    def idle():
        calls.append(1)
        if len(calls) == 3:
            done.set()
        return len(calls) < 3

    writer = BackgroundWriter(write_file=lambda path, data: None, idle=idle)
    time.sleep(0.01)
    assert calls == []  # nothing before a poke
    writer.poke()
    assert done.wait(WAIT)
    writer.close()
    assert len(calls) == 3


def test_a_file_waits_for_one_piece_of_idle_work_at_most():
    written, release = [], threading.Event()
    started = threading.Event()

    def idle():  # endless work, each piece held until the test lets it go
        started.set()
        release.wait(WAIT)
        return True

    writer = BackgroundWriter(write_file=lambda path, data: written.append(path), idle=idle)
    writer.poke()
    assert started.wait(WAIT)
    writer.submit(Path("a"), memoryview(b"x"))
    release.set()  # the piece in progress ends: the file goes before the next one
    wait_until(lambda: written == [Path("a")])  # bounded: fails, not hangs, if the file waited on
    writer.close()


def test_failing_idle_work_is_turned_off_and_the_files_are_still_written():
    written = []

    def idle():
        raise RuntimeError("broken")

    writer = BackgroundWriter(write_file=lambda path, data: written.append(path), idle=idle)
    writer.poke()
    wait_until(lambda: writer._idle is None)
    writer.submit(Path("a"), memoryview(b"x"))
    writer.close()
    assert written == [Path("a")] and writer.error is None


# -- in a run's writes -----------------------------------------------------------------------------


def test_a_runs_files_take_the_spares_and_have_the_mode_of_a_created_file(tmp_path):
    """Files written once the writer has made spares are those spares (same inodes), with the
    mode a created file gets; the record claims the spare folder; none is left at the end."""
    ledger, spare_inodes = Ledger(tmp_path), set()
    with izio.owned_by(ledger), izio.background_writes(interval=0.0):
        for name in ("a/log.json", "b/log.json"):
            izio.write_json(tmp_path / name, {"first": True})
        izio.flush()
        spares = izio._local.spares
        wait_until(lambda: not spares.pending())
        assert len(spares._ready) == 4
        spare_inodes = {os.stat(path).st_ino for path in spares._ready}
        for name in ("a/log.json", "b/log.json"):
            izio.write_json(tmp_path / name, {"second": True})
        izio.flush()
    inodes = {(tmp_path / name).stat().st_ino for name in ("a/log.json", "b/log.json")}
    assert inodes <= spare_inodes
    reference = tmp_path / "reference"
    reference.write_bytes(b"")  # created as a plain open() creates it
    assert stat.S_IMODE((tmp_path / "a/log.json").stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    assert (tmp_path / "a/log.json").read_text() == '{\n  "second": true\n}'
    assert not (tmp_path / ".izitorch" / "spare").exists()
    entries, _removed, folders = read_lines(ledger.file)
    assert ".izitorch/spare/" in folders and entries.index(".izitorch/spare/") < entries.index("a/log.json")


def test_a_run_where_spares_cannot_move_writes_every_file_all_the_same(tmp_path, monkeypatch, capsys):
    real_rename = os.rename

    def no_cross_folder_rename(src, dst):
        if f"{os.sep}spare{os.sep}" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(spares_module.os, "rename", no_cross_folder_rename)
    code, _out, err = cli(capsys, "run", str(make_manifest(tmp_path, models=[{"name": "a"}, {"name": "b"}])))
    assert code == 0, err
    res = tmp_path / "res"
    assert sorted(p.name for p in (res / "a").iterdir()) == [
        "conf.json",
        "confusion_matrix.pkl",
        "model.pth.tar",
        "test_metrics.json",
        "test_predictions.json",
        "trainlog.json",
    ]
    assert not (res / ".izitorch" / "spare").exists()
    assert not [p for p in res.rglob("*.tmp")]


def test_overwrite_removes_the_spares_a_kill_left_behind(tmp_path, capsys):
    path = make_manifest(tmp_path)
    assert cli(capsys, "run", str(path))[0] == 0
    leftover = tmp_path / "res" / ".izitorch" / "spare"
    leftover.mkdir()
    (leftover / "99-1").touch()  # as a kill -9 leaves them
    code, _out, err = cli(capsys, "run", str(path), "--overwrite")
    assert code == 0, err
    assert not leftover.exists()


def test_a_resumed_run_takes_the_spares_a_kill_left_and_leaves_none(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER, encoding="utf-8")
    path = make_manifest(tmp_path, {"run.epochs": 3, "run.flush_interval": 0.0, "plugins.enable": ["killer.py"]})
    done = run_cli("run", str(path), cwd=tmp_path, env={"KILL_AT": "1,2,3", "OMP_NUM_THREADS": "1"})
    assert done.returncode == -9, done.stderr
    spare = tmp_path / "res" / ".izitorch" / "spare"
    spare.mkdir(exist_ok=True)
    (spare / "99-1").touch()  # whatever the writer had made, one more of an earlier process
    done = run_cli("run", str(path), "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not spare.exists()
    assert not [p for p in (tmp_path / "res").rglob("*.tmp")]


def test_spares_are_made_again_after_a_flush_used_them(tmp_path):
    """Every flush of a run that rewrites its files takes spares: the writer makes them again."""
    ledger, taken = Ledger(tmp_path), []
    with izio.owned_by(ledger), izio.background_writes(interval=0.0):
        spares = izio._local.spares
        for flush in range(4):
            wait_until(lambda: not spares.pending())
            ready = {os.stat(path).st_ino for path in spares._ready}
            for name in ("a/log.json", "b/log.json"):
                izio.write_json(tmp_path / name, {"flush": flush})
            izio.flush()
            taken.append({(tmp_path / name).stat().st_ino for name in ("a/log.json", "b/log.json")} <= ready)
    assert taken == [False, True, True, True]  # the first flush came before any spare was wanted


def test_a_link_in_place_of_a_spare_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    spares = opened(tmp_path / "spare")
    spares.written(tmp_path / "a")
    made(spares)
    spare = Path(spares._ready[0])
    spare.unlink()
    spare.symlink_to(outside)  # someone put a link where a spare was
    target = tmp_path / ".a.json.1-1.tmp"
    assert spares.take(str(target), lambda: None) is None
    assert outside.read_text() == "keep me" and spare.is_symlink() and not target.exists()


def test_a_hard_link_in_place_of_a_spare_is_not_written_through(tmp_path):
    elsewhere = tmp_path / "backup_of_a_spare"
    spares = opened(tmp_path / "spare")
    spares.written(tmp_path / "a")
    made(spares)
    spare = Path(spares._ready[0])
    os.link(spare, elsewhere)  # as `cp -al` of res_dir would
    assert spares.take(str(tmp_path / ".a.json.1-1.tmp"), lambda: None) is None
    assert spare.exists() and elsewhere.read_bytes() == b""
    again = opened(tmp_path / "spare")
    assert str(spare) not in again._ready  # nor taken again by a resumed run
