"""Never lose a run (issue 4): exact resume after SIGKILL at many points, refused resumes,
extension by ``epochs``, SIGINT / SIGTERM, the res_dir lock, and weights-only checkpoints.

Every run is a separate process with one torch thread. The kill-point matrix runs through a
small fork server (``ZYGOTE``): a process that imports torch, scikit-learn and izitorch once,
then forks one child per run that calls ``izitorch.cli.main(argv)`` exactly as
``python -m izitorch`` does, so that ~100 runs fit in the time budget. The signal, lock,
refusal and random-kill tests start real ``python -m izitorch`` processes.

A local plugin (``probe.py``) kills or signals its own process at a chosen point, named by the
``IZI_PROBE`` environment variable (JSON): ``{"hook": "batch", "fold": 1, "epoch": 2, "step": 3}``
(folds and epochs 1-based), or ``{"hook": "replace", "file": "trainlog.json", "nth": 2}`` (killed
after the temporary file of that write is complete, before ``os.replace`` moves it into place),
or ``{"hook": "await_signal", "at": [1, 2, 1], "ready": "<file>"}`` (creates the file at that
step and holds it until a SIGINT / SIGTERM has arrived); with ``"clock": [t0, t1, ...]`` the
clock of ``izitorch.held`` (read when the run starts and at each epoch end) reads those times in
turn. The same plugin is enabled in every run of a scenario, killed or not, so the manifests agree.

The scenarios flush their files after every epoch (``flush_interval = 0``), so that a kill point
finds every finished epoch on disk but the last; the signal tests and the interval tests hold
them longer.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import izitorch.cli
from conftest import make_manifest, merged, run_cli

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
REPORT = Path("/tmp/izitorch_resume_report.txt")

PROBE = '''\
"""Test probe: kill or signal this process at a chosen point, or hold a step until a signal comes; count epochs."""
import json
import os
import signal
import time

from izitorch import hookimpl

SPEC = json.loads(os.environ.get("IZI_PROBE", "{}"))
COUNTS = {"fold_start": 0, "epoch_start": 0, "batch": 0}


def _fire():
    sig = getattr(signal, SPEC.get("sig", "SIGKILL"))
    for _ in range(SPEC.get("times", 1)):
        os.kill(os.getpid(), sig)


def _at(hook, **where):
    if SPEC.get("hook") == hook and all(SPEC.get(key) == value for key, value in where.items()):
        _fire()


if "clock" in SPEC:  # izitorch.held's clock reads these times in turn, then stays at the last
    import izitorch.held

    _times, _now = iter(SPEC["clock"]), [0.0]

    def _clock():
        _now[0] = float(next(_times, _now[0]))
        return _now[0]

    izitorch.held.monotonic = _clock


if SPEC.get("hook") == "replace":  # die with the temporary file written, before it is moved
    _real_replace, _seen = os.replace, [0]

    def _replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == SPEC["file"]:
            _seen[0] += 1
            if _seen[0] == SPEC["nth"]:
                _fire()
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace


@hookimpl
def izitorch_fold_start(run, fold):
    COUNTS["fold_start"] += 1
    _at("fold_start", fold=fold.index + 1)


@hookimpl
def izitorch_epoch_start(run, fold, epoch):
    COUNTS["epoch_start"] += 1
    _at("epoch_start", fold=fold.index + 1, epoch=epoch)


@hookimpl
def izitorch_batch_finish(run, fold, step, losses):
    COUNTS["batch"] += 1
    _at("batch", fold=fold.index + 1, epoch=fold.epoch, step=step)
    if SPEC.get("hook") == "await_signal" and [fold.index + 1, fold.epoch, step] == SPEC["at"]:
        open(SPEC["ready"], "w").close()  # tell the test to send its signal now...
        while run.stop_flag.signum is None:  # ...and hold this step until the signal has arrived
            time.sleep(0.01)


@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    _at("epoch_finish", fold=fold.index + 1, epoch=epoch)


@hookimpl
def izitorch_fold_finish(run, fold):
    _at("fold_finish", fold=fold.index + 1)


@hookimpl
def izitorch_run_finish(run, results):
    if os.environ.get("IZI_COUNT"):
        with open(os.environ["IZI_COUNT"], "w") as handle:
            json.dump(COUNTS, handle)
    _at("run_finish")
'''

# What every scenario shares: 240 digits on the CPU (the tiny run's batch and display_step).
HEAD = {"run": {"device": "cpu", "flush_interval": 0}, "data": {"params": {"limit": 240}}}
HOUR = {"run": {"flush_interval": 3600}}  # files held until the run stops

# (a) holdout, one model with dropout, Adam, every-epoch checkpoints, evaluation every 2 epochs
HOLDOUT = {
    "run": {"epochs": 3, "test_epoch": 2},
    "models": [{"params": {"dropout": 0.2}}],
    "plugins": {"enable": ["probe.py"], "checkpoint": {"policy": "all"}},
}

# (b) 3-fold with validation, SGD, best-loss checkpoints, early stopping that always ends every
# fold at epoch 3 of 4 (min_delta too large to ever improve): its counters must survive a resume
KFOLD = {
    "run": {"epochs": 4},
    "data": {"validation": True},
    "models": [{"optimizer": {"class": "torch.optim:SGD", "lr": 0.1}}],
    "plugins": {
        "enable": ["probe.py", "early_stop"],
        "kfold": {"k": 3},
        "checkpoint": {"policy": "best", "metric": "loss"},
        "early_stop": {"patience": 2, "metric": "loss", "min_delta": 100.0},
    },
}

# (c) two models (MLP with dropout, CNN) with SGD momentum and StepLR, validation, best-acc
# checkpoints, gradient clipping
SGD = {"class": "torch.optim:SGD", "lr": 0.05, "momentum": 0.9}
TWO = {
    "run": {"epochs": 4},
    "data": {"validation": True},
    "models": [
        {"params": {"hidden": 32, "dropout": 0.3}, "optimizer": SGD, "scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.7}},
        {
            "name": "cnn",
            "model": "izitorch.models:SmallCNN",
            "params": {"hidden": None, "channels": 4},
            "optimizer": SGD,
            "scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 2, "gamma": 0.5},
        },
    ],
    "plugins": {"enable": ["probe.py"], "checkpoint": {"policy": "best", "metric": "acc"}, "grad_clip": {"max_norm": 1.0}},
}

# (d) parallel folds: 3 folds of two models (Adam; SGD with momentum, dropout and StepLR) trained
# at once, validation, best-acc checkpoints, early stopping that ends every fold at epoch 3 of 4:
# each fold's plugin state (swapped around its hooks) must survive a resume
PARALLEL = {
    "run": {"epochs": 4},
    "data": {"validation": True},
    "models": [
        {"name": "adam"},
        {"name": "sgd", "params": {"dropout": 0.2}, "optimizer": SGD, "scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.7}},
    ],
    "plugins": {
        "enable": ["probe.py", "kfold", "early_stop"],
        "kfold": {"k": 3, "parallel": True},
        "checkpoint": {"policy": "best", "metric": "acc"},
        "early_stop": {"patience": 2, "metric": "loss", "min_delta": 100.0},
    },
}

# (e) a user's dataset that augments every sample with noise from numpy's and Python's global
# generators (see NOISY): a resume must restore both to continue the same noise
NOISY_RUN = {"run": {"epochs": 3}, "data": {"dataset": "noisy.py:NoisyDigits"}, "models": [{}], "plugins": {"enable": ["probe.py"]}}

NOISY = '''\
"""The digits with augmentation noise drawn from numpy's and Python's global generators."""
import random

import numpy as np
import torch

from izitorch.datasets import digits


class NoisyDigits(torch.utils.data.Dataset):
    def __init__(self, limit):
        self.data = digits(limit=limit)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        noise = np.random.normal(0.0, 0.2, tuple(x.shape)).astype("float32")
        return x + torch.from_numpy(noise) * random.uniform(0.5, 1.5), y
'''

# (f) fp16 with a loss scaler per stack and gradients accumulated over 4 batches, for a vectorized
# pair (a, b) and a lone CNN: the scalers and the windows must survive a resume
MIXED = {
    "run": {"epochs": 3, "precision": "fp16", "accumulate": 4},
    "models": [
        {"name": "a"},
        {"name": "b", "optimizer": {"class": "torch.optim:Adam", "lr": 5e-3}},
        {"name": "cnn", "model": "izitorch.models:SmallCNN", "params": {"hidden": None, "channels": 4}},
    ],
    "plugins": {"enable": ["probe.py"]},
}

# (g, h, i) the options of real datasets combined, each for three layouts: a lone model
# (``_lone``), a vectorized group of two models of one architecture (``_vector``, multi_model =
# "vectorized") and parallel folds (``_parallel``, 3 folds trained at once). The data lives in
# MATRIX_DATA (``matrixdata.py``); see OPTION_LAYOUTS for the pairs refused instead.
# (g) given splits with train-only augmentation, a collate_fn, balanced sampling, drop_last, an
# evaluation batch size and a scheduler stepped per optimizer step
GIVEN = {
    "run": {"epochs": 3},
    "data": {
        "dataset": "matrixdata.py:part",
        "params": None,
        "num_classes": 10,
        "train": {"split": "train", "augment": True},
        "test": {"split": "test"},
        "collate_fn": "matrixdata.py:doubling",
        "sampler": "balanced",
        "drop_last": True,
        "eval_batch_size": 25,
    },
    "plugins": {"enable": ["probe.py"]},
}
PER_STEP = {"class": "torch.optim.lr_scheduler:ExponentialLR", "gamma": 0.97, "interval": "step"}

# (h) stratified 3-fold grouped by patient, validation, ReduceLROnPlateau, best and last kept
# with the 2 best epochs, the final test on the best epoch's weights
GROUPED = {
    "run": {"epochs": 3, "test_weights": "best"},
    "data": {"dataset": "matrixdata.py:patients", "validation": True, "stratify": True, "group_by": "patient"},
    "plugins": {"enable": ["probe.py", "kfold"], "kfold": {"k": 3}, "checkpoint": {"policy": "best_and_last", "top_k": 2}},
}
# never sees an improvement of 100 points over the first epoch's: halves the learning rate after epoch 2
PLATEAU = {"class": "torch.optim.lr_scheduler:ReduceLROnPlateau", "patience": 0, "factor": 0.5, "threshold": 100.0, "threshold_mode": "abs"}

# (i) a regression (scikit-learn's diabetes, MSELoss) with a torchmetrics metric that picks the
# best epoch
REGRESSION = {
    "run": {"epochs": 3, "task": "regression", "best_metric": "tm_mae"},
    "data": {"dataset": "matrixdata.py:diabetes", "params": {"limit": 200}, "num_classes": None, "validation": True},
    "plugins": {
        "enable": ["probe.py"],
        "checkpoint": {"policy": "best"},
        "metrics": {"extra": [{"class": "torchmetrics.regression:MeanAbsoluteError", "direction": "lower", "name": "tm_mae"}]},
    },
}
REGRESSOR = {"params": {"in_features": 10, "hidden": 16, "num_classes": 1}, "criterion": "torch.nn:MSELoss"}

OPTION_SETS = {
    "given": (GIVEN, {"scheduler": PER_STEP}),
    "grouped": (GROUPED, {"scheduler": PLATEAU}),
    "regression": (REGRESSION, REGRESSOR),
}
LAYOUTS = {
    "lone": ({}, [{}]),
    "vector": ({"run": {"multi_model": "vectorized"}}, [{"name": "a"}, {"name": "b", "optimizer": {"class": "torch.optim:Adam", "lr": 5e-3}}]),
    "parallel": ({"plugins": {"enable": ["probe.py", "kfold"], "kfold": {"k": 3, "parallel": True}}}, [{}]),
}
# the option / layout pairs refused in one line instead (see test_an_option_a_layout_cannot_serve_is_refused_in_one_line),
# and what each scenario runs without the refused option
REFUSED = [
    ("given_parallel", {"sampler": "balanced"}, "plugins.kfold.parallel: parallel = true draws one pass of batches for every fold"),
    ("given_parallel", {"sampler": {"class": "torch.utils.data:RandomSampler"}}, "drop [data] sampler or set parallel = false"),
]
RUNS_INSTEAD = {("given", "parallel"): {"data": {"sampler": None}}}  # the rest of (g) runs in parallel folds


def option_scenario(options: str, layout: str) -> dict:
    """Option set ``options`` in ``layout``: every model gets the option set's model settings."""
    base, model = OPTION_SETS[options]
    tables, models = LAYOUTS[layout]
    manifest = merged(merged(merged(HEAD, base), tables), RUNS_INSTEAD.get((options, layout), {}))
    manifest["models"] = [merged(model, entry) for entry in models]
    return manifest


