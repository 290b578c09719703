"""Loader options: ``collate_fn``, ``sampler`` (``"balanced"``), ``drop_last``, ``eval_batch_size``.

The in-memory fast path gives the DataLoader path's batches with every option it can serve, and
steps aside for a ``collate_fn``; each option works for lone models, vectorized groups and
parallel folds, or is refused there in one line.
"""

from __future__ import annotations

import json
import pickle

import attrs
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

import izitorch
from izitorch.distributed import Ranks
from test_data import PerSample
from izitorch import cli
from izitorch.data import TensorBatchLoader, make_loaders
from izitorch.datasets import digits
from izitorch.state import Split


def collate_doubling(items):
    """A collate_fn of the tests: inputs doubled, so its batches are told from the default's."""
    return torch.stack([x for x, _ in items]) * 2, torch.stack([y for _, y in items])


class FakeRun:
    def __init__(self, dataset, **data):
        self.dataset = dataset
        self.device = torch.device("cpu")
        self.ranks = Ranks()  # one process
        self.config = izitorch.Config(
            run=izitorch.RunConfig(batch_size=32, rdm_seed=7),
            data=izitorch.DataConfig(**data),
            models=(izitorch.ModelSpec(name="m", model="izitorch.models:MLP"),),
        )


def epochs_of(loader, count=2):
    return [[tuple(t.clone() for t in batch) for batch in loader] for _ in range(count)]


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert len(one) == len(other)
        for a, b in zip(one, other):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


SPLIT = Split(train=np.arange(0, 300, 3).tolist() + np.arange(1, 300, 3).tolist(), val=np.arange(2, 150, 3), test=np.arange(152, 300, 3))


