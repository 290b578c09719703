"""What a run owns inside ``res_dir``: the record of every file and folder izitorch wrote there.

izitorch deletes and overwrites only what a run of its own wrote. Every file it writes goes
through :mod:`izitorch.io`, which asks the run's :class:`Ledger` to :meth:`~Ledger.claim` the path
first. The ledger appends the path (and each new folder above it) to
``res_dir/.izitorch/owned.txt`` before the file is created, so the record always covers what is
on disk: ``--overwrite`` removes exactly the recorded entries, a new run refuses a folder holding
anything else, and a resume cleans up only the temporary files of recorded names.

A claim also checks that the path, with every symbolic link resolved, lies inside ``res_dir``:
a second guard behind the validation of model names.

A run may delete a file it wrote (the checkpoint's ``top_k`` drops the epochs that fall out):
:meth:`Ledger.forget` appends a line ``/removed <path>`` first. The path stays the run's (so that
``--overwrite`` still deletes it if a kill left it on disk, and a resumed run that trains that
epoch again deletes it again), but it is no longer missed by :meth:`Ledger.missing`. A recorded
path never starts with ``/``, so the two kinds of lines never mix, and a record read by an older
izitorch keeps its paths.

A folder that another library fills (MLflow's file store, ``res_dir/mlruns``) is claimed whole
with :meth:`Ledger.claim_folder`: a line ``/folder <path>/`` says that everything below it is the
run's, whatever its names. ``--overwrite`` deletes the folder with all it holds, and nothing
inside is ever taken for a temporary file of izitorch's.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from izitorch.errors import IzitorchError, TrainingError

STATE_DIR = ".izitorch"  # the run's own folder: resume states and this record
RECORD = "owned.txt"
LOCK_NAME = ".izitorch.lock"

#: ``.<name>.<pid>-<n>.tmp``: a temporary file of :mod:`izitorch.io` for ``<name>`` (a write cut
#: short by a kill).
TEMPORARY = re.compile(r"^\.(?P<target>.+)\.\d+-\d+\.tmp$")
#: A record line saying that the run deleted the path after it.
REMOVED = "/removed "
#: A record line claiming a folder with everything it will ever hold (written by another library).
FOLDER = "/folder "


class Ledger:
    """The record of a run's own entries in ``res_dir``, as paths relative to it (folders end with ``/``)."""

    def __init__(self, res_dir: Path) -> None:
        self.root = Path(os.path.abspath(res_dir))
        self.resolved_root = self.root.resolve()
        self.file = self.root / STATE_DIR / RECORD
        entries, self.removed, folders = read_lines(self.file)
        self.entries: set[str] = set(entries)  # every path the run recorded, the removed ones too
        self.folders: set[str] = set(folders)  # folders claimed whole (``/`` at the end), with all they hold
        self._claimed: set[str] = set()  # absolute paths already checked and recorded in this process
        self._pending: list[str] = []  # recorded in memory, not yet in the file (claim(defer=True))
        self._resolved_folders: dict[str, Path] = {}  # a folder's absolute path -> its links resolved

    def claim(self, path: str | Path, defer: bool = False, folder: bool = False) -> None:
        """Record ``path`` (and the folders above it) as the run's, before it is written; refuse
        a path that resolves outside ``res_dir``.

        ``defer``: the caller creates the file only after :meth:`flush` (a run's held files,
        :mod:`izitorch.held`), so the record's lines are appended then, all in one write.
        ``folder``: ``path`` is a folder the run creates (for a library that writes its own
        files there, each claimed once it exists)."""
        key = f"{path}{os.sep}" if folder else str(path)
        if key in self._claimed:
            return
        parts = self._inside(path)
        new = [f"{'/'.join(parts[:depth])}/" for depth in range(1, len(parts))]
        new.append("/".join(parts) + ("/" if folder else ""))
        self._append(new, defer)
        self._claimed.add(key)

    def claim_folder(self, path: str | Path) -> None:
        """Record the folder ``path`` as the run's with everything it holds, before another
        library writes into it; refuse a path that resolves outside ``res_dir``."""
        parts = self._inside(path)
        folder = f"{'/'.join(parts)}/"
        self._append([f"{'/'.join(parts[:depth])}/" for depth in range(1, len(parts) + 1)])
        if folder not in self.folders:
            self._write_lines([f"{FOLDER}{folder}"])
            self.folders.add(folder)

    def _inside(self, path: str | Path) -> tuple[str, ...]:
        """The parts of ``path`` below ``res_dir``, once checked that it resolves inside it."""
        absolute = Path(os.path.abspath(path))
        resolved = self._resolve(absolute)
        if resolved == self.resolved_root or not resolved.is_relative_to(self.resolved_root):
            raise IzitorchError(
                f'refusing to write {path}: it resolves to {resolved}, outside res_dir "{self.root}"; remove the symbolic link or choose other names'
            )
        return absolute.relative_to(self.root).parts

    def _resolve(self, absolute: Path) -> Path:
        """``absolute.resolve()``, its folder's resolution cached: a run writes many files in few
        folders, and resolving walks every component of the path."""
        folder = str(absolute.parent)
        resolved_folder = self._resolved_folders.get(folder)
        if resolved_folder is None:
            resolved_folder = self._resolved_folders[folder] = absolute.parent.resolve()
        return absolute.resolve() if os.path.islink(absolute) else resolved_folder / absolute.name

    def flush(self) -> None:
        """Append the deferred claims to the record."""
        if self._pending:
            lines, self._pending = self._pending, []
            self._write_lines(lines)

    def _append(self, entries: list[str], defer: bool = False) -> None:
        """Append entries to the record; the first write of a run creates it, so that a run which
        failed before writing anything leaves no record behind."""
        if not self.entries:
            entries = [f"{STATE_DIR}/", f"{STATE_DIR}/{RECORD}", *entries]
        entries = [entry for entry in dict.fromkeys(entries) if entry not in self.entries or entry in self.removed]  # a removed file written again
        if not entries:
            return
        if defer:
            self._pending.extend(entries)
        else:
            self._write_lines([*self._pending, *entries])
            self._pending = []
        self.entries.update(entries)
        self.removed.difference_update(entries)

    def _write_lines(self, lines: list[str]) -> None:
        text = "".join(f"{line}\n" for line in lines).encode("utf-8")
        try:  # appended, not replaced: a kill leaves at most a cut last line, which read_record skips
            self.file.parent.mkdir(exist_ok=True)
            fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                os.write(fd, text)
            finally:
                os.close(fd)
        except OSError as error:
            raise res_dir_error(self.root, error) from None

    def recorded(self, path: str | Path) -> bool:
        """Whether the file ``path`` is recorded as the run's, removed since or not: a resumed run
        trains again the epochs after its saved state, and so deletes again what they deleted
        (a file a kill left behind, or one already gone)."""
        relative = self._relative(path)
        return relative is not None and relative in self.entries

    def forget(self, path: str | Path) -> None:
        """Record that the run deletes its file ``path`` (before deleting it: see the module's doc)."""
        relative = self._relative(path)
        if relative is None or relative not in self.entries or relative in self.removed:
            return
        self._write_lines([*self._pending, f"{REMOVED}{relative}"])  # after the path's own line
        self._pending = []
        self.removed.add(relative)
        self._claimed.discard(str(path))  # written again later, it is recorded again

    def _relative(self, path: str | Path) -> str | None:
        try:
            return Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:  # outside res_dir
            return None

    def owns(self, relative: str, is_dir: bool) -> bool:
        """Whether an entry (relative to ``res_dir``, ``/``-separated) is the run's: recorded, the
        lock, or a temporary file of a recorded file."""
        if relative == LOCK_NAME or self._in_folder(relative):
            return True
        if is_dir:
            return f"{relative}/" in self.entries
        if relative in self.entries:
            return True
        folder, _, name = relative.rpartition("/")
        match = TEMPORARY.match(name)
        return match is not None and f"{folder}/{match['target']}".lstrip("/") in self.entries

    def _in_folder(self, relative: str) -> bool:
        """Whether an entry lies inside a folder claimed whole."""
        return any(relative.startswith(folder) for folder in self.folders)

    def foreign(self) -> Iterator[Path]:
        """Every entry of ``res_dir`` that is not the run's (a foreign folder is not entered)."""
        for folder, dirs, files in os.walk(self.root):
            base = Path(folder).relative_to(self.root).as_posix()
            prefix = "" if base == "." else f"{base}/"
            for name in list(dirs):
                if os.path.islink(os.path.join(folder, name)) or not self.owns(prefix + name, is_dir=True):
                    dirs.remove(name)
                    yield Path(folder) / name
            for name in files:
                if not self.owns(prefix + name, is_dir=False):
                    yield Path(folder) / name

    def temporaries(self) -> list[Path]:
        """The temporary files of recorded names: writes cut short by a kill."""
        found = []
        for folder in {""} | {entry[:-1] for entry in self.entries if entry.endswith("/")}:
            directory = self.root / folder
            if not directory.is_dir() or directory.is_symlink():
                continue
            for child in directory.iterdir():
                relative = f"{folder}/{child.name}".lstrip("/")
                if relative not in self.entries and not self._in_folder(relative) and TEMPORARY.match(child.name) and self.owns(relative, is_dir=False):
                    found.append(child)
        return found

    def missing(self) -> list[str]:
        """Recorded files that are no longer on disk (deleted after the run wrote them)."""
        return sorted(entry for entry in self.entries - self.removed if not entry.endswith("/") and not (self.root / entry).is_file())

    def remove_all(self) -> None:
        """Delete every recorded entry and temporary file; the record itself goes last, so that an
        interrupted removal can be repeated. Folders are removed only once empty."""
        files = [self.root / entry for entry in self.entries if not entry.endswith("/") and entry != f"{STATE_DIR}/{RECORD}"]
        folders = sorted((self.root / entry[:-1] for entry in self.entries if entry.endswith("/")), key=lambda p: len(p.parts), reverse=True)
        try:
            for path in [*files, *self.temporaries()]:
                if path.is_symlink() or path.is_file():
                    path.unlink()
            for folder in sorted(self.folders):  # what another library wrote there: the whole tree (links are removed, not followed)
                path = self.root / folder
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
            self.file.unlink(missing_ok=True)
            for folder in folders:
                if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                    folder.rmdir()
        except OSError as error:
            raise res_dir_error(self.root, error) from None
        self.entries.clear()
        self.removed.clear()
        self.folders.clear()
        self._claimed.clear()


