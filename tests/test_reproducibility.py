"""Reproducibility: ``rdm_seed`` seeds torch, numpy and Python's ``random`` per fold (DataLoader
workers apart), and ``[run] deterministic = true`` turns on torch's deterministic-only mode
during the run, and only then."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import izitorch
from conftest import run_cli

RECORDER = """\
import torch
from izitorch import hookimpl
from izitorch.io import write_json

@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    seen = {"algorithms": torch.are_deterministic_algorithms_enabled(), "benchmark": torch.backends.cudnn.benchmark,
            "cudnn": torch.backends.cudnn.deterministic}
    write_json(run.res_dir / "seen.json", seen)  # through izitorch.io: the run records it as its own
"""

# put_ without accumulation has no deterministic CPU implementation.
SCATTERING = """\
import torch
from torch import nn

class Scattering(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        out = self.linear(x)
        return out.clone().put_(torch.tensor([0], device=out.device), out.flatten()[:1])
"""


def deterministic_manifest(manifest, tmp_path, enable: tuple[str, ...] = ("recorder.py",), model: dict | None = None) -> Path:
    """The tiny run with deterministic algorithms, the plugins ``enable`` and the model's keys ``model``."""
    (tmp_path / "recorder.py").write_text(RECORDER)
    return manifest(run={"deterministic": True}, models=[model or {}], plugins={"enable": list(enable)})


def test_the_run_uses_deterministic_algorithms_and_restores_the_previous_settings(manifest, tmp_path):
    path = deterministic_manifest(manifest, tmp_path)
    torch.backends.cudnn.benchmark = True
    try:
        first = izitorch.run(izitorch.load_manifest(str(path)))
        assert json.loads((tmp_path / "res" / "seen.json").read_text()) == {"algorithms": True, "benchmark": False, "cudnn": True}
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.deterministic
        # the switch changes no result on the CPU
        again = izitorch.run(izitorch.load_manifest(str(path), ["run.deterministic=false", "run.overwrite=true"]))
        assert json.loads((tmp_path / "res" / "seen.json").read_text())["algorithms"] is False
        assert [(f["accuracy"], f["loss"]) for f in again["mlp"]] == [(f["accuracy"], f["loss"]) for f in first["mlp"]]
        # and a resumed run may switch it (here back on, while extending the run by one epoch)
        izitorch.run(izitorch.load_manifest(str(path), ["run.resume=true", "run.epochs=3"]))
        assert json.loads((tmp_path / "res" / "seen.json").read_text())["algorithms"] is True
    finally:
        torch.backends.cudnn.benchmark = False


def test_an_operation_without_a_deterministic_algorithm_fails_in_one_line_naming_the_switch(manifest, tmp_path):
    (tmp_path / "scattering.py").write_text(SCATTERING)
    path = deterministic_manifest(manifest, tmp_path, enable=(), model={"model": "scattering.py:Scattering", "params": None})
    done = run_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith(f"izitorch: error: {path}: model mlp: forward failed on input of shape (4, 64): put_ does not have a deterministic")
    assert lines[0].endswith("this operation has no deterministic algorithm: set deterministic = false in [run]")
    checked = run_cli("validate", str(path), cwd=tmp_path)  # validate's dry run meets it with the same line
    assert (checked.returncode, checked.stderr) == (1, done.stderr)


# ---------------------------------------------------------------------------------------------
# rdm_seed seeds torch, numpy and Python's random, per fold, and DataLoader workers apart

# A user's dataset: digits with augmentation noise from numpy's or Python's global generator, and
# an offset drawn once when it is built. With ``log_to``, each DataLoader worker appends its
# draws to ``<log_to>/worker<id>.txt``.
NOISY = """\
import os
import random

import numpy as np
import torch

from izitorch.datasets import digits


class NoisyDigits(torch.utils.data.Dataset):
    def __init__(self, source="numpy", limit=300, log_to=""):
        self.data, self.source, self.log_to = digits(limit=limit), source, log_to
        self.offset = float(np.random.rand()) if source == "numpy" else random.random()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        if self.source == "numpy":
            noise = torch.from_numpy(np.random.normal(0.0, 0.3, tuple(x.shape)).astype("float32"))
        else:
            noise = torch.tensor([random.gauss(0.0, 0.3) for _ in range(x.numel())]).reshape(x.shape)
        if self.log_to:
            worker = torch.utils.data.get_worker_info()
            with open(os.path.join(self.log_to, f"worker{worker.id if worker else 'main'}.txt"), "a") as handle:
                handle.write(f"{index} {float(noise[0])!r}\\n")
        return x + noise + self.offset, y
"""

# Draws from every global generator before the first fold and between folds, as a user's plugin may.
DRAWER = """\
import random

import numpy as np
import torch

from izitorch import hookimpl


def draw():
    np.random.rand(7), random.random(), torch.rand(3)


@hookimpl
def izitorch_run_start(run):
    draw()


@hookimpl
def izitorch_fold_finish(run, fold):
    draw()
"""


def noisy_manifest(manifest, tmp_path, tag: str, source: str = "numpy", params: dict | None = None, **tables) -> Path:
    """The tiny digits manifest over ``NoisyDigits`` (``params`` added to its own) writing into
    ``res_<tag>``, with ``tables`` laid over it."""
    (tmp_path / "noisy.py").write_text(NOISY)
    (tmp_path / "drawer.py").write_text(DRAWER)
    data = {"dataset": "noisy.py:NoisyDigits", "params": {"limit": None, "source": source, **(params or {})}}
    return manifest({"run.res_dir": (tmp_path / f"res_{tag}").as_posix()}, name=f"{tag}.toml", data=data, **tables)


def outputs(res: Path) -> dict:
    """Every model's weights and trainlog (timings aside), per fold folder."""
    found = {}
    for log in sorted(res.rglob("trainlog.json")):
        entries = json.loads(log.read_text())
        found[f"{log.parent.relative_to(res)}/trainlog"] = {e: {k: v for k, v in entry.items() if not k.endswith("_time")} for e, entry in entries.items()}
        found[f"{log.parent.relative_to(res)}/weights"] = torch.load(log.parent / "model.pth.tar", weights_only=True)["state_dict"]
    assert found, f"no trainlog under {res}"
    return found


def same_outputs(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(a[k] == b[k] if k.endswith("trainlog") else all(torch.equal(a[k][name], b[k][name]) for name in a[k]) for k in a)


def run_manifest(path: Path, *overrides: str, caller_seed: int = 0) -> Path:
    """Run in this process after leaving numpy's and random's global generators at ``caller_seed``
    (so that a run that did not seed one would draw differently from the run before it)."""
    np.random.seed(caller_seed)
    random.seed(caller_seed)
    config = izitorch.load_manifest(str(path), list(overrides))
    izitorch.run(config)
    return Path(config.run.res_dir)


@pytest.mark.parametrize("source", ["numpy", "random"])
def test_a_dataset_drawing_from_a_global_generator_gives_the_same_run_twice(manifest, tmp_path, source):
    path = noisy_manifest(manifest, tmp_path, source, source)
    first = outputs(run_manifest(path))
    second = outputs(run_manifest(path, "run.overwrite=true", caller_seed=1))
    assert same_outputs(first, second)
    third = outputs(run_manifest(path, "run.overwrite=true", "run.rdm_seed=2"))
    assert not same_outputs(first, third)


@pytest.mark.parametrize("parallel", [False, True])
def test_each_fold_is_seeded_whatever_was_drawn_before_it(manifest, tmp_path, parallel):
    """Fold i trains with ``rdm_seed + i`` on every generator (parallel folds: with ``rdm_seed``,
    once they start): a plugin drawing from numpy, random and torch when the run starts and after
    each fold changes nothing."""
    kfold = {"k": 2, "parallel": parallel}
    quiet = run_manifest(noisy_manifest(manifest, tmp_path, "quiet", plugins={"enable": ["kfold"], "kfold": kfold}))
    drawn = run_manifest(noisy_manifest(manifest, tmp_path, "drawn", plugins={"enable": ["kfold", "drawer.py"], "kfold": kfold}), caller_seed=1)
    assert same_outputs(outputs(quiet), outputs(drawn))
    assert not same_outputs(outputs(quiet / "mlp" / "FOLD_1"), outputs(quiet / "mlp" / "FOLD_2"))


def worker_draws(log_dir: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().splitlines() for p in sorted(log_dir.glob("worker*.txt"))}


@pytest.mark.parametrize("source", ["numpy", "random"])
def test_dataloader_workers_draw_apart_and_the_same_from_run_to_run(manifest, tmp_path, source):
    """torch seeds each worker's torch, numpy and random from the loader's seeded generator and
    the worker id: two workers draw different noise, and a second run draws the same."""
    draws = {}
    for tag in ("a", "b"):
        log_dir = tmp_path / f"draws_{tag}"
        log_dir.mkdir()
        path = noisy_manifest(manifest, tmp_path, f"{source}_{tag}", source, params={"log_to": log_dir.as_posix()}, run={"num_workers": 2})
        draws[tag] = (outputs(run_manifest(path, caller_seed=ord(tag))), worker_draws(log_dir))
    (outputs_a, draws_a), (outputs_b, draws_b) = draws["a"], draws["b"]
    assert {"worker0", "worker1"} <= set(draws_a)
    assert draws_a == draws_b and same_outputs(outputs_a, outputs_b)
    first = [draws_a[worker][0].split()[1] for worker in ("worker0", "worker1")]
    assert first[0] != first[1]
