"""The original izitorch API, kept working: ``Rack`` and ``ModelConfig``.

``Rack`` is a thin facade: its argparse menu (the original parameter names and meanings)
becomes a :class:`~izitorch.config.Config`, and ``launch()`` calls :func:`izitorch.run`. Code
written for the original README runs unchanged; see README "The original API" for the few
deliberate differences (exactly N epochs, per-fold fresh optimizers, no silent overwrite).
"""

from __future__ import annotations

import argparse
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import attrs

from izitorch.config import ComponentSpec, Config, DataConfig, FieldError, ModelSpec, PluginsConfig, RunConfig, SchedulerSpec
from izitorch.errors import ManifestError, describe, did_you_mean

#: The original menu: name -> (type, default, help). Flags that were 0/1 integers stay so.
DEFAULT_PARAMETERS: dict[str, tuple[type, Any, str]] = {
    "device": (str, "auto", 'device to train on: auto, cpu, cuda or cuda:N ("auto" picks cuda when available)'),
    "res_dir": (str, "results", "folder where checkpoints, logs and results are written"),
    "rdm_seed": (int, 1, "random seed for the dataset split, the shuffling and the training"),
    "dataset": (str, "", "path to the dataset file/folder, if your dataset needs one (read it from rack.args)"),
    "num_classes": (int, 0, "number of classes (0: inferred from the model output)"),
    "num_workers": (int, 0, "DataLoader worker processes"),
    "pin_memory": (int, 0, "1 to use pinned memory in the DataLoader"),
    "train_ratio": (float, 0.8, "share of the samples used for training (without k-fold)"),
    "kfold": (int, 0, "if non zero, number of folds of cross-validation"),
    "validation": (int, 0, "1 to hold out a validation set that picks the best epoch"),
    "save_last": (int, 1, "1 to save only the last epoch's weights"),
    "save_all": (int, 0, "1 to save the weights of every epoch"),
    "save_best": (int, 0, "1 to save only the best epoch's weights (see metric_best)"),
    "metric_best": (str, "loss", "metric that picks the best epoch: loss, acc, IoU or any registered metric"),
    "epochs": (int, 10, "number of training epochs"),
    "batch_size": (int, 128, "batch size"),
    "lr": (float, 1e-3, "learning rate (read it from rack.args.lr when building your optimizer)"),
    "test_epoch": (int, 1, "number of epochs between two evaluations"),
    "display_step": (int, 50, "number of training steps between two displays of the losses"),
    "shuffle": (int, 1, "1 to shuffle the training set every epoch"),
    "grad_clip": (float, 0.0, "if non zero, clip every gradient element to [-grad_clip, grad_clip]"),
    "overwrite": (int, 0, "1 to replace the results of an earlier run in res_dir"),
    "resume": (int, 0, "1 to continue the interrupted run in res_dir"),
    "nan_policy": (str, "stop", "what a non-finite loss does to its model: stop, skip_batch or raise"),
    "flush_interval": (float, 30.0, "seconds between two flushes of the run's files to disk (0: after every epoch)"),
}

#: The 0/1 flags, which also take True and False from Python.
FLAGS = frozenset({"pin_memory", "validation", "save_last", "save_all", "save_best", "shuffle", "overwrite", "resume"})


@attrs.define
class ModelConfig:
    """One model for the Rack: live objects, as in the original izitorch."""

    name: str
    model: Any
    criterion: Any
    optimizer: Any
    scheduler: Any = None
    #: When the scheduler steps: after every "epoch" or every optimizer "step"
    scheduler_interval: str = "epoch"


