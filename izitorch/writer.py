"""Write-behind: during a run, files reach the disk on one background thread while training goes on.

Why: every file izitorch writes is fsynced before it replaces the previous version
(:mod:`izitorch.io`), and an epoch writes several (trainlog, checkpoint, resume state). For a
small model these system calls cost as much as the epoch's training. The main thread still
serialises each file, so what is written is the state at the moment it was handed over; only
the temporary file, its fsync and the rename move to the thread. A run hands its files over in
batches, every ``[run] flush_interval`` seconds (:mod:`izitorch.held`).

What a run can count on:

- **order**: files land in the order they were written, so an epoch's resume state (its last
  file) never lands before that epoch's outputs;
- **bounded lag**: :meth:`BackgroundWriter.commit` marks the end of a flush (an epoch's files,
  its resume state last, or several epochs') and waits until the flush before it is on disk;
  :meth:`BackgroundWriter.settle`, at the end of an epoch that does not flush, waits until the
  last flush is. Ctrl-C (a second one too), errors and the end of a run wait for every file;
- **errors**: a failed write stops every later one (nothing after it lands, so the resume state
  never points past it) and is raised in the main thread by the next write, commit or flush;
- **memory**: the serialised bytes waiting for the disk are bounded by ``max_pending_bytes``;
  past it a write waits (one file larger than the bound is still taken, alone). The next file is
  serialised before it waits, so a run holds at most the bound plus one file;
- **staged batches** (with a ``stage`` function, as :mod:`izitorch.io` gives): the thread takes
  every queued file at once, writes and fsyncs their temporary files side by side on a few
  threads, then moves them into place one by one in order. A run's flush is dozens of small
  files at a time (a trainlog, a checkpoint, a confusion matrix... per model), and fsyncs issued
  together cost little more than one: the file system commits them in the same journal
  transaction. The order in which files appear is still the order they were written; after a
  failure, the temporary files of the later ones are deleted, none of them lands;
- **idle work** (with an ``idle`` function, as :mod:`izitorch.io` gives for
  :mod:`izitorch.spares`): while no file waits, after :meth:`BackgroundWriter.poke` or a batch
  written, the thread calls ``idle()`` again and again until it returns False; a file handed
  over meanwhile waits for one call at most.
"""

from __future__ import annotations

import collections
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Protocol

WriteFile = Callable[[Path, memoryview], None]


class Staged(Protocol):
    """A file written to its temporary name and fsynced, not yet in place."""

    def publish(self) -> None:
        """Move it into place (or carry out a deletion)."""

    def discard(self) -> None:
        """Delete the temporary file: a write before it failed."""


#: Writes a file's temporary version (raising what the write raised): the first half of a write.
Stage = Callable[[Path, memoryview], Staged]

#: How many files of a batch are staged at once, and the most files a batch takes.
STAGING_THREADS = 8
MAX_BATCH = 256

#: The default bound of the bytes waiting for the disk (and of the files a run holds between
#: flushes, :mod:`izitorch.held`).
MAX_PENDING_BYTES = 256 << 20


