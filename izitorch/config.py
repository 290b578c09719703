"""The configuration of a run: frozen attrs classes that are also the manifest's schema.

A manifest is structured into these classes by :mod:`izitorch.manifest` (cattrs, extra keys
forbidden); the ``Rack`` facade builds them directly, with live objects where a manifest has
``"module:attr"`` references. Field validators raise :class:`FieldError` so that the manifest
loader can name the exact key path of a bad value.
"""

from __future__ import annotations

import datetime
import functools
import re
from typing import Any

import attrs

from izitorch.errors import describe

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")
MULTI_MODEL_MODES = ("auto", "sequential", "vectorized")
NAN_POLICIES = ("stop", "skip_batch", "raise")
SCHEDULER_INTERVALS = ("epoch", "step")
PRECISIONS = ("32", "bf16", "fp16")
DISTRIBUTED_STRATEGIES = ("auto", "models", "data")  # [run] distributed (izitorch.distributed)


class FieldError(ValueError):
    """A validator's complaint about one field, so the loader can put its name in the path."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


def at_least(minimum: int):
    def check(_instance: object, attribute: attrs.Attribute, value: int) -> None:
        if value < minimum:
            raise FieldError(attribute.name, f"expected an integer >= {minimum}, got {describe(value)}")

    return check


#: numpy's seed range, the narrowest of the generators a run seeds (torch takes any 64-bit integer).
SEED_RANGE = (0, 2**32 - 1)


def seed_range(_instance: object, attribute: attrs.Attribute, value: int) -> None:
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise FieldError(attribute.name, f"expected an integer from {low} to {high} (numpy's seed range), got {describe(value)}")


def one_of(*choices: str):
    def check(_instance: object, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            from izitorch.errors import did_you_mean

            options = ", ".join(f'"{c}"' for c in choices)
            raise FieldError(attribute.name, f"expected one of {options}, got {describe(value)}{did_you_mean(str(value), choices)}")

    return check


def open_unit_interval(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise FieldError(attribute.name, f"expected a number between 0 and 1 (exclusive), got {describe(value)}")


def seconds(_instance: object, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:  # NaN too
        raise FieldError(attribute.name, f"expected a number of seconds >= 0, got {describe(value)}")


def device_name(_instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not DEVICE_PATTERN.fullmatch(value):
        raise FieldError(attribute.name, f'expected "auto", "cpu", "cuda", "cuda:<index>" or "mps", got {describe(value)}')


def reference(_instance: object, attribute: attrs.Attribute, value: Any) -> None:
    """A ``"module:attr"`` / ``"file.py:attr"`` string, or (from Python) the object itself."""
    malformed = isinstance(value, str) and (value.count(":") != 1 or not all(value.split(":")))
    if malformed or isinstance(value, (bool, int, float, list, dict, datetime.date, datetime.time)):
        raise FieldError(attribute.name, f'expected a reference "module:attr" or "file.py:attr", got {describe(value)}')


def doc(text: str) -> dict:
    return {"doc": text}


@attrs.frozen
class RunConfig:
    """``[run]``: where results go and how the loop runs."""

    res_dir: str = attrs.field(default="results", metadata=doc("folder for every output of the run"))
    device: str = attrs.field(default="auto", validator=device_name, metadata=doc('"auto" picks cuda when available'))
    rdm_seed: int = attrs.field(default=1, validator=seed_range, metadata=doc("seed of the split, the shuffling and the training"))
    epochs: int = attrs.field(default=10, validator=at_least(1), metadata=doc("epochs trained (exactly N)"))
    batch_size: int = attrs.field(default=128, validator=at_least(1), metadata=doc("samples per batch"))
    num_workers: int = attrs.field(default=0, validator=at_least(0), metadata=doc("DataLoader worker processes"))
    pin_memory: bool = attrs.field(default=False, metadata=doc("page-locked batches for faster host-to-GPU copies"))
    shuffle: bool = attrs.field(default=True, metadata=doc("reshuffle the training set every epoch"))
    test_epoch: int = attrs.field(default=1, validator=at_least(1), metadata=doc("evaluate every N epochs (and always the last)"))
    display_step: int = attrs.field(default=50, validator=at_least(1), metadata=doc("print the losses every N training steps"))
    resume: bool = attrs.field(default=False, metadata=doc("continue the run saved in res_dir (a new run when none is)"))
    overwrite: bool = attrs.field(default=False, metadata=doc("replace the results of an earlier run in res_dir"))
    nan_policy: str = attrs.field(default="stop", validator=one_of(*NAN_POLICIES), metadata=doc("what a non-finite training loss does to its model"))
    multi_model: str = attrs.field(default="auto", validator=one_of(*MULTI_MODEL_MODES), metadata=doc("how several models share a batch"))
    deterministic: bool = attrs.field(default=False, metadata=doc("deterministic algorithms only: the same bits on a GPU too"))
    background_writes: bool = attrs.field(default=True, metadata=doc("write files on a background thread, at most one flush behind"))
    flush_interval: float = attrs.field(
        default=30.0, validator=seconds, metadata=doc("seconds between two flushes of the run's files to disk (0: after every epoch)")
    )
    precision: str = attrs.field(default="32", validator=one_of(*PRECISIONS), metadata=doc('"32", or autocast to "bf16" / "fp16" (with a loss scaler)'))
    accumulate: int = attrs.field(default=1, validator=at_least(1), metadata=doc("batches whose gradients add up before one optimizer step"))
    compile: bool = attrs.field(default=False, metadata=doc("torch.compile each stack's forward (uncompiled, with a warning, where it cannot)"))
    test_weights: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(one_of("last", "best")),
        metadata=doc('what the final test scores: the "last" epoch\'s weights or the "best" one\'s (unset: "best" with [plugins.checkpoint] policy = "best")'),
    )
    best_metric: str | None = attrs.field(
        default=None, metadata=doc("a registered metric that picks each model's best epoch on validation (unset: loss, or the checkpoint's metric)")
    )
    distributed: str = attrs.field(
        default="auto",
        validator=one_of(*DISTRIBUTED_STRATEGIES),
        metadata=doc('under torchrun: spread the "models" (and folds) over the processes, or share the "data"; "auto" picks'),
    )
    task: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(one_of("classification", "regression", "segmentation")),
        metadata=doc('"classification", "regression" or "segmentation": the headline metric of the table (unset: inferred from the data)'),
    )


DEFAULT_TRAIN_RATIO = 0.8

#: ``[data] sampler = "balanced"``: draw the training samples with weights inverse to their class's count
BALANCED = "balanced"


def group_reference(_instance: object, attribute: attrs.Attribute, value: Any) -> None:
    """An attribute name of the dataset, a ``"module:callable"`` reference, or (from Python) a callable."""
    if isinstance(value, str) and (value.isidentifier() or (value.count(":") == 1 and all(value.split(":")))):
        return
    if callable(value) and not isinstance(value, str):
        return
    raise FieldError(attribute.name, f'expected a dataset attribute name or a reference "module:callable", got {describe(value)}')


def sampler_spec(value: Any) -> Any:
    """``[data] sampler`` as ``None``, ``"balanced"`` or a :class:`ComponentSpec` (a reference,
    a ``{ class = ..., ... }`` table, or from Python a sampler class or factory)."""
    if value is None or value == BALANCED or isinstance(value, ComponentSpec):
        return value
    if isinstance(value, dict):
        if "class" not in value:
            raise FieldError("sampler", 'expected a table with a "class" key, e.g. { class = "torch.utils.data:WeightedRandomSampler", ... }')
        try:
            return ComponentSpec(value["class"], {k: v for k, v in value.items() if k != "class"})
        except FieldError as error:
            raise FieldError("sampler.class", error.message) from None
    if isinstance(value, str) and ":" not in value:
        raise FieldError("sampler", f'expected "{BALANCED}", a reference "module:attr" or a table {{ class = ..., ... }}, got {describe(value)}')
    try:
        return ComponentSpec(value)
    except FieldError as error:
        raise FieldError("sampler", error.message) from None


@attrs.frozen
class SplitSpec:
    """One given split (``[data] train``, ``val``, ``test``): the callable that builds it, or
    None for ``[data] dataset``'s, and its keyword arguments, laid over ``[data] params``.

    In TOML: ``train = "data.py:train_set"``, ``test = { class = "data.py:Scans", fold = "test" }``,
    or ``train = { split = "train", augment = true }`` (``[data] dataset`` called with them).
    """

    target: Any = attrs.field(default=None, validator=attrs.validators.optional(reference))
    params: dict = attrs.field(factory=dict)


def split_spec(value: Any, name: str) -> Any:
    """``[data] <name>`` (train, val or test) as None or a :class:`SplitSpec`; from Python, a
    dataset object or a callable stands for itself."""
    if value is None or isinstance(value, SplitSpec):
        return value
    if isinstance(value, dict):
        params = {k: v for k, v in value.items() if k != "class"}
        try:
            return SplitSpec(value.get("class"), params)
        except FieldError as error:
            raise FieldError(f"{name}.class", error.message) from None
    if isinstance(value, str) and (value.count(":") != 1 or not all(value.split(":"))):
        raise FieldError(
            name, f'expected a reference "module:callable", a table {{ class = ..., ... }} or a table of parameters for [data] dataset, got {describe(value)}'
        )
    if isinstance(value, (bool, int, float, list)):
        raise FieldError(
            name, f'expected a reference "module:callable", a table {{ class = ..., ... }} or a table of parameters for [data] dataset, got {describe(value)}'
        )
    return SplitSpec(value)


GIVEN_SPLITS = ("train", "val", "test")


@attrs.frozen
class DataConfig:
    """``[data]``: the dataset and how it is split."""

    dataset: Any = attrs.field(default=None, validator=attrs.validators.optional(reference), metadata=doc('"module:callable" returning a torch Dataset'))
    params: dict = attrs.field(factory=dict, metadata=doc("keyword arguments for the dataset callable"))
    num_classes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(at_least(2)), metadata=doc("classes; inferred from the model output when absent")
    )
    train_ratio: float = attrs.field(default=DEFAULT_TRAIN_RATIO, validator=open_unit_interval, metadata=doc("share of the samples trained on (holdout)"))
    validation: bool = attrs.field(default=False, metadata=doc("hold out a validation set to pick the best epoch"))
    stratify: bool | None = attrs.field(
        default=None, metadata=doc("keep the class proportions in every split (unset: when the dataset's integer labels are at hand)")
    )
    group_by: Any = attrs.field(
        default=None,
        validator=attrs.validators.optional(group_reference),
        metadata=doc('k-fold keeps each group in one fold: a per-sample attribute of the dataset, or "module:callable" (dataset) -> groups'),
    )
    collate_fn: Any = attrs.field(default=None, validator=attrs.validators.optional(reference), metadata=doc('"module:callable" that batches samples'))
    sampler: Any = attrs.field(
        default=None, converter=sampler_spec, metadata=doc('"balanced" (class-weighted), or a sampler "module:callable" / { class = ..., ... }')
    )
    drop_last: bool = attrs.field(default=False, metadata=doc("drop the last incomplete training batch of every epoch"))
    eval_batch_size: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(at_least(1)), metadata=doc("samples per validation and test batch (unset: batch_size)")
    )
    train: Any = attrs.field(
        default=None,
        converter=functools.partial(split_spec, name="train"),
        metadata=doc('the given training set: "module:callable", or a table (its class and parameters)'),
    )
    val: Any = attrs.field(default=None, converter=functools.partial(split_spec, name="val"), metadata=doc("the given validation set, as train"))
    test: Any = attrs.field(
        default=None, converter=functools.partial(split_spec, name="test"), metadata=doc("the given test set, as train; every fold's final test")
    )

    def __attrs_post_init__(self) -> None:
        """Given splits come as a training and a test set (a validation set optional); each
        needs a callable, its own or ``dataset``'s; ``train_ratio`` does not apply to them."""
        given = [name for name in GIVEN_SPLITS if getattr(self, name) is not None]
        if not given:
            return
        for name in ("train", "test"):
            if name not in given:
                other = given[0]
                raise FieldError(name, f"[data] {other} is given, so the {name} set must be given too (train and test; val is optional)")
        for name in given:
            if getattr(self, name).target is None and self.dataset is None:
                raise FieldError(name, 'a table without "class" calls [data] dataset with its parameters: set dataset, or give the split its own class')
        if self.val is not None and not self.validation:
            raise FieldError("val", "a given validation set picks the best epoch: set validation = true, or drop val")
        if self.train_ratio != DEFAULT_TRAIN_RATIO:
            raise FieldError("train_ratio", "with given splits ([data] train and test) train_ratio does not apply: drop it")


