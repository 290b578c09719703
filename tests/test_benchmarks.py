"""The benchmark script keeps running: it reports timings (never asserted), accuracies, and in
case 1 whether izitorch's weights equal those of the hand-written loops that draw its batches."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_quick_benchmark_prints_every_case_with_accuracies():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--ks", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for title in ("case 1: one MLP", "case 2: K models", "case 3: 5-fold cross-validation"):
        assert title in out
    case1 = out.split("case 1:", 1)[1].split("\n\n", 1)[0].splitlines()[3:]  # title, header, rule
    runners = [line.split("  ")[0] for line in case1]
    assert runners == ["hand-written, DataLoader", "hand-written, tensor indexing", "izitorch, default plugins",
                       "izitorch, no output plugins", "izitorch, default plugins"], case1
    assert [line.split()[-1] for line in case1] == ["identical", "reference", "identical", "identical", "identical"], case1
    assert len({line.split()[-2] for line in case1}) == 1  # the same weights reach the same test accuracy
    case2 = out.split("case 2:", 1)[1].split("\n\n", 1)[0].splitlines()
    row = case2[3].split()  # header, header, rule, K = 2
    assert row[0] == "2"
    accuracies = [float(value) for value in row[-4:]]  # loops, sequential, vectorized, reference
    assert all(20.0 < value <= 100.0 for value in accuracies), row
    assert abs(accuracies[1] - accuracies[2]) < 1.0  # vectorized reaches what sequential reaches
