"""``izitorch report``: compare the models of one or more runs, and say whether the lead is real.

Built on :func:`izitorch.results.load`. Each model gets its final test scores as mean ± std over
folds, its parameter count, the epochs scored, its training time per epoch (CPU runs) and its
sweep values, ranked by the headline
metric (the task's, or ``--metric``). The best model is then compared with each other model of
the same run by a paired test on that metric:

- over k >= 2 folds, the corrected resampled t-test of Nadeau and Bengio (2003): the per-fold
  differences ``d`` give ``t = mean(d) / sqrt((1 / k + n_test / n_train) * var(d))`` with k - 1
  degrees of freedom. The ``n_test / n_train`` term accounts for the folds' training sets
  overlapping, which makes a plain paired t-test far too confident.
- on a holdout (one fold) of a classification, McNemar's exact test on the test samples that
  one model classifies right and the other wrong (``test_predictions.json``, see
  :mod:`izitorch.predictions`); each model also gets a bootstrap interval of its accuracy.

A p-value is the chance of a lead at least this large if the two models were equally good on
data like this; it says nothing about data unlike it, and with many models compared some small
p-values come by chance.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

import numpy as np
from scipy import stats

from izitorch.errors import IzitorchError, did_you_mean
from izitorch.results import Results, load, per_class, predictions, spread
from izitorch.table import BUILTIN_DIRECTIONS, columns, is_metric

FORMATS = ("table", "markdown", "csv", "json")
#: The version of ``--format json``'s schema (documented in the README).
SCHEMA = 1


def build(res_dirs: Sequence[str], metric: str | None = None, by_class: bool = False) -> dict[str, Any]:
    """The report of the runs in ``res_dirs`` as ``--format json`` writes it; ``by_class``: each
    classifier's per-class scores too (``per_class``: precision, recall, F1, IoU per class)."""
    runs = [load(res_dir, frames=False) for res_dir in res_dirs]
    directions = dict(BUILTIN_DIRECTIONS)
    for run in runs:
        directions.update(run.directions)
    models = [_entry(run, name, rows, len(runs) > 1, by_class) for run in runs for name, rows in _replica_groups(run.models).items()]
    for run in runs:
        for model in models:
            if model["run"] == str(run.res_dir) and len(run.splits) == 1:
                model["accuracy_interval"] = accuracy_interval(_recorded(run, model))
    rank = _rank_metric(metric, runs, models, directions)
    lower = directions.get(rank) == "lower"
    scored = [model for model in models if rank in model["metrics"]]
    scored.sort(key=lambda model: model["metrics"][rank]["mean"] * (1 if lower else -1))
    ordered = scored + [model for model in models if rank not in model["metrics"]]
    comparisons = _comparisons(ordered, runs, rank)
    return {
        "schema": SCHEMA,
        "metric": rank,
        "direction": directions.get(rank),
        "directions": {key: value for key, value in directions.items() if any(key in model["metrics"] for model in models)},
        "models": ordered,
        "comparisons": comparisons,
    }


def _entry(run: Results, name: str, rows: list[dict], several: bool, by_class: bool) -> dict[str, Any]:
    """One row of the report: a model, or a sweep's replicas (``rows``) pooled over seeds and folds."""
    folds = [fold for fold in run.folds if fold["model"] in {row["name"] for row in rows}]
    metrics = {}
    for key in dict.fromkeys(key for fold in folds for key in fold if key not in ("model", "fold", "epoch") and is_metric(key, fold[key])):
        per_fold: dict[int, list[float]] = {}
        for fold in folds:
            if key in fold:
                per_fold.setdefault(fold["fold"], []).append(float(fold[key]))
        values = [float(fold[key]) for fold in folds if key in fold]
        ((mean, std),) = spread({key: values}).values()
        metrics[key] = {"mean": mean, "std": std, "values": values, "fold_means": [math.fsum(v) / len(v) for _, v in sorted(per_fold.items())]}
    replicas = "seed" in rows[0]["sweep"]
    times = [float(fold["train_time"]) for fold in folds if "train_time" in fold]
    scores = per_class(run, [row["name"] for row in rows]).get(rows[0]["name"]) if by_class else None
    return {
        "name": f"{run.res_dir.name}/{name}" if several else name,
        "run": str(run.res_dir),
        "params": rows[0]["params"],
        "sweep": {key: value for key, value in rows[0]["sweep"].items() if key != "seed"},
        "seeds": len(rows) if replicas else None,
        "replicas": [row["name"] for row in rows] if replicas else None,
        "folds": max((row["folds"] for row in rows), default=0),
        "epochs": [epoch for row in rows for epoch in row["epochs"]],
        "train_time": math.fsum(times) / len(times) if times else None,  # seconds per epoch
        "metrics": metrics,
        **({"per_class": scores} if scores else {}),
    }