@attrs.frozen
class ComponentSpec:
    """A callable (reference or object) and the keyword arguments it is called with.

    In TOML: ``"torch.nn:CrossEntropyLoss"`` or ``{ class = "torch.optim:Adam", lr = 1e-3 }``.
    From Python, ``target`` may be an already built object (a model, an optimizer).
    """

    target: Any = attrs.field(validator=reference)
    params: dict = attrs.field(factory=dict)


@attrs.frozen
class SchedulerSpec(ComponentSpec):
    """A learning-rate scheduler: called as ``target(optimizer, **params)``, and stepped after
    every ``interval``: each ``"epoch"`` (after its training pass) or each optimizer ``"step"``.

    In TOML: ``{ class = "torch.optim.lr_scheduler:OneCycleLR", interval = "step", ... }``;
    ``interval`` is izitorch's key, every other one an argument of the class.
    """

    interval: str = attrs.field(
        default="epoch",
        validator=one_of(*SCHEDULER_INTERVALS),
        metadata=doc('step after every "epoch" or after every optimizer "step" (ReduceLROnPlateau: after every evaluation)'),
    )


def as_scheduler(value: ComponentSpec | None) -> SchedulerSpec | None:
    """A plain :class:`ComponentSpec` given as a scheduler steps every epoch."""
    if value is None or isinstance(value, SchedulerSpec):
        return value
    return SchedulerSpec(value.target, value.params)


