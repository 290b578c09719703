"""``izitorch.run(config)``: build what the configuration names and drive the hooks.

This is the run's outer sequence (``docs/architecture.md``, "The run, as data flows"); the
per-fold loop lives in :mod:`izitorch.loop`. The run holds ``res_dir``'s lock and turns
SIGINT/SIGTERM into a clean stop; with ``resume``, finished folds are taken from their saved
state and an interrupted fold continues from its last finished epoch (:mod:`izitorch.resume`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pluggy

from izitorch import distributed, ensemble, metrics, ownership, resume, sharding, spread
from izitorch.config import Config
from izitorch.checks import dry_run
from izitorch.data import pick_device
from izitorch.errors import IzitorchError, ManifestError, located_in
from izitorch.guard import Interrupted, StopFlag, res_dir_lock, stop_on_signals
from izitorch.io import background_writes, discarding, hand_over, owned_by, write_json
from izitorch.options import check_metric_options
from izitorch.selection import resolve_selection, warn_test_set_choices
from izitorch.splits import recorded_splits
from izitorch.pluginmanager import make_plugin_manager
from izitorch.reproducibility import deterministic_algorithms
from izitorch.stacks import build_stacks
from izitorch.state import Run, Split
from izitorch.streams import say


def run(config: Config) -> dict[str, list[dict]]:
    """Train every model of ``config`` on every split; return each model's final test scores per
    fold. An error that names a key path is raised naming the manifest file too."""
    with located_in(config.source):
        return _run_in_res_dir(config)


def _run_in_res_dir(config: Config) -> dict[str, list[dict]]:
    pm, versions = make_plugin_manager(config)
    factories = registered_metrics(pm, config)
    ranks = distributed.from_environment()
    device = distributed.rank_device(pick_device(config.run.device), ranks)
    res_dir = Path(config.run.res_dir)
    flag = StopFlag()
    with distributed.process_group(ranks, device) as ranks, contextlib.ExitStack() as guards:
        if not ranks.main:  # rank 0 prints the console; another rank's error still reaches the CLI as an exception
            null = guards.enter_context(open(os.devnull, "w"))
            guards.enter_context(contextlib.redirect_stdout(null))
            guards.enter_context(contextlib.redirect_stderr(null))
        ledger, resuming = take_res_dir(res_dir, config, ranks, guards)
        guards.enter_context(stop_on_signals(flag))
        guards.enter_context(deterministic_algorithms(config.run.deterministic))
        guards.enter_context(background_writes(config.run.background_writes, config.run.flush_interval))
        session = Run(config, pm, device, res_dir, plugin_versions=versions, stop_flag=flag, metric_factories=factories, ranks=ranks)
        try:
            with owned_by(ledger), contextlib.ExitStack() as quiet:
                results = _run(session, resuming, quiet)
                if ranks.main:
                    write_json(ownership.finished_path(res_dir), {"finished": datetime.datetime.now().isoformat(timespec="seconds")})
                session.hook.izitorch_run_teardown(run=session, error=None)  # the training finished even if this fails
        except Interrupted as stop:
            raise Interrupted(stop.signum, interrupted_message(config, stop, session.ranks)) from None
    if resuming and ranks.main:  # every file is on disk now
        report_missing(ledger)
    return results


def take_res_dir(res_dir: Path, config: Config, ranks: distributed.Ranks, guards: contextlib.ExitStack) -> tuple[ownership.Ledger, bool]:
    """Rank 0 (or the only process) checks ``res_dir``, takes its lock until ``guards`` closes and
    prepares it; every other rank then checks that it sees that same folder. Return this
    process's ledger of the run's files and whether the run resumes."""
    prepared: list[ownership.Ledger] = []

    def prepare() -> tuple[bool, str]:
        check_res_dir(res_dir, config)
        guards.enter_context(res_dir_lock(res_dir))
        ledger, resuming = prepare_res_dir(res_dir, config)
        prepared.append(ledger)
        return resuming, distributed.lock_text(res_dir)

    resuming, lock = distributed.main_first(ranks, prepare)
    if prepared:
        return prepared[0], resuming
    distributed.check_shared_res_dir(res_dir, lock, ranks)  # it writes its models' files there
    return ownership.Ledger(res_dir), resuming


def _run(session: Run, resuming: bool, quiet: contextlib.ExitStack) -> dict[str, list[dict]]:
    config, hook = session.config, session.pm.hook
    session.dataset, session.slots, session.task, session.selection = dry_run(config, session.device, session.metric_factories)
    groups, singles, session.grouping = ensemble.plan(config.run.multi_model, session.slots)
    session.stacks = build_stacks(groups, singles, config.data.num_classes, config.run.compile)
    session.splits = check_splits(hook.izitorch_make_splits(run=session, dataset=session.dataset), len(session.dataset))
    session.ranks = distributed.resolve_strategy(session.ranks, resumed_strategy(session, resuming), len(spread.units(session)))
    if session.ranks.launched:
        distributed.check_same_run(session.ranks, what_was_built(session))
        check_distributed(session)
        if session.ranks.strategy == "models":
            session.share = spread.my_share(session)
    if resuming:  # refuse a changed manifest before izitorch_run_start rewrites conf.json and the split
        spread.check_layout(session)
        complete = spread.check_saved(session) if session.share is not None else resume.check(session, len(session.splits))
        if complete and session.ranks.main:
            say(f'izitorch: the run in "{session.res_dir}" is complete: every fold finished, nothing is trained again', sys.stderr)
        # the same configuration and data: the folds go on with the samples they were given, however a split is drawn today
        session.splits = check_splits(recorded_splits(session.res_dir, session.splits), len(session.dataset))
    if session.ranks.launched and session.ranks.main:
        announce_share(session)
    if sharding.active(session.ranks):
        session.ranks = sharding.step_group(session.ranks, session.device)
        for stack in session.stacks:
            stack.distribute(session.ranks, session.device)
        if not session.ranks.main:  # it computes what rank 0 writes
            quiet.enter_context(discarding())
    warn_test_set_choices(config, session.plugin_versions)  # once everything is set up: a refusal stays one line
    try:
        hook.izitorch_run_start(run=session)
        hand_over()  # conf.json, the split, each model's folder and conf.json: written while the run trains, not at its end
        results = hook.izitorch_run_folds(run=session, resuming=resuming)
        if session.ranks.main:  # with every rank's results (izitorch.spread)
            hook.izitorch_run_finish(run=session, results=results)
    except BaseException as error:  # izitorch_run_teardown(error=None) comes once the run is marked finished
        with contextlib.suppress(Exception):  # the error that ended the run is the one to report
            hook.izitorch_run_teardown(run=session, error=error)
        raise
    return results


def what_was_built(session: Run) -> dict[str, str]:
    """A fingerprint of the run this process built: its configuration and data (as a resume
    compares them), and its splits."""
    digest = hashlib.blake2b(digest_size=8)
    for split in session.splits:
        for part in (split.train, split.val, split.test):
            digest.update(b"-" if part is None else np.asarray(part, dtype=np.int64).tobytes() + b"|")
    return {"the configuration or the data": resume.saved_fingerprint(session), "the split": digest.hexdigest()}


def resumed_strategy(session: Run, resuming: bool) -> str:
    """``[run] distributed``; resuming with ``"auto"``, the strategy the saved run had: spread
    (its units' states), else data-parallel (the only way a run under torchrun keeps one state
    per fold: a single-process run is then refused, :func:`izitorch.sharding.check_world`)."""
    setting = session.config.run.distributed
    if not (resuming and setting == "auto" and session.ranks.launched):
        return setting
    return "models" if spread.saved_layout(session.res_dir) == "models" else "data"


def check_distributed(session: Run) -> None:
    """Refuse, in one line, what a run launched by torchrun cannot do yet."""
    if sharding.active(session.ranks):
        with located_in(session.config.source):
            sharding.check_metrics(session.metric_factories)
    for name, plugin in session.pm.list_name_plugin():
        if getattr(plugin, "izitorch_single_process", False):
            raise ManifestError(
                f"the {name} plugin writes one log for the whole run and does not run under torchrun yet; disable it for a distributed run",
                f"plugins.{name}",
                session.config.source,
            )


def announce_share(session: Run) -> None:
    """Rank 0 says how the run is spread, and which processes have nothing to train."""
    world, units = session.ranks.world, len(spread.units(session))
    if sharding.active(session.ranks):
        batch = session.config.run.batch_size
        say(
            f'izitorch: torchrun, {world} process(es), distributed = "data": every model on each process\'s shard of the data, '
            f"{world} x batch_size {batch} = {world * batch} samples per step; the console shows rank 0's, with every rank's samples counted",
            sys.stderr,
        )
        return
    say(
        f'izitorch: torchrun, {world} process(es), distributed = "models": {units} unit(s) of work (each stack of models on each fold) '
        "spread by cost; the console shows rank 0's",
        sys.stderr,
    )
    if units < world:
        say(f"izitorch: {world - units} of the {world} processes have nothing to train", sys.stderr)


def registered_metrics(pm: pluggy.PluginManager, config: Config) -> dict[str, Any]:
    """The metric factories the plugins register (``izitorch_register_metrics``), once every
    plugin option that names a metric, and ``[run] best_metric``, is checked against them (``run``
    and ``validate``)."""
    factories = metrics.registered(pm.hook)
    check_metric_options(pm.list_name_plugin(), config, factories)
    resolve_selection(config, factories)
    return factories


def report_missing(ledger: ownership.Ledger) -> None:
    """Say which of the run's files were deleted after it wrote them and were not written again
    (a checkpoint of a finished fold, say): the saved state cannot rebuild them."""
    missing = ledger.missing()
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        say(
            f'izitorch: {len(missing)} file(s) of this run in "{ledger.root}" were deleted after it wrote them and cannot be rebuilt '
            f"from the saved state: {shown}; run again with --overwrite to get them back",
            sys.stderr,
        )


def check_res_dir(res_dir: Path, config: Config) -> None:
    """Refuse, before anything is written, a ``res_dir`` where the run would mix with, or delete,
    what is not its own (see :mod:`izitorch.ownership`)."""
    run = config.run
    if run.resume and run.overwrite:
        raise ManifestError(
            "--resume and --overwrite cannot go together: --resume continues the run in res_dir, --overwrite deletes it; pass one", "run.resume", config.source
        )
    try:
        refuse_shared_folder(res_dir, config)
        if res_dir.exists() and not res_dir.is_dir():
            raise ManifestError(f'res_dir "{res_dir}" is a file; choose a folder', "run.res_dir", config.source)
        if not res_dir.is_dir() or not [e for e in res_dir.iterdir() if e.name != ownership.LOCK_NAME]:
            return  # new or empty: nothing to mix with
        problem = _res_dir_problem(res_dir, config)
    except OSError as error:  # a name too long, a folder that cannot be read...
        raise ownership.res_dir_error(res_dir, error) from None
    if problem:
        raise ManifestError(f'res_dir "{res_dir}" {problem}', "run.res_dir", config.source)


def _res_dir_problem(res_dir: Path, config: Config) -> str | None:
    """Why a folder that is not empty cannot take this run (its mode: new, overwrite, resume), or None."""
    run = config.run
    if not ownership.has_record(res_dir):
        if (res_dir / "conf.json").exists() or resume.has_state(res_dir):
            if run.resume and resume.has_state(res_dir):
                return None  # a run of izitorch 0.2, which kept no record: it resumes, and records from now on
            return (
                "holds an izitorch run without its record of files (.izitorch/owned.txt: a run of izitorch 0.2, or a copy "
                "that skipped the hidden .izitorch folder, as `cp -r run/*` does), so izitorch cannot tell its files from yours"
                + ("; nothing to resume" if run.resume else "")
                + ": choose a new or empty folder"
            )
        return "holds files that are not an izitorch run; choose a new or empty folder"
    if not (run.overwrite or run.resume):
        return "already holds a run; pass --resume to continue it, --overwrite to replace it, or choose another res_dir"
    ledger = ownership.Ledger(res_dir)
    restarting = run.resume and not resume.has_state(res_dir)
    if restarting and ownership.finished_path(res_dir).is_file():
        return (
            "holds a finished run whose resume state is gone (.izitorch/*.pth.tar was deleted); nothing to resume: pass "
            "--overwrite to start over, or choose another res_dir"
        )
    if run.overwrite or restarting:  # a run killed before its first epoch ended starts again, as --overwrite would
        foreign = sorted(ledger.foreign())
        if foreign:
            return (
                f"holds files that are not an izitorch run ({_listing(foreign, res_dir)}); --overwrite deletes only what izitorch "
                "wrote: move them out, or choose a new or empty folder"
            )
    return None


def _listing(paths: list[Path], res_dir: Path) -> str:
    shown = ", ".join(str(p.relative_to(res_dir)) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def refuse_shared_folder(res_dir: Path, config: Config) -> None:
    """A run gets a folder of its own: never the working directory, a file system's root, the
    home folder, or a folder that holds the manifest."""
    target = res_dir.resolve()
    shared = []
    if target == Path.cwd().resolve():
        shared.append("the working directory")
    if target == Path(target.anchor):
        shared.append("the root of a file system")
    with contextlib.suppress(RuntimeError, KeyError):  # no home folder known
        if target == Path.home().resolve():
            shared.append("your home folder")
    manifest = Path(config.source)
    if config.source.endswith(".toml") and manifest.is_file() and manifest.resolve().is_relative_to(target):
        shared.append("a folder that holds the manifest")
    if shared:
        raise ManifestError(
            f'res_dir "{config.run.res_dir}" is {" and ".join(shared)}; a run needs a folder of its own: choose a new or empty one, e.g. "results/<name>"',
            "run.res_dir",
            config.source,
        )


def prepare_res_dir(res_dir: Path, config: Config) -> tuple[ownership.Ledger, bool]:
    """Under the lock: delete the earlier run's own files (``overwrite``, or ``resume`` with no
    finished epoch), or remove the temporary files of writes cut short (``resume``); return the
    run's ledger and whether it resumes."""
    check_res_dir(res_dir, config)  # again, now that no other run can change the folder
    ledger = ownership.Ledger(res_dir)
    resuming = config.run.resume and resume.has_state(res_dir)
    if resuming:
        for leftover in ledger.temporaries():  # a write cut short by the kill being resumed
            leftover.unlink(missing_ok=True)
        return ledger, True
    if config.run.resume:
        say(f'izitorch: nothing to resume in "{res_dir}"; starting a new run', sys.stderr)
    ledger.remove_all()  # overwrite, or a resume with nothing finished: only the earlier run's own files
    return ledger, False


