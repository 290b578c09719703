"""Write-behind (izitorch/writer.py, io.background_writes): order, bounded lag, errors, memory.

The writer's file function is replaced by a recorder whose writes can be held back with events,
so each guarantee is checked at a moment when it matters (a file still waiting), not by timing.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
import torch

from izitorch import held
from izitorch import io as izio
from izitorch.errors import TrainingError
from izitorch.guard import Interrupted
from izitorch.writer import BackgroundWriter

from conftest import replaced_by_thread

WAIT = 10.0  # seconds: generous for a loaded CI machine; a passing test never waits this long


class Recorder:
    """A ``write_file`` that records (path, bytes, thread) and waits on a path's gate, if set."""

    def __init__(self, fail: str | None = None) -> None:
        self.written: list[tuple[str, bytes]] = []
        self.threads: set[str] = set()
        self.gates: dict[str, threading.Event] = {}
        self.fail = fail

    def hold(self, *names: str) -> None:
        for name in names:
            self.gates[name] = threading.Event()

    def release(self, *names: str) -> None:
        for name in names:
            self.gates[name].set()

    def __call__(self, path: Path, data: memoryview) -> None:
        gate = self.gates.get(str(path))
        if gate is not None:
            assert gate.wait(WAIT), f"{path} was never released"
        if str(path) == self.fail:
            raise TrainingError(f"no space left on the device while writing {path}")
        self.written.append((str(path), bytes(data)))
        self.threads.add(threading.current_thread().name)

    def names(self) -> list[str]:
        return [name for name, _ in self.written]


def write_with(recorder) -> None:
    """This thread's run writer writes each file with ``recorder``, one at a time (not staged)."""
    writer = izio._writer()
    writer._stage, writer._write_file = None, recorder


class Stager:
    """A ``stage`` whose files are published and discarded into lists; a name in ``fail`` fails
    its stage, and ``together`` stages wait until that many run at once (a barrier)."""

    def __init__(self, fail: str | None = None, together: int = 0) -> None:
        self.published: list[str] = []
        self.discarded: list[str] = []
        self.fail = fail
        self.barrier = threading.Barrier(together, timeout=WAIT) if together else None
        self.threads: set[str] = set()

    def __call__(self, path: Path, data: memoryview):
        self.threads.add(threading.current_thread().name)
        if self.barrier is not None:
            self.barrier.wait()
        if str(path) == self.fail:
            raise TrainingError(f"no space left on the device while writing {path}")
        stager = self

        class Item:
            def publish(self) -> None:
                stager.published.append(str(path))

            def discard(self) -> None:
                stager.discarded.append(str(path))

        return Item()


def test_staged_files_overlap_and_land_in_the_order_they_were_asked_for():
    stager = Stager(together=4)
    writer = BackgroundWriter(stage=stager)
    with writer._cond:  # queue the whole batch before the thread looks at it
        names = [f"file{i}" for i in range(8)]
        for name in names:
            writer._queue.append((Path(name), memoryview(b"x")))
            writer._pending_bytes += 1
            writer._submitted += 1
        writer._cond.notify_all()
    writer.flush()  # a barrier of four in stage: it passes only if four stages run at once
    assert stager.published == names
    assert len(stager.threads) >= 4 and all(name.startswith("izitorch-stage") for name in stager.threads)
    writer.close()


def test_after_a_failed_stage_the_later_files_of_the_batch_are_discarded_not_published():
    stager = Stager(fail="model")
    writer = BackgroundWriter(stage=stager)
    with writer._cond:
        for name in ("log", "model", "state", "other"):
            writer._queue.append((Path(name), memoryview(b"x")))
            writer._pending_bytes += 1
            writer._submitted += 1
        writer._cond.notify_all()
    with pytest.raises(TrainingError, match="writing model"):
        writer.flush()
    assert stager.published == ["log"]
    assert sorted(stager.discarded) == ["other", "state"]
    writer.close()


