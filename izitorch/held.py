"""A run's files held in memory between flushes: ``[run] flush_interval`` seconds apart.

Why: an epoch of a small model is shorter than writing its files. Even with the system calls on
the writer's thread (:mod:`izitorch.writer`), serialising a checkpoint and a resume state with
``torch.save`` costs the training thread about as much as the epoch's steps. A run that keeps
its files in memory and hands them to the writer every few seconds pays that once per flush,
for the latest version of each file only.

What a run can count on:

- **order**: held files keep the order they were written in; a newer version of a path replaces
  the held one and takes its place at the end, so an epoch's resume state (its last file) still
  comes after the outputs it describes;
- **deferred serialisation**: a file given as a function (``io.save_torch(..., snapshot=True)``)
  is serialised only when it is flushed; one given as bytes was serialised at the call;
- **interval**: :meth:`HeldFiles.commit`, at the end of each epoch, flushes when ``interval``
  seconds have passed since the last flush at an epoch end (``interval == 0``: no file is held,
  each goes to the writer at the call, and every epoch ends with a flush), and otherwise waits
  until the last flush is on disk. So a hard kill (SIGKILL, power loss) loses at most the epochs
  of the last ``interval`` seconds, the one before them and the one in flight, which
  ``--resume`` trains again; :meth:`close` (Ctrl-C, SIGTERM, an error, the end of the run)
  flushes everything;
- **early hand-over**: :meth:`hand_over` gives the held files to the writer now, without waiting
  (the files a run writes once at its start: their folders and files are then made while it
  trains rather than at its end);
- **memory**: past ``max_bytes`` held (serialised bytes, or a snapshot's tensor bytes) the held
  files are flushed at once, whatever the interval.
"""

from __future__ import annotations

from pathlib import Path
from time import monotonic
from typing import Callable, Union

from izitorch.writer import MAX_PENDING_BYTES, BackgroundWriter

#: A held file's content: its bytes, or a function that serialises it when it is flushed.
Content = Union[memoryview, Callable[[], memoryview]]


class HeldFiles:
    """The files of one run between flushes, in front of its :class:`BackgroundWriter`.

    Used by the thread that writes the run's files only (no lock).
    """

    def __init__(self, writer: BackgroundWriter, interval: float = 0.0, max_bytes: int = MAX_PENDING_BYTES) -> None:
        self.writer = writer
        self.interval = interval
        self.max_bytes = max_bytes
        self._held: dict[Path, tuple[Content, int]] = {}  # insertion order is the order of writing
        self._held_bytes = 0
        self._flushed_at = monotonic()
        #: Called before held files go to the writer: the run's ledger puts its deferred claims
        #: on disk before the files it records exist (:meth:`izitorch.ownership.Ledger.flush`).
        self.before_hand_over: Callable[[], None] | None = None

    @property
    def holds(self) -> bool:
        """Whether files wait here for the interval (else each goes to the writer at once)."""
        return self.interval > 0

    def put(self, path: Path, content: Content, size: int) -> None:
        """Hold ``content`` for ``path`` (``size`` bytes, counted against ``max_bytes``), in place
        of a held version of it; raise the error of an earlier write, if any."""
        if self.writer.error is not None:
            raise self.writer.error
        if not self.holds:
            self.writer.submit(path, content if isinstance(content, memoryview) else content())
            return
        previous = self._held.pop(path, None)
        if previous is not None:
            self._held_bytes -= previous[1]
        self._held[path] = (content, size)
        self._held_bytes += size
        if self._held_bytes > self.max_bytes:
            self._hand_over()

    def commit(self) -> None:
        """The end of an epoch: flush when the interval has passed since the last flush, then wait
        until the flush before it is on disk; else wait until the last flush is."""
        if self.holds:
            now = monotonic()
            if now - self._flushed_at < self.interval:
                self.writer.settle()
                return
            self._flushed_at = now
            self._hand_over()
        self.writer.commit()

    def hand_over(self) -> None:
        """Every held file to the writer now, without waiting for it (nor counting as a flush
        for the interval); raise the error of an earlier write, if any."""
        if self.writer.error is not None:
            raise self.writer.error
        self._hand_over()

    def flush(self) -> None:
        """Every held file to the writer, and wait until all are on disk; raise a write's error."""
        self._hand_over()
        self.writer.flush()

    def close(self) -> BaseException | None:
        """Hand every held file to the writer and stop it; return the first failure (a file that
        could not be serialised, or a write's error), after which nothing later lands.

        A KeyboardInterrupt meanwhile (a second Ctrl-C) is held until every file is on disk,
        then raised: the held files are the last finished epochs, which ``--resume`` needs."""
        interrupt: KeyboardInterrupt | None = None
        failure: BaseException | None = None
        while self._held and failure is None:
            try:
                self._hand_over()
            except KeyboardInterrupt as error:  # the file in hand is still held: try it again
                interrupt = error
            except Exception as error:  # noqa: BLE001 -- returned to the caller, which decides
                failure = error
        self._held.clear()
        self._held_bytes = 0
        try:
            self.writer.close()
        except KeyboardInterrupt as error:
            interrupt = error
        if interrupt is not None:
            raise interrupt
        return failure or self.writer.error

    def _hand_over(self) -> None:
        """Give the held files to the writer, oldest first, serialising those that waited for it.
        A file leaves the held set only once the writer has it."""
        if self._held and self.before_hand_over is not None:
            self.before_hand_over()
        while self._held:
            path, (content, size) = next(iter(self._held.items()))
            data = content if isinstance(content, memoryview) else content()
            self.writer.submit(path, data)
            del self._held[path]
            self._held_bytes -= size
