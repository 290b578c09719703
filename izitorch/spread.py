"""``[run] distributed = "models"``: the run's units of work spread over torchrun's ranks.

A unit is one stack (a lone model, or a vectorized group) on one fold. Every rank builds the
whole run as a single process would (every model from the run's seed, in the manifest's order;
the same splits), then trains only its share of the units (:func:`izitorch.distributed.spread`,
balanced by each unit's cost). A unit is trained as a fold of its own with just that stack: its
models reset to their initial weights, the global generators seeded with ``rdm_seed + fold`` and
the fold's loaders drawn from their own seeded generators, exactly as the fold starts in one
process. So each model's weights, trainlog and confusion matrix are those a single process gives,
whichever rank trains it. (What a model draws from the global generator during training, dropout
say, is drawn in one process in turn with the other stacks of the fold; spread, each stack
draws alone: such models train alike but not bit for bit.)

Each unit keeps its own resume state (``.izitorch/fold_<k>.stack_<s>.pth.tar``), written by the
rank that trains it with no communication, so a run resumes with any number of ranks. Once every
rank has finished (:func:`izitorch.distributed.wait_for_everyone`), rank 0 reads every unit's
final scores back from those states and the run finishes as in one process.
"""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from izitorch import cohort as cohorts
from izitorch import distributed, resume
from izitorch.errors import IzitorchError, TrainingError
from izitorch.io import flush
from izitorch.ownership import STATE_DIR
from izitorch.state import Run

#: A unit's resume state: ``fold_<k>.stack_<s>.pth.tar`` (both 1-based).
UNIT_STATE = re.compile(r"^fold_\d+\.stack_\d+\.pth\.tar$")


@attrs.frozen
class Unit:
    """One stack (index into ``run.stacks``) on one fold (index into ``run.splits``)."""

    fold: int
    stack: int


def units(run: Run) -> list[Unit]:
    """Every unit of the run, fold by fold, stack by stack."""
    return [Unit(fold, stack) for fold in range(len(run.splits)) for stack in range(len(run.stacks))]


def cost(run: Run, unit: Unit) -> float:
    """What a unit costs, roughly: its parameters times the samples it passes over per epoch."""
    split = run.splits[unit.fold]
    samples = sum(len(part) for part in (split.train, split.val, split.test) if part is not None)
    parameters = sum(p.numel() for slot in run.stacks[unit.stack].members for p in slot.model.parameters())
    return float(parameters * samples)


def my_share(run: Run) -> list[Unit]:
    """The units this rank trains."""
    every = units(run)
    shares = distributed.spread([cost(run, unit) for unit in every], run.ranks.world)
    return [every[index] for index in shares[run.ranks.rank]]


def state_path(res_dir: Path, unit: Unit) -> Path:
    return res_dir / STATE_DIR / f"fold_{unit.fold + 1}.stack_{unit.stack + 1}.pth.tar"


def saved_layout(res_dir: Path) -> str | None:
    """How a saved run kept its resume states: ``"models"`` (one per unit), ``"one process"``, or None."""
    names = [path.name for path in (res_dir / STATE_DIR).glob("*.pth.tar")]
    if not names:
        return None
    return "models" if any(UNIT_STATE.match(name) for name in names) else "one process"


def check_layout(run: Run) -> None:
    """A resume goes on with the saved states' layout: a run spread over ranks resumes under
    torchrun (with any number of processes), a single-process run in one process."""
    saved, spread_now = saved_layout(run.res_dir), run.ranks.strategy == "models"
    if saved == "models" and not spread_now:
        raise IzitorchError(
            'cannot resume: this run was spread over torchrun\'s processes (distributed = "models"); resume it under torchrun with distributed = '
            '"models" or "auto", with any number of processes (torchrun --nproc_per_node=1 works too)',
            "run.distributed",
        )
    if saved == "one process" and spread_now:
        raise IzitorchError(
            'cannot resume: this run was not spread over processes (distributed = "models"); resume it as it ran: without torchrun, '
            'or with distributed = "data" on as many processes',
            "run.distributed",
        )


def check_saved(run: Run) -> bool:
    """Load every unit's saved state once (a changed configuration is refused); return whether
    every unit finished."""
    epochs = run.config.run.epochs
    return all(not resume.needs_training(resume.load_file(run, state_path(run.res_dir, unit), device="cpu"), epochs) for unit in units(run))


def run_share(run: Run, resuming: bool) -> dict[str, list[dict]]:
    """Train this rank's units (each from its saved state with ``resuming``), wait for the other
    ranks, then, on rank 0, every model's final test scores per fold (an empty table elsewhere)."""
    for unit in run.share:
        path = state_path(run.res_dir, unit)
        saved = resume.load_file(run, path) if resuming else None
        if resume.needs_training(saved, run.config.run.epochs):
            fold = cohorts.sequential(run, unit.fold, saved, stacks=[run.stacks[unit.stack]], state_path=path).folds[0]
            run.hook.izitorch_run_fold(run=run, fold=fold)
    flush()  # rank 0 reads every rank's final states from disk
    distributed.wait_for_everyone(run.ranks, run.stop_flag)
    return gathered_results(run) if run.ranks.main else {}


def gathered_results(run: Run) -> dict[str, list[dict]]:
    """Every model's final test scores, fold by fold, read from the units' final states."""
    results: dict[str, list[dict]] = {slot.name: [] for slot in run.slots}
    for unit in units(run):  # fold by fold: each model's list is in fold order
        path = state_path(run.res_dir, unit)
        state = resume.load_file(run, path, device="cpu")
        if state is None or not state["final"]:
            raise TrainingError(f"{path} holds no finished fold although every rank finished its share; resume the run with --resume")
        for name, scores in resume.final_scores(state["folds"][0]).items():
            results[name].append(scores)
    return results
