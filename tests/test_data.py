"""The fast path for in-memory tensor datasets gives exactly the DataLoader path's batches."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import izitorch
from izitorch.distributed import Ranks
from izitorch.data import TensorBatchLoader, make_loaders
from izitorch.datasets import digits
from izitorch.state import Split


class PerSample(Dataset):
    """The same data behind ``__getitem__``: forces the DataLoader path (its ``targets`` make
    the split the fast path's, stratified)."""

    def __init__(self, base: TensorDataset) -> None:
        self.base, self.targets = base, base.tensors[1]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index]


def per_sample_digits(limit: int = 300) -> PerSample:
    return PerSample(digits(limit=limit))


class FakeRun:
    def __init__(self, dataset, batch_size=32, shuffle=True):
        self.dataset = dataset
        self.device = torch.device("cpu")
        self.ranks = Ranks()  # one process
        self.config = izitorch.Config(
            run=izitorch.RunConfig(batch_size=batch_size, shuffle=shuffle, rdm_seed=7), models=(izitorch.ModelSpec(name="m", model="izitorch.models:MLP"),)
        )


def batches(loader, epochs=3):
    return [[tuple(t.clone() for t in batch) for batch in loader] for _ in range(epochs)]


def test_tensor_datasets_take_the_fast_path_and_give_the_dataloader_batches():
    data = digits(limit=300)
    rng = np.random.default_rng(0)
    order = rng.permutation(300)
    split = Split(train=order[:200], val=order[200:250], test=order[250:])
    fast = make_loaders(FakeRun(data), split, fold_index=1)
    slow = make_loaders(FakeRun(PerSample(data)), split, fold_index=1)
    assert all(isinstance(loader, TensorBatchLoader) for loader in fast.values())
    assert all(isinstance(loader, DataLoader) for loader in slow.values())
    for phase in ("train", "val", "test"):
        assert len(fast[phase]) == len(slow[phase])
        got, expected = batches(fast[phase]), batches(slow[phase])
        for epoch_got, epoch_expected in zip(got, expected):
            assert len(epoch_got) == len(epoch_expected)
            for (x1, y1), (x2, y2) in zip(epoch_got, epoch_expected):
                assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # both paths leave their generators in the same state (what the resume state saves)
    assert torch.equal(fast["train"].sampler.generator.get_state(), slow["train"].sampler.generator.get_state())
    assert torch.equal(fast["train"].generator.get_state(), slow["train"].generator.get_state())
    # shuffling really happens, differently each epoch
    epochs = batches(fast["train"], 2)
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])


def test_without_shuffle_batches_follow_the_split_order():
    data = digits(limit=100)
    split = Split(train=np.arange(60), test=np.arange(60, 100))
    loader = make_loaders(FakeRun(data, batch_size=25, shuffle=False), split, 0)["train"]
    xs = [x for x, _ in loader]
    assert [len(x) for x in xs] == [25, 25, 10]
    assert torch.equal(torch.cat(xs), data.tensors[0][:60])


def test_a_run_is_identical_on_both_paths(manifest, tmp_path):
    fast_dir, slow_dir = tmp_path / "fast", tmp_path / "slow"
    fast = manifest({"run.res_dir": fast_dir.as_posix()}, name="fast.toml")
    slow = manifest({"run.res_dir": slow_dir.as_posix(), "data.dataset": "test_data:per_sample_digits"}, name="slow.toml")
    results_fast = izitorch.run(izitorch.load_manifest(fast))
    results_slow = izitorch.run(izitorch.load_manifest(slow))
    assert results_fast["mlp"][0]["accuracy"] == results_slow["mlp"][0]["accuracy"]
    strip = lambda log: {e: {k: v for k, v in d.items() if not k.endswith("_time")} for e, d in log.items()}  # noqa: E731
    log_fast = json.loads((fast_dir / "mlp" / "trainlog.json").read_text())
    log_slow = json.loads((slow_dir / "mlp" / "trainlog.json").read_text())
    assert strip(log_fast) == strip(log_slow)


def test_move_to_skips_only_what_is_already_on_the_device(monkeypatch):
    """``Module.to`` runs unless every tensor is on the device already; a class with its own ``to``
    or ``_apply`` (which may move more than parameters and buffers) always gets it called."""
    from torch import nn

    from izitorch.data import move_to

    moved = []
    real_to = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *args, **kwargs: moved.append(type(self).__name__) or self)

    class OwnTo(nn.Linear):
        def to(self, *args, **kwargs):
            moved.append("own")
            return real_to(self, *args, **kwargs)

    cpu = torch.device("cpu")
    move_to(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), cpu)
    move_to(nn.ReLU(), cpu)
    assert moved == []
    move_to(OwnTo(2, 2), cpu)
    assert moved == ["own"]
    moved.clear()
    on_meta = nn.Linear(2, 2, device="meta")
    move_to(on_meta, cpu)
    assert moved == ["Linear"]
    buffer_on_meta = nn.BatchNorm1d(2)
    buffer_on_meta.running_mean = torch.zeros(2, device="meta")
    move_to(buffer_on_meta, cpu)
    assert moved == ["Linear", "BatchNorm1d"]

    class OwnApply(nn.Module):  # moves a plain tensor attribute along (through _apply)
        def _apply(self, fn, recurse=True):
            self.table = fn(self.table)
            return super()._apply(fn, recurse)

    holder = OwnApply()
    holder.table = torch.zeros(2)
    move_to(nn.Sequential(nn.Linear(2, 2), holder), cpu)
    assert moved == ["Linear", "BatchNorm1d", "Sequential"]