@pytest.mark.parametrize(
    "options",
    [{"sampler": "balanced"}, {"drop_last": True}, {"eval_batch_size": 7}, {"sampler": "balanced", "drop_last": True, "eval_batch_size": 100}],
)
def test_the_fast_path_serves_the_options_with_the_dataloaders_batches(options):
    data = digits(limit=300)
    fast = make_loaders(FakeRun(data, **options), SPLIT, fold_index=1)
    slow = make_loaders(FakeRun(PerSample(data), **options), SPLIT, fold_index=1)
    assert all(isinstance(loader, TensorBatchLoader) for loader in fast.values())
    assert all(isinstance(loader, DataLoader) for loader in slow.values())
    for phase in ("train", "val", "test"):
        assert len(fast[phase]) == len(slow[phase])
        assert_same_batches(epochs_of(fast[phase]), epochs_of(slow[phase]))
    sizes = [len(batch[0]) for batch in fast["train"]]
    eval_size = options.get("eval_batch_size", 32)
    assert [len(batch[0]) for batch in fast["test"]][0] == min(eval_size, 50)
    assert len(fast["test"]) == -(-50 // eval_size)
    if options.get("drop_last"):
        assert sizes == [32] * (200 // 32)  # 200 training samples: the 8 left over are dropped
    else:
        assert sizes == [32] * 6 + [8]


def test_balanced_weighs_each_training_sample_by_its_class_count_in_the_split():
    data = digits(limit=300)
    loader = make_loaders(FakeRun(data, sampler="balanced"), SPLIT, fold_index=0)["train"]
    assert isinstance(loader.sampler, WeightedRandomSampler) and loader.sampler.replacement
    labels = data.tensors[1][torch.as_tensor(SPLIT.train)]
    counts = {c: int((labels == c).sum()) for c in range(10)}
    expected = torch.tensor([1.0 / counts[int(c)] for c in labels], dtype=torch.float64)
    assert torch.allclose(loader.sampler.weights, expected)
    assert loader.sampler.num_samples == 200
    # drawn over many epochs, every class comes up about as often
    drawn = torch.cat([y for _ in range(30) for _, y in loader])
    share = torch.bincount(drawn, minlength=10).double() / len(drawn)
    assert torch.all((share - 0.1).abs() < 0.02), share


def test_a_collate_fn_moves_a_tensor_dataset_off_the_fast_path_with_its_batches():
    data = digits(limit=300)
    loaders = make_loaders(FakeRun(data, collate_fn=collate_doubling), SPLIT, fold_index=0)
    plain = make_loaders(FakeRun(data), SPLIT, fold_index=0)
    assert isinstance(loaders["train"], DataLoader)
    for phase in ("train", "test"):
        for (x, y), (x0, y0) in zip(loaders[phase], plain[phase]):
            assert torch.equal(x, 2 * x0) and torch.equal(y, y0)


def test_drop_last_with_a_split_smaller_than_a_batch_is_one_line():
    split = Split(train=np.arange(20), test=np.arange(20, 40))
    with pytest.raises(izitorch.IzitorchError, match=r"fewer than batch_size = 32: drop_last leaves no batch"):
        make_loaders(FakeRun(digits(limit=40), drop_last=True), split, fold_index=0)


# -- whole runs ----------------------------------------------------------------------------------

HELPERS = """\
import torch


def doubling(items):
    return torch.stack([x for x, _ in items]) * 2, torch.stack([y for _, y in items])


def first_half(split, generator=None, share=0.5):
    count = int(len(split) * share)
    return torch.utils.data.SubsetRandomSampler(list(range(count)), generator=generator)


def out_of_range(split):
    return [len(split) + 5]


def triple(items):
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]), None


def failing(items):
    raise ValueError("no batch today")
"""

OPTIONS = {"data.collate_fn": "helpers.py:doubling", "data.drop_last": True, "data.eval_batch_size": 7}
TWO = [{"name": "a"}, {"name": "b", "optimizer": {"class": "torch.optim:Adam", "lr": 5e-3}}]  # one vectorized group


@pytest.fixture
def helpers(tmp_path):
    (tmp_path / "helpers.py").write_text(HELPERS, encoding="utf-8")


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err


def without_times(log: dict) -> dict:
    return {epoch: {k: v for k, v in entry.items() if not k.endswith("_time")} for epoch, entry in log.items()}


@pytest.mark.parametrize(
    "overrides,plugins",
    [
        ({**OPTIONS, "data.sampler": "balanced"}, {}),
        ({**OPTIONS, "data.sampler": {"class": "helpers.py:first_half", "share": 0.75}}, {}),
        (OPTIONS, {"kfold": {"k": 3, "parallel": True}}),
    ],
    ids=["balanced", "custom-sampler", "parallel-folds"],
)
def test_options_run_for_a_vectorized_group_and_survive_resume(manifest, helpers, tmp_path, capsys, overrides, plugins):
    whole = manifest({**overrides, "run.res_dir": (tmp_path / "whole").as_posix()}, models=TWO, plugins=plugins, name="whole.toml")
    code, err = run_cli(capsys, "run", str(whole))
    assert code == 0, err
    first = manifest({**overrides, "run.res_dir": (tmp_path / "cut").as_posix(), "run.epochs": 1}, models=TWO, plugins=plugins, name="cut.toml")
    assert run_cli(capsys, "run", str(first))[0] == 0
    code, err = run_cli(capsys, "run", str(first), "--resume", "--set", "run.epochs=2")
    assert code == 0, err
    folders = [f"{name}/FOLD_{k}" for name in "ab" for k in (1, 2, 3)] if plugins else ["a", "b"]
    for folder in folders:
        logs = [json.loads((tmp_path / res / folder / "trainlog.json").read_text()) for res in ("whole", "cut")]
        assert without_times(logs[0]) == without_times(logs[1])  # the resumed run drew the same batches
        assert list(logs[0]) == ["1", "2"]
    conf = json.loads((tmp_path / "whole" / "conf.json").read_text())
    assert conf["config"]["data"]["drop_last"] is True and conf["config"]["data"]["eval_batch_size"] == 7


def test_a_lone_model_with_the_options_matches_the_fast_path_run(manifest, tmp_path, capsys):
    """drop_last, eval_batch_size and balanced sampling on the fast path give the DataLoader's run."""
    options = {"data.sampler": "balanced", "data.drop_last": True, "data.eval_batch_size": 5}
    fast = manifest({**options, "run.res_dir": (tmp_path / "fast").as_posix()}, name="fast.toml")
    slow = manifest({**options, "run.res_dir": (tmp_path / "slow").as_posix(), "data.dataset": "test_data:per_sample_digits"}, name="slow.toml")
    for path in (fast, slow):
        code, err = run_cli(capsys, "run", str(path))
        assert code == 0, err
    logs = [json.loads((tmp_path / res / "mlp" / "trainlog.json").read_text()) for res in ("fast", "slow")]
    assert without_times(logs[0]) == without_times(logs[1])
    assert pickle.loads((tmp_path / "fast" / "Dataset_split.pkl").read_bytes()) == pickle.loads((tmp_path / "slow" / "Dataset_split.pkl").read_bytes())


@pytest.mark.parametrize(
    "overrides,plugins,line",
    [
        ({"data.collate_fn": "helpers.py:nope"}, {}, 'data.collate_fn: "helpers.py" has no attribute "nope"'),
        ({"data.collate_fn": 3}, {}, 'data.collate_fn: expected a reference "module:attr" or "file.py:attr", got 3'),
        (
            {"data.collate_fn": "helpers.py:triple"},
            {},
            'data.collate_fn: "helpers.py:triple" returned 3 elements; a collate_fn must return an (inputs, target) pair',
        ),
        ({"data.collate_fn": "helpers.py:failing"}, {}, 'data.collate_fn: "helpers.py:failing"(4 samples) raised ValueError: no batch today'),
        ({"data.sampler": "balance"}, {}, 'data.sampler: expected "balanced", a reference "module:attr" or a table { class = ..., ... }, got "balance"'),
        ({"data.sampler": {"share": 0.5}}, {}, 'data.sampler: expected a table with a "class" key'),
        ({"data.sampler": {"class": "helpers.py:first_half", "shar": 0.5}}, {}, 'data.sampler.shar: unexpected argument "shar"'),
        ({"data.sampler": {"class": "helpers.py:first_half", "share": "half"}}, {}, 'data.sampler.share: expected a number, got "half"'),
        ({"data.sampler": "helpers.py:nope"}, {}, 'data.sampler: "helpers.py" has no attribute "nope"'),
        ({"data.sampler": "balanced", "run.shuffle": False}, {}, "data.sampler: shuffle = false keeps the training split's order"),
        ({"data.sampler": "balanced", "data.dataset": "test_loader_options:unlabelled"}, {}, 'data.sampler: sampler = "balanced" needs one integer class'),
        (
            {"data.sampler": "balanced"},
            {"kfold": {"k": 3, "parallel": True}},
            "plugins.kfold.parallel: parallel = true draws one pass of batches for every fold",
        ),
        ({"data.drop_last": "yes"}, {}, 'data.drop_last: expected true or false, got "yes"'),
        ({"data.eval_batch_size": 0}, {}, "data.eval_batch_size: expected an integer >= 1, got 0"),
    ],
)
def test_loader_option_mistakes_are_one_line_exit_2(manifest, helpers, tmp_path, capsys, overrides, plugins, line):
    path = manifest(overrides, plugins=plugins)
    for command in ("validate", "run"):
        code, err = run_cli(capsys, command, str(path))
        assert code == 2, (command, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert line in err, err
    assert not (tmp_path / "res" / "mlp").exists()


def test_a_sampler_yielding_outside_the_split_stops_training_in_one_line(manifest, helpers, tmp_path, capsys):
    code, err = run_cli(capsys, "run", str(manifest({"data.sampler": "helpers.py:out_of_range"})))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert 'data.sampler: "helpers.py:out_of_range" yielded position 245, outside the training split\'s 240 samples' in err


def unlabelled(limit: int = 300):
    base = digits(limit=limit)

    class Unlabelled(Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, index):
            return base[index]

    return Unlabelled()


def test_the_options_are_part_of_the_resume_fingerprint(manifest, tmp_path, capsys):
    path = manifest(run={"epochs": 1})
    assert run_cli(capsys, "run", str(path))[0] == 0
    code, err = run_cli(capsys, "run", str(path), "--resume", "--set", "data.drop_last=true")
    assert code == 2 and "cannot resume: data.drop_last changed (False -> True)" in err, err
    assert attrs.fields_dict(izitorch.DataConfig)["drop_last"].default is False
