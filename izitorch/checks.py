"""The dry run that ``validate`` and ``run`` share: what the first training step would meet.

What can only be seen once built (a model without parameters, a loss that is not a scalar, an
item that does not load, a forward that fails) is found by :func:`dry_run`: the dataset, every
slot, and one forward and loss per model on a few samples, with the same one-line errors the
first training step would give. The kinds of components are checked by :mod:`izitorch.kinds`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from izitorch import precision, tasks
from izitorch.config import Config
from izitorch.data import Guarded, build_dataset, build_slots, loading_error, to_device
from izitorch.cohort import unpack
from izitorch.stacks import forward_loss
from izitorch.reproducibility import deterministic_algorithms
from izitorch.state import Slot

#: Samples in the dry run's batch: enough for a model that needs more than one, and cheap.
DRY_RUN_SAMPLES = 4


def dry_run(config: Config, device: torch.device) -> tuple[Dataset, list[Slot], str | None]:
    """Build the dataset and every slot, then one forward and loss per model on a few samples;
    return them with the run's task (:func:`izitorch.tasks.settle`: declared and checked
    against the first model's output and the target, or inferred from them; None where unclear).

    Whatever would fail at the first training step fails here with the line training would
    give (under ``deterministic`` too). Nothing is written and nothing the run depends on moves:
    the random generators are restored, the models are evaluated without gradients and get
    their modes back.
    """
    precision.check(config.run.precision, device)
    dataset = build_dataset(config)
    slots = build_slots(config, device)
    with _random_states_kept(device), deterministic_algorithms(config.run.deterministic):
        inputs, target = first_batch(config, dataset, device)
        outputs = []
        for slot in slots:
            with torch.no_grad(), _evaluating(slot.model), precision.autocast(config.run.precision, device):
                outputs.append(forward_loss(slot, inputs, target, config.data.num_classes)[0])
    return dataset, slots, tasks.settle(config, outputs[0] if outputs else None, target)


def first_batch(config: Config, dataset: Dataset, device: torch.device) -> tuple[Any, torch.Tensor]:
    """The first few samples collated as a DataLoader would, on ``device``; the last sample is
    loaded too, so that a ``__len__`` longer than the data shows here."""
    size, guarded = len(dataset), Guarded(dataset)
    count = min(DRY_RUN_SAMPLES, size, config.run.batch_size)
    try:
        guarded[size - 1]
        batch = default_collate([guarded[index] for index in range(count)])
    except Exception as error:
        raise loading_error(config, error, "a batch checked before training") from None
    return to_device(unpack(batch), device, non_blocking=False)


@contextlib.contextmanager
def _random_states_kept(device: torch.device) -> Iterator[None]:
    """torch's (CPU and ``device``), numpy's and Python's global generators as they were."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in evaluation mode (no dropout, no running statistics moved), then each
    submodule back in its own mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
