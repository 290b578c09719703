"""A finished run, read back: its recorded configuration, its folds, each model's checkpoints.

``izitorch.load_model(res_dir, name)`` and the ``evaluate`` / ``predict`` / ``export`` commands
start here. A run records its configuration in ``res_dir/conf.json`` (the trainlog plugin) and
its weights in ``<model>[/FOLD_<k>]/*.pth.tar`` (the checkpoint plugin); the model is rebuilt
from the recorded reference and parameters with the builders a run uses
(:func:`izitorch.data.build_slot`), on the CPU, in evaluation mode.

Which weights: every checkpoint records its epoch, so ``which`` names an epoch and any saved
file of that epoch serves it, whatever the checkpoint policy that wrote it:

- ``None`` (the default): the epoch the run's final test scored (``test_metrics.json``, as
  ``[run] test_weights`` chose), so that a loaded model reproduces the run's reported scores;
- ``"best"``: the epoch the run picked as its best (``best_epoch.json`` under the ``best``
  policy; otherwise found again in ``trainlog.json`` by ``[run] best_metric`` in its direction,
  as :mod:`izitorch.selection` picks it during the run);
- ``"last"``: the last epoch the model trained.

An epoch whose weights were not saved (``"last"`` under the ``best`` policy, ``"best"`` under
``last``) is refused in one line naming the policy that would keep it. Nothing here writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import attrs
import numpy as np
import torch

from izitorch.config import ComponentSpec, Config, ModelSpec
from izitorch.errors import IzitorchError, describe, did_you_mean, located_in, one_line
from izitorch.manifest import apply_override, config_from_dict
from izitorch.ownership import LOCK_NAME, finished_path

WHICH = ("best", "last")
#: Names of the checkpoint files that carry their epoch (policy ``all``).
EPOCH_FILE = re.compile(r"^model_epoch(\d+)\.pth\.tar$")
#: A reference a manifest can hold: ``module.path:attr`` or ``file.py:attr``. Anything else in a
#: recorded ``model`` (a ``repr``) was a Python object given to the ``Rack``.
REFERENCE = re.compile(r"^[^:\s]+:[A-Za-z_][\w.]*$")


@attrs.frozen
class Checkpoint:
    """One model's saved weights: the file, its epoch, and its ``state_dict``."""

    path: Path
    epoch: int
    state_dict: dict