def test_a_runs_files_are_staged_then_land_whole_and_a_failure_leaves_no_temporary_file(tmp_path, clock):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(izio.IzitorchError, match="cannot write .*blocker"):
        with izio.background_writes(interval=3600.0):  # held: one batch at the end
            for index in range(20):
                izio.write_json(tmp_path / f"m{index}" / "log.json", {"index": index})
            izio.write_json(tmp_path / "blocker" / "log.json", {})
            izio.write_json(tmp_path / "after.json", {})
    assert [json.loads((tmp_path / f"m{i}" / "log.json").read_text()) for i in range(20)] == [{"index": i} for i in range(20)]
    assert not (tmp_path / "after.json").exists()  # after the failure nothing lands...
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []  # ...and no temporary file stays


def in_thread(call) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def test_files_land_in_the_order_they_were_asked_for_on_the_writer_thread():
    recorder = Recorder()
    writer = BackgroundWriter(recorder)
    asked = [(f"file{i % 3}", bytes([i])) for i in range(40)]
    for name, data in asked:
        writer.submit(Path(name), memoryview(data))
    writer.flush()
    assert recorder.written == asked
    assert recorder.threads == {"izitorch-writer"}
    writer.close()


def test_commit_waits_for_the_previous_epoch_and_not_for_the_current_one():
    recorder = Recorder()
    recorder.hold("log1", "state1", "log2", "state2")
    writer = BackgroundWriter(recorder)
    writer.submit(Path("log1"), memoryview(b"1"))
    writer.submit(Path("state1"), memoryview(b"1"))
    writer.commit()  # epoch 1: nothing before it to wait for, although its own files wait
    assert recorder.written == []
    writer.submit(Path("log2"), memoryview(b"2"))
    writer.submit(Path("state2"), memoryview(b"2"))
    committed = threading.Event()
    thread = in_thread(lambda: (writer.commit(), committed.set()))
    assert not committed.wait(0.3)  # epoch 2's commit waits for epoch 1's files
    recorder.release("log1", "state1")
    assert committed.wait(WAIT)  # ...and only for them: epoch 2's files still wait
    assert recorder.names() == ["log1", "state1"]
    thread.join(WAIT)
    recorder.release("log2", "state2")
    writer.flush()
    assert recorder.names() == ["log1", "state1", "log2", "state2"]
    writer.close()


def test_a_failed_write_stops_the_later_ones_and_every_later_call_raises_it():
    recorder = Recorder(fail="model")
    recorder.hold("model")
    writer = BackgroundWriter(recorder)
    for name in ("log", "model", "state"):
        writer.submit(Path(name), memoryview(b"x"))
    recorder.release("model")
    with pytest.raises(TrainingError, match="no space left on the device while writing model"):
        writer.flush()
    with pytest.raises(TrainingError, match="writing model"):
        writer.submit(Path("later"), memoryview(b"x"))
    with pytest.raises(TrainingError, match="writing model"):
        writer.commit()
    writer.close()  # never raises
    assert recorder.names() == ["log"]  # the state after the failed checkpoint never landed


def test_waiting_bytes_are_bounded_but_one_large_file_is_taken_alone():
    recorder = Recorder()
    recorder.hold("a")
    writer = BackgroundWriter(recorder, max_pending_bytes=10)
    writer.submit(Path("a"), memoryview(b"123456"))
    taken = threading.Event()
    thread = in_thread(lambda: (writer.submit(Path("b"), memoryview(b"123456")), taken.set()))
    assert not taken.wait(0.3)  # 12 bytes would wait: the second file waits for the first
    recorder.release("a")
    assert taken.wait(WAIT)
    thread.join(WAIT)
    writer.flush()
    writer.submit(Path("big"), memoryview(b"x" * 50))  # larger than the bound, nothing waiting
    writer.flush()
    assert recorder.names() == ["a", "b", "big"]
    writer.close()


def when_closing(writer: BackgroundWriter, then) -> threading.Thread:
    """Run ``then()`` on another thread once ``writer.close()`` has begun (it is waiting then)."""

    def wait_then():
        with writer._cond:
            assert writer._cond.wait_for(lambda: writer._closing, WAIT), "close() was never called"
        then()

    return in_thread(wait_then)


def test_close_writes_what_is_queued():
    recorder = Recorder()
    recorder.hold("a")
    writer = BackgroundWriter(recorder)
    for name in ("a", "b", "c"):
        writer.submit(Path(name), memoryview(name.encode()))
    written_when_closing = []
    when_closing(writer, lambda: (written_when_closing.extend(recorder.names()), recorder.release("a")))
    writer.close()
    assert written_when_closing == []  # close() began with all three files waiting...
    assert recorder.written == [("a", b"a"), ("b", b"b"), ("c", b"c")]  # ...and wrote them all


