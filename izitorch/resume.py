"""Exact resume: the state of a cohort of folds, saved after every epoch (on disk at the run's
next flush, :mod:`izitorch.held`).

One writer for both fold schedules: ``res_dir/.izitorch/fold_<k>.pth.tar`` for fold k trained
on its own, ``folds.pth.tar`` for parallel folds. A state holds, for the last finished epoch,
per fold (``folds``): every model's optimizer, scheduler, kept (best) weights, stop reason and
weights (those of a vectorized member come with its stack's entry in ``groups``), and every
plugin's ``izitorch_state_dict``; the RNG states (torch, CUDA, numpy, python, and the loaders'
generators); and, once the folds are done, their final test scores. It is written whatever the
checkpoint policy, holds only tensors and plain containers (``torch.load(weights_only=True)``),
and carries a fingerprint of the configuration so that a resume with a manifest that changed
what the state depends on is refused, naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from izitorch import sharding
from izitorch.config import Config, DataConfig, RunConfig, SchedulerSpec
from izitorch.data import dataset_labels
from izitorch.errors import IzitorchError, ManifestError, describe, error_text, join_path
from izitorch.io import commit, discarding_now, save_torch
from izitorch.ownership import STATE_DIR
from izitorch.state import Run, deep_equal, standalone

FORMAT = 5  # 3: plugin tables fingerprinted as plugins.<name>; 4: fingerprint and trainlog as JSON text; 5: one layout for every cohort
READABLE = (3, 4, 5)  # formats this version resumes

#: Keys a resumed run may change: they do not affect what the saved state means.
#: ``run.epochs`` may grow (the run is extended) or shrink (finished folds are kept).
TOLERATED = {
    "run.epochs",
    "run.res_dir",
    "run.display_step",
    "run.num_workers",
    "run.pin_memory",
    "run.deterministic",
    "run.device",
    "run.overwrite",
    "run.resume",
    "run.background_writes",
    "run.flush_interval",
    "run.compile",
    "run.distributed",  # a spread run resumes spread (izitorch.spread.check_layout), with any number of ranks
    "args.epochs",
    "args.display_step",
    "args.num_workers",
    "args.pin_memory",
    "args.device",
    "args.resume",
    "args.overwrite",
    "args.flush_interval",
    "args.res_dir",
}


def state_path(res_dir: Path, fold_index: int) -> Path:
    """A fold trained on its own: ``res_dir/.izitorch/fold_<k>.pth.tar`` (1-based)."""
    return res_dir / STATE_DIR / f"fold_{fold_index + 1}.pth.tar"


def parallel_state_path(res_dir: Path) -> Path:
    """Parallel folds share one state (they advance together): ``res_dir/.izitorch/folds.pth.tar``."""
    return res_dir / STATE_DIR / "folds.pth.tar"


def has_state(res_dir: Path) -> bool:
    return any((res_dir / STATE_DIR).glob("*.pth.tar"))


def save(run: Run, cohort: Any, epoch: int, final: bool = False) -> None:
    """Write the state of a cohort of folds after ``epoch`` (``final``: its folds are done,
    their final scores included), to ``cohort.state_path``.

    The state is a snapshot, serialised only when the run flushes its files (``io.save_torch``
    with ``snapshot=True``): nothing in it may change after this call. Its tensors are copies
    (``slot_state``, the stacks' ``state_dict``, the generators' states) and its other values
    immutable, or copied here: the plugins' states (a plugin may keep mutating what it
    returned) and the final scores (numpy arrays the fold keeps)."""
    if discarding_now():  # a rank other than 0 under distributed = "data": rank 0 saves
        return
    vectorized = {slot for stack in cohort.stacks if stack.vectorized for slot in stack.members}
    state = {
        "format": FORMAT,
        "fingerprint": saved_fingerprint(run),
        "parallel": len(cohort.folds),
        "epoch": epoch,
        "final": final,
        "folds": [
            {
                "index": fold.index,
                "epoch": fold.epoch,
                "stop_reason": fold.stop_reason,
                "final_scores": standalone(tensorise(fold.final_scores)) if final else None,
                "slots": {slot.name: slot_state(slot, grouped=slot in vectorized) for slot in fold.slots},
                "plugins": standalone(cohort.plugin_state(run, fold)),
            }
            for fold in cohort.folds
        ],
        "groups": [state for state in (stack.state_dict() for stack in cohort.stacks) if state is not None],
        "scalers": [scaler.state_dict() if scaler is not None else None for scaler in cohort.scalers],
        "rng": rng_state(cohort.loaders),
    }
    if sharding.active(run.ranks):
        state["data_parallel"] = run.ranks.world  # a resume needs as many ranks (sharding.check_world)
    save_torch(cohort.state_path, state, snapshot=True)
    commit()  # the state is the epoch's last file


def plugin_states(run: Run) -> dict[str, Any]:
    """Every plugin's ``izitorch_state_dict``, merged (each plugin under its own keys)."""
    merged: dict[str, Any] = {}
    for part in run.hook.izitorch_state_dict(run=run):
        if part:
            merged.update(part)
    return merged