def read_record(file: Path) -> list[str]:
    """The entries of a record; a line cut by a kill (no newline) is skipped, as is anything
    that is not a plain relative path."""
    return read_entries(file)[0]


def read_entries(file: Path) -> tuple[list[str], set[str]]:
    """The entries of a record (as :func:`read_record`) and those removed since they were
    last recorded (``/removed <path>`` lines)."""
    entries, removed, _ = read_lines(file)
    return entries, removed


def read_lines(file: Path) -> tuple[list[str], set[str], list[str]]:
    """The entries of a record, those removed since they were last recorded (``/removed
    <path>`` lines), and the folders claimed whole (``/folder <path>/`` lines)."""
    try:
        text = file.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], set(), []
    except OSError as error:
        raise IzitorchError(f"cannot read {file}: {error.strerror or error}; check the permissions of res_dir") from None
    entries: list[str] = []
    removed: set[str] = set()
    folders: list[str] = []
    for line in text.split("\n")[:-1]:  # the last piece has no newline: empty, or cut short
        if line.startswith(REMOVED):
            removed.add(line[len(REMOVED) :])
        elif line.startswith(FOLDER):
            folder = line[len(FOLDER) :]
            if folder.endswith("/") and not folder.startswith("/") and ".." not in folder.split("/"):
                folders.append(folder)
        elif line and not line.startswith("/") and ".." not in line.split("/"):
            entries.append(line)
            removed.discard(line)
    return entries, removed, folders