MATRIX_DATA = '''\
"""The data of the option-matrix scenarios."""
import torch
from torch.utils.data import TensorDataset

from izitorch.datasets import digits


def part(split="train", augment=False):
    """240 digits given as a training split of 180 (augmented: shifted) and a test split of 60."""
    inputs, targets = digits(limit=240).tensors
    rows = {"train": slice(0, 180), "test": slice(180, 240)}[split]
    return TensorDataset(inputs[rows] + (0.5 if augment else 0.0), targets[rows])


def doubling(items):
    """A collate_fn: the default batch with its inputs doubled."""
    return torch.stack([x for x, _ in items]) * 2, torch.stack([y for _, y in items])


def patients(limit):
    """The digits, four consecutive samples per patient."""
    data = digits(limit=limit)
    data.patient = [index // 4 for index in range(limit)]
    return data


def diabetes(limit):
    """scikit-learn's bundled diabetes regression, standardised, targets [N, 1]."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    inputs = torch.tensor(data.data[:limit], dtype=torch.float32)
    target = torch.tensor(data.target[:limit], dtype=torch.float32).reshape(-1, 1)
    return TensorDataset((inputs - inputs.mean(0)) / inputs.std(0), (target - target.mean()) / target.std())
'''

SCENARIOS = {
    "holdout": merged(HEAD, HOLDOUT),
    "kfold": merged(HEAD, KFOLD),
    "two": merged(HEAD, TWO),
    "parallel": merged(HEAD, PARALLEL),
    "noisy": merged(HEAD, NOISY_RUN),
    "mixed": merged(HEAD, MIXED),
    **{f"{options}_{layout}": option_scenario(options, layout) for options in OPTION_SETS for layout in LAYOUTS},
}
OPTION_SCENARIOS = [f"{options}_{layout}" for options in OPTION_SETS for layout in LAYOUTS]


def _batch(fold, epoch, step):
    return {"hook": "batch", "fold": fold, "epoch": epoch, "step": step}


TOP_K_KILL = {"lone": 3, "vector": 4, "parallel": 7}
STATE_FILE = {"lone": "fold_1.pth.tar", "vector": "fold_1.pth.tar", "parallel": "folds.pth.tar"}

