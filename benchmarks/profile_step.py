"""Where a lone model's training step spends its time beyond a hand-written loop.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py              # the tables of benchmarks/README.md
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --cprofile   # and cProfile's busiest functions
    OMP_NUM_THREADS=1 python benchmarks/profile_step.py --ablation   # and passes with components switched off
    python benchmarks/profile_step.py --quick                        # every table once, small: a smoke test

One MLP 64-64-10 on digits, batch 32, Adam, the default plugins (the console included, writing
to a buffer, so its bar is the one a redirected run has), on both of izitorch's data paths: the
in-memory ``TensorDataset`` (batches gathered by indexing the tensors) and a per-sample dataset
(a ``DataLoader`` that calls ``__getitem__`` per sample).

Four measurements, each the best of ``--repeats`` with the variants taking turns (the
machine's speed drifts, and other processes share its cores), in the process's CPU time by
default (all its threads, the file writer's too; the time other processes hold the cores is
not counted), or wall-clock time with ``--clock wall``:

1. Whole runs (``--epochs`` epochs, set-up included), izitorch against the hand-written loop of
   the same data path (``benchmarks/run.py``'s case 1): the overhead to explain, per step.
2. One training pass of izitorch's own code (``izitorch.loop.epoch_pass``, on the cohort of a
   real run) against the same pass written by hand on the same model, optimizer and data; then
   each component of izitorch's step timed alone over many calls, on that run's objects and
   tensors (a stub model, criterion, optimizer or stack where only the wrapping around them is
   timed). With ``--ablation`` also izitorch's pass with one component at a time switched off
   (replaced by the plain statement a hand-written loop has): a component's cost is then what
   switching it off saves, which needs a quiet machine to rise above the noise.
3. Each epoch's evaluation pass in parts, on that run's objects: the hand-written test pass
   (forward, argmax, count), izitorch's pass whole, and its reading of the batches, the forward
   pass, the loss, the meters' updates and their scores, each timed alone.
4. Per-epoch and per-run costs, timed inside a real run (hooks through pluggy's call
   monitoring, the resume state's save) and spread over the run's steps.

The engine's parts, as this script names them: the cohort's loader (``cohort.loaders``) and
``izitorch.cohort.batches`` (reading, one-line errors, ``to_device``, ``unpack``); the lone
model's stack (``izitorch.stacks.LoneStack``: ``call_model``, ``criterion_loss``); one
``izitorch.engine.StackPass`` per stack and pass (``_guard``: the finiteness check; the rest of
``_train``: its bookkeeping; ``_count``: the meters of ``izitorch.metrics``); and the loop's
``izitorch_batch_finish`` dispatch (``member_losses``, ``BatchLosses``).

Only ``benchmarks/`` is involved: izitorch's code is patched in this process, never edited. A
component that this version of izitorch does not have is shown as "n/a" (``tests/
test_benchmarks.py`` runs ``--quick`` and fails on one).
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

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Subset

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import izitorch  # noqa: E402
import izitorch.cohort  # noqa: E402
import izitorch.engine  # noqa: E402
import izitorch.loop  # noqa: E402
import izitorch.metrics  # noqa: E402
import izitorch.resume  # noqa: E402
import izitorch.runner  # noqa: E402
import izitorch.stacks  # noqa: E402
from izitorch import Config, DataConfig, PluginsConfig, RunConfig  # noqa: E402
from izitorch.datasets import digits  # noqa: E402

bench = importlib.import_module("run")  # benchmarks/run.py: the hand-written loops and the dataset of case 1

BATCH = bench.CASE1_BATCH
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # --clock: the process's CPU time does not count the time other processes hold the cores
CALLS = 2000  # calls per timing of a component alone (--quick: fewer)
WARM_UP = 1  # first turns of a measurement that warm up and do not count (--quick: none, but for the whole runs)
PATHS = ("in-memory", "per-sample")


# -- a real run, and its objects ---------------------------------------------------------------


def config_for(path: str, epochs: int, res_dir: str, builder: Any) -> Config:
    spec = bench.attrs.evolve(bench.mlp_spec("mlp"), model=builder())
    dataset = "izitorch.datasets:digits" if path == "in-memory" else bench.Samples()
    return Config(
        run=RunConfig(res_dir=res_dir, epochs=epochs, batch_size=BATCH, rdm_seed=bench.SEED, device="cpu"),
        data=DataConfig(dataset=dataset, num_classes=10, stratify=False),  # the hand-written loops' split
        models=(spec,),
        plugins=PluginsConfig(),
    )


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


@attrs.define
class Captured:
    """A finished one-epoch run's objects: its cohort (one fold, one lone stack) and their parts."""

    run: Any
    cohort: Any

    @property
    def fold(self) -> Any:
        return self.cohort.folds[0]

    @property
    def stack(self) -> Any:
        return self.cohort.stacks[0]

    @property
    def slot(self) -> Any:
        return self.stack.members[0]

    @property
    def loader(self) -> Any:
        return self.cohort.loaders["train"]


