"""izitorch under torchrun: a run on 2 processes against the same run in 1 process.

    python benchmarks/torchrun.py            # every case (a few minutes on a 2-core CPU)
    python benchmarks/torchrun.py --quick    # fewer epochs, for a smoke test

Each case is one manifest launched as ``torchrun --standalone --nproc_per_node=N -m izitorch run``,
N = 1 then 2, each process on one thread (``OMP_NUM_THREADS=1``), with the default plugins
(trainlog, checkpoint: the files written).

Sweep:  ``distributed = "models"``, 8 MLPs of different widths (64-h-h-10, h from 96 to 320) on
        digits: 8 units of work.
K-fold: ``distributed = "models"``, one MLP 64-512-512-10, 4-fold cross-validation: 4 units.
Data:   ``distributed = "data"``, one CNN (``SmallCNN``, 48 and 96 channels of 3x3 convolutions on
        the 8x8 digits: 57 k parameters, most of its time in compute), SGD, a step of 256
        samples (1,536 training samples): one process of batch 256 against two of batch 128.

Times are wall clock from launch to exit, so they include each process's start (importing torch,
building every model, the dry run). The speed-up is the 1-process time over the 2-process time;
"same scores" checks that both runs wrote the same ``results.json`` (the times in it aside):
exactly for ``"models"``, within 1e-4 for ``"data"`` (its gradients are summed in another order).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SWEEP_WIDTHS = (96, 128, 160, 192, 224, 256, 288, 320)
TIMES = {"train_step_time", "inference_time", "train_time", "eval_time"}


def sweep_manifest(epochs: int, processes: int) -> str:
    models = "\n".join(
        f'[[models]]\nname = "mlp{h}"\nmodel = "izitorch.models:MLP"\nparams = {{ hidden = {h}, layers = 2 }}\n'
        f'optimizer = {{ class = "torch.optim:Adam", lr = 1e-3 }}\n'
        for h in SWEEP_WIDTHS
    )
    return f"{run_table(epochs)}\n{models}"


def kfold_manifest(epochs: int, processes: int) -> str:
    model = '[[models]]\nname = "mlp512"\nmodel = "izitorch.models:MLP"\nparams = { hidden = 512, layers = 2 }\noptimizer = { class = "torch.optim:Adam", lr = 1e-3 }\n'
    return f"{run_table(epochs)}\n{model}\n[plugins.kfold]\nk = 4\n"


def data_manifest(epochs: int, processes: int) -> str:
    model = '[[models]]\nname = "cnn48"\nmodel = "izitorch.models:SmallCNN"\nparams = { channels = 48 }\noptimizer = { class = "torch.optim:SGD", lr = 0.05 }\n'
    # 1,536 training samples, 6 steps of 256: no padding, so both runs see the same batches
    return f"{run_table(epochs, 'data', 256 // processes)}train_ratio = 0.8548\n\n{model}"


def run_table(epochs: int, strategy: str = "models", batch_size: int = 32) -> str:
    return (
        f'[run]\nres_dir = "res"\nepochs = {epochs}\nbatch_size = {batch_size}\ndisplay_step = 100000\ndistributed = "{strategy}"\n\n'
        '[data]\ndataset = "izitorch.datasets:digits"\nnum_classes = 10\n'
    )


def launch(folder: Path, manifest: str, processes: int) -> tuple[float, dict]:
    """Run ``manifest`` under torchrun with ``processes`` processes; its wall time and scores."""
    work = folder / f"n{processes}"
    work.mkdir()
    (work / "m.toml").write_text(manifest)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "izitorch", "run", "m.toml"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"torchrun with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    return seconds, scores(work / "res" / "results.json")


def scores(path: Path) -> dict:
    """``results.json`` without the times, which differ from run to run."""

    def strip(value):
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key not in TIMES}
        return value

    return strip(json.loads(path.read_text()))


def close(one, two, tolerance: float) -> bool:
    """Whether two results tables match, numbers within ``tolerance`` (relative)."""
    if isinstance(one, dict) and isinstance(two, dict):
        return one.keys() == two.keys() and all(close(one[key], two[key], tolerance) for key in one)
    if isinstance(one, list) and isinstance(two, list):
        return len(one) == len(two) and all(close(a, b, tolerance) for a, b in zip(one, two))
    if isinstance(one, float) and isinstance(two, float):
        return math.isclose(one, two, rel_tol=tolerance, abs_tol=tolerance)
    return one == two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--cases", default="sweep,kfold,data", help="which cases to run: sweep, kfold, data")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU core(s), one thread per process, wall time\n")
    cases = {
        name: case
        for name, case in {
            "sweep": ('"models": sweep of 8 MLPs', sweep_manifest, 0.0),
            "kfold": ('"models": 4-fold, one MLP', kfold_manifest, 0.0),
            "data": ('"data": one CNN', data_manifest, 1e-4),
        }.items()
        if name in args.cases.split(",")
    }
    epochs = 2 if args.quick else 60
    rows = []
    for label, manifest, tolerance in cases.values():
        with tempfile.TemporaryDirectory() as tmp:
            one_s, one = launch(Path(tmp), manifest(epochs, 1), 1)
            two_s, two = launch(Path(tmp), manifest(epochs, 2), 2)
        rows.append((label, epochs, one_s, two_s, one_s / two_s, "yes" if close(one, two, tolerance) else "NO"))
    header = ("case", "epochs", "1 process s", "2 processes s", "speed-up", "same scores")
    cells = [header] + [(r[0], str(r[1]), f"{r[2]:.1f}", f"{r[3]:.1f}", f"{r[4]:.2f}", r[5]) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print("under torchrun, 1 against 2 processes (speed-up = 1-process time / 2-process time)")
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    main()