def finished_path(res_dir: Path) -> Path:
    """``res_dir/.izitorch/finished.json``: written when a run ends, so that a finished run whose
    resume state was deleted is told apart from one killed before it saved an epoch."""
    return res_dir / STATE_DIR / "finished.json"


def has_record(res_dir: Path) -> bool:
    return (res_dir / STATE_DIR / RECORD).is_file()


def res_dir_error(res_dir: Path, error: OSError) -> IzitorchError:
    """A failure to create, lock or clean ``res_dir`` as one line (exit 1 for a full disk)."""
    where = f'res_dir "{res_dir}"'
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return TrainingError(f"{where}: no space left on the device; free some space and run again", "run.res_dir")
    reasons = {
        errno.ENOTDIR: "is a file, not a folder",
        errno.EEXIST: "is a file, not a folder",
        errno.EACCES: "cannot be written (permission denied)",
        errno.EPERM: "cannot be written (permission denied)",
        errno.EROFS: "is on a read-only file system",
        errno.ENAMETOOLONG: "has a name that is too long",
        errno.EISDIR: "is a folder where izitorch needs a file",
    }
    reason = reasons.get(error.errno, f"cannot be used ({error.strerror or error})")
    return IzitorchError(f"{where}: {error.filename or res_dir} {reason}; choose another res_dir or fix that path", "run.res_dir")
