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

- **the same files**: a temporary file made from a spare has the name and the mode (0666 less
  the umask) of one created in place, so everything that knows izitorch's temporary files (a
  resume's clean-up, ``--overwrite``) treats both alike. What a file takes from its folder when it
  is created (the group of a setgid folder, a default ACL) is that of ``res_dir/.izitorch``;
- **only plain files**: a spare is written to only when it is still a regular file of one name
  owned by this user (a link put in its place is not followed, a hard link is not written
  through): anything else is moved back and left alone;
- **fallback**: with no spare left, or where a target folder lies on another file system than
  ``res_dir/.izitorch``, a write creates its temporary file as it would without spares;
- **how many**: twice the number of distinct files the run has written so far (at most
  :data:`MAX_SPARES`), made again after each flush used them: a run that rewrites every file at
  each flush needs one a file, and the end of a run adds about as many new ones (a model's final
  test scores) as it had before;
- **ownership**: the folder is claimed whole in the run's record (:mod:`izitorch.ownership`)
  before the first spare exists; the spares left at the end of the run are deleted with their
  folder, and those a kill left behind are taken again by the resumed run (only empty plain
  files of this user's, as above; anything else there is left alone).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import stat
from pathlib import Path
from typing import Callable

#: The most spares a run keeps ready.
MAX_SPARES = 1024
#: The folder of the spares inside the run's own folder (``res_dir/.izitorch``).
SPARE_DIR = "spare"

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
#: A spare is reopened without following a link: only the plain file it was can be written to.
_REOPEN = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


class Spares:
    """The spare files of one run: made by :meth:`make_one` on the writer's thread, taken by
    :meth:`take` on its staging threads (a deque: appends and pops need no lock), wanted by the
    thread that writes the run's files.

    Inactive (every :meth:`take` gives None) until :meth:`open` names its folder."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._ready: collections.deque[str] = collections.deque()
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
                    if _plain(entry.stat(follow_symlinks=False)):
                        self._ready.append(entry.path)
        except FileNotFoundError:
            pass
        except OSError:
            self._failed = True

    def written(self, path: Path) -> bool:
        """Count ``path`` among the run's files; True when fewer spares are ready than wanted
        (the writer's thread should make more: each flush uses them up)."""
        if self.folder is None:
            return False
        if path not in self._paths:
            self._paths.add(path)
            self._wanted = min(2 * len(self._paths), MAX_SPARES)  # read by the writer's thread: one assignment
        return self.pending()

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
        self._ready.append(path)
        try:
            os.close(fd)
        except OSError:
            pass
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
            fd = os.open(temporary, _REOPEN)
        except OSError:  # a link put there: not followed
            fd = None
        if fd is not None:
            try:
                info = os.fstat(fd)
                if _plain(info, empty=False):
                    if info.st_size:
                        os.ftruncate(fd, 0)
                    return fd
            except OSError:
                pass
            os.close(fd)
        with contextlib.suppress(OSError):  # not a plain file of this run's: back where it was, left alone
            os.rename(temporary, spare)
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


def _plain(info: os.stat_result, empty: bool = True) -> bool:
    """Whether a spare's status is that of one this run can write to: a regular file of one
    name (not a link, not a hard link to a file elsewhere), this user's, empty when ``empty``."""
    owner = getattr(os, "getuid", None)
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and (owner is None or info.st_uid == owner()) and not (empty and info.st_size)