def _default_criterion() -> ComponentSpec:
    return ComponentSpec("torch.nn:CrossEntropyLoss")


def _default_optimizer() -> ComponentSpec:
    return ComponentSpec("torch.optim:Adam", {"lr": 1e-3})


#: Names of the run's own entries at the top of ``res_dir``, which a model's folder would replace
#: (compared ignoring case, for case-insensitive file systems). Names starting with a dot
#: (``.``, ``..``, ``.izitorch``, ``.izitorch.lock``) are refused as a whole.
#: ``mlruns`` and ``tensorboard`` are the mlflow plugin's default store and the tensorboard plugin's log dir.
RESERVED_NAMES = frozenset({"conf.json", "dataset_split.pkl", "results.json", "manifest.toml", "metrics.csv", "plots", "mlruns", "tensorboard"})


def model_name(_instance: object, attribute: attrs.Attribute, value: str) -> None:
    """A model's name is its folder under ``res_dir``: it must stay inside and not replace a run file."""
    if not isinstance(value, str) or not MODEL_NAME_PATTERN.fullmatch(value):
        raise FieldError(attribute.name, f"expected a name made of letters, digits, '_', '-', '.', '+' (it names a folder), got {describe(value)}")
    if value.startswith("."):
        raise FieldError(
            attribute.name, f"{describe(value)} starts with a dot: it would name a hidden folder, or res_dir's parent; start with a letter or digit"
        )
    if value.casefold() in RESERVED_NAMES:
        raise FieldError(attribute.name, f"{describe(value)} is the name of one of the run's own files in res_dir; choose another name")


