"""The comparison table of a run's final test scores: what the console prints at the end of a run
and ``izitorch report`` prints from ``results.json``. Rendering only: it holds no state.
"""
from __future__ import annotations

import numpy as np

# The scores shown, in order: (key in the scores, column header, format of one value).
COLUMNS = (("loss", "loss", "{:.4f}"), ("accuracy", "acc %", "{:.2f}"), ("IoU", "IoU", "{:.4f}"))


def comparison_table(results: dict[str, list[dict]], parameters: dict[str, int] | None = None) -> str:
    """Final test scores per model (mean ± std over folds), one row per model, best first."""
    parameters = parameters or {}
    header = ["model", "params", "folds"] + [label for _, label, _ in COLUMNS]
    rows = []
    order = {name: -float(np.mean([f.get("accuracy", 0.0) for f in folds] or [0.0])) for name, folds in results.items()}
    for name, folds in sorted(results.items(), key=lambda item: order[item[0]]):
        row = [name, f"{parameters[name]:,}" if name in parameters else "-", str(len(folds))]
        for key, _, fmt in COLUMNS:
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