def check(run: Run, folds: int) -> bool:
    """Load every saved state once (on the CPU, then dropped): a changed config is refused here.
    Return whether the saved run is complete (nothing is left to train)."""
    epochs = run.config.run.epochs
    done = [not needs_training(load(run, index, device="cpu"), epochs) for index in range(folds)]
    parallel = load_file(run, parallel_state_path(run.res_dir), device="cpu")
    return not needs_training(parallel, epochs) if parallel is not None else all(done)


def load(run: Run, fold_index: int, device: Any = None) -> dict | None:
    """The saved state of a fold, or None; refused (ManifestError) when the config changed."""
    return load_file(run, state_path(run.res_dir, fold_index), device)


def load_file(run: Run, path: Path, device: Any = None) -> dict | None:
    """A saved state, or None when there is none; refused when it is not a state this version
    wrote (unreadable, another format, the wrong structure) or when the config changed."""
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch's advice is about its own pickles, not ours
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device or run.device, weights_only=True)
    except Exception as error:
        raise IzitorchError(f"the resume state cannot be read ({_load_failure(error)}); start over with --overwrite", source=str(path)) from None
    if not isinstance(state, dict):
        raise IzitorchError(
            f"the resume state is not one izitorch wrote (it holds {describe(state)}, not a table); start over with --overwrite", source=str(path)
        )
    if state.get("format") not in READABLE:
        raise IzitorchError(f"written by another izitorch version (format {describe(state.get('format'))}); start over with --overwrite", source=str(path))
    problem = structure_problem(state)
    if problem:
        raise IzitorchError(f"the resume state is not one izitorch wrote ({problem}); start over with --overwrite", source=str(path))
    state = _one_layout(state)
    sharding.check_world(state, run.ranks, run.config.source)
    saved = state["fingerprint"]
    saved = json.loads(saved) if isinstance(saved, str) else saved
    current = {**fingerprint(run.config), **dataset_fingerprint(run.dataset)}
    if DATASET_KEY not in saved:  # a state of izitorch 0.2 did not describe the dataset's content
        current.pop(DATASET_KEY, None)
    difference = first_difference(saved, current)
    if difference:
        raise ManifestError(f"cannot resume: {difference} since the interrupted run; restore it, or start over with --overwrite", source=run.config.source)
    return state