class TrainedRun:
    """A finished run in ``res_dir``: its configuration rebuilt from ``conf.json`` (with
    ``overrides`` applied, ``--set`` style), its models and folds. ``other_data``: data other
    than the run's will be given (``--data``), so the recorded ``data.params`` are dropped."""

    def __init__(self, res_dir: str | os.PathLike, overrides: Iterable[str] = (), other_data: bool = False) -> None:
        if not isinstance(res_dir, (str, os.PathLike)):
            raise IzitorchError(f"expected the path of a finished run's res_dir, got {describe(res_dir)}", "res_dir")
        self.res_dir = Path(res_dir)
        self.conf_file = self.res_dir / "conf.json"
        self.conf = _check_finished(self.res_dir, self.conf_file)
        self.raw = manifest_form(self.conf.get("config"), self.conf_file)
        if other_data:  # --data: its parameters are the ones --set data.params.<key> gives, not the run's dataset's
            self.raw.setdefault("data", {})["params"] = {}
        # the machine using the run need not have the run's device: "auto" unless --set names one
        self.raw.setdefault("run", {})["device"] = "auto"
        self.overrides = list(overrides)
        for override in self.overrides:
            apply_override(self.raw, override)
        try:
            self.config: Config = config_from_dict(self.raw, source=str(self.conf_file), base_dir=self.base_dir(), check=False)
        except IzitorchError as error:
            if self.overrides:
                raise error.located(source="--set") from None
            raise IzitorchError(f"{error.message}; this izitorch version cannot read the recorded configuration", error.path, str(self.conf_file)) from None
        self.names = [spec.name for spec in self.config.models]
        splits = self.conf.get("splits")
        self.folds = len(splits) if isinstance(splits, list) and splits else 1
        self._selection = None

    def recorded(self, key: str, default: str) -> str:
        value = (self.conf.get("config") or {}).get(key)
        return value if isinstance(value, str) and value else default

    def base_dir(self) -> str:
        """Where the run looked up its ``"file.py:attr"`` references: the manifest's folder, which
        ``conf.json`` records as the run saw it, relative to the folder the run started in. That
        folder is found again from ``res_dir``: the recorded ``run.res_dir`` (relative to it too)
        ends the path of the ``res_dir`` given, unless the results were moved."""
        base = Path(self.recorded("base_dir", "."))
        recorded_res = Path(str(self.raw.get("run", {}).get("res_dir", "")))
        if base.is_absolute() or recorded_res.is_absolute() or ".." in recorded_res.parts or not recorded_res.parts:
            return str(base)
        actual = self.res_dir.resolve().parts
        depth = len(recorded_res.parts)
        if actual[-depth:] != recorded_res.parts:
            return str(base)  # moved: relative to the working directory
        return str(Path(*actual[:-depth]) / base)

    def check_reference(self, reference: str, where: str) -> None:
        """Import a recorded reference, or one line naming its key (a run checked them all when it
        started; a file may have moved since)."""
        from izitorch.errors import ManifestError
        from izitorch.references import resolve

        try:
            resolve(reference, self.config.base_dir)
        except ManifestError as error:
            raise IzitorchError(f"{error.message}; the run found it there when it started", where, str(self.conf_file)) from None

    # -- names and folders ------------------------------------------------------------------

    def spec(self, name: str, where: str = "name") -> tuple[int, ModelSpec]:
        """The index and ``[[models]]`` entry of model ``name``; unknown names are one line."""
        if isinstance(name, str) and name in self.names:
            index = self.names.index(name)
            return index, self.config.models[index]
        raise IzitorchError(
            f"no model {describe(name)} in this run (its models: {', '.join(self.names)}){did_you_mean(str(name), self.names)}", where, str(self.res_dir)
        )

    def fold_index(self, fold: int | None, where: str = "fold") -> int:
        """``fold`` (1-based, as the ``FOLD_<k>`` folders) as an index; None is the only split of a
        holdout run and refused for a k-fold run."""
        if fold is None:
            if self.folds > 1:
                raise IzitorchError(f"the run has {self.folds} folds: name one, from 1 to {self.folds}", where, str(self.res_dir))
            return 0
        if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= self.folds:
            span = f"from 1 to {self.folds}" if self.folds > 1 else "1, or leave it out (the run has one split)"
            raise IzitorchError(f"expected a fold {span}, got {describe(fold)}", where, str(self.res_dir))
        return fold - 1

    def model_dir(self, name: str, fold: int) -> Path:
        """``res_dir/<model>``, or ``res_dir/<model>/FOLD_<k>`` with several folds (as :meth:`izitorch.state.Run.model_dir`)."""
        base = self.res_dir / name
        return base if self.folds == 1 else base / f"FOLD_{fold + 1}"

    # -- which epoch --------------------------------------------------------------------------

    def policy(self) -> str:
        table = self.config.plugin_table("checkpoint")
        return table.get("policy", "last") if "checkpoint" not in self.config.plugins.disable else "none"

    def selection(self) -> Any:
        """The run's :class:`izitorch.selection.Selection`, from its plugins' registered metrics."""
        if self._selection is None:
            from izitorch.pluginmanager import make_plugin_manager
            from izitorch.runner import registered_metrics
            from izitorch.selection import resolve_selection

            with located_in(str(self.conf_file)):
                pm, _ = make_plugin_manager(self.config)
                task = self.conf.get("task") if isinstance(self.conf.get("task"), str) else None
                self._selection = resolve_selection(self.config, registered_metrics(pm, self.config), task)
        return self._selection

    def epoch_of(self, name: str, fold: int, which: str | None) -> tuple[int, str]:
        """The epoch ``which`` names for one model and fold, and how to say it in a message."""
        folder = self.model_dir(name, fold)
        if which is None:
            tested = _read_json(folder / "test_metrics.json").get("epoch")
            if not isinstance(tested, (int, float)) or isinstance(tested, bool):
                raise IzitorchError('records no "epoch"; ask for which="best" or "last" (--which)', source=str(folder / "test_metrics.json"))
            return int(tested), "the epoch the final test scored"
        if which == "last":
            return _last_trained(folder), "the last epoch"
        best_file = folder / "best_epoch.json"
        if best_file.is_file():
            best = _read_json(best_file).get("epoch")
            if isinstance(best, int) and not isinstance(best, bool):
                return best, "the best epoch"
        selection = self.selection()
        if selection.key is None:
            raise IzitorchError('the run picks no best epoch (no metric to pick it with); ask for which="last" (--which last)', "which", str(self.res_dir))
        return _best_in_trainlog(folder, selection), f"the best epoch by {selection.key}"

    def checkpoint(self, name: str, fold: int, which: str | None) -> Checkpoint:
        """The saved weights of ``which`` epoch; one line naming what was saved when it was not."""
        if which is not None and which not in WHICH:
            raise IzitorchError(f'expected "best" or "last", got {describe(which)}{did_you_mean(str(which), WHICH)}', "which", str(self.res_dir))
        folder = self.model_dir(name, fold)
        if not folder.is_dir():
            raise IzitorchError(f"{folder} is missing: the run's files were moved or deleted", source=str(self.res_dir))
        epoch, label = self.epoch_of(name, fold, which)
        saved = saved_checkpoints(folder)
        if epoch in saved:
            path, state = saved[epoch]
            return Checkpoint(path, epoch, (state if state is not None else _load_checkpoint(path))["state_dict"])
        raise IzitorchError(self._not_saved(folder, epoch, label, which, sorted(saved)), source=str(folder))

    def _not_saved(self, folder: Path, epoch: int, label: str, which: str | None, saved: list[int]) -> str:
        policy = self.policy()
        if policy == "none":
            return "no weights were saved: the run had the checkpoint plugin disabled; train again with it enabled"
        kept = f"epoch {', '.join(map(str, saved))}" if saved else "no epoch"
        message = f'{label} ({epoch}) was not saved: [plugins.checkpoint] policy = "{policy}" kept {kept} of this model'
        others = [w for w in WHICH if w != which]
        if saved:
            message += "; ask for " + " or ".join(f'which="{w}" (--which {w})' for w in others)
        if policy != "all":
            message += ', or train with policy = "all" (every epoch)' + (' or "best"' if which == "best" else "")
        return message

    # -- the model ----------------------------------------------------------------------------

    def build(self, name: str, device: torch.device | str = "cpu", with_criterion: bool = False) -> Any:
        """Model ``name`` rebuilt from its recorded reference and parameters (its criterion too
        with ``with_criterion``), as an :class:`izitorch.state.Slot` on ``device``; the global
        random generators are left as they were."""
        from izitorch.data import build_slot

        index, spec = self.spec(name)
        if not is_reference(spec.model):
            raise IzitorchError(
                f'model "{name}" was given to the Rack as a Python object, so conf.json holds only its repr: build the model yourself and '
                f'pass it, load_model(res_dir, "{name}", model=YourModel(...)), or load the checkpoint\'s state_dict into it',
                f"models[{index}].model",
                str(self.conf_file),
            )
        criterion = spec.criterion
        if not is_reference(criterion.target):
            if with_criterion:
                raise IzitorchError(
                    f'model "{name}": its criterion was given to the Rack as a Python object, which conf.json cannot rebuild; evaluate it in Python',
                    f"models[{index}].criterion",
                    str(self.conf_file),
                )
            criterion = ComponentSpec("torch.nn:CrossEntropyLoss")
        self.check_reference(spec.model, f"models[{index}].model")
        # only the model (and its loss) is wanted: a no-op optimizer stands for the recorded one
        bare = attrs.evolve(spec, criterion=criterion, optimizer=ComponentSpec(torch.optim.SGD, {"lr": 0.0}), scheduler=None)
        with located_in(str(self.conf_file)), _random_states_kept():
            return build_slot(bare, index, torch.device(device), self.config.base_dir)