# holdout: 192 training samples -> 6 steps per epoch; kfold: 80 -> 3 steps; two: 192 -> 6 steps;
# parallel: one pass over all 240 samples -> 8 steps, batch_finish once per fold and step
KILL_POINTS = {
    "holdout": [
        _batch(1, 1, 1),
        _batch(1, 1, 3),
        _batch(1, 1, 6),
        _batch(1, 2, 1),
        _batch(1, 2, 4),
        _batch(1, 3, 6),
        {"hook": "epoch_start", "fold": 1, "epoch": 1},
        {"hook": "epoch_start", "fold": 1, "epoch": 3},
        {"hook": "epoch_finish", "fold": 1, "epoch": 1},
        {"hook": "epoch_finish", "fold": 1, "epoch": 2},
        {"hook": "epoch_finish", "fold": 1, "epoch": 3},
        {"hook": "fold_finish", "fold": 1},
        {"hook": "run_finish"},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 1},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 2},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 4},  # the final state (after the test)
        {"hook": "replace", "file": "trainlog.json", "nth": 2},
        {"hook": "replace", "file": "model_epoch3.pth.tar", "nth": 1},
        {"hook": "replace", "file": "confusion_matrix.pkl", "nth": 1},
        {"hook": "replace", "file": "results.json", "nth": 1},
        _batch(1, 2, 6),
        _batch(1, 3, 1),
        {"hook": "epoch_start", "fold": 1, "epoch": 2},
        {"hook": "fold_start", "fold": 1},
        {"hook": "replace", "file": "trainlog.json", "nth": 1},
        {"hook": "replace", "file": "trainlog.json", "nth": 3},
        {"hook": "replace", "file": "model_epoch1.pth.tar", "nth": 1},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 3},
        [_batch(1, 1, 4), _batch(1, 2, 2)],
        [_batch(1, 2, 5), {"hook": "epoch_start", "fold": 1, "epoch": 2}],
        [{"hook": "epoch_finish", "fold": 1, "epoch": 2}, {"hook": "replace", "file": "fold_1.pth.tar", "nth": 1}],
    ],
    "kfold": [
        _batch(1, 1, 1),
        _batch(1, 2, 2),
        _batch(1, 3, 3),
        _batch(2, 1, 1),
        _batch(2, 2, 3),
        _batch(3, 3, 2),
        {"hook": "fold_start", "fold": 2},
        {"hook": "fold_start", "fold": 3},
        {"hook": "epoch_finish", "fold": 1, "epoch": 2},
        {"hook": "epoch_finish", "fold": 3, "epoch": 3},
        {"hook": "fold_finish", "fold": 1},
        {"hook": "fold_finish", "fold": 2},
        {"hook": "run_finish"},
        {"hook": "replace", "file": "fold_2.pth.tar", "nth": 3},
        {"hook": "replace", "file": "best_epoch.json", "nth": 2},
        {"hook": "replace", "file": "overall.json", "nth": 1},
        _batch(1, 1, 3),
        _batch(2, 3, 1),
        _batch(3, 1, 1),
        _batch(3, 3, 3),
        {"hook": "fold_start", "fold": 1},
        {"hook": "epoch_start", "fold": 2, "epoch": 1},
        {"hook": "epoch_finish", "fold": 1, "epoch": 1},
        {"hook": "epoch_finish", "fold": 2, "epoch": 3},
        {"hook": "fold_finish", "fold": 3},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 4},
        {"hook": "replace", "file": "fold_3.pth.tar", "nth": 1},
        {"hook": "replace", "file": "results.json", "nth": 1},
        {"hook": "replace", "file": "confusion_matrix.pkl", "nth": 2},
        [_batch(1, 2, 1), _batch(2, 2, 2)],
        [{"hook": "fold_finish", "fold": 1}, {"hook": "fold_finish", "fold": 1}],
        [_batch(2, 3, 3), _batch(2, 3, 3), {"hook": "fold_start", "fold": 3}],
    ],
    "two": [
        _batch(1, 1, 1),
        _batch(1, 1, 6),
        _batch(1, 2, 3),
        _batch(1, 3, 2),
        _batch(1, 4, 1),
        _batch(1, 4, 6),
        {"hook": "epoch_start", "fold": 1, "epoch": 4},
        {"hook": "epoch_finish", "fold": 1, "epoch": 1},
        {"hook": "epoch_finish", "fold": 1, "epoch": 3},
        {"hook": "epoch_finish", "fold": 1, "epoch": 4},
        {"hook": "fold_finish", "fold": 1},
        {"hook": "run_finish"},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 3},
        {"hook": "replace", "file": "model.pth.tar", "nth": 2},
        {"hook": "replace", "file": "best_epoch.json", "nth": 1},
        {"hook": "replace", "file": "test_metrics.json", "nth": 2},
        _batch(1, 2, 1),
        _batch(1, 2, 6),
        _batch(1, 3, 6),
        {"hook": "epoch_start", "fold": 1, "epoch": 1},
        {"hook": "epoch_start", "fold": 1, "epoch": 2},
        {"hook": "epoch_finish", "fold": 1, "epoch": 2},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 5},
        {"hook": "replace", "file": "trainlog.json", "nth": 3},
        {"hook": "replace", "file": "confusion_matrix.pkl", "nth": 2},
        {"hook": "replace", "file": "results.json", "nth": 1},
        {"hook": "replace", "file": "model.pth.tar", "nth": 1},
        [_batch(1, 1, 5), _batch(1, 3, 3)],
        [_batch(1, 4, 2), {"hook": "epoch_finish", "fold": 1, "epoch": 4}],
    ],
    "parallel": [
        _batch(1, 1, 1),
        _batch(2, 1, 8),
        _batch(3, 2, 4),
        _batch(1, 3, 8),
        _batch(3, 3, 1),
        {"hook": "fold_start", "fold": 2},
        {"hook": "epoch_start", "fold": 2, "epoch": 2},
        {"hook": "epoch_finish", "fold": 1, "epoch": 2},
        {"hook": "epoch_finish", "fold": 3, "epoch": 3},
        {"hook": "fold_finish", "fold": 2},
        {"hook": "run_finish"},
        {"hook": "replace", "file": "folds.pth.tar", "nth": 1},
        {"hook": "replace", "file": "folds.pth.tar", "nth": 3},
        {"hook": "replace", "file": "folds.pth.tar", "nth": 4},  # the final state (after the tests)
        {"hook": "replace", "file": "trainlog.json", "nth": 5},
        {"hook": "replace", "file": "best_epoch.json", "nth": 2},
        [_batch(2, 2, 2), _batch(1, 3, 1)],
        [{"hook": "fold_finish", "fold": 1}, {"hook": "fold_finish", "fold": 3}],
    ],
    # 192 training samples -> 6 steps per epoch: accumulation windows of 4 and 2 batches
    "mixed": [
        _batch(1, 1, 2),
        _batch(1, 2, 5),
        _batch(1, 3, 4),
        {"hook": "epoch_finish", "fold": 1, "epoch": 2},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 2},
        [_batch(1, 1, 3), _batch(1, 2, 6)],
    ],
    # 192 training samples -> 6 steps per epoch
    "noisy": [
        _batch(1, 1, 3),
        _batch(1, 2, 4),
        _batch(1, 3, 6),
        {"hook": "epoch_finish", "fold": 1, "epoch": 2},
        {"hook": "replace", "file": "fold_1.pth.tar", "nth": 2},
        [_batch(1, 2, 2), _batch(1, 3, 1)],
    ],
    # the option matrix, each point after a resume state is on disk (see OPTION_SCENARIOS): in the
    # middle of an epoch (fold 2's second of sequential folds, else the third); once epoch 2's files
    # are written, between its resume state's write and its move into place; grouped k-fold also
    # between a top_k.json's write and its move, once a later epoch has dropped (and recorded as
    # removed) an earlier epoch's file, which the resumed run drops again (TOP_K_KILL: the nth
    # top_k.json written, in model and fold order)
    **{
        f"{options}_{layout}": [
            _batch(2, 2, 3) if options == "grouped" and layout != "parallel" else _batch(2 if layout == "parallel" else 1, 3, 2),
            {"hook": "replace", "file": STATE_FILE[layout] if options != "grouped" or layout == "parallel" else "fold_2.pth.tar", "nth": 2},
            *([{"hook": "replace", "file": "top_k.json", "nth": TOP_K_KILL[layout]}] if options == "grouped" else []),
        ]
        for options in OPTION_SETS
        for layout in LAYOUTS
    },
}

