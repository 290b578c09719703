"""izitorch against hand-written PyTorch, side by side in one process, same data/model/seed.

    python benchmarks/run.py            # all cases (a few minutes on a 2-core CPU)
    python benchmarks/run.py --quick    # fewer epochs, for a smoke test
    python benchmarks/run.py --device cuda

Case 1: one MLP on digits, batch 32, on both of izitorch's data paths, against two hand-written
        loops: a DataLoader over a per-sample dataset, and batches gathered by indexing in-memory
        tensors (the fastest way to write it by hand). izitorch runs on the in-memory
        TensorDataset (its tensor-indexing path) and on the per-sample dataset (its DataLoader
        path); "over ref" is its time per step beyond the hand loop of the same data path. Every
        runner draws the same batches, so the weights after the run are compared bit for bit.
Case 2: K small models (64-16-10) on one data stream: izitorch sequential / vectorized, K
        hand-written loops one after another, and a hand-batched reference (weights stacked
        [K, in, out], torch.baddbmm, one Adam) that stands for the practical limit.
Case 3: 5-fold cross-validation: sequential folds, parallel folds, one single fold.
Every row also reports the final test accuracy, so a speed-up never hides a wrong result.
Cases 2 and 3 run izitorch without its output plugins (trainlog, checkpoint), as the hand-written
loops write no files; the per-epoch resume state is still written.
Timings are wall-clock (``--clock cpu``: the process's CPU time, which does not count the time
other processes hold the cores); the first repetition warms up and is dropped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import izitorch  # noqa: E402
from izitorch import ComponentSpec, Config, DataConfig, ModelSpec, PluginsConfig, RunConfig  # noqa: E402
from izitorch.datasets import digits  # noqa: E402
from izitorch.models import MLP  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # --clock cpu: this process's CPU time, for a machine that other processes share
BATCH = 64
CASE1_BATCH = 32  # small batches: the per-step overhead weighs most
SEED = 1


# -- izitorch ---------------------------------------------------------------------------------


def izitorch_run(
    models: list[ModelSpec],
    epochs: int,
    device: str,
    multi_model: str = "auto",
    plugins: PluginsConfig | None = None,
    quiet: bool = True,
    batch: int = BATCH,
    dataset=None,
) -> tuple[float, dict]:
    """Seconds for a whole izitorch run (set-up included) and its results.

    ``dataset`` (a callable building a Dataset, called inside the timed run) replaces the
    bundled digits; a model spec whose ``model`` is a :class:`BuildModel` has its model built
    inside the timed run too (and kept, for the weights check).
    """
    with tempfile.TemporaryDirectory() as res_dir:
        disable = ("console",) if quiet else ()
        plugins = plugins or PluginsConfig()
        plugins = PluginsConfig(enable=plugins.enable, disable=plugins.disable + disable, tables=plugins.tables)
        start = clock()
        models = [attrs.evolve(spec, model=spec.model()) if isinstance(spec.model, BuildModel) else spec for spec in models]
        config = Config(
            run=RunConfig(res_dir=res_dir, epochs=epochs, batch_size=batch, rdm_seed=SEED, device=device, multi_model=multi_model),
            # stratify off: the hand-written loops split by a seeded permutation (holdout above)
            data=DataConfig(dataset=dataset() if dataset else "izitorch.datasets:digits", num_classes=10, stratify=False),
            models=tuple(models),
            plugins=plugins,
        )
        results = izitorch.run(config)
        return clock() - start, results


class BuildModel:
    """A model built by the benchmark (seeded as the hand-written loops seed theirs) and kept, so
    that its weights can be compared with theirs after the run."""

    def __init__(self, hidden: int = 64, layers: int = 1) -> None:
        self.hidden, self.layers = hidden, layers
        self.built: list[nn.Module] = []

    def __call__(self) -> nn.Module:
        torch.manual_seed(SEED)
        model = MLP(hidden=self.hidden, layers=self.layers)
        self.built.append(model)
        return model


def mlp_spec(name: str, hidden: int = 64, layers: int = 1, lr: float = 1e-3) -> ModelSpec:
    return ModelSpec(
        name=name, model="izitorch.models:MLP", params={"hidden": hidden, "layers": layers}, optimizer=ComponentSpec("torch.optim:Adam", {"lr": lr})
    )


# -- hand-written references -----------------------------------------------------------------


def holdout(size: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SEED).permutation(size)
    cut = int(0.8 * size)
    return order[:cut], order[cut:]


class Samples(Dataset):
    """The digits as a per-sample dataset (not a ``TensorDataset``): every sample goes through
    ``__getitem__`` and the DataLoader's collation, as with images read from files."""

    def __init__(self) -> None:
        self.inputs, self.targets = digits().tensors

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def hand_loop(
    epochs: int, device: torch.device, hidden: int = 64, layers: int = 1, lr: float = 1e-3, seed: int = SEED, batch: int = BATCH
) -> tuple[float, float, dict]:
    """The loop a user writes by hand: DataLoader, forward, loss, backward, Adam, test each epoch.

    Timed from loading the data, as izitorch's runs are (set-up included on both sides). The
    sampler has its own seeded generator, as izitorch's has: the same batches as izitorch's.
    Returns the seconds, the test accuracy and the final weights.
    """
    start = clock()
    data = Samples()
    train, test = holdout(len(data))
    torch.manual_seed(seed)
    model = MLP(hidden=hidden, layers=layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    train_set = Subset(data, train.tolist())
    train_loader = DataLoader(
        train_set,
        batch_size=batch,
        sampler=RandomSampler(train_set, generator=torch.Generator().manual_seed(seed)),
        generator=torch.Generator().manual_seed(seed),
    )
    test_loader = DataLoader(Subset(data, test.tolist()), batch_size=batch)
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        correct = 0
        model.eval()
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    return clock() - start, 100.0 * correct / len(test), model.state_dict()


def hand_tensor_loop(
    epochs: int, device: torch.device, hidden: int = 64, layers: int = 1, lr: float = 1e-3, seed: int = SEED, batch: int = BATCH
) -> tuple[float, float, dict]:
    """The fastest loop by hand for in-memory data: a permutation per epoch, batches gathered by
    indexing the tensors (``x[rows]``), the same model, optimizer and test as :func:`hand_loop`.

    ``RandomSampler`` draws a second (empty) permutation at the end of each epoch from its
    generator; drawing it too gives the batches of izitorch and of :func:`hand_loop`.
    """
    start = clock()
    inputs, targets = digits().tensors
    train, test = holdout(len(targets))
    train_x, train_y = inputs[train].to(device), targets[train].to(device)
    test_x, test_y = inputs[test].to(device), targets[test].to(device)
    torch.manual_seed(seed)
    model = MLP(hidden=hidden, layers=layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    size = len(train)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(size, generator=generator).to(device)
        torch.randperm(size, generator=generator)  # what RandomSampler draws and drops
        for begin in range(0, size, batch):
            rows = order[begin : begin + batch]
            loss = criterion(model(train_x[rows]), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        correct = 0
        model.eval()
        with torch.no_grad():
            for begin in range(0, len(test), batch):
                correct += (model(test_x[begin : begin + batch]).argmax(1) == test_y[begin : begin + batch]).sum().item()
    return clock() - start, 100.0 * correct / len(test), model.state_dict()


def same_weights(state: dict, reference: dict) -> str:
    """``identical`` when every tensor is bit-identical, else the largest absolute difference."""
    gap = max(float((state[k].cpu() - reference[k].cpu()).abs().max()) for k in reference)
    return "identical" if all(torch.equal(state[k].cpu(), reference[k].cpu()) for k in reference) else f"differ:{gap:.1e}"


def hand_batched(k: int, epochs: int, device: torch.device, hidden: int = 16) -> tuple[float, float]:
    """K MLPs 64-hidden-10 as stacked weights [K, in, out], torch.baddbmm, one Adam: the limit."""
    start = clock()
    data = digits()
    x_all, y_all = data.tensors[0].to(device), data.tensors[1].to(device)
    train, test = holdout(len(data))
    train_x, train_y = x_all[train], y_all[train]
    test_x, test_y = x_all[test], y_all[test]
    torch.manual_seed(SEED)
    w1 = (torch.randn(k, 64, hidden, device=device) / 8).requires_grad_()
    b1 = torch.zeros(k, 1, hidden, device=device, requires_grad=True)
    w2 = (torch.randn(k, hidden, 10, device=device) / hidden**0.5).requires_grad_()
    b2 = torch.zeros(k, 1, 10, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([w1, b1, w2, b2], lr=1e-2)
    generator = torch.Generator().manual_seed(SEED)

    def forward(x):
        hidden_layer = torch.relu(torch.baddbmm(b1, x.expand(k, -1, -1), w1))
        return torch.baddbmm(b2, hidden_layer, w2)

    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator).to(device)
        for begin in range(0, len(train), BATCH):
            rows = order[begin : begin + BATCH]
            out = forward(train_x[rows])
            loss = nn.functional.cross_entropy(out.reshape(-1, 10), train_y[rows].repeat(k), reduction="mean") * k
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (forward(test_x).argmax(-1) == test_y).float().mean(1) * 100
    return clock() - start, float(accuracy.mean())


# -- cases -------------------------------------------------------------------------------------


def best_of(repeats: int, fn):
    outcomes = [fn() for _ in range(repeats + 1)][1:]  # the first one warms up
    return min(outcomes, key=lambda o: o[0])


def accuracy_of(results: dict) -> float:
    return float(np.mean([np.mean([fold["accuracy"] for fold in folds]) for folds in results.values()]))


def case1(epochs: int, device: str, repeats: int) -> list[list]:
    """Runners take turns (hand, default, no outputs, hand, ...): a drift of the machine's speed
    during the case then weighs on every runner alike instead of on whichever ran last."""
    steps = epochs * int(np.ceil(0.8 * 1797 / CASE1_BATCH))
    torch_device = torch.device(device if device != "auto" else "cpu")
    builders = {label: BuildModel() for label in ("default", "no outputs", "per-sample")}

    def izitorch_case1(label: str, **options):
        return lambda: izitorch_run([attrs.evolve(mlp_spec("mlp"), model=builders[label])], epochs, device, batch=CASE1_BATCH, **options)

    by_loader, by_tensors = ("hand-written, DataLoader", "per-sample"), ("hand-written, tensor indexing", "in-memory")
    # (label, data path): (run, the hand-written loop on the same data, the model kept by an izitorch run)
    runners = {
        by_loader: (lambda: hand_loop(epochs, torch_device, batch=CASE1_BATCH), None, None),
        by_tensors: (lambda: hand_tensor_loop(epochs, torch_device, batch=CASE1_BATCH), None, None),
        ("izitorch, default plugins", "in-memory"): (izitorch_case1("default"), by_tensors, builders["default"]),
        ("izitorch, no output plugins", "in-memory"): (izitorch_case1("no outputs", plugins=NO_OUTPUTS), by_tensors, builders["no outputs"]),
        ("izitorch, default plugins", "per-sample"): (izitorch_case1("per-sample", dataset=Samples), by_loader, builders["per-sample"]),
    }
    best = best_in_turns(repeats, {key: run for key, (run, _, _) in runners.items()})
    reference_weights = best[by_tensors][2]
    rows = []
    for (label, path), (_, reference, built) in runners.items():
        seconds, outcome = best[(label, path)][:2]
        if reference is None:  # a hand-written loop
            accuracy, weights, over = outcome, best[(label, path)][2], float("nan")
        else:
            accuracy, weights = accuracy_of(outcome), built.built[-1].state_dict()
            over = (seconds - best[reference][0]) / steps * 1e6
        check = "reference" if (label, path) == by_tensors else same_weights(weights, reference_weights)
        rows.append([label, path, seconds, seconds / steps * 1e3, over, seconds / best[by_loader][0], seconds / best[by_tensors][0], accuracy, check])
    return rows


def best_in_turns(repeats: int, runners: dict) -> dict:
    """``best_of`` for several runners whose repetitions alternate; the first turn warms up."""
    outcomes: dict = {label: [] for label in runners}
    for turn in range(repeats + 1):
        for label, fn in runners.items():
            outcome = fn()
            if turn:
                outcomes[label].append(outcome)
    return {label: min(found, key=lambda o: o[0]) for label, found in outcomes.items()}


NO_OUTPUTS = PluginsConfig(disable=("trainlog", "checkpoint"))  # hand loops write no files either


def case2(ks: list[int], epochs: int, device: str, repeats: int) -> list[list]:
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    hand_loop(1, torch_device, hidden=16)  # warm-up: first calls pay for lazy initialisation
    rows = []
    for k in ks:
        specs = [mlp_spec(f"m{i}", hidden=16, lr=1e-2) for i in range(k)]
        loops_s = sum(hand_loop(epochs, torch_device, hidden=16, lr=1e-2, seed=SEED + i)[0] for i in range(k))
        loops_acc = hand_loop(epochs, torch_device, hidden=16, lr=1e-2)[1]
        ref_s, ref_acc = best_of(repeats, lambda: hand_batched(k, epochs, torch_device))
        seq_s, seq = best_of(repeats, lambda: izitorch_run(specs, epochs, device, "sequential", plugins=NO_OUTPUTS))
        try:
            vec_s, vec = best_of(repeats, lambda: izitorch_run(specs, epochs, device, "vectorized", plugins=NO_OUTPUTS))
            vec_acc = accuracy_of(vec)
            # the same with the default output plugins (trainlog, checkpoint): what a user's sweep pays
            out_s, _ = best_of(repeats, lambda: izitorch_run(specs, epochs, device, "vectorized"))
        except izitorch.IzitorchError as error:
            vec_s, vec_acc, out_s = float("nan"), float("nan"), float("nan")
            print(f"  (vectorized unavailable: {error})")
        rows.append(
            [
                k,
                loops_s,
                seq_s,
                vec_s,
                out_s,
                ref_s,
                loops_s / seq_s,
                loops_s / vec_s,
                loops_s / out_s,
                loops_s / ref_s,
                vec_s / ref_s,
                loops_acc,
                accuracy_of(seq),
                vec_acc,
                ref_acc,
            ]
        )
    return rows


def case3(epochs: int, device: str, repeats: int) -> list[list]:
    rows = []
    for label, spec in (("small 64-16-10", mlp_spec("small", hidden=16, lr=1e-2)), ("64-256-256-10", mlp_spec("big", hidden=256, layers=2))):
        one_s, one = best_of(repeats, lambda: izitorch_run([spec], epochs, device, plugins=NO_OUTPUTS))
        kfold = PluginsConfig(disable=NO_OUTPUTS.disable, tables={"kfold": {"k": 5}})
        seq_s, seq = best_of(repeats, lambda: izitorch_run([spec], epochs, device, plugins=kfold))
        try:
            parallel = PluginsConfig(disable=NO_OUTPUTS.disable, tables={"kfold": {"k": 5, "parallel": True}})
            par_s, par = best_of(repeats, lambda: izitorch_run([spec], epochs, device, plugins=parallel))
            par_acc = accuracy_of(par)
        except izitorch.IzitorchError as error:
            par_s, par_acc = float("nan"), float("nan")
            print(f"  (parallel folds unavailable: {error})")
        rows.append([label, one_s, seq_s, par_s, seq_s / one_s, par_s / one_s, accuracy_of(one), accuracy_of(seq), par_acc])
    return rows


def table(title: str, header: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return "n/a" if np.isnan(value) else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repetitions")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--cases", default="1,2,3", help="which cases to run, e.g. 1,2")
    parser.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="wall (default) or cpu: this process's CPU time, all its threads (robust on a shared machine)"
    )
    parser.add_argument("--ks", default="1,4,16,64", help="model counts for case 2")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else 2
    case1_repeats = 1 if args.quick else 5  # the tightest target (1.05x): more turns, each short
    cases = set(args.cases.split(","))
    print(f"izitorch {izitorch.__version__}, torch {torch.__version__}, device {args.device}, {args.threads} thread(s), {args.clock} time\n")
    if "1" in cases:
        epochs = 5 if args.quick else 30
        print(
            table(
                f"case 1: one MLP 64-64-10 on digits, batch {CASE1_BATCH}, {epochs} epochs (ratios = time / a hand-written "
                "loop's; us over ref = per step, beyond the hand-written loop of the same data; weights against the "
                "tensor-indexing loop's)",
                ["runner", "data", "seconds", "ms/step", "us over ref", "/ DataLoader", "/ tensors", "test acc %", "weights"],
                case1(epochs, args.device, case1_repeats),
            ),
            "\n",
            flush=True,
        )
    if "2" in cases:
        epochs = 2 if args.quick else 5
        ks = [int(k) for k in args.ks.split(",")]
        print(
            table(
                f"case 2: K models 64-16-10 on one data stream, {epochs} epochs (speed-up = K separate loops / runner; "
                "seq, vec: no output plugins; vec+out: vectorized with the default plugins, files written)",
                [
                    "K",
                    "loops s",
                    "seq s",
                    "vec s",
                    "vec+out s",
                    "ref s",
                    "seq x",
                    "vec x",
                    "vec+out x",
                    "ref x",
                    "vec/ref",
                    "acc loops",
                    "acc seq",
                    "acc vec",
                    "acc ref",
                ],
                case2(ks, epochs, args.device, repeats),
            ),
            "\n",
            flush=True,
        )
    if "3" in cases:
        epochs = 3 if args.quick else 10
        print(
            table(
                f"case 3: 5-fold cross-validation, {epochs} epochs (ratios to one single fold)",
                ["model", "1 fold s", "5 seq s", "5 par s", "seq/1", "par/1", "acc 1", "acc seq", "acc par"],
                case3(epochs, args.device, repeats),
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
