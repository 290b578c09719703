"""The CUDA path: device placement, the fast data path on the GPU, pinned memory, vectorized
groups, parallel folds and exact resume. Runs only where a GPU is visible; CPU machines (CI)
skip this module, and nothing else in the suite depends on it."""

from __future__ import annotations

import json
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import izitorch
from izitorch.distributed import Ranks
from conftest import KILLER, make_manifest, merged, run_cli
from izitorch.data import TensorBatchLoader, make_loaders
from izitorch.datasets import digits
from izitorch.models import MLP, SmallCNN
from izitorch.state import Split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Two members per optimizer class, each pair with its own hyper-parameters: three vectorized groups.
SIX_MODELS = [
    {"name": name, "params": {"hidden": 32}, **entry}
    for name, entry in {
        "sgd": {"optimizer": {"class": "torch.optim:SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True}},
        "sgd2": {"optimizer": {"class": "torch.optim:SGD", "lr": 0.02, "momentum": 0.5, "nesterov": True, "weight_decay": 1e-3}},
        "adam": {"optimizer": {"class": "torch.optim:Adam", "lr": 3e-3, "betas": [0.8, 0.99]}},
        "adam2": {"optimizer": {"class": "torch.optim:Adam", "lr": 1e-2}},
        "adamw": {
            "optimizer": {"class": "torch.optim:AdamW", "lr": 1e-2, "weight_decay": 0.05},
            "scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.8},
        },
        "adamw2": {"optimizer": {"class": "torch.optim:AdamW", "lr": 3e-3, "weight_decay": 0.2}},
    }.items()
]
NAMES = ("sgd", "sgd2", "adam", "adam2", "adamw", "adamw2")

DEVICES = """\
import json
from izitorch import hookimpl

@hookimpl
def izitorch_batch_finish(run, fold, step, losses):
    if step == 1 and fold.epoch == 1:
        seen = {name: str(loss.device) for name, loss in losses.items()}
        seen.update({"param:" + s.name: str(next(s.model.parameters()).device) for s in fold.slots})
        (run.res_dir / "devices.json").write_text(json.dumps(seen))
"""


def write(
    folder: Path,
    name: str,
    *,
    models: list[dict],
    epochs: int = 3,
    mode: str = "auto",
    enable: tuple[str, ...] = (),
    plugins: dict | None = None,
    dataset: str = "izitorch.datasets:digits",
    deterministic: bool = False,
    stratify: bool | None = None,
) -> Path:
    """folder/NAME.toml, results in folder/NAME: ``models`` (laid over the tiny MLP) on 600 digits
    on the GPU, pinned memory, with the plugins ``enable`` and the plugin tables ``plugins``."""
    return make_manifest(
        folder,
        name=f"{name}.toml",
        models=models,
        run={
            "res_dir": (folder / name).as_posix(),
            "device": "cuda",
            "epochs": epochs,
            "rdm_seed": 5,
            "multi_model": mode,
            "pin_memory": True,
            "deterministic": deterministic,
        },
        data={"dataset": dataset, "params": {"limit": 600}, "stratify": stratify},
        plugins={"enable": list(enable), **(plugins or {})},
    )


def run(path: Path) -> dict:
    return izitorch.run(izitorch.load_manifest(str(path)))


def checkpoint(res: Path, model: str, fold: int = 0) -> dict:
    folder = res / model / (f"FOLD_{fold}" if fold else "")
    return torch.load(folder / "model.pth.tar", weights_only=True)


def tensors_of(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for value in state.values() for t in tensors_of(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in tensors_of(value)]
    return []


def test_models_train_on_the_gpu_and_their_checkpoints_load_on_a_cpu_machine(tmp_path):
    (tmp_path / "devices.py").write_text(DEVICES)
    models = [
        {"name": "mlp", "params": None, "optimizer": {"lr": 3e-3}},
        {"name": "cnn", "model": "izitorch.models:SmallCNN", "params": None, "optimizer": {"lr": 3e-3}},
    ]
    results = run(write(tmp_path, "gpu", models=models, epochs=8, enable=("devices.py",)))
    res = tmp_path / "gpu"
    devices = json.loads((res / "devices.json").read_text())
    assert devices == {"mlp": "cuda:0", "cnn": "cuda:0", "param:mlp": "cuda:0", "param:cnn": "cuda:0"}
    split = pickle.loads((res / "Dataset_split.pkl").read_bytes())
    x, y = digits(limit=600).tensors
    test = torch.as_tensor(split[0][1])
    for name, fresh in (("mlp", MLP()), ("cnn", SmallCNN())):
        saved = checkpoint(res, name)
        # torch.load without map_location on a machine with no GPU needs CPU tensors
        assert {t.device.type for t in tensors_of(saved)} == {"cpu"}, name
        fresh.load_state_dict(saved["state_dict"])
        with torch.no_grad():
            correct = int((fresh.eval()(x[test]).argmax(1) == y[test]).sum())
        assert 100.0 * correct / len(test) == pytest.approx(results[name][0]["accuracy"], abs=1e-9), name
        assert correct > 0.85 * len(test), name


class PerSample(Dataset):
    """digits behind ``__getitem__`` only: forces the DataLoader path (pinned memory)."""

    def __init__(self) -> None:
        self.base = digits(limit=300)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index]


class FakeRun:
    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.device = torch.device("cuda")
        self.ranks = Ranks()  # one process
        self.config = izitorch.Config(
            run=izitorch.RunConfig(batch_size=32, rdm_seed=7, pin_memory=True), models=(izitorch.ModelSpec(name="m", model="izitorch.models:MLP"),)
        )


def test_the_fast_path_keeps_the_split_on_the_gpu_and_gives_the_pinned_dataloader_batches():
    order = np.random.default_rng(0).permutation(300)
    split = Split(train=order[:200], test=order[200:])
    fast = make_loaders(FakeRun(digits(limit=300)), split, fold_index=0)
    slow = make_loaders(FakeRun(PerSample()), split, fold_index=0)
    assert isinstance(fast["train"], TensorBatchLoader) and isinstance(slow["train"], DataLoader)
    assert all(t.device.type == "cuda" for t in fast["train"].tensors)  # moved once, not per batch
    for phase in ("train", "test"):
        for epoch in range(2):
            for (x1, y1), (x2, y2) in zip(fast[phase], slow[phase], strict=True):
                assert x1.device.type == y1.device.type == "cuda"
                assert x2.is_pinned() and y2.is_pinned()  # ready for non-blocking copies
                assert torch.equal(x1.cpu(), x2) and torch.equal(y1.cpu(), y2), (phase, epoch)


def test_a_vectorized_group_on_the_gpu_ends_with_the_sequential_weights(tmp_path, capsys):
    run(write(tmp_path, "vec", models=SIX_MODELS, mode="vectorized"))
    out = capsys.readouterr().out
    assert "vectorized group of 2: sgd, sgd2" in out and "vectorized group of 2: adamw, adamw2" in out
    run(write(tmp_path, "seq", models=SIX_MODELS, mode="sequential"))
    for name in NAMES:
        vec, seq = checkpoint(tmp_path / "vec", name), checkpoint(tmp_path / "seq", name)
        for key, value in seq["state_dict"].items():
            assert torch.allclose(vec["state_dict"][key], value, atol=1e-5), (name, key)
    assert checkpoint(tmp_path / "vec", "adamw")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.8**3)


NOISY = """\
import torch
from torch.utils.data import TensorDataset
from izitorch.datasets import digits

ROWS = []

def noisy_digits(limit=600):
    inputs, targets = (t.clone() for t in digits(limit=limit).tensors)
    rows = torch.tensor(ROWS, dtype=torch.long)
    inputs[rows] = 5 * torch.randn(len(rows), inputs.shape[1], generator=torch.Generator().manual_seed(0))
    targets[rows] = (targets[rows] + 3) % 10
    return TensorDataset(inputs, targets)
"""


def test_parallel_folds_on_the_gpu_never_depend_on_their_own_test_samples(tmp_path):
    models = [merged(model, {"params": {"dropout": 0.1}}) for model in SIX_MODELS]
    kfold = {"kfold": {"k": 3, "parallel": True}}
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "noisy.py").write_text(NOISY)
    # not stratified: the garbage changes labels, and a stratified split would move with them
    run(write(tmp_path / "clean", "res", models=models, enable=("kfold",), plugins=kfold, dataset="noisy.py:noisy_digits", stratify=False))
    split = pickle.loads((tmp_path / "clean" / "res" / "Dataset_split.pkl").read_bytes())
    (tmp_path / "spoiled").mkdir()
    (tmp_path / "spoiled" / "noisy.py").write_text(NOISY.replace("ROWS = []", f"ROWS = {json.dumps(split[0][1])}"))
    run(write(tmp_path / "spoiled", "res", models=models, enable=("kfold",), plugins=kfold, dataset="noisy.py:noisy_digits", stratify=False))
    for name in NAMES:
        before, after = checkpoint(tmp_path / "clean" / "res", name, 1), checkpoint(tmp_path / "spoiled" / "res", name, 1)
        assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"]), name
        before, after = checkpoint(tmp_path / "clean" / "res", name, 2), checkpoint(tmp_path / "spoiled" / "res", name, 2)
        assert not all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"]), name


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_killed_gpu_run_with_dropout_resumes_bit_for_bit(tmp_path, deterministic):
    """MLPs resume bit for bit as they are; convolutions need ``deterministic = true``."""
    (tmp_path / "killer.py").write_text(KILLER)
    models = [merged(model, {"params": {"dropout": 0.2}}) for model in SIX_MODELS]
    if deterministic:  # the MLPs and as many CNNs
        models += [
            merged(model, {"name": f"solo_{model['name']}", "model": "izitorch.models:SmallCNN", "params": {"hidden": None, "channels": 8}})
            for model in SIX_MODELS
        ]
    kfold = {"kfold": {"k": 2}}
    reference = write(tmp_path, "ref", models=models, enable=("killer.py", "kfold"), plugins=kfold, deterministic=deterministic)
    killed = write(tmp_path, "killed", models=models, enable=("killer.py", "kfold"), plugins=kfold, deterministic=deterministic)
    assert run_cli("run", str(reference), cwd=tmp_path).returncode == 0
    # killed in fold 2: fold 1's saved final scores are reused on resume
    done = run_cli("run", str(killed), cwd=tmp_path, env={"KILL_AT": "2,2,5"})
    assert done.returncode == -signal.SIGKILL
    done = run_cli("run", str(killed), "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in NAMES + (tuple("solo_" + name for name in NAMES) if deterministic else ()):
        for fold in (1, 2):
            ref, res = checkpoint(tmp_path / "ref", name, fold), checkpoint(tmp_path / "killed", name, fold)
            for key in ref["state_dict"]:
                assert torch.equal(ref["state_dict"][key], res["state_dict"][key]), (name, fold, key)
            logs = [json.loads((tmp_path / r / name / f"FOLD_{fold}" / "trainlog.json").read_text()) for r in ("ref", "killed")]
            strip = [{e: {k: v for k, v in d.items() if not k.endswith("_time")} for e, d in log.items()} for log in logs]
            assert strip[0] == strip[1], (name, fold)


def test_the_per_step_metric_and_optimizer_work_never_waits_for_the_gpu():
    """Meters and the stacked optimizer queue their work: no host-device synchronisation
    (``bincount``, pageable host-to-device copies) inside a training step."""
    from izitorch.ensemble import VectorGroup
    from izitorch.plugins.metrics import ConfusionMeter, LossMeter, count_cells

    pairs = torch.randint(0, 12, (500,), device="cuda")
    assert torch.equal(count_cells(pairs, 13).cpu(), torch.bincount(pairs.cpu(), minlength=13))
    slots = [
        izitorch.data.build_slot(
            izitorch.ModelSpec(name=f"m{i}", model="izitorch.models:MLP", optimizer=izitorch.ComponentSpec("torch.optim:Adam", {"lr": 1e-3 * (i + 1)})),
            i,
            torch.device("cuda"),
            ".",
        )
        for i in range(3)
    ]
    group = VectorGroup(slots)
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    meters = [LossMeter(10, 3), ConfusionMeter(10, 3)]
    single = ConfusionMeter(10)  # a lone model: K = 1
    frozen_row = torch.tensor([[True], [False], [True]], device="cuda").expand(3, 32)  # member 1 frozen
    frozen = [p.detach().clone() for p in slots[1].model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            outputs = group.forward(x, None)
            losses = group.losses(outputs, y)
            group.zero_grad()
            group.backward(losses)
            group.step([True, False, True])
            for meter in meters:
                meter.update(outputs.detach(), y, losses.detach(), frozen_row)
            single.update(outputs[:1].detach(), y, losses[:1].detach())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [m["confusion_matrix"].sum() for m in meters[1].compute()] == [96, 0, 96]
    assert meters[0].compute()[1] == {} and single.compute()[0]["confusion_matrix"].sum() == 96
    assert all(torch.equal(a, b) for a, b in zip(frozen, slots[1].model.parameters()))  # the inactive member


@pytest.mark.parametrize("strategy", ["models", "data"])
def test_torchrun_on_the_gpus_gives_what_one_gpu_gives(tmp_path, strategy):
    """torchrun with one process per visible GPU (nccl; one process on a single GPU):
    ``"models"`` equals one process bit for bit; ``"data"`` with batch 32 per process equals one
    process of batch 32 x processes under torchrun, within float tolerance."""
    import os
    import subprocess
    import sys

    gpus = torch.cuda.device_count()
    results = {}
    for processes, batch in ((1, 32 * gpus), (gpus, 32)):
        folder = tmp_path / f"n{processes}"
        manifest = make_manifest(
            folder,
            models=[{"name": "a", "optimizer": {"class": "torch.optim:SGD", "lr": 0.1}}, {"name": "b", "params": {"hidden": 8, "layers": 2}}],
            run={"device": "cuda", "epochs": 2, "batch_size": batch if strategy == "data" else 32, "distributed": strategy, "rdm_seed": 3},
            data={"params": {"limit": 64 * 5 * gpus}, "train_ratio": 0.8},
        )
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "izitorch", "run", str(manifest)]
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[processes] = {name: checkpoint(folder / "res", name)["state_dict"] for name in ("a", "b")}
    for name in ("a", "b"):
        for key, value in results[1][name].items():
            torch.testing.assert_close(results[gpus][name][key], value, rtol=1e-4, atol=1e-5)