def interrupted_message(config: Config, stop: Interrupted, ranks: distributed.Ranks | None = None) -> str:
    name = signal.Signals(stop.signum).name
    how = f"python -m izitorch run {config.source} --resume" if config.source.endswith(".toml") else "run the same script with --resume 1"
    if ranks is not None and ranks.launched and config.source.endswith(".toml"):
        many = f"{ranks.world} processes in all, as before" if sharding.active(ranks) else "any N"
        how = f"torchrun --nproc_per_node=<N> -m izitorch run {config.source} --resume ({many})"
    return f"interrupted by {name}; every finished epoch is saved in {config.run.res_dir}. To continue: {how}"


def check_splits(splits: list[Split] | None, size: int) -> list[Split]:
    """Every split must have training and test samples inside the dataset."""
    if not splits:
        raise IzitorchError("no split was made: enable the holdout or kfold plugin", "plugins")
    for index, split in enumerate(splits):
        for part in ("train", "val", "test"):
            indices = getattr(split, part)
            if indices is None:
                continue
            if len(indices) == 0:
                raise IzitorchError(f"split {index + 1}: the {part} set is empty ({size} samples); use more data or change train_ratio / k", "data")
            if indices.min() < 0 or indices.max() >= size:
                raise IzitorchError(f"split {index + 1}: {part} indices fall outside the dataset of {size} samples", "plugins")
    return splits
