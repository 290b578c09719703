"""The dry run that ``validate`` and ``run`` share: what the first training step would meet.

What can only be seen once built (a model without parameters, a loss that is not a scalar, an
item that does not load, a forward that fails) is found by :func:`dry_run`: the dataset, every
slot, and one forward and loss per model on a few samples, with the same one-line errors the
first training step would give. The kinds of components are checked by :mod:`izitorch.kinds`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, default_collate

from izitorch import precision, schedules, tasks, torchmetrics_bridge
from izitorch.config import BALANCED, Config
from izitorch.data import (
    Guarded,
    balanced_labels,
    batch_kind,
    build_dataset,
    build_slots,
    collate_function,
    loading_error,
    takes_keyword,
    to_device,
    user_sampler,
)
from izitorch.errors import IzitorchError, ManifestError, describe, error_text, join_path
from izitorch.references import check_arguments, resolve
from izitorch.splits import class_labels, sample_groups
from izitorch.cohort import unpack
from izitorch.stacks import forward_loss
from izitorch.reproducibility import deterministic_algorithms, random_states_kept
from izitorch.selection import Selection, resolve_selection
from izitorch.state import Slot

#: Samples in the dry run's batch: enough for a model that needs more than one, and cheap.
DRY_RUN_SAMPLES = 4


def dry_run(config: Config, device: torch.device, factories: dict | None = None) -> tuple[Dataset, list[Slot], str | None, Selection]:
    """Build the dataset and every slot, then one forward and loss per model on a few samples;
    return them with the run's task (:func:`izitorch.tasks.settle`: declared and checked
    against the first model's output and the target, or inferred from them; None where unclear)
    and the run's :class:`~izitorch.selection.Selection` for that task (``factories``: the
    registered metrics; None: the default selection, ``loss``).

    Whatever would fail at the first training step fails here with the line training would
    give (under ``deterministic`` too). Nothing is written and nothing the run depends on moves:
    the random generators are restored, the models are evaluated without gradients and get
    their modes back. A ``ReduceLROnPlateau`` watches the selection's metric: when the task
    changes the default metric, the slots are built again (from the same seed) for its mode.
    """
    precision.check(config.run.precision, device)
    dataset = build_dataset(config)
    check_data_options(config, dataset)
    selection = resolve_selection(config, factories) if factories is not None else Selection()
    slots = build_slots(config, device, selection)
    with random_states_kept(device), deterministic_algorithms(config.run.deterministic):
        inputs, target = first_batch(config, dataset, device)
        outputs = []
        for slot in slots:
            with torch.no_grad(), _evaluating(slot.model), precision.autocast(config.run.precision, device):
                outputs.append(forward_loss(slot, inputs, target, config.data.num_classes)[0])
    task = tasks.settle(config, outputs[0] if outputs else None, target)
    for factory in (factories or {}).values():
        if outputs and isinstance(outputs[0], torch.Tensor) and isinstance(factory, type) and issubclass(factory, torchmetrics_bridge.TorchMetricMeter):
            with random_states_kept(device):
                torchmetrics_bridge.check_one_number(factory, outputs[0], target)
    if factories is not None:
        settled = resolve_selection(config, factories, task)
        if settled != selection and any(isinstance(slot.scheduler, schedules.PLATEAU) for slot in slots):
            slots = build_slots(config, device, settled)
        selection = settled
    return dataset, slots, task, selection


def first_batch(config: Config, dataset: Dataset, device: torch.device) -> tuple[Any, torch.Tensor]:
    """The first few samples collated as a DataLoader would, on ``device``; the last sample is
    loaded too, so that a ``__len__`` longer than the data shows here."""
    size, guarded = len(dataset), Guarded(dataset)
    count = min(DRY_RUN_SAMPLES, size, config.run.batch_size)
    collate = collate_function(config)
    try:
        guarded[size - 1]
        items = [guarded[index] for index in range(count)]
    except Exception as error:
        raise loading_error(config, error, "a batch checked before training") from None
    check_items(config, dataset, items[0])
    try:
        batch = default_collate(items) if collate is None else None
    except Exception as error:
        raise loading_error(config, error, "a batch checked before training") from None
    if collate is not None:  # the user's batching: its failures are its own, not the dataset's
        name = describe(config.data.collate_fn) if isinstance(config.data.collate_fn, str) else "collate_fn"
        try:
            batch = collate(items)
        except Exception as error:
            raise IzitorchError(f"{name}({count} samples) raised {error_text(error)}", "data.collate_fn") from None
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ManifestError(f"{name} returned {batch_kind(batch)}; a collate_fn must return an (inputs, target) pair", "data.collate_fn")
    return to_device(unpack(batch), device, non_blocking=False)


def check_items(config: Config, dataset: Dataset, first: Any) -> None:
    """The first sample of the dataset (``first``), and of each given split (``[data] train``,
    ``val``, ``test``), loads and is an ``(input, target)`` pair; a callable that gives anything
    else is refused naming the key that built it."""
    parts = getattr(dataset, "izitorch_parts", None) or {"dataset": range(len(dataset))}
    guarded = Guarded(dataset)
    for name, rows in parts.items():
        key = f"data.{name}"
        spec = getattr(config.data, name)
        target = spec if name == "dataset" else spec.target if spec.target is not None else config.data.dataset
        label = describe(target) if isinstance(target, str) else getattr(target, "__name__", type(target).__name__)
        try:
            item = first if int(rows[0]) == 0 else guarded[int(rows[0])]
        except Exception as error:
            raise loading_error(config, error, f"the first sample of its {name} set" if name != "dataset" else "its first sample", key, label) from None
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            got = f"items of {len(item)} elements" if isinstance(item, (list, tuple)) else f"{type(item).__name__} items"
            raise ManifestError(f"{label} yields {got}; izitorch expects (input, target) pairs from __getitem__", key)


def check_data_options(config: Config, dataset: Dataset) -> None:
    """``[data]``'s split and loader options against the built dataset: each reference
    imports and takes its arguments, stratification and ``sampler = "balanced"`` find the
    labels they need, ``group_by`` gives one group per sample."""
    data = config.data
    collate_function(config)
    class_labels(config, dataset)
    sample_groups(config, dataset)
    if data.sampler is None:
        return
    if not config.run.shuffle:
        raise ManifestError("shuffle = false keeps the training split's order, which a sampler replaces with its own; drop one of them", "data.sampler")
    if data.sampler == BALANCED:
        balanced_labels(dataset)
    elif isinstance(data.sampler.target, str):
        where = "data.sampler.class" if data.sampler.params else "data.sampler"
        try:
            factory = resolve(data.sampler.target, config.base_dir)
        except ManifestError as error:
            raise ManifestError(error.message, where) from None
        if not callable(factory):
            raise ManifestError(f'"{data.sampler.target}" is not callable', where)
        try:
            check_arguments(factory, {"generator": None, **data.sampler.params} if takes_keyword(factory, "generator") else data.sampler.params, leading=1)
        except ManifestError as error:
            raise ManifestError(error.message, join_path("data.sampler", error.path)) from None
    if data.sampler != BALANCED:  # called as the first epoch will call it (the whole dataset for its training split)
        with random_states_kept(torch.device("cpu")):
            user_sampler(config, Subset(dataset, range(len(dataset))), torch.Generator().manual_seed(config.run.rdm_seed))


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