# -- io.background_writes ------------------------------------------------------------------------


def test_inside_background_writes_files_are_written_by_the_thread_and_all_there_at_the_end(tmp_path, monkeypatch):
    seen = replaced_by_thread(monkeypatch)
    main = threading.current_thread().name
    with izio.background_writes():
        for epoch in range(1, 6):
            izio.write_json(tmp_path / "trainlog.json", {str(e): e for e in range(1, epoch + 1)})
            izio.commit()
    assert json.loads((tmp_path / "trainlog.json").read_text()) == {str(e): e for e in range(1, 6)}
    assert seen == [("trainlog.json", "izitorch-writer")] * 5
    assert izio._writer() is None
    izio.write_json(tmp_path / "after.json", {})  # outside: written at once, by the caller
    assert seen[-1] == ("after.json", main) and (tmp_path / "after.json").exists()


def test_nested_without_background_writes_go_in_line_after_the_outer_ones(tmp_path, monkeypatch):
    seen = replaced_by_thread(monkeypatch)
    main = threading.current_thread().name
    with izio.background_writes():
        izio.write_json(tmp_path / "queued.json", {})
        with izio.background_writes(enabled=False):
            izio.write_json(tmp_path / "in_line.json", {})
            assert seen == [("queued.json", "izitorch-writer"), ("in_line.json", main)]
        izio.write_json(tmp_path / "queued_again.json", {})
    assert seen[-1] == ("queued_again.json", "izitorch-writer")


def test_each_thread_has_its_own_writer(tmp_path, monkeypatch):
    """A second run in another thread neither uses nor waits on this thread's writer."""
    seen = replaced_by_thread(monkeypatch)
    with izio.background_writes():
        outer = izio._writer()
        found = []

        def other_thread():
            found.append(izio._writer())
            izio.write_json(tmp_path / "other.json", {})  # no writer of its own: written at once
            with izio.background_writes():
                found.append(izio._writer())

        thread = in_thread(other_thread)
        thread.join(WAIT)
    assert found[0] is None and found[1] is not None and found[1] is not outer
    assert ("other.json", thread.name) in seen


