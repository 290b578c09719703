"""``[run] deterministic = true``: the same run gives the same bits on a GPU too.

On the CPU izitorch's runs are reproducible as they are. On CUDA, cuDNN picks convolution
algorithms by benchmark and some of them (and some cuBLAS paths) add in a varying order, so two
runs of a convolutional model, or a run and its resumed twin, drift apart in the last bits.
Lightning's ``Trainer(deterministic=True)`` answers the same need the same way.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

#: cuBLAS needs a fixed workspace to be deterministic; it reads this before its first call.
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Inside, torch uses deterministic algorithms only (an op that has none raises, naming
    itself); the previous global settings come back on exit, as ``izitorch.run`` is a library call."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2], previous[3]