def _load_failure(error: Exception) -> str:
    """What went wrong in ``torch.load``, without torch's advice to load with ``weights_only=False``
    (a state izitorch wrote never needs it: anything else is not our file)."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error) or not str(error).strip():
        return f"{type(error).__name__}: it is damaged or not a file izitorch wrote"
    return error_text(error)


# -- the structure of a saved state: checked once, where it is loaded ---------------------------

_SLOT = {
    "model": (dict, type(None)),
    "optimizer": dict,
    "scheduler": (dict, type(None)),
    "kept_state": (dict, type(None)),
    "kept_epoch": (int, type(None)),
    "stopped": (str, bool, type(None)),
}
_SLOT_ADDED = {"best_epoch": (int, type(None)), "best_value": (float, type(None))}  # absent from a state of format 5
_FOLD = {"epoch": int, "stop_reason": (str, type(None)), "final_scores": (dict, type(None)), "slots": dict, "plugins": dict}
_COMMON = {"fingerprint": (str, dict), "epoch": int, "groups": list, "rng": dict}
_SEQUENTIAL = {**_COMMON, **_FOLD, "fold": int}
_PARALLEL = {**_COMMON, "parallel": int, "final": bool, "folds": list}
_RNG = {"torch": torch.Tensor, "cuda": list, "numpy": list, "python": list, "loaders": dict}


def structure_problem(state: dict) -> str | None:
    """What is wrong with the structure of a loaded state (``key.path: what``), or None.

    Everything :func:`restore` and :func:`set_rng_state` read is checked here, the random
    generators' states by setting them on throwaway generators, so that a damaged or foreign
    file is refused in one line before anything is restored."""
    try:
        _check_keys(state, _PARALLEL if "parallel" in state else _SEQUENTIAL, "")
        for index, fold in enumerate(state["folds"]) if "parallel" in state else [(None, state)]:
            where = "" if index is None else f"folds[{index}]"
            _check_keys(fold, _FOLD, where)
            for name, slot in fold["slots"].items():
                _check_keys(slot, _SLOT, join_path(join_path(where, "slots"), str(name)))
                _check_keys(slot, {key: kind for key, kind in _SLOT_ADDED.items() if key in slot}, join_path(join_path(where, "slots"), str(name)))
        for index, group in enumerate(state["groups"]):
            _check_keys(group, {"names": list}, f"groups[{index}]")
        _check_keys(state["rng"], _RNG, "rng")
        _try_rng(state["rng"])
    except _Malformed as problem:
        return str(problem)
    return None


class _Malformed(Exception):
    """One thing wrong with a loaded state, as ``key.path: what``."""


def _check_keys(value: Any, expected: dict[str, Any], where: str) -> None:
    if not isinstance(value, dict):
        raise _Malformed(f"{where or 'the state'}: expected a table, found {describe(value)}")
    for key, kind in expected.items():
        if key not in value:
            raise _Malformed(f"{join_path(where, key)}: missing")
        if not isinstance(value[key], kind) or (kind is int and isinstance(value[key], bool)):
            raise _Malformed(f"{join_path(where, key)}: unexpected {type(value[key]).__name__}")


def _try_rng(rng: dict) -> None:
    """Set each saved generator state on a throwaway generator: a bad one fails here."""
    try:
        torch.Generator().set_state(rng["torch"].cpu())
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.RandomState().set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = rng["python"]
        random.Random().setstate((version, tuple(internal.tolist()), gauss))
        for generators in rng["loaders"].values():
            for generator_state in generators.values():
                torch.Generator().set_state(generator_state.cpu())
    except Exception as error:  # noqa: BLE001 - any damage: a wrong type, length, dtype or value
        raise _Malformed(f"rng: not a generator state ({type(error).__name__})") from None


def _one_layout(state: dict) -> dict:
    """A state of format 3 or 4 written for one sequential fold, in the layout of today's
    (its fold as the one entry of ``folds``): what the rest of this module reads."""
    if "parallel" in state:
        return state
    fold = {key: state[key] for key in ("epoch", "stop_reason", "final_scores", "slots", "plugins")}
    return {key: state[key] for key in ("format", "fingerprint", "epoch", "groups", "rng")} | {
        "parallel": 1,
        "final": state["final_scores"] is not None,
        "folds": [{"index": state["fold"], **fold}],
    }


def needs_training(state: dict | None, epochs: int) -> bool:
    """Folds must (re)train unless they finished and none can be extended to ``epochs`` (a fold
    that stopped early is done)."""
    if state is None or not state["final"]:
        return True
    return state["epoch"] < epochs and any(fold["stop_reason"] is None for fold in state["folds"])


def restore(run: Run, cohort: Any, state: dict) -> int:
    """Put a cohort's folds back where ``state`` left them; return the first epoch still to train."""
    if state["parallel"] != len(cohort.folds):
        raise IzitorchError(
            f"cannot resume: the saved state holds {state['parallel']} folds trained together, this run {len(cohort.folds)}; start over with --overwrite"
        )
    for fold, entry in zip(cohort.folds, state["folds"]):
        for slot in fold.slots:
            restore_slot(run, slot, entry["slots"].get(slot.name))
            if "best_value" not in entry["slots"][slot.name]:  # written before the core picked the best epoch
                restore_legacy_best(slot, entry["plugins"])
        fold.epoch, fold.stop_reason = entry["epoch"], entry["stop_reason"]
        cohort.put_plugin_state(run, fold, entry["plugins"])
    restore_stacks(cohort.stacks, state["groups"])
    for scaler, saved in zip(cohort.scalers, state.get("scalers") or []):
        if scaler is not None and saved:
            scaler.load_state_dict(saved)
    set_rng_state(cohort.loaders, state["rng"])
    return state["epoch"] + 1


