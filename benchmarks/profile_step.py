"""Where a lone model's training step spends its time beyond a hand-written loop.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py              # the tables of benchmarks/README.md
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --cprofile   # and cProfile's busiest functions
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --ablation   # and passes with components switched off

One MLP 64-64-10 on digits, batch 32, Adam, the default plugins (the console included, writing
to a buffer, so its bar is the one a redirected run has), on both of izitorch's data paths: the
in-memory ``TensorDataset`` (batches gathered by indexing the tensors) and a per-sample dataset
(a ``DataLoader`` that calls ``__getitem__`` per sample).

Three measurements, each the best of ``--repeats`` with the variants taking turns (the
machine's speed drifts, and other processes share its cores), in the process's CPU time by
default (all its threads, the file writer's too; the time other processes hold the cores is
not counted), or wall-clock time with ``--clock wall``:

1. Whole runs (``--epochs`` epochs, set-up included), izitorch against the hand-written loop of
   the same data path (``benchmarks/run.py``'s case 1): the overhead to explain, per step.
2. One training pass of izitorch's own code (``izitorch.loop.epoch_pass``, on the objects of a
   real run) against the same pass written by hand on the same model, optimizer and data; then
   each component of izitorch's step timed alone over many calls, on that run's objects and
   tensors (a stub model, criterion and optimizer where only the wrapping around them is
   timed). With ``--ablation`` also izitorch's pass with one component at a time switched off
   (replaced by the plain statement a hand-written loop has): a component's cost is then what
   switching it off saves, which needs a quiet machine to rise above the noise.
3. Per-epoch and per-run costs, timed inside a real run (hooks through pluggy's call
   monitoring, the resume state's save) and spread over the run's steps.

Only ``benchmarks/`` is involved: izitorch's code is patched in this process, never edited. A
component that this version of izitorch does not have (the loop is being rewritten) is shown as
"n/a".
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import io
import math
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Subset

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import izitorch  # noqa: E402
import izitorch.loop  # noqa: E402
import izitorch.resume  # noqa: E402
import izitorch.runner  # noqa: E402
from izitorch import Config, DataConfig, PluginsConfig, RunConfig  # noqa: E402
from izitorch.datasets import digits  # noqa: E402

bench = importlib.import_module("run")  # benchmarks/run.py: the hand-written loops and the dataset of case 1

BATCH = bench.CASE1_BATCH
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # --clock: the process's CPU time does not count the time other processes hold the cores
PATHS = ("in-memory", "per-sample")


# -- a real run, and its objects ---------------------------------------------------------------

def config_for(path: str, epochs: int, res_dir: str, builder: Any) -> Config:
    spec = bench.attrs.evolve(bench.mlp_spec("mlp"), model=builder())
    dataset = "izitorch.datasets:digits" if path == "in-memory" else bench.Samples()
    return Config(run=RunConfig(res_dir=res_dir, epochs=epochs, batch_size=BATCH, rdm_seed=bench.SEED, device="cpu"),
                  data=DataConfig(dataset=dataset, num_classes=10), models=(spec,), plugins=PluginsConfig())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The console's lines and bar go to buffers (not a terminal: the bar is a disabled tqdm)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def izitorch_run(path: str, epochs: int) -> float:
    """Seconds of a whole izitorch run with the default plugins, set-up included."""
    with tempfile.TemporaryDirectory() as res_dir, quiet():
        start = clock()
        izitorch.run(config_for(path, epochs, res_dir, bench.BuildModel()))
        return clock() - start


def hand_run(path: str, epochs: int) -> float:
    loop = bench.hand_tensor_loop if path == "in-memory" else bench.hand_loop
    start = clock()
    loop(epochs, torch.device("cpu"), batch=BATCH)
    return clock() - start


@contextlib.contextmanager
def captured_run(path: str) -> Iterator[tuple[Any, Any]]:
    """``(run, fold)`` of a one-epoch izitorch run, kept alive (res_dir included) inside the block."""
    seen: dict[str, Any] = {}
    original = izitorch.loop.epoch_pass

    def spy(run, fold, phase):
        seen.setdefault("objects", (run, fold))
        return original(run, fold, phase)

    with tempfile.TemporaryDirectory() as res_dir:
        izitorch.loop.epoch_pass = spy
        try:
            with quiet():
                izitorch.run(config_for(path, 1, res_dir, bench.BuildModel()))
        finally:
            izitorch.loop.epoch_pass = original
        run, fold = seen["objects"]
        with quiet():
            run.hook.izitorch_epoch_start(run=run, fold=fold, epoch=1)  # the console's bar, as during an epoch
        yield run, fold


# -- one training pass, with components switched off -------------------------------------------

class NoImpls:
    """A hook nobody implements, as the loop sees it."""

    def get_hookimpls(self) -> list:
        return []


class HooksWithout:
    """``run.pm`` with the named hooks unimplemented (their dispatch through pluggy then skipped)."""

    def __init__(self, pm: Any, names: tuple[str, ...]) -> None:
        self.pm, self.names = pm, names

    @property
    def hook(self) -> Any:
        pm, names = self.pm, self.names

        class Hook:
            def __getattr__(self, name: str) -> Any:
                return NoImpls() if name in names else getattr(pm.hook, name)

        return Hook()


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[bool]:
    """``target.name = value`` inside the block; yields False (patching nothing) when absent."""
    if not hasattr(target, name):
        yield False
        return
    before = getattr(target, name)
    setattr(target, name, value)
    try:
        yield True
    finally:
        setattr(target, name, before)


def plain_forward_loss(slot: Any, inputs: Any, target: torch.Tensor, classes: Any) -> tuple[torch.Tensor, torch.Tensor]:
    output = slot.model(inputs)
    return output, slot.criterion(output, target)


def plain_step(run: Any, slot: Any, loss: torch.Tensor, before_step: Any) -> None:
    slot.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    slot.optimizer.step()


class HandBatches:
    """The training batches as a hand-written loop makes them, from the same data and sampler."""

    def __init__(self, path: str, fold: Any, run: Any) -> None:
        loader = fold.loaders["train"]
        self.path, self.size = path, len(fold.split.train)
        self.generator = torch.Generator().manual_seed(bench.SEED)
        if path == "in-memory":
            self.inputs, self.targets = loader.tensors
        else:
            subset = Subset(run.dataset, fold.split.train.tolist())  # no Guarded wrapper
            self.loader = DataLoader(subset, batch_size=BATCH, sampler=RandomSampler(subset, generator=self.generator))

    def __len__(self) -> int:
        return (self.size + BATCH - 1) // BATCH

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.path != "in-memory":
            yield from self.loader
            return
        order = torch.randperm(self.size, generator=self.generator)
        for begin in range(0, self.size, BATCH):
            rows = order[begin:begin + BATCH]
            yield self.inputs[rows], self.targets[rows]


def switches(path: str, run: Any, fold: Any) -> dict[str, Callable[[], Any]]:
    """Each component of izitorch's training pass, as a context that switches it off."""
    loop = izitorch.loop
    hand_batches = HandBatches(path, fold, run)
    assembly = ("batch assembly: TensorBatchLoader -> x[rows], y[rows]" if path == "in-memory" else
                "batch assembly: Subset(Guarded(dataset)) -> Subset(dataset)")
    return {
        assembly: lambda: patched(fold, "loaders", {**fold.loaders, "train": hand_batches}),
        "_batches: the loader's errors turned into one line": lambda: patched(loop, "_batches", lambda run, fold, phase: iter(fold.loaders[phase])),
        "to_device + unpack of each batch": lambda: patched(loop, "to_device", lambda batch, device, non_blocking: batch),
        "forward_loss: failure wrapping and shape checks": lambda: patched(loop, "forward_loss", plain_forward_loss),
        "_step: failure wrapping of backward and step": lambda: patched(loop, "_step", plain_step),
        "meters: update per step, compute per pass": lambda: patched(loop, "meters_for", lambda *args: []),
        "izitorch_batch_finish through pluggy (console bar)": lambda: patched(run, "pm", HooksWithout(run.pm, ("izitorch_batch_finish",))),
    }


