"""Shared helpers: tiny manifests on the bundled digits data, and a CLI runner."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import threading
from pathlib import Path
from textwrap import dedent

import pytest
import tomli_w
import torch

# Two cores for the whole suite: one thread per process keeps parallel subprocesses from thrashing.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

TINY_MANIFEST = """\
[run]
res_dir = "{res_dir}"
epochs = 2
batch_size = 32
display_step = 1000

[data]
dataset = "izitorch.datasets:digits"
params = {{ limit = 300 }}
num_classes = 10

[[models]]
name = "mlp"
model = "izitorch.models:MLP"
params = {{ hidden = 16 }}
optimizer = {{ class = "torch.optim:Adam", lr = 1e-2 }}
"""

# The tiny run as data: what make_manifest writes unless told otherwise (TINY_MANIFEST's values).
TINY = {
    "run": {"epochs": 2, "batch_size": 32, "display_step": 1000},
    "data": {"dataset": "izitorch.datasets:digits", "params": {"limit": 300}, "num_classes": 10},
}
MLP = {"name": "mlp", "model": "izitorch.models:MLP", "params": {"hidden": 16}, "optimizer": {"class": "torch.optim:Adam", "lr": 1e-2}}


def merged(base: dict, overrides: dict) -> dict:
    """A copy of ``base`` with ``overrides`` laid over it: a dotted key (``"run.epochs"``) or a
    nested dict reaches into tables, a dict merges into a table, any other value replaces.
    ``None`` marks a key to leave out: it stays a ``None`` through later merges (so it can be laid
    over a default afterwards) and :func:`make_manifest` drops it."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        *tables, last = key.split(".")
        table = result
        for name in tables:
            table = table.setdefault(name, {})
        if isinstance(value, dict) and isinstance(table.get(last), dict):
            table[last] = merged(table[last], value)
        else:
            table[last] = copy.deepcopy(value)
    return result


def _without_none(value):
    """``value`` with every ``None`` left out of its tables, at any depth (TOML has no null)."""
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def make_manifest(folder: Path, overrides: dict | None = None, *, name: str = "m.toml", models: list[dict] | None = None, **tables) -> Path:
    """Write a manifest into ``folder`` and return its path: the tiny run (300 digits, 2 epochs,
    batch 32, one MLP of 16 hidden units named "mlp", Adam lr 1e-2, results in folder/res) with
    ``overrides`` (dotted keys) and ``tables`` (``run={"epochs": 3}``, ``plugins={...}``) laid
    over it as :func:`merged` does (``None`` leaves a key out). ``models`` lists the models, each
    laid over the MLP above (``models=[{"name": "a"}, {"name": "b", "params": {"hidden": 8}}]``).
    """
    data = merged(TINY, {"run.res_dir": (folder / "res").as_posix()})
    data["models"] = [merged(MLP, model) for model in (models if models is not None else [{}])]
    data = merged(merged(data, tables), overrides or {})
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(_without_none(data)), encoding="utf-8")
    return path


@pytest.fixture
def manifest(tmp_path: Path):
    """``manifest(overrides=None, *, name="m.toml", models=None, **tables)``: :func:`make_manifest`
    in tmp_path."""
    return functools.partial(make_manifest, tmp_path)


# A plugin file that SIGKILLs the run at the batch named by KILL_AT="fold,epoch,step".
KILLER = """\
import os, signal
from izitorch import hookimpl

@hookimpl
def izitorch_batch_finish(run, fold, step, losses):
    if os.environ.get("KILL_AT") == f"{fold.index + 1},{fold.epoch},{step}":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def write_manifest(tmp_path: Path):
    """``write_manifest(text=None, name="m.toml", **fmt)``: a manifest file in tmp_path, for a
    test whose subject is the text itself (broken syntax, odd quoting, README examples).

    Without ``text``, TINY_MANIFEST's tiny run into tmp_path/res. A test that only varies the
    run builds it as data with the ``manifest`` fixture instead.
    """

    def write(text: str | None = None, name: str = "m.toml", **fmt: str) -> Path:
        fmt.setdefault("res_dir", (tmp_path / "res").as_posix())
        body = TINY_MANIFEST.format(**fmt) if text is None else dedent(text)
        path = tmp_path / name
        path.write_text(body, encoding="utf-8")
        return path

    return write


ERROR_PREFIX = "izitorch: error: "


def cli(capture, *args) -> tuple[int, str, str]:
    """``izitorch ARGS`` in this process: (exit code, stdout, stderr), read from pytest's
    ``capsys`` or ``capfd`` (``capfd`` also sees what worker processes print)."""
    from izitorch.cli import main

    code = main([str(a) for a in args])
    out, err = capture.readouterr()
    return code, out, err


def error_of(err: str) -> str:
    """The message of the one ``izitorch: error:`` line that stderr must hold (no traceback)."""
    assert "Traceback" not in err, err[:2000]
    lines = err.splitlines()
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith(ERROR_PREFIX), err[:2000]
    return lines[0][len(ERROR_PREFIX) :]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m izitorch ARGS`` in a subprocess; returns the completed process (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "izitorch", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_cli_here(capture, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``izitorch ARGS`` in this process, returned as :func:`run_cli` returns it: for the tests
    of a one-line refusal, whose checks need no process of their own (``capture``: pytest's
    ``capsys``)."""
    from izitorch.cli import main

    previous = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        code = main([str(a) for a in args])
    finally:
        os.chdir(previous)
    out, err = capture.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def replaced_by_thread(monkeypatch) -> list[tuple[str, str]]:
    """Record ``(file name, thread name)`` each time izitorch moves a file into place."""
    from izitorch import io as izio

    seen: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((Path(dst).name, threading.current_thread().name))
        real_replace(src, dst)

    monkeypatch.setattr(izio.os, "replace", replace)
    return seen


def plain_scores(model: torch.nn.Module, checkpoint: Path, indices, limit: int = 300) -> dict[str, float]:
    """The test scores of a checkpoint's weights on ``digits(limit)[indices]``, computed here in
    plain PyTorch and NumPy (not by izitorch's metrics): accuracy in %, mean cross-entropy loss,
    and IoU, the mean over the classes present (in the labels or the predictions) of
    ``tp / (tp + fp + fn)``."""
    import numpy as np

    from izitorch.datasets import digits

    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    inputs, targets = digits(limit=limit).tensors
    index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    with torch.no_grad():
        output = model(inputs[index])
    target = targets[index]
    predicted = output.argmax(dim=1)
    truth, guess = target.numpy(), predicted.numpy()
    ious = []
    for label in sorted(set(truth) | set(guess)):
        tp = np.sum((truth == label) & (guess == label))
        ious.append(tp / np.sum((truth == label) | (guess == label)))
    return {
        "accuracy": 100.0 * float((predicted == target).double().mean()),
        "loss": float(torch.nn.functional.cross_entropy(output, target)),
        "IoU": float(np.mean(ious)),
    }
