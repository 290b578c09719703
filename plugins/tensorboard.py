"""TensorBoard logs of every model and fold under ``res_dir/tensorboard`` (``[plugins] enable =
["tensorboard"]``, off by default; ``pip install "izitorch[tensorboard]"``).

One log dir for the run, so that every model's curves overlay (``tensorboard --logdir
res/tensorboard``), with a run folder per model, ``<model>/FOLD_<k>`` per fold with k-fold. Each
epoch adds every numeric value of its scores (the values of the trainlog and of ``metrics.csv``)
as the scalar ``<metric>/<phase>`` (``loss/train``, ``loss/val``, ``accuracy/val``,
``train_step_time/train``), and the learning rate the epoch starts with as ``lr``, at the step
of the epoch (1-based). When a fold ends, its model's hyper-parameters go to TensorBoard's hparams
view from the model's own run folder: the optimizer's class and arguments, the model's scalar
``params``, criterion, scheduler, batch size, epochs, the values a sweep gave it (its dotted keys:
``optimizer.lr``, ``params.hidden``), its seed and fold; and as their metrics the fold's final
test values (``accuracy/final_test``, written as scalars at the fold's last epoch).

The writers are ``torch.utils.tensorboard.SummaryWriter``'s, one per model and fold, opened at
the fold's first epoch and flushed at each epoch's end (one event per model and epoch): the
epochs a resume state holds are written before it. A resumed fold opens its writer with
``purge_step`` set to the first epoch it trains again, so TensorBoard hides what the killed run
logged from that epoch on and no epoch is drawn twice. The writers close when their fold ends,
and at the end of the run, whether it finishes, fails or is interrupted
(``izitorch_run_teardown``). What a hard kill can cost: nothing but the epochs the resume trains
again; the event files are not fsynced (one fsync per model and epoch is what a sweep must not
wait for), so a crash of the machine itself may lose the last points of epochs whose resume
state survived, and a kill between a fold's end and its final resume state writes its final
values and hyper-parameters twice (the same values, at the same step).

The writer names its event files itself (time, host, process): each run folder is recorded as
the run's before its writer is made, and each event file as soon as the writer has created it
(:func:`izitorch.io.claim`), so ``--overwrite`` removes them, and only them.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import attrs

from izitorch.errors import IzitorchError
from izitorch.hookspecs import hookimpl
from izitorch.io import claim
from izitorch.options import plugin_options
from izitorch.table import is_metric

FOLDER = "tensorboard"
INSTALL = 'the tensorboard plugin needs TensorBoard: pip install "izitorch[tensorboard]"'
#: A writer's event file: ``events.out.tfevents.<second it was created, 10 digits>.<host>.<pid>...``
EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d{10})\.")
#: What TensorBoard's hparams view shows as a value; anything else is shown as its text.
SCALARS = (bool, int, float, str)


def summary_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or the one-line error that names the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard missing (torch's module says so with an ImportError), or blocked
        raise IzitorchError(INSTALL, "plugins.enable") from None
    return SummaryWriter


@attrs.frozen
class TensorBoardOptions:
    """``[plugins.tensorboard]`` has no keys yet: a table naming one is refused, not ignored."""


class TensorBoardPlugin:
    izitorch_options = TensorBoardOptions  # what `izitorch plugins` lists
    izitorch_single_process = True  # one log for the whole run: refused under torchrun (izitorch.runner.check_distributed)

    def __init__(self) -> None:
        self.writers: dict[tuple[int, str], Any] = {}  # by fold index and model: the open writers

    @hookimpl
    def izitorch_configure(self, config) -> None:
        plugin_options(config, "tensorboard", TensorBoardOptions)
        summary_writer()  # refused before anything is built, by `izitorch validate` too

    @hookimpl
    def izitorch_epoch_start(self, run, fold, epoch) -> None:
        for slot in fold.slots:
            self._writer(run, fold, slot, epoch)

    @hookimpl
    def izitorch_epoch_finish(self, run, fold, epoch, scores) -> None:
        for slot in fold.slots:
            writer = self._writer(run, fold, slot, epoch)
            phases = scores[slot.name] if slot.name in scores.values else {}
            values = {
                f"{metric}/{phase}": value
                for phase, metrics in phases.items()
                for metric, value in metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
            }
            if slot.name in scores.lrs:
                values["lr"] = scores.lrs[slot.name]
            writer.file_writer.add_summary(scalars(values), epoch)
            writer.flush()  # on disk before the epoch's resume state

    @hookimpl
    def izitorch_fold_finish(self, run, fold) -> None:
        from torch.utils.tensorboard.summary import hparams

        for slot in fold.slots:
            writer = self._writer(run, fold, slot, fold.epoch + 1)  # nothing of a later epoch to hide
            final = {f"{key}/final_test": value for key, value in fold.final_scores.get(slot.name, {}).items() if is_metric(key, value)}
            writer.file_writer.add_summary(scalars(final), fold.epoch)
            for summary in hparams(hyper_parameters(run, fold, slot), final):  # the experiment, the session's start and end
                writer.file_writer.add_summary(summary)
            writer.close()
            del self.writers[fold.index, slot.name]

    @hookimpl
    def izitorch_run_teardown(self, run, error) -> None:
        writers, self.writers = self.writers, {}
        for writer in writers.values():
            writer.close()

    def _writer(self, run, fold, slot, epoch: int) -> Any:
        """The model's writer for this fold, opened at the first epoch this process logs: events
        an earlier, killed process logged at or after that epoch are hidden (``purge_step``)."""
        key = (fold.index, slot.name)
        if key not in self.writers:
            self.writers[key] = open_writer(run.res_dir / FOLDER / run.model_dir(slot, fold).relative_to(run.res_dir), epoch)
        return self.writers[key]


def open_writer(folder: Path, purge_step: int) -> Any:
    """A ``SummaryWriter`` into ``folder``, claimed for the run with the event file it creates.

    Where an earlier process left event files, the new one hides their events from
    ``purge_step`` on, and is created once its name sorts after theirs: TensorBoard reads a
    folder's files in the order of their names, which start with the second they were created
    in (a resume within the second of the killed writer's start would otherwise come first, and
    the killed run's epochs would hide the resumed ones)."""
    claim(folder, folder=True)
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    seconds = [int(match[1]) for match in map(EVENT_FILE.match, before) if match]
    wait = max(seconds, default=0) + 1 - time.time()
    if 0 < wait <= 2:  # not when the clock went back: waiting for it would not end
        time.sleep(wait)
    writer = summary_writer()(log_dir=str(folder), purge_step=purge_step if before else None)
    for name in sorted(set(os.listdir(folder)) - before):  # the event file it created
        claim(folder / name)
    return writer


def scalars(values: dict[str, float]) -> Any:
    """One summary holding every ``tag: value`` as TensorBoard scalars (what ``add_scalar``
    writes for one): one event, one write to the file, for a model's whole epoch."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.summary import scalar

    return Summary(value=[value for tag, number in values.items() for value in scalar(tag, number).value])


def hyper_parameters(run, fold, slot) -> dict[str, Any]:
    """A model's hyper-parameters for the hparams view, by the dotted keys of its ``[[models]]``
    table (``optimizer.lr``, ``params.hidden``; a component by its class), with the run's batch
    size and epochs, its seed and, with k-fold, the fold (1-based). Values that are not scalars
    (a list, a table) are left out, but a swept one is shown as its text."""
    spec = slot.spec
    values: dict[str, Any] = {"optimizer": type(slot.optimizer).__name__, "optimizer.lr": slot.optimizer.defaults.get("lr")}
    if spec is not None:
        values["model"] = _name(spec.model)
        for table, component in (("optimizer", spec.optimizer), ("criterion", spec.criterion), ("scheduler", spec.scheduler)):
            if component is not None:
                values[table] = _name(component.target)
                values.update((f"{table}.{key}", value) for key, value in component.params.items() if isinstance(value, SCALARS))
        values.update((f"params.{key}", value) for key, value in spec.params.items() if isinstance(value, SCALARS))
        values.update((key, value if isinstance(value, SCALARS) else repr(value)) for key, value in spec.swept.items())
        if spec.seed is not None:
            values["seed"] = spec.seed
    values["run.batch_size"] = run.config.run.batch_size
    values["run.epochs"] = run.config.run.epochs
    if fold.count > 1:
        values["fold"] = fold.index + 1
    return {key: value for key, value in values.items() if isinstance(value, SCALARS)}


def _name(target: Any) -> str:
    """A component's class: the last part of its reference (``"torch.optim:Adam"``: ``Adam``), or the name of the class given."""
    if isinstance(target, str):
        return target.rpartition(":")[2].rpartition(".")[2]
    return target.__name__ if isinstance(target, type) else type(target).__name__
