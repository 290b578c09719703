"""izitorch touches only what a run of its own wrote in res_dir (izitorch.ownership, runner).

Each case runs the real command line in-process (``cli.main``) and checks the exit code, the
one line on stderr, and that the user's files, and everything outside res_dir, are untouched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import ERROR_PREFIX, cli, error_of, make_manifest
from izitorch.config import ModelSpec
from izitorch.errors import IzitorchError
from izitorch.manifest import config_from_dict
from izitorch.ownership import Ledger, read_record


def run(capsys, *args: str) -> tuple[int, str]:
    """``izitorch ARGS`` in this process: (exit code, stderr)."""
    code, _, err = cli(capsys, *args)
    return code, err


def one_error(err: str) -> str:
    """The one error line of stderr, whole."""
    return ERROR_PREFIX + error_of(err)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (symbolic links as their target)."""
    return {
        p.relative_to(folder).as_posix(): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


# -- the ledger ---------------------------------------------------------------------------------


def test_a_claim_records_the_file_and_each_new_folder_above_it(tmp_path):
    ledger = Ledger(tmp_path)
    assert not (tmp_path / ".izitorch").exists()  # nothing is recorded before the first write
    ledger.claim(tmp_path / "mlp" / "FOLD_1" / "trainlog.json")
    ledger.claim(tmp_path / "mlp" / "conf.json")
    assert read_record(tmp_path / ".izitorch" / "owned.txt") == [
        ".izitorch/",
        ".izitorch/owned.txt",
        "mlp/",
        "mlp/FOLD_1/",
        "mlp/FOLD_1/trainlog.json",
        "mlp/conf.json",
    ]


def test_a_folder_claimed_for_a_library_holds_only_the_files_claimed_in_it(tmp_path):
    """A library that names its own files (TensorBoard) writes into a claimed folder; each file
    is claimed once it exists, and --overwrite's removal takes those and the folder, no more."""
    ledger = Ledger(tmp_path)
    folder = tmp_path / "tensorboard" / "mlp"
    ledger.claim(folder, folder=True)
    assert read_record(tmp_path / ".izitorch" / "owned.txt")[2:] == ["tensorboard/", "tensorboard/mlp/"]
    folder.mkdir(parents=True)
    (folder / "events.out.1").write_text("x")
    ledger.claim(folder / "events.out.1")
    (folder / "notes.txt").write_text("mine")
    assert [p.relative_to(tmp_path).as_posix() for p in ledger.foreign()] == ["tensorboard/mlp/notes.txt"]
    ledger.remove_all()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["tensorboard", "tensorboard/mlp", "tensorboard/mlp/notes.txt"]


def test_a_claim_that_resolves_outside_res_dir_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    (res_dir / "mlp").symlink_to(outside)
    ledger = Ledger(res_dir)
    with pytest.raises(IzitorchError, match="outside res_dir"):
        ledger.claim(res_dir / "mlp" / "conf.json")
    with pytest.raises(IzitorchError, match="outside res_dir"):
        ledger.claim(res_dir / ".." / "conf.json")
    with pytest.raises(IzitorchError, match="outside res_dir"):
        ledger.claim(res_dir)
    assert not (res_dir / ".izitorch").exists() and list(outside.iterdir()) == []


def test_a_file_symlinked_out_of_a_claimed_folder_is_refused(tmp_path):
    res_dir = tmp_path / "res"
    (res_dir / "mlp").mkdir(parents=True)
    ledger = Ledger(res_dir)
    ledger.claim(res_dir / "mlp" / "conf.json")  # the folder's resolution is now known
    (res_dir / "mlp" / "trainlog.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(IzitorchError, match="outside res_dir"):
        ledger.claim(res_dir / "mlp" / "trainlog.json")


def test_held_files_are_recorded_before_they_land_and_a_removal_after_its_file(tmp_path):
    from izitorch import io as izio

    ledger, landed = Ledger(tmp_path), []

    def check_record(path, data):  # each file, as it is written: its line is in the record already
        landed.append((path.relative_to(tmp_path).as_posix(), read_record(ledger.file) if ledger.file.exists() else []))
        return izio._stage_or_remove(path, data)

    with izio.owned_by(ledger), izio.background_writes(interval=3600.0):  # held until the end
        izio._writer()._stage = check_record
        for name in ("a/log.json", "b/log.json"):
            izio.write_json(tmp_path / name, {})
    assert sorted(name for name, _ in landed) == ["a/log.json", "b/log.json"]  # staged side by side: any order
    assert all(name in record for name, record in landed)
    with izio.owned_by(ledger), izio.background_writes(interval=3600.0):
        izio.write_json(tmp_path / "c.json", {})
        izio.remove(tmp_path / "c.json")
    record = ledger.file.read_text().splitlines()
    assert record.index("/removed c.json") > record.index("c.json") and not (tmp_path / "c.json").exists()


def test_a_record_cut_by_a_kill_loses_only_its_last_line(tmp_path):
    record = tmp_path / "owned.txt"
    record.write_text("conf.json\nmlp/\nmlp/model.pth")
    assert read_record(record) == ["conf.json", "mlp/"]
    record.write_text("conf.json\n/etc/passwd\n../up\nmlp/../../x\n")
    assert read_record(record) == ["conf.json"]


def test_foreign_entries_and_own_temporary_files(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.claim(tmp_path / "mlp" / "trainlog.json")
    for name in ("mlp/trainlog.json", "mlp/.trainlog.json.123-4.tmp", "mlp/.other.json.1-2.tmp", "raw.csv", ".izitorch.lock", "notes/.draft.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in ledger.foreign()) == ["mlp/.other.json.1-2.tmp", "notes", "raw.csv"]
    assert [p.relative_to(tmp_path).as_posix() for p in ledger.temporaries()] == ["mlp/.trainlog.json.123-4.tmp"]


def test_a_folder_claimed_whole_owns_all_it_holds_and_is_removed_whole(tmp_path):
    """MLflow's file store: files izitorch never names, below a folder the run claimed as a whole."""
    ledger = Ledger(tmp_path)
    ledger.claim_folder(tmp_path / "mlruns")
    ledger.claim(tmp_path / "conf.json")
    for name in ("conf.json", "mlruns/1/meta.yaml", "mlruns/1/abc/metrics/loss", "mlruns/.meta.yaml.1-2.tmp", "raw.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    again = Ledger(tmp_path)  # as read back from the record by the next run
    assert [p.relative_to(tmp_path).as_posix() for p in again.foreign()] == ["raw.csv"]
    assert again.temporaries() == []  # a name like a temporary file's, inside: MLflow's, kept on a resume
    again.remove_all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.csv"]


def test_a_folder_claimed_whole_that_resolves_outside_res_dir_is_refused(tmp_path):
    outside, res_dir = tmp_path / "outside", tmp_path / "res"
    outside.mkdir()
    res_dir.mkdir()
    (res_dir / "mlruns").symlink_to(outside)
    with pytest.raises(IzitorchError, match="outside res_dir"):
        Ledger(res_dir).claim_folder(res_dir / "mlruns")
    with pytest.raises(IzitorchError, match="outside res_dir"):
        Ledger(res_dir).claim_folder(res_dir)
    assert list(outside.iterdir()) == [] and not (res_dir / ".izitorch").exists()


# -- a new run, --overwrite, forbidden folders --------------------------------------------------


def test_a_new_run_refuses_a_folder_holding_other_files(tmp_path, capsys):
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    (res_dir / "raw.csv").write_text("a,b\n1,2\n")
    code, err = run(capsys, "run", str(make_manifest(tmp_path)))
    assert code == 2
    assert "holds files that are not an izitorch run; choose a new or empty folder" in one_error(err)
    assert snapshot(res_dir) == {"raw.csv": b"a,b\n1,2\n"} and sorted(os.listdir(res_dir)) == ["raw.csv"]


def test_overwrite_deletes_only_the_runs_own_files_and_refuses_when_others_joined(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    res_dir = tmp_path / "res"
    assert run(capsys, "run", str(manifest))[0] == 0
    first = snapshot(res_dir)
    (res_dir / "raw.csv").write_text("mine")
    (res_dir / "mlp" / "notes.txt").write_text("mine too")
    code, err = run(capsys, "run", str(manifest), "--overwrite")
    assert code == 2
    line = one_error(err)
    assert "holds files that are not an izitorch run (mlp/notes.txt, raw.csv); --overwrite deletes only what izitorch wrote" in line
    assert snapshot(res_dir) == {**first, "raw.csv": b"mine", "mlp/notes.txt": b"mine too"}  # nothing deleted

    (res_dir / "raw.csv").unlink()
    (res_dir / "mlp" / "notes.txt").unlink()
    (res_dir / "mlp" / "model_epoch9.pth.tar").write_bytes(b"not izitorch's")  # an izitorch-like name it did not write
    assert run(capsys, "run", str(manifest), "--overwrite")[0] == 2
    (res_dir / "mlp" / "model_epoch9.pth.tar").unlink()
    code, err = run(capsys, "run", str(manifest), "--overwrite")
    assert code == 0, err
    assert sorted(snapshot(res_dir)) == sorted(first)
    assert read_record(res_dir / ".izitorch" / "owned.txt").count("conf.json") == 1  # a new record, not appended to the old one


def test_overwrite_of_a_run_with_only_its_own_files_leaves_no_old_file(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    res_dir = tmp_path / "res"
    assert run(capsys, "run", str(manifest), "--set", 'plugins.checkpoint.policy="all"')[0] == 0
    assert (res_dir / "mlp" / "model_epoch2.pth.tar").is_file()
    assert run(capsys, "run", str(manifest), "--overwrite")[0] == 0
    assert not list((res_dir / "mlp").glob("model_epoch*"))  # the first run's files are gone with it


@pytest.mark.parametrize(
    "res_dir, what",
    [
        ("", "the working directory"),
        (".", "the working directory"),
        ("/", "the root of a file system"),
        ("HOME", "your home folder"),
        ("MANIFEST_DIR", "a folder that holds the manifest"),
        ("MANIFEST_PARENT", "a folder that holds the manifest"),
    ],
)
def test_shared_folders_are_refused_as_res_dir(tmp_path, capsys, monkeypatch, res_dir, what):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    manifest_dir = tmp_path / "project" / "manifests"
    manifest_dir.mkdir(parents=True)
    folder = {"HOME": str(tmp_path / "home"), "MANIFEST_DIR": str(manifest_dir), "MANIFEST_PARENT": str(manifest_dir.parent)}.get(res_dir, res_dir)
    manifest = make_manifest(manifest_dir, {"run.res_dir": folder})
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, err = run(capsys, "run", str(manifest), *extra)
        assert code == 2
        line = one_error(err)
        assert f'run.res_dir: res_dir "{folder}" is {what}' in line and "a run needs a folder of its own" in line
    assert snapshot(tmp_path) == before


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    code, err = run(capsys, "run", str(make_manifest(tmp_path)), "--resume", "--overwrite")
    assert code == 2
    assert "run.resume: --resume and --overwrite cannot go together" in one_error(err)


@pytest.mark.parametrize("name", ["..", ".", "...", ".izitorch", ".izitorch.lock", ".hidden", "conf.json", "results.json", "Dataset_split.pkl", "CONF.JSON"])
def test_model_names_that_leave_res_dir_or_replace_a_run_file_are_refused(name):
    raw = {"models": [{"name": name, "model": "izitorch.models:MLP"}]}
    with pytest.raises(IzitorchError, match=r"m.toml: models\[0\].name: ") as caught:
        config_from_dict(raw, source="m.toml", check=False)
    assert "dot" in str(caught.value) or "the run's own files" in str(caught.value)
    for ok in ("mlp", "mlp.v2", "conf", "a..b"):
        ModelSpec(name=ok, model="izitorch.models:MLP")


# -- --resume -----------------------------------------------------------------------------------


def test_resume_of_a_copy_without_its_saved_state_is_refused(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    assert run(capsys, "run", str(manifest))[0] == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    for entry in (tmp_path / "res").iterdir():  # what `cp -r res/* copy` copies: no dot entries
        if not entry.name.startswith("."):
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, copy / entry.name)
    before = snapshot(copy)
    changed = make_manifest(tmp_path, {"run.res_dir": copy.as_posix()}, name="m2.toml", models=[{"params": {"hidden": 8}}])
    for extra in (["--resume"], [], ["--overwrite"]):
        code, err = run(capsys, "run", str(changed), *extra)
        assert code == 2
        assert "holds an izitorch run without its record of files" in one_error(err)
    assert snapshot(copy) == before


def test_resume_of_a_run_whose_state_is_gone_is_refused(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    assert run(capsys, "run", str(manifest))[0] == 0
    (tmp_path / "res" / ".izitorch" / "fold_1.pth.tar").unlink()
    before = snapshot(tmp_path / "res")
    code, err = run(capsys, "run", str(manifest), "--resume")
    assert code == 2
    assert "holds a finished run whose resume state is gone" in one_error(err)
    assert snapshot(tmp_path / "res") == before


def test_resume_of_a_run_killed_before_its_first_epoch_ended_starts_again(tmp_path, capsys):
    from izitorch.io import owned_by, write_json

    res_dir = tmp_path / "res"
    res_dir.mkdir()
    with owned_by(Ledger(res_dir)):  # what the killed run wrote: conf.json, nothing finished
        write_json(res_dir / "conf.json", {"stale": True})
        write_json(res_dir / "old_model" / "conf.json", {"stale": True})
    (res_dir / "raw.csv").write_text("mine")
    code, err = run(capsys, "run", str(make_manifest(tmp_path)), "--resume")
    assert code == 2 and "holds files that are not an izitorch run (raw.csv)" in one_error(err)
    (res_dir / "raw.csv").unlink()
    code, err = run(capsys, "run", str(make_manifest(tmp_path)), "--resume")
    assert code == 0 and "nothing to resume" in err
    assert not (res_dir / "old_model").exists() and "stale" not in (res_dir / "conf.json").read_text()


def test_a_run_that_fails_before_writing_leaves_no_record_and_can_run_again(tmp_path, capsys):
    """Refused under the lock (the data do not fit), the run removes the folders it created for
    res_dir, and only those; a folder that was there stays."""
    manifest = make_manifest(tmp_path, {"run.res_dir": (tmp_path / "results" / "res").as_posix()})
    code, err = run(capsys, "run", str(manifest), "--set", "data.params.limit=0")
    assert code == 2 and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["m.toml"]
    (tmp_path / "results" / "res").mkdir(parents=True)
    code, err = run(capsys, "run", str(manifest), "--set", "data.params.limit=0")
    assert code == 2 and sorted(os.listdir(tmp_path / "results" / "res")) == []
    assert run(capsys, "run", str(manifest))[0] == 0


DATASET = """\
from pathlib import Path
from izitorch.datasets import digits

def make():
    return digits(limit=int((Path(__file__).parent / "size.txt").read_text()))
"""


def test_resume_over_a_dataset_that_changed_is_refused(tmp_path, capsys):
    (tmp_path / "data.py").write_text(DATASET)
    (tmp_path / "size.txt").write_text("300")
    manifest = make_manifest(tmp_path, {"data.dataset": "data.py:make", "data.params": None})
    assert run(capsys, "run", str(manifest))[0] == 0
    before = snapshot(tmp_path / "res")
    (tmp_path / "size.txt").write_text("200")
    code, err = run(capsys, "run", str(manifest), "--resume", "--set", "run.epochs=3")
    assert code == 2
    line = one_error(err)
    assert "cannot resume: data.dataset (samples and labels) changed (300 samples, labels " in line and "-> 200 samples, labels " in line
    assert snapshot(tmp_path / "res") == before  # Dataset_split.pkl untouched

    (tmp_path / "size.txt").write_text("300")  # the same data again: it resumes (and extends the run)
    code, err = run(capsys, "run", str(manifest), "--resume", "--set", "run.epochs=3")
    assert code == 0, err
    assert "3" in (tmp_path / "res" / "mlp" / "trainlog.json").read_text()


def test_the_dataset_digest_sees_a_changed_label(tmp_path):
    import torch
    from torch.utils.data import TensorDataset

    from izitorch.resume import DATASET_KEY, dataset_fingerprint

    x, y = torch.zeros(10, 2), torch.arange(10) % 3
    same = dataset_fingerprint(TensorDataset(x, y.clone()))
    assert same == dataset_fingerprint(TensorDataset(x + 1, y.clone()))  # samples are not read: labels and length only
    y2 = y.clone()
    y2[4] = (y2[4] + 1) % 3
    assert dataset_fingerprint(TensorDataset(x, y2)) != same
    assert same[DATASET_KEY].startswith("10 samples, labels ")

    class NoLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 7

    assert dataset_fingerprint(NoLabels()) == {DATASET_KEY: "7 samples"}


def test_resume_of_a_complete_run_says_so_and_names_deleted_files(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    assert run(capsys, "run", str(manifest))[0] == 0
    model = tmp_path / "res" / "mlp" / "model.pth.tar"
    kept = model.read_bytes()
    model.unlink()
    code, err = run(capsys, "run", str(manifest), "--resume")
    assert code == 0
    lines = err.strip().splitlines()
    assert "is complete: every fold finished, nothing is trained again" in lines[0]
    assert "1 file(s) of this run" in lines[-1] and "mlp/model.pth.tar" in lines[-1] and "--overwrite" in lines[-1]
    assert not model.exists() and kept


def test_resume_removes_only_izitorchs_own_temporary_files(tmp_path, capsys):
    manifest = make_manifest(tmp_path)
    assert run(capsys, "run", str(manifest))[0] == 0
    res_dir = tmp_path / "res"
    own = res_dir / "mlp" / ".trainlog.json.4242-0.tmp"
    own.write_text("cut short")
    mine = [res_dir / "notes" / ".draft.tmp", res_dir / ".raw.csv.1-1.tmp"]
    mine[0].parent.mkdir()
    for path in mine:
        path.write_text("the user's")
    code, err = run(capsys, "run", str(manifest), "--resume", "--set", "run.epochs=3")
    assert code == 0, err
    assert not own.exists() and all(path.read_text() == "the user's" for path in mine)


# -- creating and locking res_dir ---------------------------------------------------------------


def test_res_dir_under_a_file_or_too_long_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run(capsys, "run", str(make_manifest(tmp_path, {"run.res_dir": (tmp_path / "file" / "res").as_posix()})))
    assert code == 2 and "m.toml: run.res_dir: " in one_error(err) and "is a file, not a folder" in one_error(err)
    code, err = run(capsys, "run", str(make_manifest(tmp_path, {"run.res_dir": (tmp_path / ("x" * 300)).as_posix()})))
    assert code == 2 and "has a name that is too long" in one_error(err)


def test_a_lock_path_that_is_a_folder_is_one_line_and_kept(tmp_path, capsys):
    lock = tmp_path / "res" / ".izitorch.lock"
    lock.mkdir(parents=True)
    code, err = run(capsys, "run", str(make_manifest(tmp_path)))
    assert code == 2 and "is a folder where izitorch needs a file" in one_error(err)
    assert lock.is_dir()


def test_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # as a read-only folder answers (root is never refused, so it is simulated)
        if self.name == "res":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = run(capsys, "run", str(make_manifest(tmp_path)))
    assert code == 2 and "cannot be written (permission denied)" in one_error(err)
    assert not (tmp_path / "res").exists()


def test_a_full_disk_while_locking_exits_1_and_leaves_no_lock(tmp_path, capsys, monkeypatch):
    import errno

    from izitorch import guard

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.handle = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(guard.os, "fdopen", Full)
    code, err = run(capsys, "run", str(make_manifest(tmp_path)))
    assert code == 1 and "no space left on the device" in one_error(err)
    assert not (tmp_path / "res" / ".izitorch.lock").exists()