@contextlib.contextmanager
def captured_run(path: str) -> Iterator[Captured]:
    """The objects of a one-epoch izitorch run, kept alive (res_dir included) inside the block."""
    seen: dict[str, Any] = {}
    original = izitorch.loop.epoch_pass

    def spy(run, cohort, phase, folds, **options):
        seen.setdefault("objects", Captured(run, cohort))
        return original(run, cohort, phase, folds, **options)

    with tempfile.TemporaryDirectory() as res_dir:
        izitorch.loop.epoch_pass = spy
        try:
            with quiet():
                izitorch.run(config_for(path, 1, res_dir, bench.BuildModel()))
        finally:
            izitorch.loop.epoch_pass = original
        got = seen["objects"]
        with quiet():
            got.run.hook.izitorch_epoch_start(run=got.run, fold=got.fold, epoch=1)  # the console's bar, as during an epoch
        yield got


# -- the plain statements of a hand-written loop, standing in for izitorch's parts -------------


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
def patched(*changes: tuple[Any, str, Any]) -> Iterator[bool]:
    """``target.name = value`` for each ``(target, name, value)`` inside the block; yields False
    (patching nothing) when one of the names is absent."""
    if not all(hasattr(target, name) for target, name, _value in changes):
        yield False
        return
    before = [getattr(target, name) for target, name, _value in changes]
    for target, name, value in changes:
        setattr(target, name, value)
    try:
        yield True
    finally:
        for (target, name, _value), value in zip(changes, before):
            setattr(target, name, value)


def plain_batches(run: Any, cohort: Any, phase: str) -> Iterator[tuple[Any, torch.Tensor, None]]:
    """``izitorch.cohort.batches`` without reading the loader under a guard (its errors as they come)."""
    loader = cohort.loaders[phase]
    move = not getattr(loader, "on_device", False)
    for batch in loader:
        if move:
            batch = izitorch.cohort.to_device(batch, run.device, False)
        inputs, target = izitorch.cohort.unpack(batch)
        yield inputs, target, None


