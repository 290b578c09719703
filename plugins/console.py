"""What a person sees (default plugin): a progress bar per epoch, the losses every
``display_step`` steps, one line of evaluation scores per epoch, and a final comparison table.

Both show every registered scalar metric: the headline ones first (loss, accuracy, IoU), then
the others in the order they are registered, a lower-is-better one marked ``↓`` (loss aside).

The bar is tqdm's (shown only on a terminal); the lines go to stdout, so logs stay readable
when the output is redirected. A stream that goes away (``| head -1``, ``/dev/full``, a closed
terminal) silences that part of the console; the run trains on (see :mod:`izitorch.streams`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from izitorch.hookspecs import hookimpl
from izitorch.metrics import metric_directions
from izitorch.streams import say, silence
from izitorch.table import columns, comparison_table, is_metric
from izitorch.tasks import headline


def _advance(bar: tqdm) -> None:
    bar.update(1)


class ConsolePlugin:
    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.bar: tqdm | None = None
        self.bar_fold = 0
        self.announced: set[tuple[int, str]] = set()
        self.lines_gone = False  # stdout went away: no more lines
        self.bar_gone = False  # stderr went away: no more bars

    def _print(self, text: str) -> None:
        if self.lines_gone:
            return
        self._on_bar(tqdm.clear)
        self.lines_gone = not say(text, self.stream or sys.stdout)
        self._on_bar(tqdm.refresh)

    def _on_bar(self, action: Callable[[tqdm], Any]) -> None:
        """``action(bar)``; when stderr fails, the bar is disabled (it then draws nothing, and
        its state, such as the shared bar of parallel folds, is kept) and so are later ones."""
        if self.bar is None:
            return
        try:
            action(self.bar)
        except (OSError, ValueError):
            self.bar.disable = self.bar_gone = True
            silence(sys.stderr)

    @hookimpl
    def izitorch_run_start(self, run) -> None:
        names = ", ".join(f"{s.name} ({s.parameter_count():,} parameters)" for s in run.slots)
        sizes = run.splits[0]
        parts = f"train {len(sizes.train)}" + (f", val {len(sizes.val)}" if sizes.val is not None else "") + f", test {len(sizes.test)}"
        folds = f"{len(run.splits)} folds" if len(run.splits) > 1 else "holdout"
        self._print(f"izitorch: {len(run.slots)} model(s) on {run.device}: {names}")
        self._print(f"izitorch: {len(run.dataset)} samples, {folds} ({parts}), {run.config.run.epochs} epochs -> {run.res_dir}")
        for note in run.grouping:
            self._print(f"izitorch: {note}")

    @hookimpl
    def izitorch_epoch_start(self, run, fold, epoch) -> None:
        if self.bar is not None:  # parallel folds share one pass over the data: one bar for all
            self.bar.set_description(f"folds 1-{fold.count} epoch {epoch}/{run.config.run.epochs}", refresh=False)
            return
        self.bar_fold = fold.index
        label = f"fold {fold.index + 1}/{fold.count} " if fold.count > 1 else ""
        options = {
            "total": len(fold.loaders["train"]),
            "desc": f"{label}epoch {epoch}/{run.config.run.epochs}",
            "leave": False,
            "file": sys.stderr,
            "dynamic_ncols": True,
        }
        try:
            self.bar = tqdm(**options, disable=True if self.bar_gone or sys.stderr is None else None)
        except (OSError, ValueError):  # its first drawing failed: stderr went away
            self.bar_gone = True
            silence(sys.stderr)
            self.bar = tqdm(**options, disable=True)

    @hookimpl
    def izitorch_batch_finish(self, run, fold, step, losses) -> None:
        bar = self.bar
        if bar is not None and not bar.disable and fold.index == self.bar_fold:  # a disabled bar (no terminal) counts nothing
            self._on_bar(_advance)
        if step % run.config.run.display_step == 0:
            text = "  ".join(f"{name} {loss.item():.4f}" for name, loss in losses.items())
            label = f"fold {fold.index + 1} " if fold.count > 1 else ""
            self._print(f"  {label}step {step}/{len(fold.loaders['train'])}  loss: {text}")

    @hookimpl
    def izitorch_epoch_finish(self, run, fold, epoch, scores) -> None:
        self._on_bar(tqdm.close)
        self.bar = None
        parts = []
        directions = metric_directions(run)
        for name in scores:
            phases = scores[name]
            shown = phases.get(fold.eval_phase) or phases.get("train", {})
            tag = fold.eval_phase if fold.eval_phase in phases else "train"
            keys = [key for key, value in shown.items() if is_metric(key, value)]
            metrics = " ".join(f"{label} {fmt.format(shown[key])}" for key, label, fmt in columns(keys, directions))
            parts.append(f"{name} [{tag}] {metrics}")
        label = f"fold {fold.index + 1}/{fold.count} " if fold.count > 1 else ""
        self._print(f"{label}epoch {epoch}/{run.config.run.epochs}: " + " | ".join(parts))
        for slot in fold.slots:
            if slot.stopped and (fold.index, slot.name) not in self.announced:
                self.announced.add((fold.index, slot.name))
                self._print(f"izitorch: {slot.name} stopped: {slot.stopped}")

    @hookimpl
    def izitorch_fold_finish(self, run, fold) -> None:
        if fold.stop_reason:
            self._print(f"izitorch: fold {fold.index + 1} stopped: {fold.stop_reason}")

    @hookimpl
    def izitorch_run_finish(self, run, results) -> None:
        parameters = {s.name: s.parameter_count() for s in run.slots}
        self._print(comparison_table(results, parameters, metric_directions(run), headline(run.task)))
        self._print(f"izitorch: results in {run.res_dir}")