def load_model(
    res_dir: str | os.PathLike, name: str, fold: int | None = None, which: str | None = None, model: torch.nn.Module | None = None
) -> torch.nn.Module:
    """Model ``name`` of the finished run in ``res_dir``, rebuilt from its recorded configuration
    with the weights of ``which`` epoch, on the CPU, in evaluation mode.

    ``fold`` (1 to k) is required for a k-fold run. ``which``: None for the weights the run's
    final test scored, ``"best"`` for the best epoch, ``"last"`` for the last (see this module's
    docstring). ``model``: a module to load the weights into instead of rebuilding one (the way
    for a model given to the ``Rack`` as an object). Mistakes raise :class:`IzitorchError` in one line.
    """
    run = TrainedRun(res_dir)
    run.spec(name)
    index = run.fold_index(fold)
    checkpoint = run.checkpoint(name, index, which)
    if model is None:
        model = run.build(name).model
    elif not isinstance(model, torch.nn.Module):
        raise IzitorchError(f"expected a torch.nn.Module to load the weights into, got {type(model).__name__}", "model")
    return load_weights(model, checkpoint)


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> torch.nn.Module:
    """``model`` on the CPU, in evaluation mode, holding ``checkpoint``'s weights; a model that
    does not fit them is one line."""
    model = model.cpu()
    try:
        model.load_state_dict(checkpoint.state_dict)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise IzitorchError(
            f"the weights do not fit the model: {one_line(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)}; "
            "the model's class or params differ from the run's",
            source=str(checkpoint.path),
        ) from None
    return model.eval()