class BackgroundWriter:
    """One thread writing ``(path, bytes)`` pairs in order with ``write_file``, or in staged
    batches with ``stage`` when it is given (``write_file`` is then not used)."""

    def __init__(
        self,
        write_file: WriteFile | None = None,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        stage: Stage | None = None,
        idle: Callable[[], bool] | None = None,
    ) -> None:
        """``idle``: a small piece of work done while nothing waits to be written, after a
        :meth:`poke`; it returns whether it has more (see the module's doc)."""
        if write_file is None and stage is None:
            raise TypeError("BackgroundWriter needs write_file or stage")
        self._write_file = write_file
        self._stage = stage
        self._max_pending_bytes = max_pending_bytes
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[Path, memoryview]] = collections.deque()
        self._pending_bytes = 0
        self._submitted = 0  # files handed over so far
        self._done = 0  # files written (or dropped after an error) so far
        self._last_commit = 0
        self._error: BaseException | None = None
        self._closing = False
        self._stopped = False  # set by the thread when it leaves its loop
        self._idle = idle
        self._idle_wanted = False  # poke() was called, and idle() has not said it is done since
        self._thread = threading.Thread(target=self._work, name="izitorch-writer", daemon=True)
        self._thread.start()

    @property
    def error(self) -> BaseException | None:
        """The first failed write's error (later files were dropped), or None."""
        return self._error

    def submit(self, path: Path, data: memoryview) -> None:
        """Queue ``data`` for ``path``; raise the error of an earlier write, if any."""
        with self._cond:
            if self._closing:
                raise RuntimeError(f"{path}: the background writer is closed")
            self._cond.wait_for(lambda: self._error is not None or not self._pending_bytes or self._pending_bytes + len(data) <= self._max_pending_bytes)
            self._raise_error()
            self._queue.append((path, data))
            self._pending_bytes += len(data)
            self._submitted += 1
            self._cond.notify_all()

    def poke(self) -> None:
        """Tell the thread that ``idle`` has work again."""
        if self._idle is not None:
            with self._cond:
                self._idle_wanted = True
                self._cond.notify_all()

    def commit(self) -> None:
        """Mark the end of a flush (an epoch's files, or several epochs') and wait until the
        files of the previous flush are on disk."""
        with self._cond:
            previous, self._last_commit = self._last_commit, self._submitted
            self._wait_for(previous)

    def settle(self) -> None:
        """Wait until the files before the last :meth:`commit` are on disk; raise a write's error."""
        with self._cond:
            self._wait_for(self._last_commit)

    def flush(self) -> None:
        """Wait until every queued file is on disk; raise a write's error."""
        with self._cond:
            self._wait_for(self._submitted)

    def close(self) -> None:
        """Finish the queued writes (dropping them after an error) and stop the thread.

        Raises no write error (see :attr:`error`). A KeyboardInterrupt meanwhile (a second
        Ctrl-C) is held until the queued files, at most an epoch's, are on disk, then raised:
        abandoning them would lose finished epochs and leave temporary files."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        interrupt = None
        while True:  # not Thread.join(): an interrupted join marks a running thread as stopped
            try:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopped)
                break
            except KeyboardInterrupt as error:
                interrupt = error
        self._thread.join()  # at once: the thread has left its loop
        if interrupt is not None:
            raise interrupt

    def _wait_for(self, count: int) -> None:
        self._cond.wait_for(lambda: self._done >= count or self._error is not None)
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        pool: ThreadPoolExecutor | None = None  # made at the first batch of more than one file
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._queue or self._closing or self._idle_wanted)
                    if not self._queue and not self._closing:
                        self._idle_wanted = False
                        batch = None
                    elif not self._queue:
                        self._stopped = True
                        self._cond.notify_all()
                        return
                    else:
                        batch = [self._queue[0]] if self._stage is None else list(itertools.islice(self._queue, MAX_BATCH))
                        failed = self._error is not None
                if batch is None:  # nothing to write: a piece of idle work
                    if self._idle_once():
                        with self._cond:
                            self._idle_wanted = True
                    continue
                error = None
                if not failed:  # after a failure nothing later lands
                    try:
                        if self._stage is None:
                            self._write_file(*batch[0])
                        else:
                            if pool is None and len(batch) > 1:
                                pool = ThreadPoolExecutor(STAGING_THREADS, thread_name_prefix="izitorch-stage")
                            self._write_batch(pool, batch)
                    except BaseException as caught:  # noqa: BLE001 -- handed to the main thread
                        error = caught
                with self._cond:
                    for _ in batch:
                        _path, data = self._queue.popleft()
                        self._pending_bytes -= len(data)
                    self._done += len(batch)
                    if error is not None and self._error is None:
                        self._error = error
                    self._idle_wanted = self._idle is not None  # the batch may have used what idle work prepares
                    self._cond.notify_all()
                del batch  # the written bytes are not kept while the thread waits for more
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
            with self._cond:  # however the loop ended, no caller waits forever
                if not self._stopped and self._error is None:
                    self._error = RuntimeError("izitorch's background writer stopped unexpectedly; continue with --resume")
                self._stopped = True
                self._cond.notify_all()

    def _idle_once(self) -> bool:
        """Call ``idle`` once; a failure there turns it off (it is an optimisation, and must not
        stop the writes)."""
        try:
            return self._idle is not None and self._idle()
        except Exception:  # noqa: BLE001
            self._idle = None
            return False

    def _write_batch(self, pool: ThreadPoolExecutor | None, batch: list[tuple[Path, memoryview]]) -> None:
        """Stage every file of ``batch`` side by side, then publish them in order; raise the first
        failure, after which the later files' temporary versions are deleted."""
        stage = self._stage
        assert stage is not None
        futures = [pool.submit(stage, path, data) for path, data in batch] if pool is not None and len(batch) > 1 else None
        staged: list = []
        error: BaseException | None = None
        for index, (path, data) in enumerate(batch):
            try:
                item = futures[index].result() if futures is not None else stage(path, data)
            except BaseException as caught:  # noqa: BLE001 -- raised after the others are cleaned
                error = error or caught
                continue
            if error is None:
                try:
                    item.publish()
                    continue
                except BaseException as caught:  # noqa: BLE001
                    error = caught
            staged.append(item)
        for item in staged:
            item.discard()
        if error is not None:
            raise error
