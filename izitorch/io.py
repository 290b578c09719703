"""Every file izitorch writes goes through here: temp file, flush, fsync, ``os.replace``.

A crash at any moment leaves either the previous file or the new one, never half of one, so a
checkpoint or trainlog that existed before a failure still loads after it.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import torch

from izitorch.errors import IzitorchError, TrainingError

# mkstemp makes 0600 files; outputs get the mode a plain open() would give them (0666 & ~umask)
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(path, error) from None
        raise
    return path


def _write_error(path: Path, error: OSError) -> IzitorchError:
    """A failed write as one line; the previous version of the file is intact."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return TrainingError(f"no space left on the device while writing {path}; the previous version is intact: free some space, then continue with --resume")
    return IzitorchError(f"cannot write {path}: {error.strerror or error}; check the permissions of res_dir or choose another one")


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_pickle(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda f: pickle.dump(data, f))


def save_torch(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda f: torch.save(data, f))


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