def restore_slot(run: Run, slot: Any, saved: dict | None) -> None:
    """Put one model back as saved (a vectorized member's weights come with its group)."""
    if saved is None:
        raise ManifestError(f'cannot resume: model "{slot.name}" is not in the saved state; start over with --overwrite', source=run.config.source)
    try:
        if saved["model"] is None:  # a vectorized member: weights and moments come with its group
            for group, hyper in zip(slot.optimizer.param_groups, saved["optimizer"]["param_groups"]):
                group.update({key: value for key, value in hyper.items() if key != "params"})
        else:
            slot.model.load_state_dict(saved["model"])
            slot.optimizer.load_state_dict(saved["optimizer"])
        if slot.scheduler is not None and saved["scheduler"] is not None:
            slot.scheduler.load_state_dict(saved["scheduler"])
    except (RuntimeError, ValueError, KeyError) as error:
        lines = [line.strip().rstrip(".") for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        first = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]  # the first mismatch
        raise IzitorchError(
            f"model {slot.name}: the saved state does not fit the model ({first}); the architecture changed since the interrupted run: start over with --overwrite"
        ) from None
    slot.kept_state, slot.kept_epoch, slot.stopped = saved["kept_state"], saved["kept_epoch"], saved["stopped"]
    slot.best_epoch, slot.best_value = saved.get("best_epoch"), saved.get("best_value")
    slot.train_seconds, slot.timed_epochs = saved.get("train_seconds", 0.0), saved.get("timed_epochs", 0)


def restore_legacy_best(slot: Any, plugins: dict) -> None:
    """The best score of a state written when the checkpoint plugin tracked it (its
    ``{"checkpoint": {"best": {name: value}}}`` state), with the epoch of the weights it kept."""
    value = plugins.get("checkpoint", {}).get("best", {}).get(slot.name)
    if value is not None:
        slot.best_epoch, slot.best_value = slot.kept_epoch, float(value)


def restore_stacks(stacks: list[Any], saved_groups: list[dict]) -> None:
    """The stacked state of each vector stack, which must group the models as the saved run did."""
    vectorized = [stack for stack in stacks if stack.vectorized]
    if [g["names"] for g in saved_groups] != [[slot.name for slot in stack.members] for stack in vectorized]:
        raise IzitorchError("cannot resume: the models were grouped differently when the state was saved; start over with --overwrite")
    for stack, saved in zip(vectorized, saved_groups):
        stack.load_state_dict(saved)


def final_scores(state: dict) -> dict[str, dict]:
    """A finished fold's final scores (an entry of a state's ``folds``), as the loop returned
    them (numpy confusion matrices)."""
    return {name: {k: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in scores.items()} for name, scores in state["final_scores"].items()}


# -- fingerprint ------------------------------------------------------------------------------


def fingerprint(config: Config) -> dict[str, str]:
    """A flat ``{"models[0].params.hidden": "64"}`` view of what the saved state depends on."""
    tree = attrs.asdict(config, recurse=True, value_serializer=lambda _i, _f, v: _stable(v), filter=lambda field, _: field.name not in ("source", "base_dir"))
    flat: dict[str, str] = {}
    _flatten(tree, "", flat)
    # a plugin's table is [plugins.<name>] in the manifest (``PluginsConfig.tables`` inside)
    flat = {k.replace("plugins.tables.", "plugins.", 1): v for k, v in flat.items()}
    return {k: v for k, v in flat.items() if k not in TOLERATED}


