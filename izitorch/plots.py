"""``izitorch report --plots``: PNG figures of a run in ``RES_DIR/plots/`` (matplotlib, an extra).

- ``learning_curves.png``: the loss and the ranking metric per epoch, training and evaluated
  phase, every model on one figure; with folds, the mean over folds with a band from the lowest
  to the highest fold.
- ``confusion_<model>.png``: each classifier's confusion matrix over its folds, each row
  normalised to the share of that true class.
- ``per_class.png``: each classifier's per-class F1 (mean over folds).
- ``sweep_<key>.png``: for a sweep, the ranking metric against each swept value, one point per
  model (mean over folds and seeds).

Figures are drawn on ``matplotlib.figure.Figure`` objects, not ``pyplot``: no global state and
no display needed. Each function returns what it plotted, so tests compare it with the report.
A file in ``plots/`` is only ever (re)written when the report wrote it before (listed in
``plots/.izitorch``) or when it does not exist: a file of the user's is never replaced.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from izitorch.errors import IzitorchError
from izitorch.results import Results, model_folder, per_class

LEDGER = ".izitorch"


def matplotlib_figure() -> Any:
    """``matplotlib.figure.Figure``, or one line naming the extra to install."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise IzitorchError('plots need matplotlib: pip install "izitorch[plots]"', "--plots") from None
    return Figure


def write_plots(results: Results, report: dict[str, Any]) -> dict[str, Any]:
    """Write every figure that applies into ``res_dir/plots``; return ``{file name: plotted data}``."""
    Figure = matplotlib_figure()
    folder = results.res_dir / "plots"
    owned = _owned(folder)
    plotted: dict[str, Any] = {}
    rank = report["metric"]
    figures = [("learning_curves.png", learning_curves(Figure, results, rank))]
    for name in [row["name"] for row in results.models]:
        matrix = confusion(results, name)
        if matrix is not None:
            figures.append((f"confusion_{_safe(name)}.png", confusion_figure(Figure, name, matrix)))
    per_class_scores = {name: scores["F1"] for name, scores in per_class(results).items() if "F1" in scores}
    if per_class_scores:
        figures.append(("per_class.png", per_class_figure(Figure, per_class_scores)))
    for key in dict.fromkeys(key for model in report["models"] for key in model["sweep"]):
        figures.append((f"sweep_{_safe(key)}.png", sweep_figure(Figure, report, key, rank)))
    for file, (figure, data) in figures:
        path = folder / file
        if path.exists() and file not in owned:
            raise IzitorchError(f"{path} is not a figure izitorch wrote: move it away, or leave out --plots", "--plots")
        folder.mkdir(exist_ok=True)
        owned.add(file)
        (folder / LEDGER).write_text("\n".join(sorted(owned)) + "\n", encoding="utf-8")
        figure.savefig(path, dpi=100)
        plotted[file] = data
    return plotted


def _owned(folder: Path) -> set[str]:
    ledger = folder / LEDGER
    return set(ledger.read_text(encoding="utf-8").split()) if ledger.is_file() else set()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", name)


# -- the figures ----------------------------------------------------------------------------------


def curves(results: Results, metric: str) -> dict[tuple[str, str], dict[str, list[float]]]:
    """``{(model, phase): {"epoch", "mean", "low", "high"}}`` of ``metric`` over the folds."""
    by_point: dict[tuple[str, str], dict[int, list[float]]] = {}
    for row in results.epochs:
        if row["metric"] == metric:
            by_point.setdefault((row["model"], row["phase"]), {}).setdefault(row["epoch"], []).append(row["value"])
    out = {}
    for key, points in by_point.items():
        epochs = sorted(points)
        out[key] = {
            "epoch": epochs,
            "mean": [float(np.mean(points[e])) for e in epochs],
            "low": [float(np.min(points[e])) for e in epochs],
            "high": [float(np.max(points[e])) for e in epochs],
        }
    return out


def learning_curves(Figure: Any, results: Results, rank: str) -> tuple[Any, dict]:
    metrics = ["loss"] + ([rank] if rank != "loss" else [])
    figure = Figure(figsize=(6 * len(metrics), 4.5), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    data = {}
    for axis, metric in zip(axes, metrics):
        lines = curves(results, metric)
        data[metric] = lines
        colours = {name: f"C{index % 10}" for index, name in enumerate(dict.fromkeys(name for name, _ in lines))}
        for (name, phase), line in sorted(lines.items()):
            style = "-" if phase == "train" else "--"
            axis.plot(line["epoch"], line["mean"], style, color=colours[name], label=f"{name} ({phase})")
            if line["low"] != line["high"]:
                axis.fill_between(line["epoch"], line["low"], line["high"], color=colours[name], alpha=0.15)
        axis.set_xlabel("epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylabel(metric)
        axis.set_title(f"{metric}: training (solid) and evaluated (dashed)")
        if len(lines) <= 16:
            axis.legend(fontsize="small")
    return figure, data


def confusion(results: Results, name: str) -> np.ndarray | None:
    """``name``'s confusion matrix summed over its folds, or None (not a classifier)."""
    total = None
    for fold in range(1, len(results.splits) + 1):
        path = model_folder(results, name, fold) / "confusion_matrix.pkl"
        if not path.is_file():
            continue
        with path.open("rb") as handle:
            matrix = np.asarray(_NumpyUnpickler(handle).load(), dtype=np.int64)
        total = matrix if total is None else total + matrix
    return total


class _NumpyUnpickler(pickle.Unpickler):
    """A numpy array and nothing else: the matrix is read without running what a file names."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a confusion matrix")


def confusion_figure(Figure: Any, name: str, matrix: np.ndarray) -> tuple[Any, np.ndarray]:
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(5, 4.5), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(shares, vmin=0.0, vmax=1.0, cmap="Blues")
    figure.colorbar(image, ax=axis, label="share of the true class")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{name}: confusion matrix")
    return figure, shares


def per_class_figure(Figure: Any, scores: dict[str, list[float]]) -> tuple[Any, dict]:
    classes = max(len(values) for values in scores.values())
    figure = Figure(figsize=(max(6, classes * 0.6), 4.5), layout="constrained")
    axis = figure.subplots()
    width = 0.8 / len(scores)
    for index, (name, values) in enumerate(scores.items()):
        axis.bar(np.arange(len(values)) + index * width, values, width, label=name)
    axis.set_xticks(np.arange(classes) + 0.4 - width / 2, [str(c) for c in range(classes)])
    axis.set_xlabel("class")
    axis.set_ylabel("F1")
    axis.set_ylim(0, 1)
    if len(scores) <= 16:
        axis.legend(fontsize="small")
    return figure, scores


def sweep_figure(Figure: Any, report: dict[str, Any], key: str, rank: str) -> tuple[Any, dict]:
    points = [(model["sweep"][key], model["metrics"][rank]["mean"]) for model in report["models"] if key in model["sweep"] and rank in model["metrics"]]
    numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value, _ in points)
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axis = figure.subplots()
    if numeric:
        axis.scatter([value for value, _ in points], [score for _, score in points])
        if min(value for value, _ in points) > 0 and max(value for value, _ in points) / min(value for value, _ in points) >= 100:
            axis.set_xscale("log")
    else:
        labels = list(dict.fromkeys(str(value) for value, _ in points))
        axis.scatter([labels.index(str(value)) for value, _ in points], [score for _, score in points])
        axis.set_xticks(range(len(labels)), labels)
    axis.set_xlabel(key)
    axis.set_ylabel(f"{rank} (mean over folds and seeds)")
    return figure, {"x": [value for value, _ in points], "y": [score for _, score in points]}
