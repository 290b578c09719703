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
from collections.abc import Callable, Iterable
from typing import Any

from tqdm import tqdm

from izitorch import hookimpl
from izitorch.metrics import metric_directions
from izitorch.streams import say, silence

#: The headline metrics, in the order shown, with their labels and formats.
COLUMNS = (("loss", "loss", "{:.4f}"), ("accuracy", "acc %", "{:.2f}"), ("IoU", "IoU", "{:.4f}"))
#: Directions of the built-in metrics, for a table read back without them (older results.json).
BUILTIN_DIRECTIONS = {"loss": "lower", "accuracy": "higher", "IoU": "higher"}
#: Scalar entries of the scores that are not metrics.
NOT_METRICS = ("epoch", "folds", "skipped_batches")
OTHER_FORMAT = "{:.4f}"


def is_metric(key: str, value: Any) -> bool:
    """Whether a scores entry is a metric's scalar value (not a time, a count or a matrix)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("_time")
            and key not in NOT_METRICS)


def columns(keys: Iterable[str], directions: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(key, label, format)`` of each metric among ``keys``: the headline ones first, then
    the others in the order given, marked ``↓`` where lower is better."""
    keys = list(dict.fromkeys(keys))
    shown = [column for column in COLUMNS if column[0] in keys]
    headline = {key for key, _, _ in COLUMNS}
    shown += [(key, key + ("↓" if directions.get(key) == "lower" else ""), OTHER_FORMAT) for key in keys if key not in headline]
    return shown


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
        options = {"total": len(fold.loaders["train"]), "desc": f"{label}epoch {epoch}/{run.config.run.epochs}",
                   "leave": False, "file": sys.stderr, "dynamic_ncols": True}
        try:
            self.bar = tqdm(**options, disable=True if self.bar_gone or sys.stderr is None else None)
        except (OSError, ValueError):  # its first drawing failed: stderr went away
            self.bar_gone = True
            silence(sys.stderr)
            self.bar = tqdm(**options, disable=True)

    @hookimpl
    def izitorch_batch_finish(self, run, fold, step, losses) -> None:
        if fold.index == self.bar_fold:
            self._on_bar(lambda bar: bar.update(1))
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
        self._print(comparison_table(results, {s.name: s.parameter_count() for s in run.slots}, metric_directions(run)))
        self._print(f"izitorch: results in {run.res_dir}")


def comparison_table(results: dict[str, list[dict]], parameters: dict[str, int] | None = None,
                     directions: dict[str, str] | None = None) -> str:
    """Final test scores per model (mean ± std over folds), one row per model, best first: by
    accuracy when there is one, else by the first other metric in its direction (``directions``,
    value name -> "higher" / "lower"; the built-in metrics' by default)."""
    import numpy as np

    parameters = parameters or {}
    directions = {**BUILTIN_DIRECTIONS, **(directions or {})}
    shown = columns([key for folds in results.values() for fold in folds for key, value in fold.items() if is_metric(key, value)],
                    directions)
    header = ["model", "params", "folds"] + [label for _, label, _ in shown]
    rows = []
    ranked = [key for key, _, _ in shown if key != "loss" and key in directions] + ["loss"]
    rank = next((key for key in ranked if any(key in fold for folds in results.values() for fold in folds)), None)

    def order(item: tuple[str, list[dict]]) -> float:
        values = [fold[rank] for fold in item[1] if rank in fold]
        if not values:
            return float("inf")
        mean = float(np.mean(values))
        return mean if directions.get(rank) == "lower" else -mean

    for name, folds in sorted(results.items(), key=order) if rank is not None else results.items():
        row = [name, f"{parameters[name]:,}" if name in parameters else "-", str(len(folds))]
        for key, _, fmt in shown:
            values = [f[key] for f in folds if key in f]
            if not values:
                row.append("-")
            elif len(values) == 1:
                row.append(fmt.format(values[0]))
            else:
                row.append(f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values))}")
        rows.append(row)
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["final test scores:", "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)
    return "\n".join(lines)
