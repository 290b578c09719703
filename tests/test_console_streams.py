"""The console's streams going away (``izitorch run m.toml | head -1``, stdout to ``/dev/full``, a
terminal that breaks under the progress bar): the run trains to the end and saves everything,
silently, exit 0, with nothing on stderr (no traceback, no "Exception ignored" at exit).

The process-level cases run ``python -m izitorch`` with stdout on a pipe whose reader is already
gone, so the first write fails at once (EPIPE) instead of whenever a real ``head`` exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_manifest

from izitorch.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def trainlog_without_times(res: Path) -> dict:
    log = json.loads((res / "mlp" / "trainlog.json").read_text(encoding="utf-8"))
    return {epoch: {k: v for k, v in entry.items() if not k.endswith("_time")} for epoch, entry in log.items()}


def assert_same_run(res: Path, reference: Path) -> None:
    """Every output of a finished run, with the reference run's values."""
    assert trainlog_without_times(res) == trainlog_without_times(reference)
    assert list(trainlog_without_times(res)) == ["1", "2"]
    saved, expected = (torch.load(folder / "mlp" / "model.pth.tar", weights_only=True) for folder in (res, reference))
    assert saved["epoch"] == 2
    assert saved["state_dict"].keys() == expected["state_dict"].keys()
    assert all(torch.equal(saved["state_dict"][k], expected["state_dict"][k]) for k in saved["state_dict"])
    summary, reference_summary = (json.loads((folder / "results.json").read_text()) for folder in (res, reference))
    assert summary["mlp"]["mean"]["accuracy"] == reference_summary["mlp"]["mean"]["accuracy"]
    assert (res / "mlp" / "confusion_matrix.pkl").read_bytes() == (reference / "mlp" / "confusion_matrix.pkl").read_bytes()
    assert not (res / ".izitorch.lock").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run as ``manifest()``'s, in this process with a working console."""
    folder = tmp_path_factory.mktemp("reference")
    path = make_manifest(folder, {"run.res_dir": (folder / "ref").as_posix()}, name="ref.toml")
    assert main(["run", str(path)]) == 0
    return folder / "ref"


def closed_pipe() -> int:
    """The writing end of a pipe whose reader has left."""
    read, write = os.pipe()
    os.close(read)
    return write


# A user's code that prints, unflushed, after the console went away: at exit, Python flushes it.
CHATTY = """\
from izitorch import hookimpl

@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    print("a user's line")
"""


@pytest.mark.parametrize("where", ["stdout to a closed pipe", "stdout and stderr to a closed pipe", "stdout to /dev/full"])
def test_a_run_whose_console_goes_away_trains_to_the_end_and_exits_0(manifest, tmp_path, reference, where):
    (tmp_path / "chatty.py").write_text(CHATTY, encoding="utf-8")
    path = manifest(run={"display_step": 1}, plugins={"enable": ["chatty.py"]})
    if where.endswith("/dev/full"):
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full here")
        out = os.open("/dev/full", os.O_WRONLY)
    else:
        out = closed_pipe()
    try:
        err = out if "stderr" in where else subprocess.PIPE
        done = subprocess.run([sys.executable, "-m", "izitorch", "run", str(path)], stdout=out, stderr=err, env=ENV, timeout=300, check=False)
    finally:
        os.close(out)
    assert done.returncode == 0, done.stderr
    assert done.stderr in (None, b"")  # nothing at all: no traceback, no "Exception ignored" at exit
    assert_same_run(tmp_path / "res", reference)


class BreakingTerminal:
    """A terminal (``isatty``) that takes ``lines`` writes, then fails as a closed one does."""

    def __init__(self, lines: int, error: OSError) -> None:
        self.lines, self.error, self.written = lines, error, []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if len(self.written) >= self.lines:
            raise self.error
        self.written.append(text)
        return len(text)

    def flush(self) -> None:
        if len(self.written) >= self.lines:
            raise self.error

    def fileno(self) -> int:
        raise OSError("no descriptor")


@pytest.mark.parametrize("lines", [0, 3])
def test_a_progress_bar_whose_terminal_breaks_does_not_stop_the_run(manifest, tmp_path, reference, monkeypatch, capsys, lines):
    """0: the bar's first drawing fails; 3: it fails mid-epoch, after drawing."""
    terminal = BreakingTerminal(lines, BrokenPipeError(32, "Broken pipe"))
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["run", str(manifest())]) == 0
    monkeypatch.undo()
    assert len(terminal.written) == lines and any("epoch 1/2" in text for text in terminal.written) == (lines > 0)
    assert "final test scores:" in capsys.readouterr().out  # stdout still works: its lines all came
    assert_same_run(tmp_path / "res", reference)


@pytest.mark.parametrize(
    "error, code, err",
    [
        (BrokenPipeError(32, "Broken pipe"), 0, ""),
        (OSError(28, "No space left on device"), 1, "izitorch: error: cannot write the output: No space left on device\n"),
    ],
)
def test_a_listing_whose_output_goes_away_is_one_line_or_nothing(monkeypatch, capsys, error, code, err):
    """``izitorch plugins | head -1`` ends quietly (its reader chose to stop); a full device says so."""
    monkeypatch.setattr(sys, "stdout", BreakingTerminal(1, error))
    assert main(["plugins"]) == code
    monkeypatch.undo()
    assert capsys.readouterr().err == err