def is_reference(value: Any) -> bool:
    """Whether a recorded value is a ``"module:attr"`` / ``"file.py:attr"`` reference (not the
    ``repr`` of an object given from Python)."""
    return isinstance(value, str) and REFERENCE.fullmatch(value) is not None


def manifest_form(config: Any, source: Path) -> dict:
    """The ``config`` table of ``conf.json`` in the form a manifest has, for
    :func:`izitorch.manifest.config_from_dict`: :func:`manifest_keys` (``conf.json`` written by
    an older izitorch holds ``attrs.asdict`` of the run's :class:`Config`), unset values
    (``null``) left out, and where an object given from Python was recorded (its ``repr`` in
    place of a reference) a :class:`GivenObject` standing for it."""
    if not isinstance(config, dict) or not isinstance(config.get("models"), list):
        raise IzitorchError(
            f'expected the run\'s configuration under "config", found {describe(config)}; it is not a conf.json izitorch wrote', source=str(source)
        )
    raw = manifest_keys({key: value for key, value in config.items() if key in SECTIONS})
    for section in ("run", "data"):
        if isinstance(raw.get(section), dict):
            raw[section] = _given_in(raw[section], ("dataset",) if section == "data" else ())
    raw["models"] = [_given_in(item, ("model",)) if isinstance(item, dict) else item for item in raw["models"]]
    return raw


#: The sections of a manifest (``conf.json``'s ``config`` also records ``source`` and ``base_dir``).
SECTIONS = ("run", "data", "models", "plugins")