#: results of the kill points, filled by the matrix fixtures and the other kill/signal tests
TALLY: dict[str, list[tuple[str, bool]]] = {}

# ---------------------------------------------------------------------------------------------
# running izitorch: a fork server for the matrix, real processes elsewhere

ZYGOTE = r"""
import json, os, signal, sys, traceback
import torch
torch.set_num_threads(1)
import numpy, sklearn.datasets, sklearn.model_selection
import izitorch, izitorch.cli, izitorch.runner, izitorch.manifest, izitorch.pluginmanager
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports what optimizers import
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(120)
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                    (2, job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                new = os.open(name, flags, 0o644)
                os.dup2(new, fd)
                os.close(new)
            code = izitorch.cli.main(job["argv"])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


class ForkServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})

    def run(self, *argv: str, cwd: Path, env: dict | None = None) -> Result:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        job = {"argv": list(argv), "cwd": str(cwd), "env": {**ENV, **(env or {})}, "out": str(out), "err": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 180)
        assert ready, f"izitorch {' '.join(argv)} did not finish in 180 s"
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return Result(json.loads(line)["rc"], out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fork_server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield fork_server
    fork_server.close()


def cli(*argv: str, cwd: Path, env: dict | None = None) -> Result:
    """A real ``python -m izitorch`` process."""
    proc = run_cli(*argv, cwd=cwd, env={**ENV, **(env or {})}, timeout=240)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def probe(spec: dict | None) -> dict:
    return {"IZI_PROBE": json.dumps(spec)} if spec else {}


def label(spec: dict | list[dict]) -> str:
    if isinstance(spec, list):
        return " then ".join(label(point) for point in spec)
    return ",".join(f"{k}={v}" for k, v in spec.items())


# ---------------------------------------------------------------------------------------------
# scenarios: a folder with probe.py and one manifest per res_dir


class Scenario:
    def __init__(self, name: str, folder: Path) -> None:
        self.name, self.folder = name, folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "probe.py").write_text(PROBE, encoding="utf-8")
        (folder / "noisy.py").write_text(NOISY, encoding="utf-8")
        (folder / "matrixdata.py").write_text(MATRIX_DATA, encoding="utf-8")

    def manifest(self, tag: str, **changes: dict) -> Path:
        """``<tag>.toml`` writing into ``res_<tag>``; ``changes`` (tables, such as
        ``run={"epochs": 6}``) are laid over the scenario's."""
        tables = merged(SCENARIOS[self.name], {"run.res_dir": (self.folder / f"res_{tag}").as_posix(), **changes})
        return make_manifest(self.folder, name=f"{tag}.toml", **tables)

    def res(self, tag: str) -> Path:
        return self.folder / f"res_{tag}"


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text[-3000:]}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# comparing two res_dirs bit for bit (timings aside)


def strip_times(value):
    if isinstance(value, dict):
        return {k: strip_times(v) for k, v in value.items() if not str(k).endswith("_time")}
    if isinstance(value, list):
        return [strip_times(v) for v in value]
    return value


def same(a, b, where: str) -> list[str]:
    """Differences between two loaded objects (tensors and arrays compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if ok else [f"{where}: tensors differ"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        ok = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
        return [] if ok else [f"{where}: arrays differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def load(path: Path):
    if path.name.endswith(".pth.tar"):
        return torch.load(path, weights_only=True)
    if path.suffix == ".json":
        return strip_times(json.loads(path.read_text(encoding="utf-8")))
    if path.suffix in (".toml", ".csv"):  # the manifest as run, the csv plugin's log: text
        return path.read_text(encoding="utf-8")
    with open(path, "rb") as handle:
        return pickle.load(handle)


def output_files(res: Path) -> set[str]:
    """Every output file but temporary leftovers of a killed write, the lock and the resume state."""
    names = set()
    for path in res.rglob("*"):
        rel = path.relative_to(res)
        if path.is_file() and not path.name.endswith(".tmp") and rel.parts[0] not in (".izitorch", ".izitorch.lock"):
            names.add(rel.as_posix())
    return names


def resume_state_view(path: Path) -> dict:
    """What must match in a resume state: weights, optimizers, schedulers, kept weights, plugin
    states (trainlog timings aside), scores, the torch, numpy and python RNG states and the
    loaders' generators."""
    state = torch.load(path, weights_only=True)
    view = {k: state[k] for k in ("parallel", "epoch", "final", "fingerprint", "groups")}
    view["folds"] = [
        {**{k: fold[k] for k in ("index", "epoch", "stop_reason")}, "slots": slots_view(fold["slots"]), **fold_view(fold)} for fold in state["folds"]
    ]
    view["rng"] = {key: state["rng"][key] for key in ("torch", "numpy", "python", "loaders")}
    return view


def slots_view(slots: dict) -> dict:
    """The models' states, their measured training times aside."""
    return {name: {k: v for k, v in slot.items() if k not in ("train_seconds", "timed_epochs")} for name, slot in slots.items()}


def fold_view(state: dict) -> dict:
    plugins = dict(state["plugins"])
    if "trainlog" in plugins:  # each model's trainlog.json text: compared as data, timings aside
        plugins["trainlog"] = {name: json.loads(text) for name, text in plugins["trainlog"]["texts"].items()}
    return {"plugins": strip_times(plugins), "final_scores": strip_times(state["final_scores"]) if state["final_scores"] is not None else None}


def compare_runs(ref: Path, other: Path) -> list[str]:
    """Differences between two runs' outputs: weights, checkpoints, trainlogs, confusion matrices,
    test metrics, best epochs, splits, summaries, and the final resume states."""
    files = output_files(ref)
    diffs = [] if files == output_files(other) else [f"files: {sorted(files ^ output_files(other))}"]
    for name in sorted(files & output_files(other)):
        if name in ("conf.json", "manifest.toml"):
            continue  # names its own res_dir
        diffs += same(load(ref / name), load(other / name), name)
    states = sorted(p.name for p in (ref / ".izitorch").glob("fold*.pth.tar"))
    if states != sorted(p.name for p in (other / ".izitorch").glob("fold*.pth.tar")):
        diffs.append("resume states: different folds saved")
    for name in states:
        diffs += same(resume_state_view(ref / ".izitorch" / name), resume_state_view(other / ".izitorch" / name), f".izitorch/{name}")
    return diffs


# ---------------------------------------------------------------------------------------------
# the references (one uninterrupted run per scenario) and the kill-point matrix


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, server):
    """``{name: (Scenario, reference res_dir)}``: each scenario's uninterrupted run."""
    root = tmp_path_factory.mktemp("scenarios")
    built = {}
    for name in SCENARIOS:
        scenario = Scenario(name, root / name)
        path = scenario.manifest("ref")
        result = server.run("run", str(path), cwd=scenario.folder)
        assert result.returncode == 0, result.stderr[-3000:]
        built[name] = (scenario, scenario.res("ref"))
    return built


def kill_and_resume(server, scenario: Scenario, tag: str, spec: dict | list[dict], ref: Path, *, saved: bool = False, **changes: dict) -> list[str]:
    """Run with the probe killing at ``spec`` (it must die by SIGKILL), resume, compare to ``ref``.

    A list of specs kills the first run and then each resumed run in turn (counted from the
    start of that process), before the last resume runs to the end. ``saved``: the last kill
    must leave a resume state on disk (the resume continues it rather than starting over).
    ``changes`` are laid over the scenario's manifest (see :meth:`Scenario.manifest`)."""
    path = scenario.manifest(tag, **changes)
    for attempt, point in enumerate(spec if isinstance(spec, list) else [spec]):
        resume_flag = ("--resume",) if attempt else ()
        killed = server.run("run", str(path), *resume_flag, cwd=scenario.folder, env=probe(point))
        if killed.returncode != -signal.SIGKILL:
            return [f"run {attempt + 1} was not killed at {label(point)} (rc {killed.returncode}): {killed.stderr[-500:]}"]
    if saved and not list((scenario.res(tag) / ".izitorch").glob("fold*.pth.tar")):
        return [f"no resume state on disk after the kill at {label(spec)}: the resume would start over"]
    resumed = server.run("run", str(path), "--resume", cwd=scenario.folder)
    if resumed.returncode != 0:
        return [f"resume failed (rc {resumed.returncode}): {resumed.stderr[-1000:]}"]
    diffs = compare_runs(ref, scenario.res(tag))
    if (scenario.res(tag) / ".izitorch.lock").exists():
        diffs.append("the lock is left after the resumed run")
    return diffs