#: The fingerprint's entry for the dataset's content, so that a resume over data that changed
#: (another length, other labels) is refused instead of testing on samples it trained on.
DATASET_KEY = "data.dataset (samples and labels)"


def dataset_fingerprint(dataset: Any) -> dict[str, str]:
    """``{DATASET_KEY: "1797 samples, labels 0a1b2c3d4e5f"}``: the length, and a digest of the
    labels where they are at hand without loading samples (:func:`izitorch.data.dataset_labels`)."""
    if dataset is None:
        return {}
    description = f"{len(dataset)} samples"
    labels = dataset_labels(dataset)
    if labels is not None:
        labels = labels.detach().cpu().contiguous()
        digest = hashlib.blake2b(f"{labels.dtype}{tuple(labels.shape)}".encode(), digest_size=6)
        digest.update(labels.reshape(-1).view(torch.uint8).numpy().tobytes() if labels.numel() else b"")
        description += f", labels {digest.hexdigest()}"
    return {DATASET_KEY: description}


_last_fingerprint: tuple[Config, Any, str] | None = None


def saved_fingerprint(run: Run) -> str:
    """:func:`fingerprint` and :func:`dataset_fingerprint` as the JSON text a state file holds,
    made once per run (the config is frozen): a run saves its state every epoch, and one string
    pickles much faster than a dict of a few hundred entries."""
    global _last_fingerprint
    if _last_fingerprint is None or _last_fingerprint[0] is not run.config or _last_fingerprint[1] is not run.dataset:
        _last_fingerprint = (run.config, run.dataset, json.dumps({**fingerprint(run.config), **dataset_fingerprint(run.dataset)}))
    return _last_fingerprint[2]


def first_difference(saved: dict[str, str], current: dict[str, str]) -> str | None:
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key, added_default(key)), current.get(key, "(absent)")
        if before != after:
            return f"{manifest_key(key, set(saved) | set(current))} changed ({describe_text(before)} -> {describe_text(after)})"
    return None


def added_default(key: str) -> str:
    """What a state written before ``[run]``, ``[data]`` or a model's ``scheduler`` had the key
    ``key`` was trained with: its default, as the fingerprint writes it (such a state resumes
    while the manifest keeps it); ``"(absent)"`` for any other key."""
    section, _, name = key.partition(".")
    schema = {"run": RunConfig, "data": DataConfig}.get(section)
    scheduler = _SCHEDULER_KEY.match(key)
    if scheduler is not None:
        schema, name = SchedulerSpec, scheduler[1]
    field = attrs.fields_dict(schema).get(name) if schema is not None else None
    if field is None or field.default is attrs.NOTHING or isinstance(field.default, attrs.Factory):
        return "(absent)"
    flat: dict[str, str] = {}
    _flatten(_stable(field.default), key, flat)
    return flat.get(key, "(absent)")


_SCHEDULER_KEY = re.compile(r"^models\[\d+\]\.scheduler\.(\w+)$")
_COMPONENT_KEY = re.compile(r"^(models\[\d+\]\.(?:criterion|optimizer|scheduler))\.(?:params\.(.+)|target)$")


def manifest_key(key: str, keys: set[str]) -> str:
    """A fingerprint key as the manifest spells it: a component's ``params.lr`` is its ``lr``, and
    its ``target`` is its ``class`` when written as a table (it has parameters), else the
    component's own key (``criterion = "torch.nn:L1Loss"``)."""
    match = _COMPONENT_KEY.match(key)
    if match is None:
        return key
    component, param = match.groups()
    if param is not None:
        return f"{component}.{param}"
    as_table = any(other.startswith(f"{component}.params.") for other in keys)
    return f"{component}.class" if as_table else component