def same_batch(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    return batch


def plain_unpack(batch: Any) -> tuple[Any, torch.Tensor]:
    inputs, target = batch
    return inputs, target


def plain_call_model(slot: Any, inputs: Any, module: Any = None) -> Any:
    return (slot.model if module is None else module)(inputs)


def plain_criterion_loss(slot: Any, output: Any, target: torch.Tensor, classes: Any) -> torch.Tensor:
    return slot.criterion(output, target)


def no_guard(self: Any, losses: torch.Tensor, mask: Any) -> list[bool]:
    """Every active member steps: no finiteness check."""
    return list(self.active)


def no_meters(factories: Any, num_classes: Any, members: int) -> list:
    return []


class PlainPass(izitorch.engine.StackPass):
    """A StackPass whose training batch is a hand-written loop's step (a lone model, no
    accumulation, fp32): no step counter, window, autocast context, masks or error wrapping.
    The parts timed on their own (the stack's forward and loss, ``_guard``, ``_count``) stay."""

    def _train(self, inputs: Any, target: torch.Tensor, rows: Any) -> None:
        stack = self.stack
        outputs = stack.forward(inputs, None)
        losses = stack.losses(outputs, target, None)
        stepping = self._guard(losses, None)
        if stepping[0]:
            stack.zero_grad()
            stack.backward(losses)
            stack.step(stepping)
        self._count(outputs.detach(), target, losses.detach(), None, stepping)


class HandBatches:
    """The training batches as a hand-written loop makes them, from the same data and sampler."""

    def __init__(self, path: str, got: Captured) -> None:
        self.path, self.size = path, len(got.fold.split.train)
        self.on_device = getattr(got.loader, "on_device", False)  # what izitorch's loader says, so both are moved alike
        self.generator = torch.Generator().manual_seed(bench.SEED)
        if path == "in-memory":
            self.inputs, self.targets = got.loader.tensors
        else:
            subset = Subset(got.run.dataset, got.fold.split.train.tolist())  # no Guarded wrapper
            self.loader = DataLoader(subset, batch_size=BATCH, sampler=RandomSampler(subset, generator=self.generator))

    def __len__(self) -> int:
        return (self.size + BATCH - 1) // BATCH

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.path != "in-memory":
            yield from self.loader
            return
        order = torch.randperm(self.size, generator=self.generator)
        for begin in range(0, self.size, BATCH):
            rows = order[begin : begin + BATCH]
            yield self.inputs[rows], self.targets[rows]


def assembly_label(path: str) -> str:
    return (
        "batch assembly: TensorBatchLoader against x[rows], y[rows]"
        if path == "in-memory"
        else "batch assembly: Subset(Guarded(dataset)) against Subset(dataset)"
    )


BATCHES = "cohort.batches: the loader read under a guard (errors in one line)"
TO_DEVICE = "to_device (batches not on the device) + unpack"
WRAPPING = "LoneStack forward/losses: call_model, criterion_loss (error wrapping, class check)"
GUARD = "StackPass._guard: finiteness check (losses.tolist(), nan_policy)"
BOOKKEEPING = "StackPass._train bookkeeping (step, window, autocast, masks, try, _count)"
METERS = "meters: update per step, compute per pass"
DISPATCH = "izitorch_batch_finish: member_losses, BatchLosses, pluggy, the console"


def switches(path: str, got: Captured) -> dict[str, Callable[[], Any]]:
    """Each component of izitorch's training pass, as a context that switches it off."""
    cohorts, engine, stacks = izitorch.cohort, izitorch.engine, izitorch.stacks
    hand_batches = HandBatches(path, got)
    return {
        assembly_label(path): lambda: patched((got.cohort, "loaders", {**got.cohort.loaders, "train": hand_batches})),
        BATCHES: lambda: patched((cohorts, "batches", plain_batches)),
        TO_DEVICE: lambda: patched((cohorts, "to_device", same_batch), (cohorts, "unpack", plain_unpack)),
        WRAPPING: lambda: patched((stacks, "call_model", plain_call_model), (stacks, "criterion_loss", plain_criterion_loss)),
        GUARD: lambda: patched((engine.StackPass, "_guard", no_guard)),
        BOOKKEEPING: lambda: patched((izitorch.loop, "StackPass", PlainPass)),
        METERS: lambda: patched((engine, "meters_for", no_meters)),
        DISPATCH: lambda: patched((got.run, "pm", HooksWithout(got.run.pm, ("izitorch_batch_finish",)))),
    }


@contextlib.contextmanager
def all_off(offs: list[Callable[[], Any]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for off in offs:
            stack.enter_context(off())
        yield


def izitorch_pass(got: Captured) -> float:
    with quiet():
        start = clock()
        izitorch.loop.epoch_pass(got.run, got.cohort, "train", got.cohort.folds)
        return clock() - start


def hand_pass(path: str, got: Captured, with_item: bool = False) -> Callable[[], float]:
    """The training pass a hand-written loop has, on izitorch's model, optimizer and data."""
    model, optimizer, criterion = got.slot.model, got.slot.optimizer, got.slot.criterion
    batches = HandBatches(path, got)

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


def step_costs(path: str, got: Captured, repeats: int, ablation: bool = True) -> list[list]:
    """Microseconds per step: izitorch's pass, each component's share (with ``ablation``), the
    hand-written pass; the first row is izitorch's pass and its cost beyond the hand-written one."""
    steps = len(got.loader)
    offs = switches(path, got)
    variants: dict[str, Callable[[], float]] = {"izitorch's training pass": lambda: izitorch_pass(got)}
    missing = []
    for label, off in offs.items() if ablation else ():
        with off() as present:
            if not present:
                missing.append(label)
                continue

        def switched(off=off) -> float:
            with off():
                return izitorch_pass(got)

        variants[label] = switched

    def everything_off() -> float:
        with all_off([offs[label] for label in offs if label not in missing]):
            return izitorch_pass(got)

    if ablation:
        variants["all of the above off"] = everything_off
        variants["hand-written pass + loss.item() finiteness check"] = hand_pass(path, got, with_item=True)
    variants["hand-written pass"] = hand_pass(path, got)
    best = best_in_turns(repeats, variants)
    per_step = {label: seconds / steps * 1e6 for label, seconds in best.items()}
    full, hand = per_step["izitorch's training pass"], per_step["hand-written pass"]
    rows = [["izitorch's training pass", full, full - hand]]
    if not ablation:
        return rows + [["hand-written pass", hand, 0.0]]
    for label in offs:
        rows.append([f"  {label}", float("nan") if label in missing else per_step[label], float("nan") if label in missing else full - per_step[label]])
    checked = per_step["hand-written pass + loss.item() finiteness check"]
    rows.append(["  loss.item() finiteness check, added to the hand pass", checked, checked - hand])
    rest = per_step["all of the above off"]
    rows.append(["  what is left with all of the above off", rest, rest - hand])
    rows.append(["hand-written pass", hand, 0.0])
    return rows


# -- each component alone -----------------------------------------------------------------------


class Stub:
    """A model or optimizer that does nothing: what is left is the wrapping around it."""

    def __init__(self, result: Any = None) -> None:
        self.result = result

    def __call__(self, *args: Any) -> Any:
        return self.result

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


class StubCriterion(torch.nn.CrossEntropyLoss):
    """A cross-entropy loss (so the class-count check runs as for the real one) that returns
    ``result`` without computing anything."""

    def __init__(self, result: torch.Tensor) -> None:
        super().__init__()
        self.result = result

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.result


class StubStack:
    """A lone stack whose members compute nothing: a StackPass on it times only its own code."""

    vectorized = False

    def __init__(self, slot: Any, outputs: torch.Tensor, losses: torch.Tensor) -> None:
        self.members, self.label = [slot], f"model {slot.name}"
        self.outputs, self.loss_values = outputs, losses

    def train(self, mode: bool) -> None:
        pass

    def forward(self, inputs: Any, active: Any = None) -> torch.Tensor:
        return self.outputs

    def losses(self, outputs: Any, target: torch.Tensor, mask: Any = None) -> torch.Tensor:
        return self.loss_values

    def backward(self, losses: torch.Tensor, factor: Any = None) -> None:
        pass

    def zero_grad(self) -> None:
        pass

    def step(self, active: Any) -> None:
        pass

    def batch_mask(self, phase: str, rows: Any) -> None:
        return None


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


def drain(batches: Any) -> None:
    for _ in batches:
        pass


def component_costs(path: str, got: Captured, repeats: int) -> list[list]:
    """Each of izitorch's per-step extras, timed alone on a real run's objects (us per step)."""
    cohorts, engine, metrics = izitorch.cohort, izitorch.engine, izitorch.metrics
    calls = CALLS
    run, cohort, fold, slot, loader = got.run, got.cohort, got.fold, got.slot, got.loader
    steps = len(loader)
    hand = HandBatches(path, got)
    batch = next(iter(loader))
    move = not getattr(loader, "on_device", False)
    inputs, target = batch[0], batch[1]
    with torch.no_grad():
        output = slot.model(inputs)
    loss = slot.criterion(output, target)
    outputs, losses = output.unsqueeze(0), loss.reshape(1)  # a stack's [K = 1, B, C] and [K = 1]

    stub = type("StubSlot", (), {})()
    stub.name, stub.model, stub.criterion, stub.optimizer, stub.stopped = slot.name, Stub(output), StubCriterion(loss), Stub(), None
    lone = izitorch.stacks.LoneStack(stub, 10)  # the real stack's code around a model and loss that do nothing
    stub_stack = StubStack(slot, outputs, losses)  # a StackPass around a stack that does nothing

    def stack_pass(stack: Any, batches: int = steps) -> Any:
        return engine.StackPass(run, stack, "train", {slot: fold}, None, None, batches)

    def plain_forward_loss() -> None:
        stub.criterion(stub.model(inputs), target)

    def plain_step() -> None:
        values = stub_stack.losses(stub_stack.forward(inputs, None), target, None)
        stub_stack.zero_grad()
        stub_stack.backward(values)
        stub_stack.step([True])

    def read_guarded() -> None:
        with patched((cohorts, "to_device", same_batch), (cohorts, "unpack", plain_unpack)):
            drain(cohorts.batches(run, cohort, "train"))

    def to_device_unpack() -> None:
        cohorts.unpack(cohorts.to_device(batch, run.device, False) if move else batch)

    def meters_updates() -> list:
        fresh = engine.meters_for(run.metric_factories, 10, 1)
        for _ in range(steps):
            for meter in fresh:
                meter.update(outputs, target, losses, None)
        return fresh

    def meters_epoch() -> None:
        metrics.compute_all(meters_updates(), 1)

    def pass_set_up() -> None:
        made = stack_pass(got.stack)
        made.meters = []  # their compute is timed with the meters
        made.results("train_step_time", 0.0)

    console = run.pm.get_plugin("console")
    hook = run.hook.izitorch_batch_finish

    def dispatch() -> None:  # what epoch_pass does after each batch
        where: dict = {}
        counted.member_losses(where)
        for part in cohort.folds:
            hook(run=run, fold=part, step=1, losses=engine.BatchLosses({s.name: where[s] for s in part.slots if s in where}))

    def console_alone() -> None:
        console.izitorch_batch_finish(run, fold, 1, engine.BatchLosses({slot.name: (counted, 0)}))

    with quiet():
        counted = stack_pass(got.stack)  # a pass that has counted one batch: its losses for the hook
        counted.losses, counted.counted = losses, [True]
        booked = stack_pass(stub_stack, 0)  # called over and over: no last batch that ends the pass early
        booked.meters = []  # the meters' own work is timed below; _count's around them stays
        booked._guard = lambda values, mask: [True]  # the guard is timed on its own
        rows = [
            [assembly_label(path), lambda: per_epoch(lambda: drain(loader), steps, 3 * repeats) - per_epoch(lambda: drain(hand), steps, 3 * repeats)],
            [BATCHES, lambda: per_epoch(read_guarded, steps, 3 * repeats) - per_epoch(lambda: drain(loader), steps, 3 * repeats)],
            [TO_DEVICE, lambda: per_call(to_device_unpack, calls, repeats)],
            [WRAPPING, lambda: per_call(lambda: lone.losses(lone.forward(inputs), target), calls, repeats) - per_call(plain_forward_loss, calls, repeats)],
            [GUARD, lambda: per_call(lambda: counted._guard(losses, None), calls, repeats)],
            [BOOKKEEPING, lambda: per_call(lambda: booked._train(inputs, target, None), calls, repeats) - per_call(plain_step, calls, repeats)],
            ["meters: update per step (loss, argmax for the confusion counts)", lambda: per_epoch(meters_updates, steps, repeats)],
            [
                "meters: compute once per pass (confusion matrix, scores)",
                lambda: per_epoch(meters_epoch, steps, repeats) - per_epoch(meters_updates, steps, repeats),
            ],
            ["StackPass: made and its results() once per pass (meters aside)", lambda: per_epoch(pass_set_up, steps, 3 * repeats)],
            ["izitorch_batch_finish: the console's own work", lambda: per_call(console_alone, calls, repeats)],
            [
                "izitorch_batch_finish: member_losses, BatchLosses, pluggy dispatch",
                lambda: per_call(dispatch, calls, repeats) - per_call(console_alone, calls, repeats),
            ],
        ]
        rows = [[label, attempt(measure)] for label, measure in rows]
    return rows


def best_in_turns(repeats: int, variants: dict[str, Callable[[], float]], warm_up: int | None = None) -> dict[str, float]:
    """Each variant's best time over ``repeats`` turns, after ``warm_up`` turns (default
    ``WARM_UP``) that do not count."""
    warm_up = WARM_UP if warm_up is None else warm_up
    times: dict[str, list[float]] = {label: [] for label in variants}
    for turn in range(warm_up + repeats):
        for label, fn in variants.items():
            seconds = fn()
            if turn >= warm_up:
                times[label].append(seconds)
    return {label: min(found) for label, found in times.items()}


# -- per-epoch and per-run costs -----------------------------------------------------------------

PER_EPOCH_HOOKS = ("izitorch_epoch_start", "izitorch_epoch_finish", "izitorch_should_stop")
EVAL_PASSES = "eval passes"
SAVES = "resume state after each epoch (resume.save)"
SET_UP = "set-up before the first epoch"


def run_costs(path: str, epochs: int, repeats: int) -> dict[str, float]:
    """Seconds spent per run in each part of a real run, the best of ``repeats`` runs each."""
    found: dict[str, list[float]] = {}
    for _ in range(WARM_UP + repeats):
        spent = timed_parts(path, epochs)
        for key, seconds in spent.items():
            found.setdefault(key, []).append(seconds)
    return {key: min(values[WARM_UP:]) for key, values in found.items()}


def timed_parts(path: str, epochs: int) -> dict[str, float]:
    """One run's seconds in: set-up (up to the first epoch's hooks), each epoch's evaluation pass,
    per-epoch hooks and resume state, and what follows the epochs (the final test pass, its hooks
    and state, the files' last writes, the lock)."""
    spent: dict[str, float] = {EVAL_PASSES: 0.0, SAVES: 0.0, **{f"{name} hooks": 0.0 for name in PER_EPOCH_HOOKS}}
    marks: dict[str, float] = {}
    evals: list[tuple[float, float]] = []
    original_pass, original_save, original_pm = izitorch.loop.epoch_pass, izitorch.resume.save, izitorch.runner.make_plugin_manager

    def timed_pass(run, cohort, phase, folds, **options):
        start = clock()
        try:
            return original_pass(run, cohort, phase, folds, **options)
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
                spent[SAVES] += marks["epochs done"] - start

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
                spent[f"{name} hooks"] += seconds

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
    spent[EVAL_PASSES] = sum(seconds for begin, seconds in evals if begin < marks["epochs done"])
    spent[SET_UP] = marks["first epoch"] - start
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


def hand_eval_pass(path: str, got: Captured) -> float:
    """The hand-written loops' test pass (argmax, count, ``.item()`` per batch) on the same data."""
    model = got.slot.model
    loader = got.cohort.loaders["test"] if path == "in-memory" else DataLoader(Subset(got.run.dataset, got.fold.split.test.tolist()), batch_size=BATCH)
    start = clock()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return clock() - start


def eval_costs(path: str, got: Captured, repeats: int) -> dict[str, float]:
    """Seconds of each epoch's evaluation pass and of its parts, timed alone on a real run's
    objects (``hand``: the hand-written test pass on the same data). The forward pass is the
    hand-written loop's too; the loss, the meters and their scores are what izitorch adds (the
    test pass written by hand counts correct answers only)."""
    run, cohort, stack, slot, fold = got.run, got.cohort, got.stack, got.slot, got.fold
    engine, phase = izitorch.engine, fold.eval_phase
    batches = [(inputs, target) for inputs, target, _rows in izitorch.cohort.batches(run, cohort, phase)]

    def forward(with_loss: bool) -> None:
        stack.train(False)
        with torch.no_grad():
            for inputs, target in batches:
                outputs = stack.forward(inputs, None)
                if with_loss:
                    stack.losses(outputs, target, None)

    def stack_pass(results: bool) -> None:
        stack.train(False)
        made = engine.StackPass(run, stack, phase, {slot: fold}, None, None, len(batches))
        with torch.no_grad():
            for inputs, target in batches:
                made.batch(inputs, target, None)
        if results:
            made.results("inference_time", 0.0)

    def whole() -> None:
        izitorch.loop.epoch_pass(run, cohort, phase, cohort.folds)

    return best_in_turns(
        3 * repeats,
        {
            "hand": lambda: hand_eval_pass(path, got),
            "whole": lambda: timed(whole),
            "reading": lambda: timed(lambda: drain(izitorch.cohort.batches(run, cohort, phase))),
            "forward": lambda: timed(lambda: forward(False)),
            "loss": lambda: timed(lambda: forward(True)),
            "batches": lambda: timed(lambda: stack_pass(False)),
            "results": lambda: timed(lambda: stack_pass(True)),
        },
    )


def eval_rows(times: dict[str, float], steps: int) -> list[list]:
    """:func:`eval_costs` as table rows: us per pass, and spread over an epoch's ``steps``."""
    rows = [
        ["the hand-written test pass (forward, argmax, count, .item())", times["hand"]],
        ["izitorch's eval pass, whole (epoch_pass)", times["whole"]],
        ["  reading the batches (cohort.batches)", times["reading"]],
        ["  forward (the lone stack's)", times["forward"]],
        ["  the loss of each batch", times["loss"] - times["forward"]],
        ["  meters: update per batch, StackPass's step around them", times["batches"] - times["loss"]],
        ["  meters: compute (confusion matrix, scores) and the pass's results", times["results"] - times["batches"]],
    ]
    return [[label, seconds * 1e6, seconds * 1e6 / steps] for label, seconds in rows]


def timed(fn: Callable[[], Any]) -> float:
    start = clock()
    with quiet():
        fn()
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
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="cpu", help="cpu: this process's CPU time, all its threads (default; robust on a shared machine), or wall"
    )
    parser.add_argument("--ablation", action="store_true", help="also time izitorch's pass with each component switched off (needs a quiet machine)")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions of one run per path")
    parser.add_argument(
        "--quick", action="store_true", help="every table once, small (1 repeat, 2 epochs, fewer calls): checks the script runs, measures nothing"
    )
    args = parser.parse_args()
    global clock, CALLS, WARM_UP
    clock = CLOCKS[args.clock]
    if args.quick:
        args.repeats, args.epochs, CALLS, WARM_UP = 1, 2, 100, 0
    torch.set_num_threads(1)
    digits()  # its first load imports scikit-learn, which no measurement should count
    print(
        f"izitorch {izitorch.__version__}, torch {torch.__version__}, one thread, batch {BATCH}, {args.clock} time, "
        f"best of {args.repeats} (variants taking turns)\n"
    )
    for path in args.paths.split(","):
        steps_per_epoch = int(np.ceil(0.8 * 1797 / BATCH))
        steps = args.epochs * steps_per_epoch
        # always a warm-up turn: the first runs of the process import what torch's optimizers use
        best = best_in_turns(args.repeats, {"hand": lambda: hand_run(path, args.epochs), "izitorch": lambda: izitorch_run(path, args.epochs)}, warm_up=1)
        overhead = (best["izitorch"] - best["hand"]) / steps * 1e6
        print(
            f"== {path} data, {args.epochs} epochs x {steps_per_epoch} steps: hand-written run {best['hand']:.3f} s, izitorch "
            f"{best['izitorch']:.3f} s: izitorch adds {overhead:.0f} us per step\n",
            flush=True,
        )
        with captured_run(path) as got:
            passes = step_costs(path, got, 1 if args.quick else 3 * args.repeats, ablation=args.ablation)
            alone = component_costs(path, got, args.repeats)
            evaluation = eval_costs(path, got, args.repeats)
        summed = sum(row[1] for row in alone if not math.isnan(row[1]))
        alone.append(["sum of the components alone", summed])
        alone.append(["izitorch's training pass beyond the hand-written pass, measured whole", passes[0][2]])
        print(table("per training step, each component alone (us)", ["component", "us/step"], alone), "\n", flush=True)
        if args.ablation:
            print(
                table(
                    "per training step, one pass (us): izitorch's pass, what switching each component off saves", ["pass", "us/step", "saves / adds"], passes
                ),
                "\n",
                flush=True,
            )
        print(
            table(
                f"each epoch's eval pass in parts, each alone (us per pass; per step: over an epoch's {steps_per_epoch} training steps)",
                ["part", "us/pass", "us/step"],
                eval_rows(evaluation, steps_per_epoch),
            ),
            "\n",
            flush=True,
        )
        parts = run_costs(path, args.epochs, args.repeats)
        setup = min(hand_setup(path) for _ in range(args.repeats))
        rows = [["training passes beyond the hand-written pass (above)", passes[0][2] * steps / 1e3, passes[0][2]]]
        for key, seconds in parts.items():
            if key == EVAL_PASSES:
                seconds -= evaluation["hand"] * args.epochs
                key = "each epoch's eval pass beyond the hand-written test pass"
            if key == SET_UP:
                seconds -= setup
                key = "set-up beyond the hand-written loop's (data, split, model)"
            rows.append([key, seconds * 1e3, seconds / steps * 1e6])
        explained = sum(row[1] for row in rows)
        rows.append(["sum of the above", explained, explained * 1e3 / steps])
        rows.append(["whole-run overhead measured above", overhead * steps / 1e3, overhead])
        print(
            table(
                f"per run of {args.epochs} epochs (parts: best of {args.repeats} runs each), spread over its {steps} steps",
                ["part", "ms per run", "us/step"],
                rows,
            ),
            "\n",
            flush=True,
        )
        if args.cprofile:
            print(profile_run(path, args.epochs), flush=True)


if __name__ == "__main__":
    main()