def kill_matrix(server, scenarios, name: str) -> list[tuple[str, list[str]]]:
    scenario, ref = scenarios[name]
    outcomes = []
    for index, spec in enumerate(KILL_POINTS[name]):
        outcomes.append((label(spec), kill_and_resume(server, scenario, f"kill{index}", spec, ref, saved=name in OPTION_SCENARIOS)))
        shutil.rmtree(scenario.res(f"kill{index}"))
    TALLY[f"matrix {name}"] = [(point, not diffs) for point, diffs in outcomes]
    return outcomes


class Matrix(dict):
    """``matrix[name]``: the kill points of scenario ``name``, killed, resumed and compared the
    first time they are asked for (so that ``-k noisy`` runs that scenario's alone)."""

    def __init__(self, server, scenarios) -> None:
        super().__init__()
        self.server, self.scenarios = server, scenarios

    def __missing__(self, name: str) -> list[tuple[str, list[str]]]:
        self[name] = kill_matrix(self.server, self.scenarios, name)
        return self[name]


@pytest.fixture(scope="module")
def matrix(server, scenarios):
    return Matrix(server, scenarios)


def test_references_are_what_the_scenarios_claim(scenarios):
    _, holdout = scenarios["holdout"]
    log = json.loads((holdout / "mlp" / "trainlog.json").read_text())
    assert list(log) == ["1", "2", "3"] and "test_loss" not in log["1"] and "test_loss" in log["2"] and "test_loss" in log["3"]
    assert sorted(p.name for p in (holdout / "mlp").glob("*.pth.tar")) == [f"model_epoch{e}.pth.tar" for e in (1, 2, 3)]
    _, kfold = scenarios["kfold"]
    for fold in (1, 2, 3):  # early stopping ends every fold at epoch 3 of 4
        log = json.loads((kfold / "mlp" / f"FOLD_{fold}" / "trainlog.json").read_text())
        assert list(log) == ["1", "2", "3"]
        summary = json.loads((kfold / "mlp" / f"FOLD_{fold}" / "test_metrics.json").read_text())
        assert summary["stopped"].startswith("early stop at epoch 3")
        state = torch.load(kfold / ".izitorch" / f"fold_{fold}.pth.tar", weights_only=True)
        assert state["epoch"] == 3 and state["folds"][0]["stop_reason"] == "every model stopped early (epoch 3)"
    _, two = scenarios["two"]
    for model in ("mlp", "cnn"):
        log = json.loads((two / model / "trainlog.json").read_text())
        assert list(log) == ["1", "2", "3", "4"] and "val_accuracy" in log["4"]
        assert json.loads((two / model / "best_epoch.json").read_text())["phase"] == "val"
    _, parallel = scenarios["parallel"]
    for model in ("adam", "sgd"):
        for fold in (1, 2, 3):  # each fold's early-stopping counters, swapped around its hooks, end it at epoch 3
            log = json.loads((parallel / model / f"FOLD_{fold}" / "trainlog.json").read_text())
            assert list(log) == ["1", "2", "3"] and "val_accuracy" in log["3"]
    state = torch.load(parallel / ".izitorch" / "folds.pth.tar", weights_only=True)
    assert state["final"] and [f["stop_reason"] for f in state["folds"]] == ["every model stopped early (epoch 3)"] * 3
    assert not list((parallel / ".izitorch").glob("fold_*.pth.tar"))
    state = torch.load(two / ".izitorch" / "fold_1.pth.tar", weights_only=True)["folds"][0]
    assert [g["lr"] for g in state["slots"]["mlp"]["optimizer"]["param_groups"]] == [pytest.approx(0.05 * 0.7**4)]
    assert state["slots"]["mlp"]["optimizer"]["state"]  # momentum buffers are part of the state
    _, noisy = scenarios["noisy"]  # its dataset drew from numpy's and python's generators since the fold's seeding
    rng = torch.load(noisy / ".izitorch" / "fold_1.pth.tar", weights_only=True)["rng"]
    np.random.seed(1)
    random.seed(1)
    assert not torch.equal(rng["numpy"][1], torch.from_numpy(np.random.get_state()[1].astype(np.int64)))
    assert tuple(rng["python"][1].tolist()) != random.getstate()[1]


def model_folders(res: Path) -> list[Path]:
    """Each model's (each model's fold's) output folder of a run."""
    return sorted(path.parent for path in res.rglob("trainlog.json"))