@contextlib.contextmanager
def all_off(offs: list[Callable[[], Any]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for off in offs:
            stack.enter_context(off())
        yield


def izitorch_pass(run: Any, fold: Any) -> float:
    with quiet():
        start = clock()
        izitorch.loop.epoch_pass(run, fold, "train")
        return clock() - start


def hand_pass(fold: Any, run: Any, path: str, with_item: bool = False) -> Callable[[], float]:
    """The training pass a hand-written loop has, on izitorch's model, optimizer and data."""
    slot = fold.slots[0]
    model, optimizer, criterion = slot.model, slot.optimizer, slot.criterion
    batches = HandBatches(path, fold, run)

    def one_pass() -> float:
        start = clock()
        model.train()
        with torch.enable_grad():
            for x, y in batches:
                loss = criterion(model(x), y)
                if with_item and not math.isfinite(loss.item()):
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return clock() - start

    return one_pass


def step_costs(path: str, repeats: int, ablation: bool = True) -> list[list]:
    """Microseconds per step: izitorch's pass, each component's share (with ``ablation``), the
    hand-written pass; the first row is izitorch's pass and its cost beyond the hand-written one."""
    with captured_run(path) as (run, fold):
        steps = len(fold.loaders["train"])
        offs = switches(path, run, fold)
        variants: dict[str, Callable[[], float]] = {"izitorch's training pass": lambda: izitorch_pass(run, fold)}
        missing = []
        for label, off in offs.items() if ablation else ():
            with off() as present:
                if not present:
                    missing.append(label)
                    continue

            def switched(off=off) -> float:
                with off():
                    return izitorch_pass(run, fold)

            variants[label] = switched

        def everything_off() -> float:
            with all_off([offs[label] for label in offs if label not in missing]):
                return izitorch_pass(run, fold)

        if ablation:
            variants["all of the above off"] = everything_off
            variants["hand-written pass + loss.item() finiteness check"] = hand_pass(fold, run, path, with_item=True)
        variants["hand-written pass"] = hand_pass(fold, run, path)
        best = best_in_turns(repeats, variants)
    per_step = {label: seconds / steps * 1e6 for label, seconds in best.items()}
    full, hand = per_step["izitorch's training pass"], per_step["hand-written pass"]
    rows = [["izitorch's training pass", full, full - hand]]
    if not ablation:
        return rows + [["hand-written pass", hand, 0.0]]
    for label in offs:
        rows.append([f"  {label}", float("nan") if label in missing else per_step[label],
                     float("nan") if label in missing else full - per_step[label]])
    rows.append(["  loss.item() finiteness check (nan_policy), added to the hand pass",
                 per_step["hand-written pass + loss.item() finiteness check"], per_step["hand-written pass + loss.item() finiteness check"] - hand])
    rest = per_step["all of the above off"]
    rows.append(["  what is left with all of the above off", rest, rest - hand])
    rows.append(["hand-written pass", hand, 0.0])
    return rows


# -- each component alone -----------------------------------------------------------------------

class Stub:
    """A model, criterion, optimizer or loss that does nothing: what is left is the wrapping."""

    def __init__(self, result: Any = None) -> None:
        self.result = result

    def __call__(self, *args: Any) -> Any:
        return self.result

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass

    def backward(self) -> None:
        pass


def attempt(measure: Callable[[], float]) -> float:
    """``measure()``, or NaN ("n/a") when this version of izitorch lacks what it times."""
    try:
        return measure()
    except AttributeError:
        return float("nan")


def per_call(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """Microseconds per call of ``fn``: the best of ``repeats`` runs of ``calls`` calls."""
    best = math.inf
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            fn()
        best = min(best, clock() - start)
    return best / calls * 1e6


def per_epoch(fn: Callable[[], Any], steps: int, repeats: int) -> float:
    """Microseconds per step of ``fn``, a whole epoch's work: the best of ``repeats``."""
    best = math.inf
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best / steps * 1e6


def component_costs(path: str, repeats: int) -> list[list]:
    """Each of izitorch's per-step extras, timed alone on a real run's objects (us per step)."""
    loop = izitorch.loop
    with captured_run(path) as (run, fold):
        slot = fold.slots[0]
        loader = fold.loaders["train"]
        steps = len(loader)
        hand = HandBatches(path, fold, run)
        batch = next(iter(loader))
        inputs, target = batch[0], batch[1]
        with torch.no_grad():
            output = slot.model(inputs)
        loss = slot.criterion(slot.model(inputs), target)
        stub_slot = type("StubSlot", (), {})()
        stub_slot.name, stub_slot.model, stub_slot.criterion, stub_slot.optimizer = "mlp", Stub(output), Stub(loss.detach()), Stub()
        stub_loss = Stub()
        hook = run.hook.izitorch_batch_finish
        console = run.pm.get_plugin("console")
        losses = {slot: loss.detach()}
        calls = 2000

        def drain(batches: Any) -> None:
            for _ in batches:
                pass

        def meters_updates() -> list:
            fresh = loop.meters_for(run.metric_factories, 10, 1)
            for _ in range(steps):
                for meter in fresh:
                    meter.update(output.unsqueeze(0), target, loss.detach().reshape(1))
            return fresh

        def meters_epoch() -> None:
            loop.compute_all(meters_updates(), 1)

        def dispatch() -> None:
            for part in fold.parts or [fold]:
                hook(run=run, fold=part, step=1, losses={s.name: losses[s] for s in part.slots if s in losses})

        with quiet():
            rows = [
                ["batch assembly, izitorch's loader", lambda: per_epoch(lambda: drain(loader), steps, 3 * repeats)
                 - per_epoch(lambda: drain(hand), steps, 3 * repeats)],
                ["_batches (the loader's errors in one line)", lambda: per_epoch(lambda: drain(loop._batches(run, fold, "train")), steps, 3 * repeats)
                 - per_epoch(lambda: drain(loader), steps, 3 * repeats)],
                ["to_device(unpack(batch))", lambda: per_call(lambda: loop.to_device(loop.unpack(batch), run.device, False), calls, repeats)],
                ["forward_loss: failure wrapping, class-count check", lambda: per_call(lambda: loop.forward_loss(stub_slot, inputs, target, 10), calls, repeats)
                 - per_call(lambda: plain_forward_loss(stub_slot, inputs, target, 10), calls, repeats)],
                ["_step: failure wrapping", lambda: per_call(lambda: loop._step(run, stub_slot, stub_loss, None), calls, repeats)
                 - per_call(lambda: plain_step(run, stub_slot, stub_loss, None), calls, repeats)],
                ["loss.item() + math.isfinite (nan_policy)", lambda: per_call(lambda: math.isfinite(loss.item()), calls, repeats)],
                ["output.detach(), loss.detach()", lambda: per_call(lambda: (output.detach(), loss.detach()), calls, repeats)],
                ["meters: update (loss sum, argmax for the confusion counts)", lambda: per_epoch(meters_updates, steps, repeats)],
                ["meters: compute once per pass (counting, confusion matrix, scores)", lambda: per_epoch(meters_epoch, steps, repeats)
                 - per_epoch(meters_updates, steps, repeats)],
                ["izitorch_batch_finish: the console's own work", lambda: per_call(lambda: console.izitorch_batch_finish(run, fold, 1, {"mlp": loss}), calls, repeats)],
                ["izitorch_batch_finish: pluggy dispatch, wrapper, losses dict", lambda: per_call(dispatch, calls, repeats)
                 - per_call(lambda: console.izitorch_batch_finish(run, fold, 1, {"mlp": loss}), calls, repeats)],
            ]
            rows = [[label, attempt(measure)] for label, measure in rows]
    return rows


def best_in_turns(repeats: int, variants: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each variant's best time over ``repeats`` turns (a first turn warms up)."""
    times: dict[str, list[float]] = {label: [] for label in variants}
    for turn in range(repeats + 1):
        for label, fn in variants.items():
            seconds = fn()
            if turn:
                times[label].append(seconds)
    return {label: min(found) for label, found in times.items()}


# -- per-epoch and per-run costs -----------------------------------------------------------------

PER_EPOCH_HOOKS = ("izitorch_epoch_start", "izitorch_epoch_finish", "izitorch_should_stop")


def run_costs(path: str, epochs: int, repeats: int) -> dict[str, float]:
    """Seconds spent per run in each part of a real run, the best of ``repeats`` runs each."""
    found: dict[str, list[float]] = {}
    for _ in range(repeats + 1):
        spent = timed_parts(path, epochs)
        for key, seconds in spent.items():
            found.setdefault(key, []).append(seconds)
    return {key: min(values[1:]) for key, values in found.items()}


def timed_parts(path: str, epochs: int) -> dict[str, float]:
    """One run's seconds in: set-up (up to the first epoch's hooks), each epoch's evaluation pass,
    per-epoch hooks and resume state, and what follows the epochs (the final test pass, its hooks
    and state, the files' last writes, the lock)."""
    spent: dict[str, float] = {"eval passes": 0.0, "resume state after each epoch (resume.save)": 0.0}
    marks: dict[str, float] = {}
    evals: list[tuple[float, float]] = []
    original_pass, original_save, original_pm = izitorch.loop.epoch_pass, izitorch.resume.save, izitorch.runner.make_plugin_manager

    def timed_pass(run, fold, phase):
        start = clock()
        try:
            return original_pass(run, fold, phase)
        finally:
            if phase != "train":
                evals.append((start, clock() - start))

    def timed_save(*args, **kwargs):
        start = clock()
        try:
            return original_save(*args, **kwargs)
        finally:
            if not kwargs.get("final"):
                marks["epochs done"] = clock()
                spent["resume state after each epoch (resume.save)"] += marks["epochs done"] - start

    def monitored(config):
        pm, versions = original_pm(config)
        starts: list[float] = []

        def before(name, impls, kwargs):
            starts.append(clock())
            if name == "izitorch_epoch_start":
                marks.setdefault("first epoch", starts[-1])

        def after(outcome, name, impls, kwargs):
            seconds = clock() - starts.pop()
            if name in PER_EPOCH_HOOKS:
                spent[f"{name} hooks"] = spent.get(f"{name} hooks", 0.0) + seconds

        pm.add_hookcall_monitoring(before, after)
        return pm, versions

    with tempfile.TemporaryDirectory() as res_dir, quiet():
        izitorch.loop.epoch_pass, izitorch.resume.save, izitorch.runner.make_plugin_manager = timed_pass, timed_save, monitored
        try:
            start = clock()
            izitorch.run(config_for(path, epochs, res_dir, bench.BuildModel()))
            end = clock()
        finally:
            izitorch.loop.epoch_pass, izitorch.resume.save, izitorch.runner.make_plugin_manager = original_pass, original_save, original_pm
    spent["eval passes"] = sum(seconds for begin, seconds in evals if begin < marks["epochs done"])
    spent["set-up before the first epoch"] = marks["first epoch"] - start
    spent["after the epochs: final test pass, its hooks and state, last writes, lock"] = end - marks["epochs done"]
    return spent


def hand_setup(path: str) -> float:
    """Seconds of the hand-written loops' set-up: load the data, split it, build the model."""
    start = clock()
    data = digits() if path == "in-memory" else bench.Samples()
    train, _test = bench.holdout(len(data))
    torch.manual_seed(bench.SEED)
    model = bench.MLP()
    torch.optim.Adam(model.parameters(), lr=1e-3)
    if path == "per-sample":
        DataLoader(Subset(data, train.tolist()), batch_size=BATCH)
    return clock() - start


def hand_eval_pass(fold: Any, run: Any, path: str) -> float:
    """The hand-written loops' test pass (argmax, count, ``.item()`` per batch) on the same data."""
    model = fold.slots[0].model
    loader = fold.loaders["test"] if path == "in-memory" else DataLoader(Subset(run.dataset, fold.split.test.tolist()), batch_size=BATCH)
    start = clock()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return clock() - start


# -- report ------------------------------------------------------------------------------------

def table(title: str, header: list[str], rows: list[list]) -> str:
    return bench.table(title, header, rows)


def profile_run(path: str, epochs: int) -> str:
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory() as res_dir, quiet():
        config = config_for(path, epochs, res_dir, bench.BuildModel())
        profile.enable()
        izitorch.run(config)
        profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the whole runs (default 30)")
    parser.add_argument("--repeats", type=int, default=7, help="turns of every measurement; each reports its best (default 7)")
    parser.add_argument("--paths", default=",".join(PATHS), help="data paths: in-memory, per-sample")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                        help="cpu: this process's CPU time, all its threads (default; robust on a shared machine), or wall")
    parser.add_argument("--ablation", action="store_true",
                        help="also time izitorch's pass with each component switched off (needs a quiet machine)")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions of one run per path")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    print(f"izitorch {izitorch.__version__}, torch {torch.__version__}, one thread, batch {BATCH}, {args.clock} time, "
          f"best of {args.repeats} (variants taking turns)\n")
    for path in args.paths.split(","):
        steps_per_epoch = int(np.ceil(0.8 * 1797 / BATCH))
        steps = args.epochs * steps_per_epoch
        best = best_in_turns(args.repeats, {"hand": lambda: hand_run(path, args.epochs), "izitorch": lambda: izitorch_run(path, args.epochs)})
        overhead = (best["izitorch"] - best["hand"]) / steps * 1e6
        print(f"== {path} data, {args.epochs} epochs x {steps_per_epoch} steps: hand-written run {best['hand']:.3f} s, izitorch "
              f"{best['izitorch']:.3f} s: izitorch adds {overhead:.0f} us per step\n", flush=True)
        passes = step_costs(path, args.repeats * 3, ablation=args.ablation)
        alone = component_costs(path, args.repeats)
        summed = sum(row[1] for row in alone if not math.isnan(row[1]))
        alone.append(["sum of the components alone", summed])
        alone.append(["izitorch's training pass beyond the hand-written pass, measured whole", passes[0][2]])
        print(table("per training step, each component alone (us)", ["component", "us/step"], alone), "\n", flush=True)
        if args.ablation:
            print(table("per training step, one pass (us): izitorch's pass, what switching each component off saves",
                        ["pass", "us/step", "saves / adds"], passes), "\n", flush=True)
        parts = run_costs(path, args.epochs, args.repeats)
        with captured_run(path) as (run, fold):
            hand_eval = min(hand_eval_pass(fold, run, path) for _ in range(args.repeats * 3))
        setup = min(hand_setup(path) for _ in range(args.repeats))
        rows = [["training passes beyond the hand-written pass (above)", passes[0][2] * steps / 1e3, passes[0][2]]]
        for key, seconds in parts.items():
            if key in ("whole run", "train passes"):
                continue
            if key == "eval passes":
                seconds -= hand_eval * args.epochs
                key = "each epoch's eval pass beyond the hand-written test pass"
            if key == "set-up before the first epoch":
                seconds -= setup
                key = "set-up beyond the hand-written loop's (data, split, model)"
            rows.append([key, seconds * 1e3, seconds / steps * 1e6])
        explained = sum(row[1] for row in rows)
        rows.append(["sum of the above", explained, explained * 1e3 / steps])
        rows.append(["whole-run overhead measured above", overhead * steps / 1e3, overhead])
        print(table(f"per run of {args.epochs} epochs (parts: best of {args.repeats} runs each), spread over its {steps} steps",
                    ["part", "ms per run", "us/step"], rows), "\n", flush=True)
        if args.cprofile:
            print(profile_run(path, args.epochs), flush=True)


if __name__ == "__main__":
    main()
