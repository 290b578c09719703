"""Every file izitorch writes goes through here: temp file, flush, fsync, ``os.replace``.

A crash at any moment leaves either the previous file or the new one, never half of one, so a
checkpoint or trainlog that existed before a failure still loads after it.

Inside :func:`background_writes` (a run, unless ``run.background_writes = false``) a file is
held in memory (:class:`~izitorch.held.HeldFiles`) and handed, with the others, to
:class:`~izitorch.writer.BackgroundWriter`'s thread at the first epoch end after
``run.flush_interval`` seconds; the thread writes them in order. What a run can count on:

- what a file holds is what was asked for at the call: :func:`save_torch` with
  ``snapshot=True`` (the caller's promise that ``data`` never changes afterwards: tensors that
  own their memory, containers of its own) serialises when the file is flushed; every other
  call serialises at once;
- files land in the order they were written (a newer version of a path replaces the held one);
- the end of the block (the run's end, an error, Ctrl-C, SIGTERM) puts every file on disk; a
  hard kill loses at most the epochs of the last ``flush_interval`` seconds, the one before them
  and the one in flight (see :mod:`izitorch.held`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import os
import pickle
import threading
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, IO, Iterator

import torch

from izitorch.errors import IzitorchError, TrainingError
from izitorch.guard import Interrupted
from izitorch.held import HeldFiles
from izitorch.ownership import STATE_DIR, Ledger
from izitorch.spares import SPARE_DIR, Spares
from izitorch.writer import BackgroundWriter, Staged

# .files: this thread's HeldFiles and .spares its Spares (background_writes); .ledger: its run's Ledger (owned_by)
_local = threading.local()


def _files() -> HeldFiles | None:
    return getattr(_local, "files", None)


def _writer() -> BackgroundWriter | None:
    files = _files()
    return files.writer if files is not None else None


def owned_by(ledger: Ledger) -> contextlib.AbstractContextManager[None]:
    """Inside, every path this thread writes is first claimed by ``ledger`` (recorded as the run's,
    and refused when it resolves outside ``res_dir``)."""
    return _thread_setting("ledger", ledger)


def discarding() -> contextlib.AbstractContextManager[None]:
    """Inside, this thread writes, claims and removes nothing: every call below returns as if it
    had (a rank other than 0 under ``distributed = "data"``, which computes what rank 0 writes)."""
    return _thread_setting("discard", True)


@contextlib.contextmanager
def _thread_setting(name: str, value: Any) -> Iterator[None]:
    """``_local.<name>`` set to ``value`` for this thread inside the block, then back as it was."""
    outer = getattr(_local, name, None)
    setattr(_local, name, value)
    try:
        yield
    finally:
        setattr(_local, name, outer)


def discarding_now() -> bool:
    """Whether this thread's writes are dropped (:func:`discarding`): a file worth building only
    to be written can be skipped."""
    return bool(getattr(_local, "discard", False))


def claim_folder(path: str | Path) -> Path:
    """Claim the folder ``path`` for the run with everything it will hold, before another library
    (MLflow) writes into it: ``--overwrite`` then removes it whole (:meth:`Ledger.claim_folder`).
    Outside a run (no ledger) nothing is recorded."""
    ledger = getattr(_local, "ledger", None)
    if ledger is not None and not discarding_now():
        ledger.claim_folder(path)
    return Path(path)


def hand_over() -> None:
    """Give every file this thread holds to the background writer now, without waiting for the
    disk: files written once at a run's start reach the disk while it trains, not at its end."""
    files = _files()
    if files is not None:
        files.hand_over()


def flush() -> None:
    """Put every file this thread wrote so far on disk now (the held ones too), for a reader
    outside izitorch's writer (MLflow copying a checkpoint); raise a write's error."""
    files = _files()
    if files is not None:
        files.flush()