def _replica_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """The models of one run, the replicas of a sweep (``seeds = N``) gathered under their name
    without ``_s<seed>``: their scores are pooled over seeds and folds."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        seed = row["sweep"].get("seed")
        suffix = f"_s{seed}"
        name = row["name"][: -len(suffix)] if seed is not None and row["name"].endswith(suffix) else row["name"]
        groups.setdefault(name, []).append(row)
    return groups


def _rank_metric(metric: str | None, runs: list[Results], models: list[dict], directions: dict[str, str]) -> str:
    present = list(dict.fromkeys(key for model in models for key in model["metrics"]))
    if metric is not None:
        aliases = {"acc": "accuracy", "iou": "IoU", "f1": "F1", "r2": "R2"}
        metric = aliases.get(metric, metric)
        if metric not in present:
            raise IzitorchError(f'"{metric}" is not among the run\'s final scores ({", ".join(present) or "none"}){did_you_mean(metric, present)}', "--metric")
        return metric
    for candidate in [run.headline for run in runs] + ["accuracy", "loss"]:
        if candidate in present:
            return candidate
    if not present:
        raise IzitorchError("no model has final test scores yet: the run has not finished a fold", source=str(runs[0].res_dir))
    return present[0]


def _comparisons(models: list[dict], runs: list[Results], rank: str) -> list[dict]:
    """The best model of each run against every other model of that run on ``rank``: over the
    folds, or on a holdout's per-sample predictions."""
    out = []
    for run in runs:
        own = [model for model in models if model["run"] == str(run.res_dir) and rank in model["metrics"]]
        if len(own) < 2:
            continue
        best = own[0]
        for other in own[1:]:
            if len(run.splits) > 1:
                test = corrected_t_test(best, other, rank, run.splits)
            else:
                test = mcnemar(_recorded(run, best), _recorded(run, other))
            out.append({"best": best["name"], "other": other["name"], **test})
    return out


def _recorded(run: Results, model: dict) -> dict[str, list[int]] | None:
    """A lone model's holdout predictions (replicas pooled over seeds have no single record)."""
    return None if model["replicas"] else predictions(run, model["name"].split("/")[-1])


def mcnemar(best: dict[str, list[int]] | None, other: dict[str, list[int]] | None) -> dict[str, Any]:
    """McNemar's exact test on the test samples one model classifies right and the other wrong
    (a two-sided binomial test of those counts against one half)."""
    if best is None or other is None or best["target"] != other["target"]:
        return {"test": "none (no paired predictions)", "difference": None, "t": None, "p": None}
    right_a = np.equal(best["predicted"], best["target"])
    right_b = np.equal(other["predicted"], other["target"])
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return {"test": "McNemar", "difference": 100.0 * (only_a - only_b) / len(right_a), "only_best_right": only_a, "only_other_right": only_b, "t": None, "p": p}


def accuracy_interval(record: dict[str, list[int]] | None, level: float = 0.95) -> list[float] | None:
    """The percentile bootstrap interval of the test accuracy (%), computed exactly: the number
    of right answers in a resample of the n test samples is binomial (n, accuracy)."""
    if not record or not record["target"]:
        return None
    n = len(record["target"])
    accuracy = float(np.mean(np.equal(record["predicted"], record["target"])))
    low, high = stats.binom.ppf([(1 - level) / 2, (1 + level) / 2], n, accuracy)
    return [100.0 * float(low) / n, 100.0 * float(high) / n]


def corrected_t_test(best: dict, other: dict, rank: str, splits: list[dict[str, int]]) -> dict[str, Any]:
    """Nadeau and Bengio's corrected resampled t-test on the per-fold differences ``best - other``
    (of the means over seeds, for replicas)."""
    a, b = best["metrics"][rank]["fold_means"], other["metrics"][rank]["fold_means"]
    k = min(len(a), len(b))
    if k < 2 or len(a) != len(b):
        return {"test": "none (one fold)" if k < 2 else "none (unequal folds)", "difference": None, "t": None, "p": None}
    differences = [x - y for x, y in zip(a, b)]
    mean = math.fsum(differences) / k
    variance = math.fsum((d - mean) ** 2 for d in differences) / (k - 1)
    ratio = sum(split.get("test", 0) for split in splits[:k]) / max(1, sum(split.get("train", 0) for split in splits[:k]))
    if variance == 0.0:
        t, p = (0.0, 1.0) if mean == 0.0 else (None, 0.0)  # the same lead on every fold: t is infinite
    else:
        t = mean / math.sqrt((1.0 / k + ratio) * variance)
        p = float(2 * stats.t.sf(abs(t), k - 1))
    return {"test": "corrected resampled t-test", "difference": mean, "t": t, "p": p}


# -- rendering ----------------------------------------------------------------------------------