@attrs.frozen
class ModelSpec:
    """``[[models]]``: one model trained on the shared data stream."""

    name: str = attrs.field(validator=model_name, metadata=doc("the model's folder under res_dir"))
    model: Any = attrs.field(validator=reference, metadata=doc('"module:Class" or "file.py:Class"'))
    params: dict = attrs.field(factory=dict, metadata=doc("keyword arguments for the model"))
    criterion: ComponentSpec = attrs.field(factory=_default_criterion, metadata=doc("the loss"))
    optimizer: ComponentSpec = attrs.field(factory=_default_optimizer, metadata=doc("{ class = ..., lr = ... }"))
    scheduler: SchedulerSpec | None = attrs.field(
        default=None, converter=as_scheduler, metadata=doc('{ class = ..., interval = "epoch" | "step", ... }: stepped after every epoch or optimizer step')
    )
    seed: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(at_least(0)),
        metadata=doc("draws this model's initial weights from the run's rdm_seed and this number, apart from the other models (a sweep's seeds = N sets 1..N)"),
    )
    swept: dict = attrs.field(factory=dict, metadata=doc("the values a sweep gave this model (set by the expansion; recorded in conf.json and results.json)"))


@attrs.frozen
class PluginsConfig:
    """``[plugins]``: which plugins run, and their own ``[plugins.<name>]`` tables."""

    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    tables: dict[str, dict] = attrs.field(factory=dict)


def unique_model_names(_instance: object, attribute: attrs.Attribute, models: tuple[ModelSpec, ...]) -> None:
    if not models:
        raise FieldError(attribute.name, "expected at least one [[models]] entry")
    seen: set[str] = set()
    for index, spec in enumerate(models):
        if spec.name in seen:
            raise FieldError(f"{attribute.name}[{index}].name", f'duplicate model name "{spec.name}"; every model needs its own name')
        seen.add(spec.name)


@attrs.frozen
class Config:
    """A whole run: what a manifest describes."""

    run: RunConfig = attrs.field(factory=RunConfig)
    data: DataConfig = attrs.field(factory=DataConfig)
    models: tuple[ModelSpec, ...] = attrs.field(default=(), converter=tuple, validator=unique_model_names)
    plugins: PluginsConfig = attrs.field(factory=PluginsConfig)
    source: str = attrs.field(default="", metadata=doc("the manifest file, for messages"))
    base_dir: str = attrs.field(default=".", metadata=doc("where file references are looked up"))
    args: dict = attrs.field(factory=dict, metadata=doc("the Rack's parameters (custom ones too), recorded in conf.json"))

    def plugin_table(self, name: str) -> dict:
        """The ``[plugins.<name>]`` table, empty when absent."""
        return self.plugins.tables.get(name, {})
