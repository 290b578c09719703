"""The same manifest gives the same bits: ``rdm_seed`` seeds every global generator, and
``[run] deterministic = true`` makes a GPU run reproducible too.

:func:`seed_everything` seeds torch's, numpy's and Python's global generators together (as
Lightning's function of that name does), so that a dataset or model drawing from ``np.random``
or ``random`` trains the same way from run to run. DataLoader workers need nothing more: each
worker seeds its own torch, numpy and ``random`` from the loader's seeded ``generator=`` and its
worker id (torch >= 1.9), so their draws differ from each other and repeat from run to run.

On the CPU izitorch's runs are reproducible as they are. On CUDA, cuDNN picks convolution
algorithms by benchmark and some of them (and some cuBLAS paths) add in a varying order, so two
runs of a convolutional model, or a run and its resumed twin, drift apart in the last bits.
Lightning's ``Trainer(deterministic=True)`` answers the same need the same way.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

#: cuBLAS needs a fixed workspace to be deterministic; it reads this before its first call.
CUBLAS_WORKSPACE = ":4096:8"


def seed_everything(seed: int) -> None:
    """Seed torch's (CPU and every CUDA device's), numpy's and Python's global generators with
    ``seed``. numpy takes seeds below 2**32 only, so it gets ``seed % 2**32``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def model_seed(run_seed: int, seed: int) -> int:
    """The seed a model with its own ``seed`` (a sweep's replica) is built from: ``run_seed``
    and ``seed`` mixed by numpy's ``SeedSequence``, so that replicas 1, 2, ... of one run and
    those of a run with another ``rdm_seed`` all start from unrelated weights."""
    return int(np.random.SeedSequence([run_seed % 2**32, seed]).generate_state(1)[0])


@contextlib.contextmanager
def random_states_kept(device: torch.device) -> Iterator[None]:
    """torch's (CPU and ``device``), numpy's and Python's global generators as they were."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Inside, torch uses deterministic algorithms only (an op that has none raises, naming
    itself); the previous global settings come back on exit, as ``izitorch.run`` is a library call."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]
