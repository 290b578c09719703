"""Datasets, models and loaders: from the configuration to the objects a fold trains on.

Shuffling uses a seeded ``torch.Generator`` per fold (never the global RNG), so the same
``rdm_seed`` gives the same batches whatever else the process does. The dataset and the models
are built right after :func:`~izitorch.reproducibility.seed_everything`, so that their own
random draws (torch, numpy or ``random``) repeat from run to run.
"""

from __future__ import annotations

import inspect
import itertools
import types
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler, Sampler, Subset, WeightedRandomSampler

from izitorch import schedules, sharding
from izitorch.config import BALANCED, GIVEN_SPLITS, ComponentSpec, Config, ModelSpec
from izitorch.errors import IzitorchError, ManifestError, TrainingError, describe, error_text, first_line, join_path
from izitorch.kinds import built_mismatch, class_mismatch
from izitorch.references import check_arguments, resolve
from izitorch.reproducibility import model_seed, random_states_kept, seed_everything
from izitorch.selection import Selection, has_validation
from izitorch.state import Run, Slot, Split


def pick_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ManifestError('device "cuda" requested but CUDA is not available; use device = "auto" or "cpu"', "run.device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ManifestError(f'device "{name}" requested but only {torch.cuda.device_count()} GPU(s) are visible', "run.device")
    return device


def _build(target: Any, params: dict, where: str, base_dir: str, *leading: Any, kind: str = "") -> Any:
    """Call a reference (or a class) with its parameters; pass an already built object through.

    With ``kind`` (``"model"``, ``"optimizer"``...), a class of another kind is refused before it
    is called and what was built (or given) must be of that kind (:mod:`izitorch.kinds`).
    """
    factory = resolve(target, base_dir) if isinstance(target, str) else target
    label = f'"{target}"' if isinstance(target, str) else _label(target)
    why = class_mismatch(kind, factory, label) if kind else None
    if why:
        raise ManifestError(why, where)
    built = factory
    if isinstance(target, str) or inspect.isclass(factory):
        try:
            built = factory(*leading, **params)
        except IzitorchError as error:  # izitorch's own line (from a bundled dataset, say): kept, placed here
            raise error.located(prefix=where) from None
        except Exception as error:
            raise IzitorchError(f"{_label(target)}(...) raised {type(error).__name__}: {error}", where) from None
    why = built_mismatch(kind, built, label) if kind else None
    if why:
        raise ManifestError(why, where)
    return built


def _label(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", type(target).__name__)


def build_dataset(config: Config) -> Dataset:
    """The dataset named by ``[data]`` (or the object the Rack was given); never empty. Given
    splits (``[data] train``, ``val``, ``test``) are built each and joined (:func:`join_splits`)."""
    if config.data.train is not None:
        dataset = join_splits({name: build_split(config, name) for name in GIVEN_SPLITS if getattr(config.data, name) is not None})
        check_labels(dataset, config.data.num_classes)
        return dataset
    dataset = config.data.dataset
    if dataset is None:
        raise ManifestError("no dataset given: set [data] dataset (or call rack.set_dataset)", "data.dataset", config.source)
    if isinstance(dataset, str):
        seed_everything(config.run.rdm_seed)  # a dataset that draws random numbers when built
        dataset = _build(dataset, config.data.params, "data.dataset", config.base_dir)
    try:
        size = len(dataset)
    except TypeError:
        raise IzitorchError(f"{type(dataset).__name__} has no len(); izitorch needs a map-style torch Dataset", "data.dataset") from None
    if size == 0:
        raise IzitorchError("the dataset is empty; check its path or parameters", "data.dataset")
    check_labels(dataset, config.data.num_classes)
    return dataset


def build_split(config: Config, name: str) -> Dataset:
    """The given split ``[data] <name>``: its own callable, or ``[data] dataset``'s, called with
    ``[data] params`` and the split's own parameters over them."""
    spec = getattr(config.data, name)
    target = spec.target if spec.target is not None else config.data.dataset
    where = f"data.{name}" if spec.target is None or not spec.params else f"data.{name}.class"
    params = {**config.data.params, **spec.params}
    if isinstance(target, str):
        try:
            factory = resolve(target, config.base_dir)
            check_arguments(factory, params)
        except ManifestError as error:
            raise ManifestError(error.message, join_path(f"data.{name}", error.path) if error.path else where) from None
        seed_everything(config.run.rdm_seed)  # a dataset that draws random numbers when built
    dataset = _build(target, params, where, config.base_dir) if isinstance(target, str) or inspect.isclass(target) else target
    try:
        size = len(dataset)
    except TypeError:
        raise IzitorchError(f"{type(dataset).__name__} has no len(); izitorch needs a map-style torch Dataset", where) from None
    if size == 0:
        raise IzitorchError(f"the {name} set is empty; check its path or parameters", where)
    return dataset


class JoinedAttributes:
    """A per-sample attribute (``group_by``) of joined given splits: every split's, joined."""

    _given_datasets: list[Dataset]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # (unpickling looks up dunders before the state is set)
            raise AttributeError(name)
        values = [getattr(part, name, None) for part in self.__dict__.get("_given_datasets", ())]
        if not values or any(value is None for value in values):
            raise AttributeError(name)
        try:
            return np.concatenate([value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value) for value in values])
        except ValueError:
            raise AttributeError(name) from None


class GivenSplits(JoinedAttributes, ConcatDataset):
    """Given splits joined into one dataset, in the order train, val, test: what a run indexes
    (``Dataset_split.pkl`` numbers the samples this way). ``izitorch_parts`` holds each split's
    indices; ``targets`` the labels when every split has them at hand."""

    def __init__(self, parts: dict[str, Dataset]) -> None:
        super().__init__(list(parts.values()))
        self._given_datasets = list(parts.values())
        self.izitorch_parts = _ranges(parts)
        self.targets = _joined([dataset_labels(part) for part in parts.values()])


class GivenTensorSplits(JoinedAttributes, torch.utils.data.TensorDataset):
    """Given splits that are all ``TensorDataset`` objects, joined into one (the fast path)."""

    def __init__(self, parts: dict[str, torch.utils.data.TensorDataset], tensors: list[torch.Tensor]) -> None:
        super().__init__(*tensors)
        # each split's own attributes, without its tensors (joined above: no second copy kept)
        self._given_datasets = [types.SimpleNamespace(**{k: v for k, v in vars(part).items() if k != "tensors"}) for part in parts.values()]
        self.izitorch_parts = _ranges(parts)


def join_splits(parts: dict[str, Dataset]) -> Dataset:
    """The given splits as one dataset (:class:`GivenTensorSplits` when they are tensors alike,
    else :class:`GivenSplits`), each split's indices in ``izitorch_parts``."""
    datasets = list(parts.values())
    if all(isinstance(d, torch.utils.data.TensorDataset) for d in datasets) and len({len(d.tensors) for d in datasets}) == 1:
        try:
            tensors = [torch.cat(group) for group in zip(*(d.tensors for d in datasets))]
        except (RuntimeError, TypeError):  # shapes or dtypes that do not join: served per sample
            pass
        else:
            return GivenTensorSplits(parts, tensors)
    return GivenSplits(parts)


def _ranges(parts: dict[str, Dataset]) -> dict[str, np.ndarray]:
    ranges, start = {}, 0
    for name, dataset in parts.items():
        ranges[name] = np.arange(start, start + len(dataset))
        start += len(dataset)
    return ranges


def _joined(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    if any(v is None for v in values):
        return None
    try:
        return torch.cat([v.reshape(len(v), *v.shape[1:]) if v.dim() else v.reshape(1) for v in values])
    except (RuntimeError, TypeError):
        return None


def check_labels(dataset: Dataset, num_classes: int | None) -> None:
    """Integer labels must lie in [0, num_classes), checked where the labels are at hand.

    Works for a ``TensorDataset`` (its last tensor) and for datasets with a ``targets`` attribute
    (torchvision's convention); other datasets are checked by the criterion during training.
    """
    if num_classes is None:
        return
    labels = dataset_labels(dataset)
    if labels is None or labels.is_floating_point() or labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise IzitorchError(
            f"labels range from {low} to {high} but num_classes = {num_classes}; labels must lie in [0, num_classes): fix num_classes or the labels",
            "data.num_classes",
        )


def dataset_labels(dataset: Dataset) -> torch.Tensor | None:
    """The labels of a dataset where they are at hand without loading its samples: a
    ``TensorDataset``'s last tensor, or a ``targets`` attribute (torchvision's convention)."""
    labels = dataset.tensors[-1] if isinstance(dataset, torch.utils.data.TensorDataset) else getattr(dataset, "targets", None)
    if labels is None:
        return None
    try:
        return torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):  # targets that are not numbers (strings, say)
        return None


def build_slot(spec: ModelSpec, index: int, device: torch.device, base_dir: str, selection: Selection | None = None, validation: bool = False) -> Slot:
    """Model on its device, then its criterion, optimizer and scheduler, each of its kind. A
    ``ReduceLROnPlateau`` watches ``selection``'s metric on the validation set (``validation``:
    whether the run has one), see :mod:`izitorch.schedules`."""
    where = f"models[{index}]"
    model = _build(spec.model, spec.params, f"{where}.model", base_dir, kind="model")
    move_to(model, device)
    criterion = _component(spec.criterion, f"{where}.criterion", base_dir, kind="criterion")
    if isinstance(criterion, torch.nn.Module):
        move_to(criterion, device)
    optimizer = _component(spec.optimizer, f"{where}.optimizer", base_dir, model.parameters(), kind="optimizer")
    scheduler = None
    if spec.scheduler:
        selection = selection or Selection()
        arguments = schedules.arguments(spec.scheduler, f"{where}.scheduler", base_dir, selection, validation)
        scheduler = _build(spec.scheduler.target, arguments, f"{where}.scheduler", base_dir, optimizer, kind="scheduler")
        schedules.check_built(scheduler, spec.scheduler, f"{where}.scheduler", selection, validation)
    slot = Slot(spec.name, spec, model, criterion, optimizer, scheduler)
    slot.snapshot_initial_state()
    return slot


def move_to(module: torch.nn.Module, device: torch.device) -> None:
    """``module.to(device)``, skipped when every parameter and buffer is there already and no
    class involved changes how ``to`` works (``to`` itself, or ``_apply``, which may move other
    tensors): the call walks every submodule of every model (64 of them in a sweep) to change
    nothing."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # where .to("cuda") puts tensors
    tensors = itertools.chain(module.parameters(), module.buffers())
    if (
        type(module).to is not torch.nn.Module.to
        or any(type(m)._apply is not torch.nn.Module._apply for m in module.modules())
        or any(tensor.device != device for tensor in tensors)
    ):
        module.to(device)


def _component(component: ComponentSpec, where: str, base_dir: str, *leading: Any, kind: str = "") -> Any:
    return _build(component.target, component.params, where, base_dir, *leading, kind=kind)


def build_slots(config: Config, device: torch.device, selection: Selection | None = None) -> list[Slot]:
    """One slot per ``[[models]]`` entry, built after seeding so weights are reproducible (a
    model with its own ``seed`` from :func:`~izitorch.reproducibility.model_seed`); each
    model and optimizer must own its parameters (:func:`check_ownership`). ``selection``: the
    run's metric, which a ``ReduceLROnPlateau`` watches."""
    seed_everything(config.run.rdm_seed)
    validation = has_validation(config)
    slots = []
    for index, spec in enumerate(config.models):
        if spec.seed is None:  # the run's sequence, model after model
            slots.append(build_slot(spec, index, device, config.base_dir, selection, validation))
            continue
        with random_states_kept(device):  # its own weights, leaving the sequence of the others as it was
            seed_everything(model_seed(config.run.rdm_seed, spec.seed))
            slots.append(build_slot(spec, index, device, config.base_dir, selection, validation))
    check_ownership(slots)
    return slots


def check_ownership(slots: list[Slot]) -> None:
    """Refuse models that share parameters and optimizers that update what is not their model's.

    Objects given from Python (a ``Rack``'s ``ModelConfig``) can be wired wrongly: one module in
    two models trains one set of weights twice per step and reports it twice; an optimizer built
    on another model's parameters trains that model and leaves its own untouched; one holding
    tensors outside its model trains them, but izitorch resets, saves and restores a model's
    parameters only. Each trains silently wrong, so each is refused before training.
    """
    owner: dict[int, int] = {}  # id(parameter) -> index of the first model holding it
    for index, slot in enumerate(slots):
        for parameter in slot.model.parameters():
            first = owner.setdefault(id(parameter), index)
            if first != index:
                same = "is the same nn.Module object as" if slot.model is slots[first].model else "shares parameters with"
                raise ManifestError(
                    f'model "{slot.name}" {same} model "{slots[first].name}", so both would train one set of weights; '
                    "give each model its own module (build another, or copy.deepcopy it) and its optimizer on "
                    "that module's parameters",
                    f"models[{index}].model",
                )
    for index, slot in enumerate(slots):
        foreign = [p for group in getattr(slot.optimizer, "param_groups", ()) for p in group["params"] if owner.get(id(p)) != index]
        if not foreign:
            continue
        others = sorted({owner[id(p)] for p in foreign if id(p) in owner})
        if others:
            names = ", ".join(f'"{slots[other].name}"' for other in others)
            what = f"parameters of model {names}, not of its own model"
        else:
            what = f"{len(foreign)} tensor(s) that are not parameters of its model (izitorch resets, saves and restores a model's parameters only)"
        raise ManifestError(
            f'the optimizer of model "{slot.name}" updates {what}; build each optimizer on its own model\'s parameters: optimizer(model.parameters())',
            f"models[{index}].optimizer",
        )


class TensorBatchLoader:
    """Batches of an in-memory ``TensorDataset`` made by indexing its tensors, not per sample.

    A DataLoader calls ``__getitem__`` once per sample and collates the results; for tensors
    already in memory that is most of a small model's step time. This loader gathers a split's
    rows once per fold (onto the device when it fits), then slices (evaluation) or indexes with
    the sampler's positions (training). It draws from the same seeded sampler and generator as
    the DataLoader path and drops the same last batch (``drop_last``), so the same seeds give
    exactly the same batches.
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        batch_size: int,
        sampler: Any,
        generator: torch.Generator,
        device: torch.device,
        drop_last: bool = False,
    ) -> None:
        self.tensors = tensors
        self.batch_size = batch_size
        self.sampler = sampler
        self.generator = generator
        self.device = device
        self.drop_last = drop_last
        self.size = len(tensors[0])
        self.on_device = all(t.device == device for t in tensors)  # its batches need no move

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else self.size
        return count // self.batch_size if self.drop_last else (count + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # as DataLoader's base seed
        if self.sampler is None:
            for start in range(0, self._stop(self.size), self.batch_size):
                yield tuple(t[start : start + self.batch_size] for t in self.tensors)
            return
        order = host_to_device(torch.tensor(list(self.sampler), dtype=torch.long), self.device)
        for start in range(0, self._stop(len(order)), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield tuple(t.index_select(0, rows) for t in self.tensors)

    def _stop(self, count: int) -> int:
        """Where the batches of ``count`` samples end: before an incomplete last one with ``drop_last``."""
        return count - count % self.batch_size if self.drop_last else count


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) copied to ``device`` without stalling on CUDA.

    A copy from ordinary (pageable) memory makes the host wait until the GPU has drained its
    queue, once per call: a few small per-step copies cost more than the step's kernels. Staged
    through pinned memory (torch's caching host allocator keeps the block until the copy is
    done) the copy is queued like a kernel.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def gather_tensors(dataset: Dataset, indices, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """The rows of a ``TensorDataset`` for ``indices`` (on ``device`` when CUDA has room), else None."""
    if not isinstance(dataset, torch.utils.data.TensorDataset):
        return None
    rows = torch.as_tensor(indices, dtype=torch.long)
    tensors = tuple(t.index_select(0, rows) for t in dataset.tensors)
    if device.type == "cuda":
        needed = sum(t.numel() * t.element_size() for t in tensors)
        free, _total = torch.cuda.mem_get_info(device)
        if needed < free // 4:
            return tuple(t.to(device) for t in tensors)
    return tensors


def make_loaders(run: Run, split: Split, fold_index: int) -> dict[str, Any]:
    """``train`` (shuffled with a per-fold seeded generator), ``val`` when present, and ``test``."""
    seed = run.config.run.rdm_seed + fold_index
    return {
        phase: make_loader(run, getattr(split, phase), seed, training=phase == "train")
        for phase in ("train", "val", "test")
        if getattr(split, phase) is not None
    }


def make_loader(run: Run, indices, seed: int, training: bool, with_rows: bool = False) -> Any:
    """Batches of ``run.dataset[indices]``: for ``training``, drawn by the sampler (``[data]
    sampler``, else shuffled with ``shuffle``) seeded with ``seed``, of ``batch_size``, the last
    one dropped with ``drop_last``; else in order, of ``eval_batch_size``.

    In-memory ``TensorDataset`` objects take the :class:`TensorBatchLoader` fast path unless a
    ``collate_fn`` makes the batches; any other dataset goes through a ``DataLoader`` (workers,
    pinned memory). ``with_rows`` adds each sample's dataset index as a third element of the
    batch (parallel folds mask by it). Under ``distributed = "data"``, this rank's shard
    (:mod:`izitorch.sharding`).
    """
    cfg, data = run.config.run, run.config.data
    # The sampler owns its generator, so the batch order does not depend on num_workers. The
    # DataLoader draws its workers' base seed from ``generator=`` at each epoch's start, and each
    # worker seeds its torch, numpy and random from it and its id. Workers are not persistent:
    # persistent ones would carry their generators from epoch to epoch, where a resumed run's
    # new workers could not pick them up; restarted each epoch, they draw from the loader's
    # generator, whose state the resume state carries, so a resumed run draws the same numbers.
    dataset = Guarded(run.dataset)  # a failing sample is reported with its index, from a worker too
    sharded = sharding.active(run.ranks)
    if sharded and not training:
        indices = sharding.eval_share(indices, run.ranks)
    subset = Subset(WithRows(dataset) if with_rows else dataset, indices.tolist())
    sampler = training_sampler(run, indices, subset, seed) if training else None
    if sharded and training:
        sampler = sharding.train_sampler(subset, sampler, seed, cfg.shuffle, run.ranks)
    generator = torch.Generator().manual_seed(seed)
    batch_size = cfg.batch_size if training else data.eval_batch_size or cfg.batch_size
    drop_last = training and data.drop_last
    collate = collate_function(run.config)
    tensors = gather_tensors(run.dataset, indices, run.device) if collate is None else None
    if tensors is not None:
        if with_rows:
            tensors = (*tensors, torch.as_tensor(indices, dtype=torch.long, device=tensors[0].device))
        loader: Any = TensorBatchLoader(tensors, batch_size, sampler, generator, run.device, drop_last)
    else:
        loader = DataLoader(
            subset,
            sampler=sampler,
            generator=generator,
            batch_size=batch_size,
            drop_last=drop_last,
            collate_fn=RowsCollate(collate) if with_rows and collate is not None else collate,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory and run.device.type == "cuda",
            persistent_workers=False,
        )
    if training and len(loader) == 0:
        raise IzitorchError(
            f"the training set has {len(sampler) if sampler is not None else len(indices)} samples per epoch, fewer than batch_size = {batch_size}: "
            "drop_last leaves no batch; lower batch_size or set drop_last = false",
            "data.drop_last",
        )
    return loader


def collate_function(config: Config) -> Any:
    """``[data] collate_fn`` resolved, or None (torch's default collation)."""
    collate = config.data.collate_fn
    if collate is None:
        return None
    if isinstance(collate, str):
        try:
            collate = resolve(collate, config.base_dir)
        except ManifestError as error:
            raise ManifestError(error.message, "data.collate_fn") from None
    if not callable(collate):
        raise ManifestError(f"{describe(config.data.collate_fn)} is not callable; collate_fn takes a list of samples and returns a batch", "data.collate_fn")
    return collate


class RowsCollate:
    """A ``collate_fn`` for samples that carry their dataset index (:class:`WithRows`): the
    user's function batches the ``(input, target)`` pairs, the indices become a tensor."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, items: list) -> tuple:
        batch = self.collate([(item[0], item[1]) for item in items])
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise TrainingError(f"collate_fn returned {batch_kind(batch)}; a collate_fn must return an (inputs, target) pair", "data.collate_fn")
        return batch[0], batch[1], torch.tensor([item[2] for item in items], dtype=torch.long)


def batch_kind(batch: Any) -> str:
    """What a batch is, in a few words for a one-line message (a tensor's repr has many lines)."""
    return f"{len(batch)} elements" if isinstance(batch, (list, tuple)) else f"a {type(batch).__name__}"


def training_sampler(run: Run, indices, subset: Dataset, seed: int) -> Any:
    """The sampler of a training split, seeded with ``seed``: ``[data] sampler`` (``"balanced"``
    weighs each sample by the inverse of its class's count in the split), else a shuffling
    ``RandomSampler`` (``shuffle = true``), else None (the split's order)."""
    spec, generator = run.config.data.sampler, torch.Generator().manual_seed(seed)
    if spec is None:
        return RandomSampler(subset, generator=generator) if run.config.run.shuffle else None
    if spec == BALANCED:
        labels = balanced_labels(run.dataset)[torch.as_tensor(indices, dtype=torch.long)]
        counts = torch.bincount(labels - labels.min())
        weights = 1.0 / counts[labels - labels.min()].double()
        return WeightedRandomSampler(weights, num_samples=len(indices), replacement=True, generator=generator)
    return user_sampler(run.config, Subset(run.dataset, indices.tolist()), generator)


def user_sampler(config: Config, split: Subset, generator: torch.Generator) -> CheckedSampler:
    """``[data] sampler``'s reference called with the training ``split``, its parameters and
    ``generator`` (when it takes one); what it gives must be a sampler. The dry run calls it with
    the whole dataset, so that ``validate`` meets what the first epoch would."""
    spec = config.data.sampler
    factory = resolve(spec.target, config.base_dir) if isinstance(spec.target, str) else spec.target
    label = f'"{spec.target}"' if isinstance(spec.target, str) else _label(spec.target)
    params = dict(spec.params)
    if "generator" not in params and takes_keyword(factory, "generator"):
        params["generator"] = generator
    try:
        sampler = factory(split, **params)
    except Exception as error:
        raise IzitorchError(f"{label}(...) raised {error_text(error)}", "data.sampler") from None
    if not hasattr(sampler, "__iter__") or not hasattr(sampler, "__len__"):
        raise IzitorchError(f"{label} gave {describe(sampler)}, not a sampler (an iterable of positions with a len())", "data.sampler")
    return CheckedSampler(sampler, len(split), label)


def balanced_labels(dataset: Dataset) -> torch.Tensor:
    """The integer class of every sample, which ``sampler = "balanced"`` weighs by; refused
    in one line when the dataset does not have them at hand."""
    labels = dataset_labels(dataset)
    if labels is None or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or len(labels) != len(dataset):
        raise ManifestError(
            'sampler = "balanced" needs one integer class per sample at hand: a TensorDataset whose last tensor holds them, or a `targets` attribute',
            "data.sampler",
        )
    return labels.cpu().long()


def takes_keyword(factory: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class CheckedSampler(Sampler):
    """A user's sampler whose positions must fall in the training split: one out of it is a
    one-line error naming the sampler, not an index error deep in a loader. Its ``generator``
    is the wrapped sampler's, which the resume state saves and restores."""

    def __init__(self, sampler: Any, size: int, label: str) -> None:
        self.sampler, self.size, self.label = sampler, size, label

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for position in self.sampler:
            if not 0 <= int(position) < self.size:
                raise TrainingError(f"{self.label} yielded position {int(position)}, outside the training split's {self.size} samples", "data.sampler")
            yield int(position)


class SampleError(Exception):
    """A sample failed to load; the message says which: ``sample 17: ValueError: <message>``.

    A DataLoader worker sends an error back as text (the original traceback, re-raised as the
    same type), so everything the main process reports is in the message.
    """


class Guarded(Dataset):
    """``dataset[index]``, with a failure raised as a :class:`SampleError` naming ``index``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as error:
            raise SampleError(f"sample {index}: {error_text(error)}") from None


def loading_error(config: Config, error: Exception, where: str, key: str = "data.dataset", name: str | None = None) -> TrainingError:
    """The one line for a dataset that fails to give a batch (a sample raising, items that do
    not collate, a ``__len__`` beyond the data): the dataset (``name``, at ``key``; default
    ``[data] dataset``), ``where``, the sample, the error."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original error is its last line
        cause = text.splitlines()[-1].strip()
        kind, _, message = cause.partition(": ")
        cause = message if kind.endswith(SampleError.__name__) else cause
    elif isinstance(error, SampleError):
        cause = first_line(error)
    else:
        cause = error_text(error)
    if "equal size" in cause or "resize storage" in cause:  # what stacking items of different shapes says, in a worker too
        cause += "; every sample must have the same shape to be batched"
    elif "IndexError" in cause:
        cause += "; check that __len__ counts only the samples that exist"
    if name is None:
        dataset = config.data.dataset
        name = f'"{dataset}"' if isinstance(dataset, str) else type(dataset).__name__
    return TrainingError(f"{name} failed loading {where}: {cause}", key)


class WithRows(Dataset):
    """``dataset[i] + (i,)``: a sample with its index, so a batch says which samples it holds."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise IzitorchError(f"the dataset yields {type(item).__name__} items; izitorch expects (input, target) pairs from __getitem__")
        return item[0], item[1], index


def to_device(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    """Move a batch (tensor, or tuple/list/dict of them) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, non_blocking) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    return batch
