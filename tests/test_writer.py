"""Write-behind (izitorch/writer.py, io.background_writes): order, bounded lag, errors, memory.

The writer's file function is replaced by a recorder whose writes can be held back with events,
so each guarantee is checked at a moment when it matters (a file still waiting), not by timing.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from izitorch import io as izio
from izitorch.errors import TrainingError
from izitorch.writer import BackgroundWriter

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


def test_close_writes_what_is_queued():
    recorder = Recorder()
    recorder.hold("a")
    writer = BackgroundWriter(recorder)
    for name in ("a", "b", "c"):
        writer.submit(Path(name), memoryview(name.encode()))
    threading.Timer(0.1, recorder.release, ("a",)).start()
    writer.close()
    assert recorder.written == [("a", b"a"), ("b", b"b"), ("c", b"c")]


# -- io.background_writes ------------------------------------------------------------------------

def test_inside_background_writes_files_are_written_by_the_thread_and_all_there_at_the_end(tmp_path, monkeypatch):
    threads = []
    real_replace = izio.os.replace

    def replace(src, dst):
        threads.append(threading.current_thread().name)
        real_replace(src, dst)

    monkeypatch.setattr(izio.os, "replace", replace)
    with izio.background_writes():
        for epoch in range(1, 6):
            izio.write_json(tmp_path / "trainlog.json", {str(e): e for e in range(1, epoch + 1)})
            izio.commit()
    assert json.loads((tmp_path / "trainlog.json").read_text()) == {str(e): e for e in range(1, 6)}
    assert threads == ["izitorch-writer"] * 5
    assert izio._writer is None
    izio.write_json(tmp_path / "after.json", {})  # outside: written at once, by the caller
    assert threads[-1] == threading.current_thread().name and (tmp_path / "after.json").exists()
    with izio.background_writes(enabled=False):
        izio.write_json(tmp_path / "off.json", {})
        assert (tmp_path / "off.json").exists() and threads[-1] == threading.current_thread().name


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
    assert izio._writer is None
