"""What protects a run while it writes to ``res_dir``: a lock file and the signal handlers.

The lock (``res_dir/.izitorch.lock``: pid, host, start time) stops two runs from writing to one
folder; a lock left by a killed run is recognised (its process is gone) and taken over.

SIGINT and SIGTERM do not kill a run in the middle of a step: the first one asks the loop to stop
after the current step, and the run ends with :class:`Interrupted` (exit 130 / 143) once the
files of the last finished epoch are on disk (:func:`izitorch.io.background_writes`). A second
signal aborts at once.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Iterator

from izitorch.errors import IzitorchError
from izitorch.ownership import LOCK_NAME, res_dir_error


class Interrupted(IzitorchError):
    """The run stopped on a signal after finishing its current step."""

    locatable = False

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)


class StopFlag:
    """Set by a signal handler, read by the loop after every step (one attribute read)."""

    def __init__(self) -> None:
        self.signum: int | None = None


@contextlib.contextmanager
def res_dir_lock(res_dir: Path) -> Iterator[None]:
    """Hold ``res_dir``'s lock for the duration of the block. ``res_dir`` (and the folders above
    it) are created if needed, and removed again if the block leaves them empty: a run refused
    before it wrote anything leaves no trace."""
    lock = res_dir / LOCK_NAME
    created = [folder for folder in (res_dir, *res_dir.parents) if not folder.exists()]
    try:
        res_dir.mkdir(parents=True, exist_ok=True)
        _acquire(lock)
    except OSError as error:
        _remove_empty(created)
        raise res_dir_error(res_dir, error) from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this process created, deepest first, as long as they are empty
    (``os.rmdir`` removes nothing else)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote there), or gone: what is above stays too
            return


def _acquire(lock: Path) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.datetime.now().isoformat(timespec="seconds")})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _stale(lock):
                owner = _read(lock)
                raise IzitorchError(
                    f'res_dir "{lock.parent}" is in use by another izitorch run (pid {owner.get("pid", "?")} on {owner.get("host", "?")}, '
                    f"since {owner.get('started', '?')}); wait for it, choose another res_dir, or delete {lock} if that run is gone"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
        except OSError:  # a full disk: no empty lock is left behind
            lock.unlink(missing_ok=True)
            raise
        return
    raise IzitorchError(f"could not take the lock {lock}; another run is starting in the same res_dir")


def _read(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _stale(lock: Path) -> bool:
    """A lock whose process is gone (same host), or unreadable: left by a killed run."""
    owner = _read(lock)
    if not owner or "pid" not in owner:
        return True
    if owner.get("host") != socket.gethostname():
        return False  # cannot tell from here: the message says how to clear it
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(owner["pid"]) == os.getpid()


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """First SIGINT/SIGTERM sets ``flag``; a second one aborts (KeyboardInterrupt / default action)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def first(signum: int, _frame) -> None:
        flag.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    for sig in previous:
        signal.signal(sig, first)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