class Rack:
    """Train several models on one dataset with the original izitorch calls."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(description="izitorch Rack", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for name, (kind, default, text) in DEFAULT_PARAMETERS.items():
            self.parser.add_argument(f"--{name}", type=kind, default=default, help=text)
        self.args = self.parser.parse_args([])
        self.model_configs: list[ModelConfig] = []
        self.dataset: Any = None
        self._manifest: Config | None = None

    # -- the original calls ---------------------------------------------------------------------

    def add_arguments(self, arguments: dict[str, Any]) -> None:
        """Add custom parameters: ``{"name": default}`` or ``{"name": {"type":, "default":, "help":}}``."""
        for name, value in arguments.items():
            spec = value if isinstance(value, dict) else {"default": value}
            default = spec.get("default")
            kind = spec.get("type", type(default) if default is not None else str)
            if kind is bool:
                kind = _parse_bool
            self.parser.add_argument(f"--{name}", type=kind, default=default, help=spec.get("help", "custom parameter"))
            setattr(self.args, name, default)

    def parse_args(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Read the parameters from the command line (``argv``, default ``sys.argv[1:]``)."""
        self.args = self.parser.parse_args(argv)
        return self.args

    def set_args(self, arguments: dict[str, Any]) -> None:
        """Set parameters from the script; an unknown name or a value of the wrong type is an
        error naming the parameter (an unknown name with a did-you-mean)."""
        known = vars(self.args)
        for name, value in arguments.items():
            if name not in known:
                raise ManifestError(f'unknown parameter "{name}"{did_you_mean(name, known)}; add custom ones with rack.add_arguments', source="Rack.set_args")
            try:
                value = checked_value(name, value)
            except FieldError as error:
                raise ManifestError(error.message, name, "Rack.set_args") from None
            setattr(self.args, name, value)

    def add_model_configs(self, configs: Iterable[ModelConfig]) -> None:
        self.model_configs.extend(configs)

    def set_dataset(self, dataset: Any) -> None:
        self.dataset = dataset

    def launch(self) -> dict[str, list[dict]]:
        """Train every model; return each model's final test scores per fold.

        ``res_dir/conf.json`` also records ``rack.args`` (custom ones included) under ``"args"``.
        """
        from izitorch.runner import run

        config = self.config()
        if self._manifest is not None:
            return run(config)
        try:
            return run(config)
        except ManifestError as error:
            flag = _flag_of(error.path)
            if flag is None or error.source not in ("", "Rack"):
                raise
            raise ManifestError(error.message, flag, "Rack") from None

    # -- the manifest world -----------------------------------------------------------------------

    @classmethod
    def from_manifest(cls, path: str | Path, overrides: Iterable[str] = ()) -> "Rack":
        """A Rack that runs a manifest; ``add_model_configs`` adds live models to its own."""
        from izitorch.manifest import load_manifest

        rack = cls()
        rack._manifest = load_manifest(path, overrides)
        return rack

    def config(self) -> Config:
        """The :class:`Config` this Rack would run."""
        if self._manifest is not None:
            extra = tuple(_model_spec(c) for c in self.model_configs)
            dataset = self.dataset if self.dataset is not None else self._manifest.data.dataset
            return attrs.evolve(self._manifest, models=self._manifest.models + extra, data=attrs.evolve(self._manifest.data, dataset=dataset))
        if not self.model_configs:
            raise ManifestError("no model: call rack.add_model_configs([ModelConfig(...)]) before rack.launch()", source="Rack")
        if self.dataset is None:
            raise ManifestError("no dataset: call rack.set_dataset(dataset) before rack.launch()", source="Rack")
        try:
            return config_from_args(self.args, self.dataset, self.model_configs)
        except FieldError as error:
            raise ManifestError(error.message, f"--{error.field}", "Rack") from None


def _model_spec(conf: ModelConfig) -> ModelSpec:
    return ModelSpec(
        name=conf.name,
        model=conf.model,
        criterion=ComponentSpec(conf.criterion),
        optimizer=ComponentSpec(conf.optimizer),
        scheduler=_scheduler_spec(conf),
    )


def _scheduler_spec(conf: ModelConfig) -> SchedulerSpec | None:
    if conf.scheduler is None:
        return None
    try:
        return SchedulerSpec(conf.scheduler, interval=conf.scheduler_interval)
    except FieldError as error:
        raise ManifestError(error.message, f"ModelConfig({conf.name!r}).scheduler_{error.field}", "Rack") from None


def checked_value(name: str, value: Any) -> Any:
    """``value`` for the original parameter ``name`` if it has the parameter's type, as a plain
    Python value (a numpy integer becomes an int, a path a string); else :class:`FieldError`
    saying what it expects, in the manifest's words. Custom parameters are the script's own."""
    if name not in DEFAULT_PARAMETERS:
        return value
    kind = DEFAULT_PARAMETERS[name][0]
    if kind is int and isinstance(value, numbers.Integral) and (name in FLAGS or not isinstance(value, bool)):
        return int(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    expected = {int: "0 or 1 (or True / False)" if name in FLAGS else "an integer", float: "a number", str: "a string"}[kind]
    raise FieldError(name, f"expected {expected}, got {describe(value)}")


def config_from_args(args: argparse.Namespace, dataset: Any, model_configs: list[ModelConfig]) -> Config:
    """Map the original parameters to their homes in the manifest schema (README table)."""
    args = argparse.Namespace(**{name: checked_value(name, value) for name, value in vars(args).items()})
    tables: dict[str, dict] = {}
    if args.kfold:
        tables["kfold"] = {"k": args.kfold}
    policy = "best" if args.save_best else "all" if args.save_all else "last"
    tables["checkpoint"] = {"policy": policy, "metric": args.metric_best}
    if args.grad_clip:
        tables["grad_clip"] = {"value": float(args.grad_clip)}
    run = RunConfig(
        res_dir=args.res_dir,
        device=args.device,
        rdm_seed=args.rdm_seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=bool(args.pin_memory),
        shuffle=bool(args.shuffle),
        test_epoch=args.test_epoch,
        display_step=args.display_step,
        overwrite=bool(args.overwrite),
        resume=bool(args.resume),
        nan_policy=args.nan_policy,
        flush_interval=args.flush_interval,
    )
    data = DataConfig(dataset=dataset, num_classes=args.num_classes or None, train_ratio=args.train_ratio, validation=bool(args.validation))
    config = Config(
        run=run, data=data, models=tuple(_model_spec(c) for c in model_configs), plugins=PluginsConfig(tables=tables), source="Rack", args=dict(vars(args))
    )
    return config


#: Where plugins put the Rack's own parameters, so that their errors name the flag.
_PLUGIN_FLAGS = {"plugins.kfold.k": "kfold", "plugins.checkpoint.metric": "metric_best", "plugins.grad_clip.value": "grad_clip"}


def _flag_of(path: str) -> str | None:
    """``plugins.kfold.k`` -> ``--kfold``, ``run.device`` -> ``--device``; None for other paths."""
    section, _, name = path.partition(".")
    name = _PLUGIN_FLAGS.get(path) or (name if section in ("run", "data") and name != "dataset" else "")
    return f"--{name}" if name in DEFAULT_PARAMETERS else None


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {text!r}")
