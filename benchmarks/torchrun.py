"""izitorch under torchrun: a run spread over 2 processes against the same run in 1 process.

    python benchmarks/torchrun.py            # both cases (a few minutes on a 2-core CPU)
    python benchmarks/torchrun.py --quick    # fewer epochs, for a smoke test

Each case is one manifest launched as ``torchrun --standalone --nproc_per_node=N -m izitorch run``
with ``[run] distributed = "models"``, N = 1 then 2, each process on one thread
(``OMP_NUM_THREADS=1``), with the default plugins (trainlog, checkpoint: the files written).

Sweep:  8 MLPs of different widths (64-h-h-10, h from 96 to 320) on digits: 8 units of work.
K-fold: one MLP 64-512-512-10, 4-fold cross-validation: 4 units of work.

Times are wall clock from launch to exit, so they include each process's start (importing torch,
building every model, the dry run). The speed-up is the 1-process time over the 2-process time;
"same scores" checks that both runs wrote the same ``results.json`` (the times in it aside).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SWEEP_WIDTHS = (96, 128, 160, 192, 224, 256, 288, 320)
TIMES = {"train_step_time", "inference_time", "train_time", "eval_time"}


def sweep_manifest(epochs: int) -> str:
    models = "\n".join(
        f'[[models]]\nname = "mlp{h}"\nmodel = "izitorch.models:MLP"\nparams = {{ hidden = {h}, layers = 2 }}\n'
        f'optimizer = {{ class = "torch.optim:Adam", lr = 1e-3 }}\n'
        for h in SWEEP_WIDTHS
    )
    return f"{run_table(epochs)}\n{models}"


def kfold_manifest(epochs: int) -> str:
    model = '[[models]]\nname = "mlp512"\nmodel = "izitorch.models:MLP"\nparams = { hidden = 512, layers = 2 }\noptimizer = { class = "torch.optim:Adam", lr = 1e-3 }\n'
    return f"{run_table(epochs)}\n{model}\n[plugins.kfold]\nk = 4\n"


def run_table(epochs: int) -> str:
    return (
        f'[run]\nres_dir = "res"\nepochs = {epochs}\nbatch_size = 32\ndisplay_step = 100000\ndistributed = "models"\n\n'
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs")
    parser.add_argument("--cases", default="sweep,kfold", help="which cases to run: sweep, kfold or both")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU core(s), one thread per process, wall time\n")
    cases = {
        name: case
        for name, case in {"sweep": ("sweep of 8 MLPs", sweep_manifest), "kfold": ("4-fold, one MLP", kfold_manifest)}.items()
        if name in args.cases.split(",")
    }
    epochs = 2 if args.quick else 60
    rows = []
    for label, manifest in cases.values():
        with tempfile.TemporaryDirectory() as tmp:
            one_s, one = launch(Path(tmp), manifest(epochs), 1)
            two_s, two = launch(Path(tmp), manifest(epochs), 2)
        rows.append((label, epochs, one_s, two_s, one_s / two_s, "yes" if one == two else "NO"))
    header = ("case", "epochs", "1 process s", "2 processes s", "speed-up", "same scores")
    cells = [header] + [(r[0], str(r[1]), f"{r[2]:.1f}", f"{r[3]:.1f}", f"{r[4]:.2f}", r[5]) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print('distributed = "models" under torchrun, 1 against 2 processes (speed-up = 1-process time / 2-process time)')
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


if __name__ == "__main__":
    main()
