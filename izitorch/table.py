"""The comparison table of a run's final test scores: what the console prints at the end of a run
and ``izitorch report`` prints from ``results.json``. Rendering only: it holds no state.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

#: The headline metrics, in the order shown, with their labels and formats.
COLUMNS = (("loss", "loss", "{:.4f}"), ("accuracy", "acc %", "{:.2f}"), ("IoU", "IoU", "{:.4f}"))
#: Directions of the built-in metrics, for a table read back without them (older results.json).
BUILTIN_DIRECTIONS = {"loss": "lower", "accuracy": "higher", "IoU": "higher"}
#: Scalar entries of the scores that are not metrics.
NOT_METRICS = ("epoch", "folds", "skipped_batches")
OTHER_FORMAT = "{:.4f}"
#: Balanced and top-k accuracy are percentages, as accuracy is.
PERCENT_FORMAT = "{:.2f}"


def is_metric(key: str, value: Any) -> bool:
    """Whether a scores entry is a metric's scalar value (not a time, a count or a matrix)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("_time") and key not in NOT_METRICS


def columns(keys: Iterable[str], directions: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(key, label, format)`` of each metric among ``keys``: the headline ones first, then
    the others in the order given, marked ``↓`` where lower is better."""
    keys = list(dict.fromkeys(keys))
    shown = [column for column in COLUMNS if column[0] in keys]
    headline = {key for key, _, _ in COLUMNS}
    shown += [
        (key, key + ("↓" if directions.get(key) == "lower" else ""), PERCENT_FORMAT if key.endswith("accuracy") else OTHER_FORMAT)
        for key in keys
        if key not in headline
    ]
    return shown


def comparison_table(
    results: dict[str, list[dict]], parameters: dict[str, int] | None = None, directions: dict[str, str] | None = None, headline: str | None = None
) -> str:
    """Final test scores per model (mean ± std over folds), one row per model, best first: by
    ``headline`` (the task's metric, :mod:`izitorch.tasks`) when the scores have it, else by
    accuracy when there is one, else by the first other metric in its direction
    (``directions``, value name -> "higher" / "lower"; the built-in metrics' by default)."""
    parameters = parameters or {}
    directions = {**BUILTIN_DIRECTIONS, **(directions or {})}
    shown = columns([key for folds in results.values() for fold in folds for key, value in fold.items() if is_metric(key, value)], directions)
    header = ["model", "params", "folds"] + [label for _, label, _ in shown]
    rows = []
    ranked = ([headline] if headline in directions else []) + [key for key, _, _ in shown if key != "loss" and key in directions] + ["loss"]
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
