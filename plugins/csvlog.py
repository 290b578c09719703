"""``metrics.csv``: every epoch's scores of a run in one long table (``[plugins.csv]``, off by default).

One row per (model, fold, epoch, phase, metric) with its value, the layout pandas reads and
pivots (``pandas.read_csv("res/metrics.csv")``): the training pass's values (``phase =
"train"``, with the learning rate as ``lr``) and the evaluated set's (``val`` or ``test``).
Folds are 1-based; timings (``*_time``) are rows too.

Rows are only ever added. The file is written whole (atomically, with the run's other files),
grouped by fold in the order the epochs finished, so that it stays consistent after a kill -9
and ``--resume``: each fold's rows are part of its resume state, and a fold that resumes or
starts again replaces what the interrupted run had written of it, rows of finished folds are
read back from the file.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import attrs

from izitorch.hookspecs import hookimpl
from izitorch.io import write_text
from izitorch.options import plugin_options

FILE = "metrics.csv"
HEADER = ("model", "fold", "epoch", "phase", "metric", "value")


@attrs.frozen
class CsvOptions:
    """``[plugins.csv]`` has no keys: a table naming one is refused, not ignored."""


class CsvLogPlugin:
    izitorch_options = CsvOptions  # what `izitorch plugins` lists
    izitorch_single_process = True  # one log for the whole run: refused under torchrun (izitorch.runner.check_distributed)

    def __init__(self) -> None:
        self.rows: dict[int, list[str]] = {}  # by fold index: its lines, in order
        self.earlier: dict[int, list[str]] = {}  # folds an interrupted run finished, read back from the file

    @hookimpl
    def izitorch_configure(self, config) -> None:
        plugin_options(config, "csv", CsvOptions)

    @hookimpl
    def izitorch_run_start(self, run) -> None:
        self.rows = {}
        path = run.res_dir / FILE
        self.earlier = _read(path.read_text(encoding="utf-8")) if path.is_file() else {}  # the run's own file: a resume

    @hookimpl
    def izitorch_fold_start(self, run, fold) -> None:
        self.rows[fold.index] = []  # trained again, or restored from its state (izitorch_load_state_dict)

    @hookimpl
    def izitorch_epoch_finish(self, run, fold, epoch, scores) -> None:
        lines = self.rows.setdefault(fold.index, [])
        for slot in fold.slots:
            phases = scores[slot.name] if slot.name in scores.values else {}
            for phase, values in phases.items():
                for metric, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        lines.append(_line(slot.name, fold.index + 1, epoch, phase, metric, value))
            if slot.name in scores.lrs:
                lines.append(_line(slot.name, fold.index + 1, epoch, "train", "lr", scores.lrs[slot.name]))
        every = {**self.earlier, **self.rows}
        text = _line(*HEADER) + "".join(line for index in sorted(every) for line in every[index])
        write_text(run.res_dir / FILE, text)

    @hookimpl
    def izitorch_state_dict(self, run) -> dict[str, Any]:
        return {"csv": {"rows": {str(index): list(lines) for index, lines in self.rows.items()}}}

    @hookimpl
    def izitorch_load_state_dict(self, run, state) -> None:
        # a resume restores each fold's rows; parallel folds swap their states in and out around
        # their hooks: the longer list of a fold is the newer one (rows are only ever added)
        for index, lines in state.get("csv", {}).get("rows", {}).items():
            if len(lines) >= len(self.rows.get(int(index), [])):
                self.rows[int(index)] = list(lines)


def _line(*cells: Any) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([repr(cell) if isinstance(cell, float) else cell for cell in cells])
    return buffer.getvalue()


def _read(text: str) -> dict[int, list[str]]:
    """An earlier ``metrics.csv``'s lines by fold index (0-based), for the folds it finished."""
    folds: dict[int, list[str]] = {}
    for line in text.splitlines(keepends=True)[1:]:
        cells = next(csv.reader([line]), None)
        if cells and len(cells) == len(HEADER) and cells[1].isdigit():
            folds.setdefault(int(cells[1]) - 1, []).append(line)
    return folds