def claim(path: str | Path, folder: bool = False) -> None:
    """Record as the run's a file (or, with ``folder``, a folder) that a library writes itself,
    not through this module (TensorBoard's event files): before it is created where its name is
    known, else as soon as it exists. Nothing happens outside a run (no ledger)."""
    ledger = getattr(_local, "ledger", None)
    if ledger is not None and not discarding_now():
        ledger.claim(path, folder=folder)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place.

    Inside :func:`background_writes`, ``write`` fills a memory buffer now; the bytes are held
    until the run's next flush and the writer's thread puts them in place (a failure there is
    raised by a later call)."""
    return _write(Path(path), write, None)


def _write(path: Path, write: Callable[[IO[bytes]], None], snapshot_bytes: int | None) -> Path:
    """:func:`atomic_write`; ``snapshot_bytes`` (not None: what ``write`` writes never changes,
    about that many bytes) lets a run that holds its files call ``write`` at the flush."""
    if discarding_now():
        return path
    ledger = getattr(_local, "ledger", None)
    files = _files()
    spares = getattr(_local, "spares", None) if ledger is not None and files is not None else None
    if spares is not None and spares.folder is None:  # the run's first file: its folder of spares is recorded first
        spares.open(ledger.root / STATE_DIR / SPARE_DIR, ledger.claim_folder)
    if ledger is not None:
        defer = files is not None and files.holds  # the file is created after the hand-over
        ledger.claim(path, defer=defer)
        if defer:
            files.before_hand_over = ledger.flush
    if files is None:
        return _write_file(path, write)
    if snapshot_bytes is not None and files.holds:
        files.put(path, lambda: _serialised(path, write), snapshot_bytes)
    else:
        data = _serialised(path, write)
        files.put(path, data, len(data))
    if spares is not None and spares.written(path):
        files.writer.poke()  # the writer's thread makes more spares while it has nothing to write
    return path


def _serialised(path: Path, write: Callable[[IO[bytes]], None]) -> memoryview:
    buffer = BytesIO()
    try:
        write(buffer)
    except OSError as error:
        raise _write_error(path, error) from None
    return buffer.getbuffer()


@contextlib.contextmanager
def background_writes(enabled: bool = True, interval: float = 0.0) -> Iterator[None]:
    """Write this thread's files on a background thread for the duration of the block, held
    in memory between flushes ``interval`` seconds apart (0: each file is handed over at once; see
    :mod:`izitorch.held`); every file is on disk when the block ends. A write error is raised
    then; when the block ends on an interrupt (whose message says the finished epochs are saved),
    the write error replaces it.

    Each thread has its own writer (two runs in two threads do not share one). Nested in the
    same thread, ``enabled=True`` keeps the outer writer and ``enabled=False`` writes in line
    after the outer writer's files (``interval`` is then of no use: nothing is held)."""
    outer = _files()
    if outer is not None:
        if enabled:
            yield
            return
        outer.flush()
        _local.files = None
        try:
            yield
        finally:
            _local.files = outer
        return
    if not enabled:
        yield
        return
    spares = _local.spares = Spares()
    files = _local.files = HeldFiles(BackgroundWriter(stage=functools.partial(_stage_or_remove, spares=spares), idle=spares.make_one), interval)
    try:
        yield
    except BaseException as error:
        _local.files = _local.spares = None
        failure = _close(files, spares)
        if failure is not None and isinstance(error, (KeyboardInterrupt, Interrupted)):
            raise failure from None
        raise
    _local.files = _local.spares = None
    failure = _close(files, spares)  # everything is written (or dropped after a failure)
    if failure is not None:
        raise failure


def _close(files: HeldFiles, spares: Spares) -> BaseException | None:
    """Every file on disk and the writer stopped, then the spare files not used deleted."""
    try:
        return files.close()
    finally:
        spares.close()


#: What :func:`remove` hands the background writer as the bytes of a file to delete (told apart
#: by identity: a write's bytes are always another object).
_REMOVAL = memoryview(b"")


def remove(path: str | Path) -> None:
    """Delete a file the run wrote, in order with its writes (a file still waiting to be written
    is written, then deleted). Only a file recorded in the run's ledger (:mod:`izitorch.ownership`)
    may be deleted: izitorch removes nothing it did not write."""
    path = Path(path)
    if discarding_now():
        return
    ledger = getattr(_local, "ledger", None)
    if ledger is None or not ledger.recorded(path):
        raise IzitorchError(f"refusing to delete {path}: this run did not write it, and izitorch deletes only its own files")
    ledger.forget(path)
    files = _files()
    if files is None:
        _remove_file(path)
    else:
        files.put(path, _REMOVAL, 0)  # in place of a held version of the file, in order