def test_a_write_error_on_the_thread_is_raised_when_the_block_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(izio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(TrainingError) as info:
        with izio.background_writes():
            izio.write_json(tmp_path / "a.json", {"a": 1})
    assert str(info.value).startswith(f"no space left on the device while writing {tmp_path / 'a.json'}")
    assert list(tmp_path.iterdir()) == []  # no file and no temporary left


def test_an_error_of_the_block_is_not_hidden_by_a_write_error(tmp_path, monkeypatch):
    monkeypatch.setattr(izio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(KeyError):
        with izio.background_writes():
            izio.write_json(tmp_path / "a.json", {"a": 1})
            raise KeyError("the block's own error")
    assert izio._writer() is None


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), Interrupted(2, "interrupted; every finished epoch is saved")])
def test_an_interrupt_does_not_hide_a_failed_write(tmp_path, monkeypatch, stop):
    """The interrupt's message says the finished epochs are saved: a failed write says otherwise."""
    monkeypatch.setattr(izio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises((TrainingError, KeyboardInterrupt)) as info:  # a KeyboardInterrupt must not end the session
        with izio.background_writes():
            izio.write_json(tmp_path / "a.json", {"a": 1})
            raise stop
    assert info.type is TrainingError and str(info.value).startswith("no space left on the device while writing")


def test_a_second_ctrl_c_during_close_waits_for_the_queued_files(tmp_path):
    """KeyboardInterrupt in the main thread while close() waits: the queued files still land
    (no finished epoch lost, no temporary file left), then the interrupt goes on."""
    recorder = Recorder()
    recorder.hold("state")
    writer = BackgroundWriter(recorder)
    writer.submit(Path("log"), memoryview(b"1"))
    writer.submit(Path("state"), memoryview(b"1"))
    interrupted = threading.Event()
    written_when_interrupted = []

    def ctrl_c(signum, frame):  # what the run's second SIGINT meets: a KeyboardInterrupt (once)
        if not interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt

    def second_ctrl_c_then_release():
        # sent again until handled: a signal that lands just before the main thread blocks in its
        # wait is only handled when that wait ends, and nothing else would end it
        for _ in range(int(WAIT / 0.05)):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            if interrupted.wait(0.05):
                break
        written_when_interrupted.extend(recorder.names())
        recorder.release("state")

    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        when_closing(writer, second_ctrl_c_then_release)
        with pytest.raises(KeyboardInterrupt):
            writer.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupted.is_set() and "state" not in written_when_interrupted  # it came while the state still waited
    assert recorder.names() == ["log", "state"]


def test_a_closed_writer_takes_no_more_files():
    writer = BackgroundWriter(Recorder())
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(Path("late"), memoryview(b"x"))


# -- held files between flushes (izitorch/held.py, run.flush_interval) -----------------------------


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(held, "monotonic", fake)
    return fake


@pytest.fixture
def saves(monkeypatch) -> list[str]:
    """The ``torch.save`` calls izitorch makes (the serialisation a held snapshot defers)."""
    calls: list[str] = []
    real = torch.save

    def save(obj, f, *args, **kwargs):
        calls.append(repr(obj))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(izio.torch, "save", save)
    return calls


def write_epoch(folder: Path, epoch: int) -> None:
    """An epoch's files as a run writes them: a trainlog, a checkpoint, the resume state last."""
    izio.write_json(folder / "trainlog.json", list(range(1, epoch + 1)))
    izio.save_torch(folder / "model.pth.tar", {"w": torch.full((3,), float(epoch))}, snapshot=True)
    izio.save_torch(folder / "state.pth.tar", {"epoch": epoch}, snapshot=True)
    izio.commit()


def test_held_files_land_together_once_the_interval_has_passed_in_order(tmp_path, monkeypatch, clock, saves):
    seen = replaced_by_thread(monkeypatch)
    with izio.background_writes(interval=10.0):
        for epoch in (1, 2, 3):
            clock.now = 3.0 * epoch  # 3, 6, 9 s: within the interval
            write_epoch(tmp_path, epoch)
        assert seen == [] and saves == [] and list(tmp_path.iterdir()) == []  # nothing serialised, nothing on disk
        clock.now = 10.0
        write_epoch(tmp_path, 4)  # the interval has passed: epoch 4's files go out
        izio._writer().flush()
        assert [name for name, _ in seen] == ["trainlog.json", "model.pth.tar", "state.pth.tar"]
        assert {thread for _, thread in seen} == {"izitorch-writer"}
        assert len(saves) == 2  # one torch.save per file, of its latest version only
        assert json.loads((tmp_path / "trainlog.json").read_text()) == [1, 2, 3, 4]
        assert torch.load(tmp_path / "state.pth.tar", weights_only=True) == {"epoch": 4}
        clock.now = 19.0
        write_epoch(tmp_path, 5)  # 9 s since the last flush: held
        assert len(seen) == 3 and torch.load(tmp_path / "state.pth.tar", weights_only=True) == {"epoch": 4}
    # the end of the block flushes what is held
    assert [name for name, _ in seen[3:]] == ["trainlog.json", "model.pth.tar", "state.pth.tar"]
    assert torch.load(tmp_path / "state.pth.tar", weights_only=True) == {"epoch": 5}
    assert torch.equal(torch.load(tmp_path / "model.pth.tar", weights_only=True)["w"], torch.full((3,), 5.0))


def test_hand_over_sends_the_held_files_now_and_the_interval_still_counts_from_the_last_flush(tmp_path, monkeypatch, clock):
    seen = replaced_by_thread(monkeypatch)
    with izio.background_writes(interval=10.0):
        izio.write_json(tmp_path / "conf.json", {"run": 1})  # a run's start files
        izio.hand_over()
        izio._writer().flush()
        assert [name for name, _ in seen] == ["conf.json"] and json.loads((tmp_path / "conf.json").read_text()) == {"run": 1}
        clock.now = 9.0
        write_epoch(tmp_path, 1)  # 9 s since the run's start: held, the hand-over was no flush
        izio._writer().flush()
        assert [name for name, _ in seen] == ["conf.json"]
        clock.now = 10.0
        write_epoch(tmp_path, 2)
        izio._writer().flush()
        assert [name for name, _ in seen] == ["conf.json", "trainlog.json", "model.pth.tar", "state.pth.tar"]
    izio.hand_over()  # outside a run: nothing held, nothing to do


def test_with_no_interval_nothing_is_held_and_each_file_is_serialised_at_the_call(tmp_path, clock, saves):
    recorder = Recorder()
    with izio.background_writes(interval=0.0):
        write_with(recorder)
        write_epoch(tmp_path, 1)
        assert len(saves) == 2  # serialised at the call...
        izio._writer().flush()  # ...and handed to the writer at once
        assert recorder.names() == [str(tmp_path / name) for name in ("trainlog.json", "model.pth.tar", "state.pth.tar")]


def test_a_newer_version_replaces_the_held_one_and_goes_behind_the_others(tmp_path, clock):
    recorder = Recorder()
    with izio.background_writes(interval=10.0):
        write_with(recorder)
        for name, value in [("a", 1), ("state", 1), ("b", 2), ("a", 2), ("state", 2)]:
            izio.write_json(tmp_path / name, value)
    assert [(Path(path).name, json.loads(data)) for path, data in recorder.written] == [("b", 2), ("a", 2), ("state", 2)]


def test_held_bytes_are_bounded_whatever_the_interval(clock):
    recorder = Recorder()
    files = held.HeldFiles(BackgroundWriter(recorder), interval=3600.0, max_bytes=10)
    files.put(Path("a"), memoryview(b"aaaa"), 4)
    files.put(Path("b"), lambda: memoryview(b"bbbb"), 4)
    files.writer.flush()
    assert recorder.written == []  # 8 bytes held: under the bound
    files.put(Path("c"), memoryview(b"cccc"), 4)  # 12 bytes: every held file goes out
    files.writer.flush()
    assert recorder.names() == ["a", "b", "c"]
    assert files.close() is None
    # a snapshot counts its tensors' bytes
    assert izio.tensor_bytes({"w": torch.zeros(5, 2), "rest": [torch.zeros(3, dtype=torch.int64), 1, "x"]}) == 5 * 2 * 4 + 3 * 8


def test_a_snapshot_is_serialised_at_the_flush_and_anything_else_at_the_call(tmp_path, clock):
    """``snapshot=True`` is the caller's promise: a change after the call shows in the file
    (which is how this test tells when it was serialised); without it the file holds the call's value."""
    live = {"w": torch.zeros(2), "plain": [0]}
    with izio.background_writes(interval=10.0):
        izio.save_torch(tmp_path / "at_call.pth", live)
        izio.save_torch(tmp_path / "at_flush.pth", live, snapshot=True)
        live["w"] += 1
        live["plain"].append(1)
    assert torch.equal(torch.load(tmp_path / "at_call.pth", weights_only=True)["w"], torch.zeros(2))
    assert torch.load(tmp_path / "at_call.pth", weights_only=True)["plain"] == [0]
    assert torch.equal(torch.load(tmp_path / "at_flush.pth", weights_only=True)["w"], torch.ones(2))
    assert torch.load(tmp_path / "at_flush.pth", weights_only=True)["plain"] == [0, 1]


def test_a_second_ctrl_c_while_held_files_are_serialised_waits_for_them(clock):
    recorder = Recorder()
    files = held.HeldFiles(BackgroundWriter(recorder), interval=3600.0)
    interrupted = []

    def serialise_after_a_ctrl_c() -> memoryview:
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # what a second Ctrl-C raises in the middle of torch.save
        return memoryview(b"state")

    files.put(Path("log"), memoryview(b"log"), 3)
    files.put(Path("state"), serialise_after_a_ctrl_c, 5)
    with pytest.raises(KeyboardInterrupt):
        files.close()
    assert interrupted and recorder.written == [("log", b"log"), ("state", b"state")]


def test_a_held_file_that_cannot_be_serialised_stops_the_later_ones(tmp_path, clock):
    with pytest.raises(ValueError, match="cannot serialise"):
        with izio.background_writes(interval=10.0):
            izio.write_json(tmp_path / "before.json", 1)
            izio._files().put(tmp_path / "broken", lambda: (_ for _ in ()).throw(ValueError("cannot serialise")), 0)
            izio.write_json(tmp_path / "after.json", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before.json"]