def render(report: dict[str, Any], fmt: str) -> str:
    """``report`` as ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return json.dumps(report, indent=2, allow_nan=False, default=str)
    if fmt == "csv":
        return _csv(report)
    header, rows = _rows(report)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + _footnote(report)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip(), "  ".join("-" * width for width in widths)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + _footnote(report)


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = list(dict.fromkeys(key for model in report["models"] for key in model["metrics"]))
    shown = columns(keys, report["directions"])
    p_values = {comparison["other"]: comparison for comparison in report["comparisons"]}
    intervals = any(model.get("accuracy_interval") for model in report["models"])
    header = ["model", "params", "folds", "epoch", "s/epoch"] + [label for _, label, _ in shown] + (["95% CI acc %"] if intervals else [])
    header.append(f"p vs best ({report['metric']})")
    rows = []
    for model in report["models"]:
        name = model["name"] + (f" ({model['seeds']} seeds)" if model["seeds"] else "")
        row = [
            name,
            f"{model['params']:,}" if isinstance(model["params"], int) else "-",
            str(model["folds"]),
            _epochs(model["epochs"]),
            _seconds(model["train_time"]),
        ]
        for key, _, fmt in shown:
            entry = model["metrics"].get(key)
            if entry is None:
                row.append("-")
            elif len(entry["values"]) > 1:
                row.append(f"{fmt.format(entry['mean'])} ± {fmt.format(entry['std'])}")
            else:
                row.append(fmt.format(entry["mean"]))
        if intervals:
            interval = model.get("accuracy_interval")
            row.append(f"{interval[0]:.2f}-{interval[1]:.2f}" if interval else "-")
        comparison = p_values.get(model["name"])
        if comparison is None:
            row.append("best" if any(c["best"] == model["name"] for c in report["comparisons"]) else "-")
        else:
            row.append("-" if comparison["p"] is None else f"{comparison['p']:.3g}")
        rows.append(row)
    return header, rows


def per_class_tables(report: dict[str, Any], fmt: str) -> str:
    """``--per-class``: one table per classifier, a row per class (table and markdown formats)."""
    out = []
    for model in report["models"]:
        scores = model.get("per_class")
        if not scores:
            continue
        metrics = [metric for metric in ("precision", "recall", "F1", "IoU") if metric in scores]
        header = ["class", *metrics]
        rows = [[str(index), *(f"{scores[metric][index]:.4f}" for metric in metrics)] for index in range(len(scores[metrics[0]]))]
        if fmt == "markdown":
            lines = [f"\n{model['name']}, per class:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
            lines = [f"\n{model['name']}, per class:", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
            lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        out.append("\n".join(lines))
    return "\n".join(out)


def _csv(report: dict[str, Any]) -> str:
    """One row per model with full-precision numbers: ``<metric>_mean`` and ``<metric>_std``."""
    keys = list(dict.fromkeys(key for model in report["models"] for key in model["metrics"]))
    sweeps = list(dict.fromkeys(key for model in report["models"] for key in model["sweep"]))
    p_values = {comparison["other"]: comparison["p"] for comparison in report["comparisons"]}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "params", "folds", "seeds", "train_time", *sweeps, *(f"{key}_{part}" for key in keys for part in ("mean", "std")), "p_vs_best"])
    for model in report["models"]:
        scores = [model["metrics"].get(key, {}).get(part, "") for key in keys for part in ("mean", "std")]
        sweep = [model["sweep"].get(key, "") for key in sweeps]
        p = p_values.get(model["name"], "")
        writer.writerow(
            [
                model["name"],
                model["params"] if model["params"] is not None else "",
                model["folds"],
                model["seeds"] or "",
                "" if model["train_time"] is None else model["train_time"],
                *sweep,
                *scores,
                "" if p is None else p,
            ]
        )
    return buffer.getvalue().rstrip("\n")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _epochs(epochs: list[Any]) -> str:
    known = [str(epoch) for epoch in epochs if isinstance(epoch, int)]
    return "-" if not known else known[0] if len(set(known)) == 1 else ",".join(known)


def _footnote(report: dict[str, Any]) -> str:
    tests = {comparison["test"] for comparison in report["comparisons"]}
    lines = []
    if "corrected resampled t-test" in tests:
        lines.append(
            f"p: corrected resampled t-test (Nadeau & Bengio) of the best model's {report['metric']} against each other model's over the folds; "
            "small p: the lead is unlikely to be noise"
        )
    if "McNemar" in tests:
        lines.append("p: McNemar's exact test on the test samples one model classifies right and the other wrong; small p: the lead is unlikely to be noise")
    if any(model.get("accuracy_interval") for model in report["models"]):
        lines.append("95% CI acc %: percentile bootstrap interval of the test accuracy over the test samples")
    if tests - {"corrected resampled t-test", "McNemar"}:
        lines.append("p -: no paired test (one fold without per-sample predictions, or replicas pooled over seeds)")
    return "".join("\n" + line for line in lines)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise IzitorchError(f'expected one of {", ".join(FORMATS)}, got "{fmt}"', "--format")
    return fmt
