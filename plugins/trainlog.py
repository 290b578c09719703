"""Output files compatible with the original izitorch (default plugin).

``res_dir/conf.json`` (resolved config, plugins and versions), ``res_dir/manifest.toml`` (the
manifest as run, :mod:`izitorch.rerun`), ``res_dir/Dataset_split.pkl``,
``<model>/conf.json``, ``<model>/trainlog.json`` (rewritten every epoch, with each epoch's
learning rate),
``<model>/confusion_matrix.pkl``, ``<model>/test_predictions.json`` (a classification's
per-sample predictions) and ``<model>/test_metrics.json`` (final test with the kept
weights), per fold under ``FOLD_<k>`` with k-fold, where ``<model>/overall.json`` then holds the
mean and standard deviation over folds; ``res_dir/results.json`` summarises every model: the
mean and standard deviation of every scalar value of the final tests (every registered metric,
the tested ``epoch``, and on the CPU ``train_time``, the model's seconds of training per epoch,
and ``eval_time``, its seconds for the final test), each fold's tested epoch (``epochs``), its
parameter count, its sweep values and the direction of each declared metric.
"""

from __future__ import annotations

import json
import platform
import sys
import types
from typing import Any

import attrs
import numpy as np
import torch

from izitorch.hookspecs import hookimpl
from izitorch.version import __version__
from izitorch.io import write_json, write_pickle, write_text
from izitorch.rerun import manifest_text
from izitorch.metrics import metric_directions
from izitorch.tasks import headline
from izitorch.trained import manifest_keys

PREFIX = {"train": "", "val": "val_", "test": "test_"}


class EpochLog:
    """One model's ``trainlog.json``: its entries by epoch, each encoded once.

    The file is rewritten after every epoch and the log is part of the resume state, so encoding
    or pickling the whole log each time would cost O(epochs) per epoch, O(epochs^2) a run, most of
    a long sweep's time. Here an epoch's entry is encoded once, with json's C
    encoder, into one line of the file; the file and the saved state are those lines joined (one
    string per model, not thousands of objects to pickle).
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.lines: dict[str, str] = {}

    @classmethod
    def parse(cls, text: str) -> "EpochLog":
        """The log of a :meth:`text` (or of any JSON object of entries by epoch). Parallel folds
        swap each fold's log in and out of the plugin several times an epoch: the lines are
        taken back from the text, not encoded again (a raw newline never occurs inside one)."""
        entries = json.loads(text)
        lines = text[2:-3].split(",\n") if text.startswith("{\n") and text.endswith("\n}\n") else []
        if len(lines) != len(entries):
            return cls.of(entries)
        log = cls()
        log.entries, log.lines = entries, dict(zip(entries, lines))
        return log

    @classmethod
    def of(cls, entries: dict[str, dict[str, Any]]) -> "EpochLog":
        log = cls()
        for epoch, entry in entries.items():
            log.set(epoch, entry)
        return log

    def set(self, epoch: str, entry: dict[str, Any]) -> None:
        self.entries[epoch] = entry
        self.lines[epoch] = f"  {json.dumps(epoch)}: {json.dumps(entry)}"

    def last(self) -> str | None:
        return next(reversed(self.entries), None)

    def text(self) -> str:
        return "{\n" + ",\n".join(self.lines.values()) + "\n}\n" if self.lines else "{}\n"


class TrainlogPlugin:
    def __init__(self) -> None:
        self.logs: dict[str, EpochLog] = {}

    @hookimpl
    def izitorch_run_start(self, run) -> None:
        if not run.ranks.main:  # the run-level files are rank 0's (izitorch.distributed)
            return
        description = run_description(run)
        write_json(run.res_dir / "conf.json", description)
        text = manifest_text(json.loads(json.dumps(description["config"], default=str)), run.config.base_dir, run.res_dir)
        if text is not None:  # the manifest as run, to run again (none for a Rack given Python objects)
            write_text(run.res_dir / "manifest.toml", text)
        write_pickle(run.res_dir / "Dataset_split.pkl", [split.as_lists() for split in run.splits])
        for slot in run.slots:
            write_json(run.res_dir / slot.name / "conf.json", model_description(slot))

    @hookimpl
    def izitorch_fold_start(self, run, fold) -> None:
        self.logs = {slot.name: EpochLog() for slot in fold.slots}

    @hookimpl
    def izitorch_epoch_finish(self, run, fold, epoch, scores) -> None:
        for slot in fold.slots:
            entry = flatten(scores[slot.name])
            if slot.name in scores.lrs:
                entry["lr"] = scores.lrs[slot.name]
            if slot.stopped:
                entry["stopped"] = slot.stopped
            log = self.logs[slot.name]
            log.set(str(epoch), entry)
            write_text(run.model_dir(slot, fold) / "trainlog.json", log.text())

    @hookimpl
    def izitorch_state_dict(self, run):
        return {"trainlog": {"texts": {name: log.text() for name, log in self.logs.items()}}}

    @hookimpl
    def izitorch_load_state_dict(self, run, state) -> None:
        saved = state.get("trainlog", {})
        if "logs" in saved:  # written by izitorch 0.2.0 (state format 3): the entries themselves
            self.logs = {name: EpochLog.of(entries) for name, entries in saved["logs"].items()}
        else:
            self.logs = {name: EpochLog.parse(text) for name, text in saved.get("texts", {}).items()}

    @hookimpl
    def izitorch_fold_finish(self, run, fold) -> None:
        for slot in fold.slots:
            final = fold.final_scores[slot.name]
            folder = run.model_dir(slot, fold)
            log = self.logs.get(slot.name)
            last = log.last() if log is not None else None
            if slot.stopped and last is not None and "stopped" not in log.entries[last]:
                log.set(last, {**log.entries[last], "stopped": slot.stopped})  # decided after that epoch was logged
                write_text(folder / "trainlog.json", log.text())
            if "confusion_matrix" in final:
                write_pickle(folder / "confusion_matrix.pkl", final["confusion_matrix"])
            if "predictions" in final:  # each test sample's class: izitorch report's paired tests
                record = {key: values.tolist() for key, values in final["predictions"].items()}
                write_text(folder / "test_predictions.json", json.dumps(record, separators=(",", ":")))
            summary = scalars(final)
            if "per_class" in final:  # lists of floats, one per class: in the final scores only
                summary["per_class"] = final["per_class"]
            summary["epoch"] = slot.kept_epoch if slot.kept_epoch is not None else fold.epoch
            if slot.stopped:
                summary["stopped"] = slot.stopped
            write_json(folder / "test_metrics.json", summary)

    @hookimpl
    def izitorch_run_finish(self, run, results) -> None:
        summary = {}
        directions = metric_directions(run)
        specs = {slot.name: slot.spec for slot in run.slots}
        models = {slot.name: slot.model for slot in run.slots}
        for name, folds in results.items():
            summary[name] = aggregate([scalars(f) for f in folds])
            spec = specs.get(name)
            if name in models:
                summary[name]["params"] = sum(parameter.numel() for parameter in models[name].parameters())
            summary[name]["epochs"] = [fold.get("epoch") for fold in folds]  # each fold's tested epoch
            if spec is not None and (spec.swept or spec.seed is not None):  # what a sweep gave this model
                summary[name]["sweep"] = {**spec.swept, **({"seed": spec.seed} if spec.seed is not None else {})}
            # which way is better, for `izitorch report` (declared metrics only)
            summary[name]["directions"] = {key: directions[key] for key in summary[name]["mean"] if key in directions}
            if headline(run.task) in summary[name]["mean"]:  # the task's metric, that `izitorch report` ranks by
                summary[name]["headline"] = headline(run.task)
            if len(folds) > 1:
                write_json(run.res_dir / name / "overall.json", summary[name])
        write_json(run.res_dir / "results.json", summary)


def flatten(per_phase: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{"train": {"loss"}, "test": {"loss"}}`` -> ``{"loss", "test_loss"}`` (original key names)."""
    entry: dict[str, Any] = {}
    for phase, values in per_phase.items():
        for key, value in scalars(values).items():
            entry[key if key.endswith("_time") else PREFIX[phase] + key] = value
    return entry


def scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


def aggregate(folds: list[dict[str, float]]) -> dict[str, Any]:
    """Mean and standard deviation of each metric over folds (std 0 for a single fold)."""
    keys = [k for k in folds[0] if all(k in f for f in folds)] if folds else []
    return {
        "folds": len(folds),
        "mean": {k: float(np.mean([f[k] for f in folds])) for k in keys},
        "std": {k: float(np.std([f[k] for f in folds])) for k in keys},
    }


def run_description(run) -> dict[str, Any]:
    """``conf.json``: the resolved configuration and everything needed to reproduce the run."""
    description = {
        # in the manifest's own keys (``optimizer = { class = ..., lr = ... }``, ``[plugins.<name>]``)
        "config": manifest_keys(attrs.asdict(run.config, value_serializer=_serialize, filter=lambda field, _: field.name != "args")),
        "device": str(run.device),
        "plugins": dict(run.plugin_versions),
        "versions": {"izitorch": __version__, "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform()},
        "splits": [{part: len(getattr(s, part)) for part in ("train", "val", "test") if getattr(s, part) is not None} for s in run.splits],
        "task": run.task,  # declared or inferred (izitorch.tasks): it sets the default best_metric
        "best_metric": run.selection.key,  # the value key that picked each model's best epoch
    }
    if run.config.args:
        description["args"] = dict(run.config.args)
    return description


def model_description(slot) -> dict[str, Any]:
    return {
        "name": slot.name,
        "spec": attrs.asdict(slot.spec, value_serializer=_serialize) if slot.spec is not None else None,
        "model": describe(slot.model),
        "criterion": describe(slot.criterion),
        "optimizer": describe(slot.optimizer),
        "scheduler": describe(slot.scheduler) if slot.scheduler is not None else None,
        "parameters": slot.parameter_count(),
    }


_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def describe(value: Any) -> str:
    """An object as ``conf.json`` records it: its repr, unless that holds a memory address
    (``<... object at 0x7f...>``, ``<function f at 0x...>``), which made the same run's files
    differ every time. A scheduler is its class and plain state, ``torch.optim.lr_scheduler.
    StepLR(base_lrs=[0.01], gamma=0.5, last_epoch=0, step_size=2)``; a function its dotted name;
    another object with the default repr its class (and length, for a dataset)."""
    kind = type(value)
    if isinstance(value, _SCHEDULERS):
        state = value.state_dict()
        shown = [f"{key}={item!r}" for key, item in sorted(state.items()) if not key.startswith("_") and _plain(item)]
        return f"{kind.__module__}.{kind.__qualname__}({', '.join(shown)})"
    if isinstance(value, (types.FunctionType, types.MethodType)):
        return f"{value.__module__}.{value.__qualname__}"
    if kind.__repr__ is object.__repr__:
        try:
            size = f"(len={len(value)})"
        except TypeError:
            size = ""
        return f"{kind.__module__}.{kind.__qualname__}{size}"
    return repr(value)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _serialize(_instance, _field, value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, list, dict, tuple)) or attrs.has(type(value)):
        return value  # attrs instances (nested config sections) are recursed into, not repr'd
    return describe(value)