def test_the_option_scenarios_use_their_options(scenarios):
    """The references of the option matrix ran with what they claim, in every layout."""
    for layout, models in (("lone", 1), ("vector", 2), ("parallel", 1)):
        folds = 3 if layout == "parallel" else 1
        _, res = scenarios[f"given_{layout}"]  # trained on the given 180, tested on the given 60
        splits = pickle.loads((res / "Dataset_split.pkl").read_bytes())
        assert len(splits) == folds and all(max(split[0]) < 180 and list(split[-1]) == list(range(180, 240)) for split in splits)
        assert len(model_folders(res)) == models * folds
        for folder in model_folders(res):  # the scheduler steps per optimizer step: 5 steps of 32 (drop_last) per epoch
            lrs = [entry["lr"] for entry in json.loads((folder / "trainlog.json").read_text()).values()]
            assert lrs[0] > lrs[1] > lrs[2]
            if layout != "parallel":
                assert lrs[1] == pytest.approx(lrs[0] * 0.97**5) and lrs[2] == pytest.approx(lrs[0] * 0.97**10)
        _, res = scenarios[f"grouped_{layout}"]  # each patient tested in one fold; plateau; best, last and the 2 best kept
        tested = [set(np.asarray(split[-1]) // 4) for split in pickle.loads((res / "Dataset_split.pkl").read_bytes())]
        assert sum(map(len, tested)) == 60 and set().union(*tested) == set(range(60))
        assert len(model_folders(res)) == models * 3
        for folder in model_folders(res):
            log = json.loads((folder / "trainlog.json").read_text())
            assert [entry["lr"] for entry in log.values()] == [pytest.approx(lr) for lr in (log["1"]["lr"], log["1"]["lr"], log["1"]["lr"] / 2)]
            kept = json.loads((folder / "top_k.json").read_text())["epochs"]
            best = json.loads((folder / "best_epoch.json").read_text())
            assert len(kept) == 2 and kept[0]["epoch"] == best["epoch"] and best["phase"] == "val"
            on_disk = sorted(path.name for path in folder.glob("*.pth.tar"))
            assert on_disk == sorted({"model_best.pth.tar", "model_last.pth.tar", *(f"model_epoch{k['epoch']}.pth.tar" for k in kept)})
            assert json.loads((folder / "test_metrics.json").read_text())["epoch"] == best["epoch"]  # test_weights = "best"
        _, res = scenarios[f"regression_{layout}"]  # regression metrics and the torchmetrics one, which picks the best epoch
        assert len(model_folders(res)) == models * folds
        for folder in model_folders(res):
            log = json.loads((folder / "trainlog.json").read_text())
            assert "val_tm_mae" in log["3"] and "val_RMSE" in log["3"] and not any("accuracy" in key for key in log["3"])
            assert log["3"]["val_tm_mae"] == pytest.approx(log["3"]["val_MAE"], rel=1e-5)
            assert json.loads((folder / "best_epoch.json").read_text())["metric"] == "tm_mae"


@pytest.mark.parametrize("name, data, line", REFUSED)
def test_an_option_a_layout_cannot_serve_is_refused_in_one_line(tmp_path, capsys, name, data, line):
    """``validate`` and ``run`` refuse it with the same line, exit 2, and write nothing."""
    scenario = Scenario(name, tmp_path)
    path = scenario.manifest("refused", data=data)
    errors = []
    for command in ("validate", "run"):
        assert izitorch.cli.main([command, str(path)]) == 2, command
        errors.append(one_line(capsys.readouterr().err))
    assert errors[0] == errors[1] == f"izitorch: error: {path}: {errors[0].split(': ', 3)[-1]}" and line in errors[0]
    assert "Traceback" not in errors[0] and not scenario.res("refused").exists()


def test_compare_runs_sees_a_difference(scenarios, tmp_path):
    """The comparison is not blind: a changed weight, trainlog value or matrix entry is reported."""
    scenario, ref = scenarios["two"]
    copy = tmp_path / "copy"
    shutil.copytree(ref, copy)
    assert compare_runs(ref, copy) == []
    checkpoint = torch.load(copy / "cnn" / "model.pth.tar", weights_only=True)
    checkpoint["state_dict"]["head.bias"][0] += 1e-6
    torch.save(checkpoint, copy / "cnn" / "model.pth.tar")
    log = json.loads((copy / "mlp" / "trainlog.json").read_text())
    log["2"]["loss"] = np.nextafter(log["2"]["loss"], 10.0)
    (copy / "mlp" / "trainlog.json").write_text(json.dumps(log))
    matrix_ = pickle.loads((copy / "mlp" / "confusion_matrix.pkl").read_bytes())
    matrix_[0, 0] += 1
    (copy / "mlp" / "confusion_matrix.pkl").write_bytes(pickle.dumps(matrix_))
    diffs = compare_runs(ref, copy)
    assert any(d.startswith("cnn/model.pth.tar.state_dict.head.bias") for d in diffs), diffs
    assert any(d.startswith("mlp/trainlog.json.2.loss") for d in diffs), diffs
    assert any(d.startswith("mlp/confusion_matrix.pkl") for d in diffs), diffs
    _, parallel = scenarios["parallel"]  # the parallel folds' shared state is compared too
    copy = tmp_path / "parallel"
    shutil.copytree(parallel, copy)
    state = torch.load(copy / ".izitorch" / "folds.pth.tar", weights_only=True)
    state["groups"][0]["flat"][0, 0] += 1e-6
    torch.save(state, copy / ".izitorch" / "folds.pth.tar")
    assert [d for d in compare_runs(parallel, copy) if d.startswith(".izitorch/folds.pth.tar.groups")], compare_runs(parallel, copy)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sigkill_at_every_kill_point_then_resume_matches_the_uninterrupted_run(matrix, name):
    failures = {point: diffs[:5] for point, diffs in matrix[name] if diffs}
    assert not failures, f"{len(failures)} of {len(matrix[name])} kill points of {name} did not match: {failures}"


def test_dataloader_workers_draw_the_same_noise_after_a_resume(server, scenarios):
    """Workers seed their numpy and random from the loader's generator at each epoch's start;
    the resume state carries that generator, so a resumed run's workers draw what the
    uninterrupted run's did."""
    scenario, _ = scenarios["noisy"]
    workers = {"run": {"num_workers": 2}}
    reference = server.run("run", str(scenario.manifest("workers_ref", **workers)), cwd=scenario.folder)
    assert reference.returncode == 0, reference.stderr[-3000:]
    for tag, spec in (("workers_mid", _batch(1, 2, 3)), ("workers_end", {"hook": "epoch_finish", "fold": 1, "epoch": 2})):
        diffs = kill_and_resume(server, scenario, tag, spec, scenario.res("workers_ref"), **workers)
        assert not diffs, f"{label(spec)}: {diffs[:5]}"


def test_sigkill_at_a_random_point_with_real_processes(scenarios, tmp_path):
    """One random kill point, with ``python -m izitorch`` processes (no fork server). The seed is
    printed (and in every failure message); ``IZITORCH_KILL_SEED=<seed>`` replays that point."""
    seed = int(os.environ.get("IZITORCH_KILL_SEED") or time.time_ns() % 2**32)
    print(f"random kill point: IZITORCH_KILL_SEED={seed}")
    rng = random.Random(seed)
    steps_per_epoch = {"holdout": 6, "kfold": 3, "two": 6, "parallel": 8}  # the scenarios this test draws from
    name = rng.choice(sorted(steps_per_epoch))
    scenario, ref = scenarios[name]
    folds = 3 if name in ("kfold", "parallel") else 1
    epochs = 3 if name in ("kfold", "parallel") else SCENARIOS[name]["run"]["epochs"]  # their folds stop at epoch 3
    steps = steps_per_epoch[name]
    spec = _batch(rng.randint(1, folds), rng.randint(1, epochs), rng.randint(1, steps))
    point = f"{name}: {label(spec)} (IZITORCH_KILL_SEED={seed})"
    path = scenario.manifest("random")
    try:
        killed = cli("run", str(path), cwd=scenario.folder, env=probe(spec))
        assert killed.returncode == -signal.SIGKILL, f"{point}: rc {killed.returncode} {killed.stderr[-1000:]}"
        lock = json.loads((scenario.res("random") / ".izitorch.lock").read_text())
        assert lock["host"] == socket.gethostname()  # left by the killed run, taken over below
        refused = cli("run", str(path), cwd=scenario.folder)
        assert refused.returncode == 2, f"{point}: {refused.stderr}"
        assert "--resume" in one_line(refused.stderr)
        resumed = cli("run", str(path), "--resume", cwd=scenario.folder)
        assert resumed.returncode == 0, f"{point}: {resumed.stderr[-2000:]}"
        diffs = compare_runs(ref, scenario.res("random"))
        TALLY["random (real processes)"] = [(point, not diffs)]
        assert diffs == [], f"{point}: {diffs[:10]}"
        assert not (scenario.res("random") / ".izitorch.lock").exists()
    finally:
        shutil.rmtree(scenario.res("random"), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# resuming: finished runs, extension, refusals, resume = true, nothing to resume


def count_file(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "counts.json"
    return path, {"IZI_COUNT": str(path)}


def test_resuming_a_finished_run_retrains_nothing(server, scenarios, tmp_path):
    for name in ("holdout", "kfold"):
        scenario, ref = scenarios[name]
        shutil.copytree(ref, scenario.res("again"))
        path = scenario.manifest("again")
        counts, env = count_file(tmp_path)
        result = server.run("run", str(path), "--resume", cwd=scenario.folder, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(counts.read_text()) == {"fold_start": 0, "epoch_start": 0, "batch": 0}
        assert json.loads((scenario.res("again") / "results.json").read_text()) == json.loads((ref / "results.json").read_text())
        assert compare_runs(ref, scenario.res("again")) == []
        shutil.rmtree(scenario.res("again"))


def test_more_epochs_on_resume_extend_the_run_exactly(server, scenarios, tmp_path):
    scenario, ref = scenarios["two"]  # finished after 4 epochs
    straight = scenario.manifest("six", run={"epochs": 6})
    result = server.run("run", str(straight), cwd=scenario.folder)
    assert result.returncode == 0, result.stderr[-2000:]
    shutil.copytree(ref, scenario.res("extended"))
    path = scenario.manifest("extended")  # still says epochs = 4
    counts, env = count_file(tmp_path)
    result = server.run("run", str(path), "--resume", "--set", "run.epochs=6", cwd=scenario.folder, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(counts.read_text())["epoch_start"] == 2  # epochs 5 and 6 only
    for model in ("mlp", "cnn"):
        assert list(json.loads((scenario.res("extended") / model / "trainlog.json").read_text())) == [str(e) for e in range(1, 7)]
        six = torch.load(scenario.res("six") / model / "model.pth.tar", weights_only=True)
        extended = torch.load(scenario.res("extended") / model / "model.pth.tar", weights_only=True)
        assert same(six, extended, model) == []
    state = torch.load(scenario.res("extended") / ".izitorch" / "fold_1.pth.tar", weights_only=True)
    assert state["epoch"] == 6
    # the final test of the 4-epoch run drew once more from the test loader's generator (unused
    # without shuffling or workers); everything else is the straight run's
    diffs = compare_runs(scenario.res("six"), scenario.res("extended"))
    assert diffs == [".izitorch/fold_1.pth.tar.rng.loaders.test.loader: tensors differ"]
    assert compare_runs(ref, scenario.res("extended")) != []  # it did train further


def test_more_epochs_leave_early_stopped_folds_as_they_are(server, scenarios, tmp_path):
    scenario, ref = scenarios["kfold"]  # every fold stopped early at epoch 3 of 4
    shutil.copytree(ref, scenario.res("more"))
    counts, env = count_file(tmp_path)
    result = server.run("run", str(scenario.manifest("more")), "--resume", "--set", "run.epochs=6", cwd=scenario.folder, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(counts.read_text())["epoch_start"] == 0
    assert compare_runs(ref, scenario.res("more")) == []


def snapshot(res: Path) -> dict[str, bytes]:
    return {p.relative_to(res).as_posix(): p.read_bytes() for p in sorted(res.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "override, key, change",
    [
        ("models[0].params.hidden=32", "models[0].params.hidden", "(16 -> 32)"),
        ("run.rdm_seed=7", "run.rdm_seed", "(1 -> 7)"),
    ],
)
def test_resume_with_a_changed_manifest_is_refused_and_touches_nothing(scenarios, tmp_path, override, key, change):
    scenario, ref = scenarios["holdout"]
    res = tmp_path / "res"
    shutil.copytree(ref, res)
    shutil.copy(scenario.folder / "probe.py", tmp_path / "probe.py")
    path = make_manifest(tmp_path, **merged(SCENARIOS["holdout"], {"run.res_dir": res.as_posix()}))  # the reference run's manifest
    before = snapshot(res)
    result = cli("run", str(path), "--resume", "--set", override, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    line = one_line(result.stderr)
    assert line.startswith("izitorch: error: ") and "cannot resume" in line and f"{key} changed {change}" in line, line
    assert "--overwrite" in line
    assert snapshot(res) == before  # a refused resume leaves the run as it was


def test_resume_true_in_the_manifest_works_like_the_flag(server, scenarios):
    scenario, ref = scenarios["holdout"]
    path = scenario.manifest("flagless", run={"resume": True})
    # killed in epoch 3: epoch 1's state is on disk (files lag at most one epoch), epoch 2's may be
    first = server.run("run", str(path), cwd=scenario.folder, env=probe(_batch(1, 3, 3)))
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert "nothing to resume" in first.stderr  # resume = true with an empty res_dir: a new run
    second = server.run("run", str(path), cwd=scenario.folder)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "nothing to resume" not in second.stderr
    assert compare_runs(ref, scenario.res("flagless")) == []


def test_resume_with_nothing_saved_starts_a_new_run(server, scenarios):
    scenario, ref = scenarios["holdout"]
    path = scenario.manifest("fresh")
    assert not scenario.res("fresh").exists()
    result = server.run("run", str(path), "--resume", cwd=scenario.folder)
    assert result.returncode == 0, result.stderr[-2000:]
    assert one_line(result.stderr) == f'izitorch: nothing to resume in "{scenario.res("fresh").as_posix()}"; starting a new run'
    assert compare_runs(ref, scenario.res("fresh")) == []


@pytest.mark.parametrize("interval, on_disk", [(4, 1), (3600, None)])
def test_a_sigkill_loses_at_most_the_flush_interval_and_the_run_resumes_exactly(server, scenarios, interval, on_disk):
    """Killed in epoch 3 while files are held. The run's clock reads 0 s at its start, then 5, 6
    and 7 s at the epoch ends: an interval of 4 s flushes epoch 1 only (on disk once epoch 2
    ended), an hour nothing at all. ``--resume`` continues from epoch 1, or starts again, and
    ends where the uninterrupted run did."""
    scenario, ref = scenarios["holdout"]
    tag = f"held{interval}"
    path = scenario.manifest(tag, run={"flush_interval": interval})
    res = scenario.res(tag)
    killed = server.run("run", str(path), cwd=scenario.folder, env=probe({**_batch(1, 3, 3), "clock": [0, 5, 6, 7]}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if on_disk:
        assert saved_epoch(res) == on_disk and list(json.loads((res / "mlp" / "trainlog.json").read_text())) == ["1"]
        assert sorted(p.name for p in (res / "mlp").glob("model_epoch*")) == ["model_epoch1.pth.tar"]
    else:
        # no epoch flushed: on disk are only the files of the run's start, handed to the writer
        # at once (izitorch.io.hand_over), and the spare files (izitorch/spares.py: empty files
        # made ahead of the first flush), all in the record; no epoch's output, no state
        left = sorted(p.relative_to(res).as_posix() for p in res.rglob("*") if p.is_file())
        start = ["Dataset_split.pkl", "conf.json", "manifest.toml", "mlp/conf.json"]
        assert [name for name in left if not name.startswith(".izitorch/spare/")] == [".izitorch.lock", ".izitorch/owned.txt", *start]
        assert all((res / name).stat().st_size == 0 for name in left if name.startswith(".izitorch/spare/"))
        assert sorted((res / ".izitorch" / "owned.txt").read_text().splitlines()) == sorted(
            [".izitorch/", ".izitorch/owned.txt", ".izitorch/spare/", "/folder .izitorch/spare/", "mlp/", *start]
        )
    resumed = server.run("run", str(path), "--resume", cwd=scenario.folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    fresh = f'izitorch: nothing to resume in "{res.as_posix()}"; starting a new run'
    assert resumed.stderr.splitlines() == ([] if on_disk else [fresh])
    diffs = compare_runs(ref, res)
    TALLY.setdefault("flush interval (SIGKILL)", []).append((f"interval {interval} s, killed at batch 1,3,3", not diffs))
    assert diffs == []


# ---------------------------------------------------------------------------------------------
# SIGINT / SIGTERM


def saved_epoch(res: Path, fold: int = 1) -> int:
    return torch.load(res / ".izitorch" / f"fold_{fold}.pth.tar", weights_only=True)["epoch"]


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_stops_cleanly_and_the_run_resumes_exactly(scenarios, sig, code):
    scenario, ref = scenarios["two"]
    tag = sig.lower()
    path = scenario.manifest(tag, **HOUR)  # nothing on disk before the signal: the stop flushes
    stopped = cli("run", str(path), cwd=scenario.folder, env=probe({**_batch(1, 3, 2), "sig": sig}))
    assert stopped.returncode == code, stopped.stderr[-2000:]
    line = one_line(stopped.stderr)
    assert f"interrupted by {sig}" in line and "--resume" in line and str(path) in line, line
    res = scenario.res(tag)
    assert saved_epoch(res) == 2  # the last finished epoch; epoch 3 was abandoned after its step 2
    for model in ("mlp", "cnn"):
        assert list(json.loads((res / model / "trainlog.json").read_text())) == ["1", "2"]
    assert not (res / "results.json").exists()
    assert not (res / ".izitorch.lock").exists()
    resumed = cli("run", str(path), "--resume", cwd=scenario.folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    diffs = compare_runs(ref, res)
    TALLY.setdefault("signals (real processes)", []).append((f"{sig} at batch 1,3,2", not diffs))
    assert diffs == []


def test_a_second_sigint_aborts_at_once_and_the_run_still_resumes(server, scenarios):
    scenario, ref = scenarios["holdout"]
    path = scenario.manifest("twice", **HOUR)
    aborted = cli("run", str(path), cwd=scenario.folder, env=probe({**_batch(1, 2, 4), "sig": "SIGINT", "times": 2}))
    assert aborted.returncode == 130, aborted.stderr[-2000:]
    line = one_line(aborted.stderr)
    assert "aborted" in line and "--resume" in line, line
    res = scenario.res("twice")
    assert saved_epoch(res) == 1 and list(json.loads((res / "mlp" / "trainlog.json").read_text())) == ["1"]
    assert not (res / ".izitorch.lock").exists()
    resumed = server.run("run", str(path), "--resume", cwd=scenario.folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    diffs = compare_runs(ref, res)
    TALLY.setdefault("signals (real processes)", []).append(("SIGINT twice at batch 1,2,4", not diffs))
    assert diffs == []


def test_sigint_sent_from_outside(server, scenarios, tmp_path):
    """SIGINT from another process, sent while the run is in epoch 2 (the probe holds step 1 of
    epoch 2 until the signal has arrived: no sleep decides when it comes)."""
    scenario, ref = scenarios["holdout"]
    path = scenario.manifest("outside", **HOUR)
    res = scenario.res("outside")
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "izitorch", "run", str(path)],
        cwd=scenario.folder,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **ENV, **probe({"hook": "await_signal", "at": [1, 2, 1], "ready": str(ready)})},
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polls for the file; the run waits for the signal meanwhile
        assert ready.exists(), f"the run never reached epoch 2, step 1 (rc {proc.poll()})"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    line = one_line(stderr)
    assert "interrupted by SIGINT" in line and "--resume" in line, line
    assert saved_epoch(res) == 1  # epoch 2 was abandoned after its step 1
    assert list(json.loads((res / "mlp" / "trainlog.json").read_text())) == ["1"]
    resumed = server.run("run", str(path), "--resume", cwd=scenario.folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    diffs = compare_runs(ref, res)
    TALLY.setdefault("signals (real processes)", []).append(("SIGINT from outside at batch 1,2,1", not diffs))
    assert diffs == []


# ---------------------------------------------------------------------------------------------
# the lock


def write_lock(res: Path, pid: int) -> Path:
    res.mkdir(parents=True, exist_ok=True)
    lock = res / ".izitorch.lock"
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    return lock


def test_a_live_lock_refuses_the_run(manifest, tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock = write_lock(tmp_path / "res", sleeper.pid)
        before = lock.read_bytes()
        result = cli("run", str(manifest()), cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-2000:]
        line = one_line(result.stderr)
        assert "in use by another izitorch run" in line and f"pid {sleeper.pid}" in line, line
        assert lock.read_bytes() == before  # the other run's lock is not touched
        assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [".izitorch.lock"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_taken_over_and_removed(manifest, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = write_lock(tmp_path / "res", gone.pid)
    result = cli("run", str(manifest()), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not lock.exists()
    assert (tmp_path / "res" / "results.json").is_file()


def test_no_lock_after_a_run_and_a_killed_run_leaves_its_dead_pid(server, scenarios):
    scenario, _ = scenarios["holdout"]
    for name, (_, ref) in scenarios.items():
        assert not (ref / ".izitorch.lock").exists(), name
    # a run killed mid-way leaves its lock, naming its own (now dead) pid on this host
    path = scenario.manifest("locked")
    killed = server.run("run", str(path), cwd=scenario.folder, env=probe(_batch(1, 1, 2)))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lock = json.loads((scenario.res("locked") / ".izitorch.lock").read_text())
    assert lock["host"] == socket.gethostname() and isinstance(lock["pid"], int) and lock["pid"] != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(lock["pid"], 0)


# ---------------------------------------------------------------------------------------------
# the Rack's --resume 1


RACK_SCRIPT = """\
import os

import torch
from torch import nn
from izitorch.trainRack import Rack, ModelConfig


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == int(os.environ.get("KILL_AT_CALL", "0")):
                os.kill(os.getpid(), 9)
        return self.net(x)


class Dataset(torch.utils.data.Dataset):
    def __init__(self, limit=240):
        from sklearn.datasets import load_digits
        data = load_digits()
        self.x = torch.tensor(data.data[:limit], dtype=torch.float32) / 16.0
        self.y = torch.tensor(data.target[:limit], dtype=torch.long)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


rack = Rack()
rack.parse_args()
torch.manual_seed(0)
m = Model()
conf = ModelConfig(name='model1', model=m, criterion=torch.nn.CrossEntropyLoss(),
                   optimizer=torch.optim.Adam(m.parameters(), lr=rack.args.lr))
rack.add_model_configs([conf])
rack.set_dataset(Dataset())
rack.launch()
"""


def test_the_rack_resumes_with_resume_1(tmp_path):
    script = tmp_path / "train_model.py"
    script.write_text(RACK_SCRIPT, encoding="utf-8")

    def launch(res: str, *extra: str, kill: int = 0) -> subprocess.CompletedProcess:
        argv = [
            sys.executable,
            str(script),
            "--res_dir",
            str(tmp_path / res),
            "--epochs",
            "3",
            "--batch_size",
            "32",
            "--lr",
            "0.01",
            "--device",
            "cpu",
            "--display_step",
            "1000",
            "--flush_interval",
            "0",
            *extra,
        ]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=240, env={**os.environ, **ENV, "KILL_AT_CALL": str(kill)})

    ref = launch("ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = launch("killed", kill=16)  # 192 training samples: 6 steps an epoch, so epoch 3 step 4
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # files are written behind training, at most one epoch behind: epoch 1 is on disk, 2 may be
    assert saved_epoch(tmp_path / "killed") in (1, 2)
    (tmp_path / "killed").rename(tmp_path / "res")  # a moved res_dir resumes too, as with a manifest
    resumed = launch("res", "--resume", "1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "nothing to resume" not in resumed.stderr
    assert list(json.loads((tmp_path / "res" / "model1" / "trainlog.json").read_text())) == ["1", "2", "3"]
    assert compare_runs(tmp_path / "ref", tmp_path / "res") == []


# ---------------------------------------------------------------------------------------------
# checkpoints load with weights_only=True


def test_every_checkpoint_loads_with_weights_only(scenarios):
    seen = set()
    for name, (_, ref) in scenarios.items():
        paths = sorted(ref.rglob("*.pth.tar"))
        for path in paths:
            data = torch.load(path, weights_only=True)
            assert isinstance(data, dict) and data, path
            kind = "resume state" if path.parent.name == ".izitorch" else path.name.split("_epoch")[0].replace(".pth.tar", "")
            seen.add(kind)
            if kind != "resume state":
                assert set(data) >= {"epoch", "state_dict", "optimizer"}, path
    assert seen == {"model", "model_best", "model_last", "resume state"}  # best_and_last: the option matrix
    assert len(list(scenarios["holdout"][1].rglob("model_epoch*.pth.tar"))) == 3
    assert len(list(scenarios["kfold"][1].rglob(".izitorch/fold_*.pth.tar"))) == 3


# ---------------------------------------------------------------------------------------------
# the report (last: it also counts what the tests above recorded)


def test_report_kill_point_counts(matrix):
    tried = sum(len(outcomes) for outcomes in matrix.values())
    matched = sum(not diffs for outcomes in matrix.values() for _, diffs in outcomes)
    lines = [f"kill points: {tried} tried, {matched} matched bit for bit"]
    for name, outcomes in matrix.items():
        lines.append(f"  {name}: {len(outcomes)} tried, {sum(not d for _, d in outcomes)} matched")
    for key, entries in TALLY.items():
        if not key.startswith("matrix"):
            lines.append(f"  {key}: {len(entries)} tried, {sum(ok for _, ok in entries)} matched: {', '.join(p for p, _ in entries)}")
    report = "\n".join(lines)
    print(report)
    REPORT.write_text(report + "\n", encoding="utf-8")
    assert tried >= 40 and matched == tried, report
