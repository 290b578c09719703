"""Empty files made ahead of time, so that writing a file does not wait for the file system to
create one.

Why: every file izitorch writes is a new temporary file moved into place (:mod:`izitorch.io`),
and on some file systems creating a file costs far more than writing a few kilobytes into it
and renaming it (network file systems, and virtual disks: half a millisecond a file, while an
open, a write and a rename take a tenth of that). A sweep's flush is hundreds of small files
(a trainlog, a checkpoint, a confusion matrix... per model), so that cost lands on the end of
every run and on every flush. The writer's thread is idle between flushes: there it creates
empty files in the run's own folder (``res_dir/.izitorch/spare``), and a write takes one of them
by renaming it to its temporary name next to its target (a rename within one file system is
cheap and atomic), then fills it as it would a new file.

What a run can count on:

- **the same files**: a temporary file made from a spare has the name, the mode (0666 less the
  umask) and the owner of one created in place, so everything that knows izitorch's temporary
  files (a resume's clean-up, ``--overwrite``) treats both alike;
- **fallback**: with no spare left, or where a target folder lies on another file system than
  ``res_dir/.izitorch``, a write creates its temporary file as it would without spares;
- **how many**: twice the number of distinct files the run has written so far (at most
  :data:`MAX_SPARES`): a run that rewrites every file at each flush needs one a file, and the
  end of a run adds about as many new ones (a model's final test scores) as it had before;
- **ownership**: the folder is claimed whole in the run's record (:mod:`izitorch.ownership`)
  before the first spare exists; the spares left at the end of the run are deleted with their
  folder, and those a kill left behind are taken again by the resumed run (only empty regular
  files; anything else there is left alone).
"""

from __future__ import annotations

import collections
import itertools
import os
import stat
import threading
from pathlib import Path
from typing import Callable

#: The most spares a run keeps ready.
MAX_SPARES = 1024
#: The folder of the spares inside the run's own folder (``res_dir/.izitorch``).
SPARE_DIR = "spare"

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_REOPEN = os.O_WRONLY | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class Spares:
    """The spare files of one run: made by :meth:`make_one` on the writer's thread, taken by
    :meth:`take` on its staging threads, wanted by the thread that writes the run's files.

    Inactive (every :meth:`take` gives None) until :meth:`open` names its folder."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._ready: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._paths: set[Path] = set()  # the distinct files written so far
        self._wanted = 0
        self._made = itertools.count()
        self._failed = False  # the folder cannot be written to: stop making spares

    def open(self, folder: Path, claim: Callable[[Path], None]) -> None:
        """Keep the spares in ``folder``, claimed with ``claim`` first; take the empty files a
        killed run left there."""
        claim(folder)
        self.folder = folder
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
                        self._ready.append(entry.path)
        except FileNotFoundError:
            pass
        except OSError:
            self._failed = True

    def written(self, path: Path) -> bool:
        """Count ``path`` among the run's files; True when that raises the number of spares wanted."""
        if path in self._paths or self.folder is None:
            return False
        self._paths.add(path)
        with self._lock:
            self._wanted = min(2 * len(self._paths), MAX_SPARES)
        return not self._failed

    def pending(self) -> bool:
        """Whether more spares are wanted than are ready."""
        return not self._failed and len(self._ready) < self._wanted

    def make_one(self) -> bool:
        """Create one spare (on the writer's thread, while it has nothing to write); return
        whether more are wanted."""
        if self.folder is None or not self.pending():
            return False
        path = f"{self.folder}{os.sep}{os.getpid()}-{next(self._made)}"
        try:
            fd = os.open(path, _FLAGS, 0o666)
        except FileNotFoundError:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                self._failed = True
            return self.pending()
        except FileExistsError:  # a leftover of an earlier process with the same pid
            return True
        except OSError:
            self._failed = True
            return False
        os.close(fd)
        self._ready.append(path)
        return self.pending()

    def take(self, temporary: str, make_folder: Callable[[], None]) -> int | None:
        """A spare moved to ``temporary`` and opened for writing (emptied); None when no spare
        is ready or it cannot be moved there (another file system). ``make_folder`` makes the
        folder of ``temporary`` when it is missing."""
        try:
            spare = self._ready.popleft()
        except IndexError:
            return None
        try:
            try:
                os.rename(spare, temporary)
            except FileNotFoundError:
                if not os.path.lexists(spare):
                    return None  # gone (deleted by hand): the caller creates its file
                make_folder()
                os.rename(spare, temporary)
        except OSError:  # EXDEV: the target folder is on another file system than the spares
            self._ready.appendleft(spare)
            return None
        try:
            return os.open(temporary, _REOPEN)
        except OSError:
            os.unlink(temporary)
            return None

    def close(self) -> None:
        """Delete the spares not taken, then their folder once empty (the end of the run)."""
        self._wanted = 0
        while self._ready:
            try:
                os.unlink(self._ready.popleft())
            except OSError:
                pass
        if self.folder is not None:
            try:
                self.folder.rmdir()
            except OSError:
                pass