def manifest_keys(config: dict) -> dict:
    """A configuration table (``attrs.asdict`` of a :class:`Config`) in the manifest's own keys,
    as ``conf.json`` records it: a component ``{"target", "params"}`` becomes ``{"class",
    ...params}`` (a scheduler's ``interval`` kept), the plugins' ``tables`` their own keys under
    ``plugins``. A table already in that form is returned as it is; other keys are kept."""
    out: dict[str, Any] = {}
    for section, value in config.items():
        if section == "models" and isinstance(value, (list, tuple)):
            out[section] = [_components(item) if isinstance(item, dict) else item for item in value]
        elif section == "plugins" and isinstance(value, dict) and isinstance(value.get("tables"), dict):
            out[section] = {"enable": list(value.get("enable") or ()), "disable": list(value.get("disable") or ()), **value["tables"]}
        elif section in ("run", "data") and isinstance(value, dict):
            out[section] = _components(value)
        else:
            out[section] = value
    return out


def _components(table: dict) -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and {"target", "params"} <= set(value):  # a ComponentSpec, with a scheduler's interval
            rest = {name: item for name, item in value.items() if name not in ("target", "params")}
            value = {"class": value["target"], **(value["params"] or {}), **rest}
        out[key] = value
    return out


def _given_in(table: dict, references: tuple[str, ...]) -> dict:
    """``table`` without its unset values, a recorded ``repr`` (a reference's place holding no
    reference) as a :class:`GivenObject`."""
    out = {}
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, dict) and "class" in value and key != "params":  # a component
            value = {**value, "class": _given(value["class"])}
        elif key in references:
            value = _given(value)
        out[key] = value
    return out


class GivenObject:
    """What stands in a rebuilt configuration for an object the ``Rack`` was given (a model, a
    dataset, a loss): ``conf.json`` holds only its ``repr``, which cannot be built again."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _given(value: Any) -> Any:
    return GivenObject(value) if isinstance(value, str) and not is_reference(value) else value


# -- the files of a finished run ----------------------------------------------------------------


def _check_finished(res_dir: Path, conf_file: Path) -> dict:
    """``conf.json`` of the finished run in ``res_dir``; one line for anything else."""
    where = str(res_dir)
    if not res_dir.exists():
        raise IzitorchError("no such folder: give the res_dir of a finished run", source=where)
    if not res_dir.is_dir():
        raise IzitorchError("is not a folder: give the res_dir of a finished run", source=where)
    if not conf_file.is_file():
        raise IzitorchError(
            "holds no izitorch run (no conf.json, which the trainlog plugin writes when a run starts): give the res_dir of a finished run", source=where
        )
    if (res_dir / LOCK_NAME).exists() or not finished_path(res_dir).is_file():
        raise IzitorchError(
            "holds a run that has not finished (it is running, or was stopped: no .izitorch/finished.json); wait for it, or finish it "
            "with `izitorch run MANIFEST --resume`",
            source=where,
        )
    conf = _read_json(conf_file)
    return conf


def _read_json(path: Path) -> dict:
    """A JSON table izitorch wrote; one line naming the file when it is missing or damaged."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise IzitorchError("is missing: the run's files were moved or deleted", source=str(path)) from None
    except OSError as error:
        raise IzitorchError(f"cannot read it: {error.strerror or error}", source=str(path)) from None
    except (UnicodeDecodeError, ValueError) as error:
        raise IzitorchError(f"not a file izitorch wrote ({type(error).__name__}: {one_line(str(error))})", source=str(path)) from None
    if not isinstance(value, dict):
        raise IzitorchError(f"expected a table, found {describe(value)}; not a file izitorch wrote", source=str(path))
    return value


def _trainlog(folder: Path) -> list[tuple[int, dict]]:
    """``trainlog.json``'s entries in epoch order."""
    log = _read_json(folder / "trainlog.json")
    try:
        entries = sorted((int(epoch), entry) for epoch, entry in log.items() if isinstance(entry, dict))
    except ValueError:
        raise IzitorchError("an epoch is not a number; not a trainlog izitorch wrote", source=str(folder / "trainlog.json")) from None
    return entries


def _last_trained(folder: Path) -> int:
    """The last epoch in which the model trained: its trainlog entry has the training pass's time."""
    trained = [epoch for epoch, entry in _trainlog(folder) if "train_step_time" in entry]
    if not trained:
        raise IzitorchError("records no trained epoch", source=str(folder / "trainlog.json"))
    return trained[-1]


