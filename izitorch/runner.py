"""``izitorch.run(config)``: build what the configuration names and drive the hooks.

This is the outer sequence of DESIGN §2; the per-fold loop lives in :mod:`izitorch.loop`. The
run holds ``res_dir``'s lock and turns SIGINT/SIGTERM into a clean stop; with ``resume``,
finished folds are taken from their saved state and an interrupted fold continues from its
last finished epoch (:mod:`izitorch.resume`).
"""
from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

from izitorch import ensemble, resume
from izitorch.config import Config
from izitorch.checks import dry_run
from izitorch.data import pick_device
from izitorch.errors import IzitorchError, ManifestError
from izitorch.guard import LOCK_NAME, Interrupted, StopFlag, res_dir_lock, stop_on_signals
from izitorch.io import background_writes
from izitorch.pluginmanager import make_plugin_manager
from izitorch.reproducibility import deterministic_algorithms
from izitorch.state import Run, Split


def run(config: Config) -> dict[str, list[dict]]:
    """Train every model of ``config`` on every split; return each model's final test scores per fold."""
    pm, versions = make_plugin_manager(config)
    device = pick_device(config.run.device)
    res_dir = Path(config.run.res_dir)
    check_res_dir(res_dir, config)
    flag = StopFlag()
    with (res_dir_lock(res_dir), stop_on_signals(flag), deterministic_algorithms(config.run.deterministic),
          background_writes(config.run.background_writes)):
        resuming = prepare_res_dir(res_dir, config)
        session = Run(config, pm, device, res_dir, plugin_versions=versions, stop_flag=flag)
        try:
            return _run(session, resuming)
        except Interrupted as stop:
            raise Interrupted(stop.signum, interrupted_message(config, stop)) from None


def _run(session: Run, resuming: bool) -> dict[str, list[dict]]:
    config, hook = session.config, session.pm.hook
    hook.izitorch_register_metrics(register=session.metric_factories.__setitem__)
    session.dataset, session.slots = dry_run(config, session.device)
    session.groups, session.singles, session.grouping = ensemble.plan(config.run.multi_model, session.slots)
    session.splits = check_splits(hook.izitorch_make_splits(run=session, dataset=session.dataset), len(session.dataset))
    if resuming:  # refuse a changed manifest before izitorch_run_start rewrites conf.json and the split
        resume.check(session, len(session.splits))
    hook.izitorch_run_start(run=session)
    results = hook.izitorch_run_folds(run=session, resuming=resuming)
    hook.izitorch_run_finish(run=session, results=results)
    return results


def check_res_dir(res_dir: Path, config: Config) -> None:
    """Refuse to mix two runs' outputs: an earlier run's folder needs ``overwrite`` or ``resume``."""
    if res_dir.exists() and not res_dir.is_dir():
        raise ManifestError(f'res_dir "{res_dir}" is a file; choose a folder', "run.res_dir", config.source)
    if (res_dir / "conf.json").exists() and not (config.run.overwrite or config.run.resume):
        raise ManifestError(
            f'res_dir "{res_dir}" already holds a run; pass --resume to continue it, --overwrite to replace it, or choose another res_dir',
            "run.res_dir",
            config.source,
        )


def prepare_res_dir(res_dir: Path, config: Config) -> bool:
    """Empty ``res_dir`` for ``overwrite``; return whether there is a saved run to resume."""
    if config.run.overwrite and not config.run.resume:
        for child in res_dir.iterdir():
            if child.name == LOCK_NAME:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        return False
    if config.run.resume:
        if resume.has_state(res_dir):
            for leftover in res_dir.rglob(".*.tmp"):  # a write cut short by the kill being resumed
                leftover.unlink(missing_ok=True)
            return True
        print(f'izitorch: nothing to resume in "{res_dir}"; starting a new run', file=sys.stderr)
    return False


def interrupted_message(config: Config, stop: Interrupted) -> str:
    name = signal.Signals(stop.signum).name
    how = f"python -m izitorch run {config.source} --resume" if config.source.endswith(".toml") else "run the same script with --resume 1"
    return f"interrupted by {name}; every finished epoch is saved in {config.run.res_dir}. To continue: {how}"


def check_splits(splits: list[Split] | None, size: int) -> list[Split]:
    """Every split must have training and test samples inside the dataset."""
    if not splits:
        raise IzitorchError("no split was made: enable the holdout or kfold plugin")
    for index, split in enumerate(splits):
        for part in ("train", "val", "test"):
            indices = getattr(split, part)
            if indices is None:
                continue
            if len(indices) == 0:
                raise IzitorchError(f"split {index + 1}: the {part} set is empty ({size} samples); use more data or change train_ratio / k")
            if indices.min() < 0 or indices.max() >= size:
                raise IzitorchError(f"split {index + 1}: {part} indices fall outside the dataset of {size} samples")
    return splits
