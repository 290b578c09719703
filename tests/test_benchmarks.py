"""The benchmark scripts keep running: ``run.py`` reports timings (never asserted), accuracies,
and in case 1 whether izitorch's weights equal those of the hand-written loops that draw its
batches; ``profile_step.py`` still finds every part of the engine it times."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_prints_every_case_with_accuracies():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--ks", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for title in ("case 1: one MLP", "case 2: K models", "case 3: 5-fold cross-validation"):
        assert title in out
    case1 = out.split("case 1:", 1)[1].split("\n\n", 1)[0].splitlines()[3:]  # title, header, rule
    runners = [line.split("  ")[0] for line in case1]
    assert runners == [
        "hand-written, DataLoader",
        "hand-written, tensor indexing",
        "izitorch, default plugins",
        "izitorch, no output plugins",
        "izitorch, default plugins",
    ], case1
    assert [line.split()[-1] for line in case1] == ["identical", "reference", "identical", "identical", "identical"], case1
    assert len({line.split()[-2] for line in case1}) == 1  # the same weights reach the same test accuracy
    case2 = out.split("case 2:", 1)[1].split("\n\n", 1)[0].splitlines()
    row = case2[3].split()  # header, header, rule, K = 2
    assert row[0] == "2"
    accuracies = [float(value) for value in row[-4:]]  # loops, sequential, vectorized, reference
    assert all(20.0 < value <= 100.0 for value in accuracies), row
    assert abs(accuracies[1] - accuracies[2]) < 1.0  # vectorized reaches what sequential reaches


# The rows of profile_step.py's tables, by how each begins: every component of a training step,
# of its ablation, of an eval pass, and of a run. A part the engine renamed or dropped prints "n/a", or fails.
STEP_ALONE = [
    "batch assembly: ",
    "cohort.batches: ",
    "to_device ",
    "LoneStack forward/losses: ",
    "StackPass._guard: ",
    "StackPass._train bookkeeping ",
    "meters: update ",
    "meters: compute ",
    "StackPass: made ",
    "izitorch_batch_finish: the console",
    "izitorch_batch_finish: member_losses",
    "sum of the components",
    "izitorch's training pass beyond",
]
STEP_OFF = [
    "izitorch's training pass",
    *STEP_ALONE[:6],
    "meters: update per step, compute",
    "izitorch_batch_finish: ",
    "loss.item() finiteness check",
    "what is left",
    "hand-written pass",
]
EVAL_PARTS = [
    "the hand-written test pass",
    "izitorch's eval pass, whole",
    "reading the batches",
    "forward ",
    "the loss of each batch",
    "meters: update per batch",
    "meters: compute ",
]
RUN_PARTS = [
    "training passes beyond",
    "each epoch's eval pass",
    "resume state after each epoch",
    "izitorch_epoch_start hooks",
    "izitorch_epoch_finish hooks",
    "izitorch_should_stop hooks",
    "set-up beyond",
    "after the epochs",
    "sum of the above",
    "whole-run overhead",
]


def tables(out: str) -> list[tuple[str, list[list[str]]]]:
    """Each table of the output as (title, rows of cells): cells are separated by two spaces or more."""
    found = []
    for block in out.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if len(lines) > 3 and set(lines[2].replace(" ", "")) == {"-"}:
            found.append((lines[0], [re.split(r"\s{2,}", line.strip()) for line in lines[3:]]))
    return found


def test_quick_profile_times_every_component_on_both_paths():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--quick", "--ablation"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "Traceback" not in out + done.stderr
    assert len(re.findall(r"^== (in-memory|per-sample) data, 2 epochs x 45 steps: .* izitorch adds -?\d+ us per step$", out, re.M)) == 2, out
    found = tables(out)
    expected = [STEP_ALONE, STEP_OFF, EVAL_PARTS, RUN_PARTS] * 2  # in-memory, then per-sample
    assert len(found) == len(expected), out
    for (title, rows), begins in zip(found, expected):
        assert len(rows) == len(begins), (title, rows)
        for row, begin in zip(rows, begins):
            assert row[0].startswith(begin), (title, row)
            for cell in row[1:]:
                assert cell != "n/a", (title, row)  # a part of the engine the script did not find
                assert math.isfinite(float(cell)), (title, row)