def _stage_or_remove(path: Path, data: memoryview, spares: Spares | None = None) -> Staged:
    """What the background writer does with a queued file: stage its bytes (written and fsynced
    under a temporary name, a spare file where one is ready), or a deletion to carry out in its turn."""
    if data is _REMOVAL:
        return _Removal(path)
    return _stage_file(path, lambda handle: handle.write(data), spares)


class _Removal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def publish(self) -> None:
        _remove_file(self.path)

    def discard(self) -> None:
        pass


def _remove_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        raise IzitorchError(f"cannot delete {path}: {error.strerror or error}; check the permissions of res_dir") from None


def commit() -> None:
    """An epoch's files are all written (its resume state last): flush the held files when the
    interval has passed, and wait until the previous flush is on disk (see :mod:`izitorch.held`)."""
    files = _files()
    if files is not None:
        files.commit()


def _write_file(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    _stage_file(path, write).publish()
    return path


class _StagedFile:
    """A file's new version under its temporary name, fsynced: :meth:`publish` moves it into place."""

    def __init__(self, tmp: str, path: Path) -> None:
        self.tmp, self.path = tmp, path

    def publish(self) -> None:
        try:
            os.replace(self.tmp, self.path)
        except BaseException as error:
            self.discard()
            if isinstance(error, OSError):
                raise _write_error(self.path, error) from None
            raise

    def discard(self) -> None:
        Path(self.tmp).unlink(missing_ok=True)


def _stage_file(path: Path, write: Callable[[IO[bytes]], None], spares: Spares | None = None) -> _StagedFile:
    """Call ``write`` on a new temporary file next to ``path``, flush and fsync it."""
    tmp = None
    try:
        fd, tmp = _create_temporary(path, spares)
        with open(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(path, error) from None
        raise
    return _StagedFile(tmp, path)


_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_temporary_numbers = itertools.count()


def _create_temporary(path: Path, spares: Spares | None = None) -> tuple[int, str]:
    """A new ``.<name>.<pid>-<n>.tmp`` next to ``path``, open for writing: one of ``spares``
    moved there when one is ready, else created with the mode a plain open() would give (0666 &
    ~umask); the folder is made when missing. Fewer system calls and less Python than
    ``tempfile.mkstemp`` + ``fchmod``, which counts when the writer thread has to take the GIL
    from the training loop for each step."""
    for _ in range(8):
        tmp = f"{path.parent}{os.sep}.{path.name}.{os.getpid()}-{next(_temporary_numbers)}.tmp"
        if spares is not None:
            if os.path.lexists(tmp):  # a leftover of an earlier process with the same pid: rename would replace it
                continue
            fd = spares.take(tmp, lambda: path.parent.mkdir(parents=True, exist_ok=True))
            if fd is not None:
                return fd, tmp
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:  # a leftover of an earlier process with the same pid
            continue
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _write_error(path: Path, error: OSError) -> IzitorchError:
    """A failed write as one line; the previous version of the file is intact."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return TrainingError(f"no space left on the device while writing {path}; the previous version is intact: free some space, then continue with --resume")
    return IzitorchError(f"cannot write {path}: {error.strerror or error}; check the permissions of res_dir or choose another one")


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_pickle(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda f: pickle.dump(data, f))


def save_torch(path: str | Path, data: Any, snapshot: bool = False) -> Path:
    """``torch.save(data)`` to ``path``. ``snapshot=True`` promises that ``data`` is not changed
    after the call (its tensors own their memory, its containers are its own): a run that holds
    its files then serialises it when the file is flushed, not now."""
    return _write(Path(path), lambda f: torch.save(data, f), tensor_bytes(data) if snapshot else None)


def save_torch_built(path: str | Path, build: Callable[[], Any], size: int) -> Path:
    """``torch.save(build())`` to ``path``, where ``build`` gives, whenever it is called, what the
    file holds at this call (it builds it from copies made by now): a run that holds its files
    calls it when the file is flushed, otherwise now. ``size``: about the bytes of its tensors
    (what holding it costs)."""
    return _write(Path(path), lambda f: torch.save(build(), f), size)


def tensor_bytes(data: Any) -> int:
    """The bytes of the tensors in nested dicts, lists and tuples (what holding them costs)."""
    if isinstance(data, torch.Tensor):
        return data.nbytes
    if isinstance(data, dict):
        return sum(tensor_bytes(value) for value in data.values())
    if isinstance(data, (list, tuple)):
        return sum(tensor_bytes(value) for value in data)
    return 0


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)