def _best_in_trainlog(folder: Path, selection: Any) -> int:
    """The best epoch as :func:`izitorch.selection.note_epoch` picks it during the run: the first
    evaluated epoch whose ``best_metric`` beats every earlier one in its direction, on the
    validation set when the run had one, else the test set."""
    from izitorch.metrics import better

    entries = _trainlog(folder)
    prefix = "val_" if any(f"val_{selection.key}" in entry for _, entry in entries) else "test_"
    best_epoch, best_value = None, None
    for epoch, entry in entries:
        value = entry.get(prefix + selection.key)
        if isinstance(value, (int, float)) and better(selection.direction, float(value), best_value):
            best_epoch, best_value = epoch, float(value)
    if best_epoch is None:
        raise IzitorchError(f"records no evaluated {selection.key}, so no best epoch", source=str(folder / "trainlog.json"))
    return best_epoch


def saved_checkpoints(folder: Path) -> dict[int, tuple[Path, dict | None]]:
    """The checkpoints in ``folder`` by epoch: ``model_epoch{E}.pth.tar`` by its name (loaded
    when asked for), any other ``*.pth.tar`` by the epoch it records (loaded here)."""
    saved: dict[int, tuple[Path, dict | None]] = {}
    try:
        files = sorted(path for path in folder.iterdir() if path.name.endswith(".pth.tar") and path.is_file())
    except OSError as error:
        raise IzitorchError(f"cannot read it: {error.strerror or error}", source=str(folder)) from None
    for path in files:
        named = EPOCH_FILE.fullmatch(path.name)
        if named:
            saved.setdefault(int(named.group(1)), (path, None))
            continue
        state = _load_checkpoint(path)
        epoch = state.get("epoch")
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            saved[epoch] = (path, state)
    return saved


def _load_checkpoint(path: Path) -> dict:
    """A checkpoint izitorch wrote (``{"epoch", "state_dict", ...}``), loaded with
    ``weights_only=True`` on the CPU; one line naming the file otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise IzitorchError(f"cannot read it: {error.strerror or error}", source=str(path)) from None
    except Exception as error:  # truncated, not a torch file, or holding objects weights_only refuses
        raise IzitorchError(
            f"not a checkpoint izitorch wrote ({type(error).__name__}: {one_line(str(error).strip().splitlines()[0] if str(error).strip() else '')})",
            source=str(path),
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise IzitorchError('not a checkpoint izitorch wrote (no "state_dict" table)', source=str(path))
    return state


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles lists, tuples and integers only: ``Dataset_split.pkl`` holds nothing else, and
    nothing izitorch reads back may run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a split")


def read_splits(res_dir: Path) -> list[tuple[np.ndarray, ...]]:
    """``Dataset_split.pkl``: each split's index arrays, ``(train, test)`` or ``(train, val, test)``."""
    path = res_dir / "Dataset_split.pkl"
    try:
        with open(path, "rb") as handle:
            splits = _IndexUnpickler(handle).load()
    except FileNotFoundError:
        raise IzitorchError("is missing: the run's files were moved or deleted; pass --data to score other data", source=str(path)) from None
    except Exception as error:
        raise IzitorchError(f"not a split file izitorch wrote ({type(error).__name__}: {one_line(str(error))})", source=str(path)) from None
    if not isinstance(splits, list) or not all(isinstance(s, (list, tuple)) and len(s) in (2, 3) for s in splits):
        raise IzitorchError("not a split file izitorch wrote (expected a list of (train, test) or (train, val, test) index lists)", source=str(path))
    return [tuple(np.asarray(part, dtype=np.int64) for part in split) for split in splits]


@contextlib.contextmanager
def _random_states_kept() -> Iterator[None]:
    """torch's CPU generator, numpy's and Python's as they were: rebuilding a model draws its
    initial weights, which the checkpoint then replaces."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