def describe_text(text: str) -> str:
    """A fingerprint value (already text) cut as :func:`izitorch.errors.describe` cuts values."""
    shown = describe(text)
    return shown[1:-1] if shown.startswith('"') and shown.endswith('"') else shown


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}[{index}]", out)
    else:
        out[prefix] = repr(value) if not isinstance(value, str) else value


def _stable(value: Any) -> Any:
    """A description of a value that is the same in the next process (no memory addresses)."""
    if value is None or isinstance(value, (str, int, float, bool, list, tuple, dict)) or attrs.has(type(value)):
        return value
    if isinstance(value, torch.nn.Module):
        return repr(value)
    if isinstance(value, torch.optim.Optimizer):
        return f"{type(value).__name__}({value.defaults})"
    if hasattr(value, "__len__") and hasattr(value, "__getitem__"):
        return f"{type(value).__qualname__}(len={len(value)})"
    return getattr(value, "__qualname__", type(value).__qualname__)


# -- state pieces -------------------------------------------------------------------------------


def slot_state(slot, grouped: bool) -> dict:
    """A slot's own state; a vectorized member's weights and moments are in its group's entry.

    ``kept_state`` is already a copy that owns its memory (``Slot.keep_weights``); the rest goes
    through ``standalone`` (a member's views of its group's tensors would save the whole group).
    """
    own = {
        "model": None if grouped else slot.model.state_dict(),
        "optimizer": {"param_groups": changed_hyper(slot)} if grouped else slot.optimizer.state_dict(),
        "scheduler": slot.scheduler.state_dict() if slot.scheduler is not None else None,
    }
    best = {"best_epoch": slot.best_epoch, "best_value": slot.best_value}
    timing = {"train_seconds": slot.train_seconds, "timed_epochs": slot.timed_epochs}
    return {**standalone(own), "kept_state": slot.kept_state, "kept_epoch": slot.kept_epoch, "stopped": slot.stopped, **best, **timing}


def changed_hyper(slot) -> list[dict]:
    """A vectorized member's optimizer hyper-parameters that differ from its initial ones (a
    scheduler's lr, say), per param group: what :func:`restore_slot` puts back onto the reset
    optimizer. Saving only those keeps a 64-member group's state small: all the hyper-parameters
    of every member were ~2,600 objects to pickle every epoch.

    The unchanged ones come back from the resuming process's optimizer, built from the same
    manifest (the fingerprint checks it), where a single model's ``load_state_dict`` takes every
    saved value: the two differ only if the optimizer's code changed between the runs. A slot
    without an initial snapshot (built outside :func:`izitorch.data.build_slot`) saves them all.
    """
    groups = slot.optimizer.param_groups
    initial = slot.initial_state.get("optimizer", {}).get("param_groups") or [{} for _ in groups]
    return [
        {key: value for key, value in group.items() if key != "params" and (key not in base or not deep_equal(value, base[key]))}
        for group, base in zip(groups, initial)
    ]


def tensorise(scores: dict[str, dict]) -> dict[str, dict]:
    return {name: {k: (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v) for k, v in values.items()} for name, values in scores.items()}


def rng_state(loaders: dict[str, Any]) -> dict:
    np_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        # through numpy: torch.tensor on a tuple of 625 ints converts them one by one, every epoch
        "python": [python_state[0], torch.from_numpy(np.array(python_state[1], dtype=np.int64)), python_state[2]],
        "loaders": {},
    }
    for phase, loader in loaders.items():
        generators = {}
        if getattr(loader, "generator", None) is not None:
            generators["loader"] = loader.generator.get_state()
        if getattr(getattr(loader, "sampler", None), "generator", None) is not None:
            generators["sampler"] = loader.sampler.generator.get_state()
        state["loaders"][phase] = generators
    return state


def set_rng_state(loaders: dict[str, Any], state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    for phase, generators in state["loaders"].items():
        loader = loaders.get(phase)
        if loader is None:
            continue
        if "loader" in generators and getattr(loader, "generator", None) is not None:
            loader.generator.set_state(generators["loader"].cpu())
        if "sampler" in generators and getattr(getattr(loader, "sampler", None), "generator", None) is not None:
            loader.sampler.generator.set_state(generators["sampler"].cpu())
