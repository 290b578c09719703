"""Runs launched by torchrun with ``distributed = "data"``: every model trained on every rank, on
its shard of each batch, gives what one process gives with the same global batch; resumes with
the same world size only; stops every rank together; counts every evaluation sample once.

Two-process runs go through ``python -m torch.distributed.run`` on the CPU with gloo; the
one-process reference joins a process group of one in this process.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score, roc_auc_score
from torch.utils.data import RandomSampler, WeightedRandomSampler

from conftest import cli, error_of, make_manifest
from izitorch import sharding, splits
from izitorch.datasets import digits
from izitorch.distributed import Ranks
from izitorch.ownership import Ledger
from test_distributed import RANK_KILLER, TIMES, become_the_only_rank, torchrun

SEED = 7
SAMPLES = 330  # 264 to train (a multiple of the global batch, 64... plus 8: the last step is 2 x 4), 66 to test (33 per rank)

PARTS = """\
import torch
from izitorch.datasets import digits
from izitorch.models import MLP

MARK = {mark}


class Marked(MLP):
    \"\"\"An MLP whose training output is NaN on a batch holding the sample marked -1 in its first pixel.\"\"\"

    def forward(self, x):
        out = super().forward(x)
        if self.training and bool((x[:, 0] == -1).any()):
            return out * float("nan")
        return out


def data():
    dataset = digits(limit={samples})
    dataset.tensors[0][MARK, 0] = -1.0
    return dataset
"""

# "a" and "b" share an architecture (one vectorized group), "c" trains alone (DistributedDataParallel)
MODELS = [
    {"name": "a", "optimizer": {"class": "torch.optim:SGD", "lr": 0.1}},
    {"name": "b", "optimizer": {"class": "torch.optim:SGD", "lr": 0.05, "momentum": 0.9}},
    {"name": "c", "model": "parts.py:Marked", "params": {"hidden": 12, "layers": 2}, "optimizer": {"class": "torch.optim:SGD", "lr": 0.1}},
]


def marked_sample() -> int:
    """A training sample of the holdout split (the one the runs draw): its batch's loss is NaN."""
    labels = digits(limit=SAMPLES).tensors[1].numpy()
    return int(splits.holdout(SAMPLES, 0.8, False, SEED, labels).train[0])


def data_manifest(folder: Path, batch_size: int, *plugins: str, **run) -> Path:
    (folder / "parts.py").write_text(PARTS.format(mark=marked_sample(), samples=SAMPLES))
    (folder / "killer.py").write_text(RANK_KILLER)
    return make_manifest(
        folder,
        models=MODELS,
        run={"epochs": 3, "batch_size": batch_size, "rdm_seed": SEED, "distributed": "data", "nan_policy": "skip_batch", "background_writes": False, **run},
        data={"dataset": "parts.py:data", "params": None, "train_ratio": 0.8},
        plugins={"enable": list(plugins)} if plugins else {},
    )


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """One process, batch 64: the global batch of two processes of 32."""
    folder = tmp_path_factory.mktemp("one")
    manifest = data_manifest(folder, 64)
    with pytest.MonkeyPatch.context() as patch:
        become_the_only_rank(patch)
        from izitorch.cli import main

        assert main(["run", str(manifest)]) == 0
    return folder / "res"


# A plugin that decides on what differs between ranks (as a time budget would): rank 1 alone
# wants to stop the fold after epoch 1. The ranks follow rank 0, which goes on.
RANK_1_STOPS = """\
import os
from izitorch import hookimpl

@hookimpl
def izitorch_should_stop(run, fold, epoch, scores):
    return "rank 1's budget" if os.environ.get("RANK") == "1" else None
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("two")
    (folder / "rank1stops.py").write_text(RANK_1_STOPS)
    done = torchrun(data_manifest(folder, 32, "rank1stops.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "res", done.stdout


def weights(res: Path, model: str) -> dict[str, torch.Tensor]:
    return torch.load(res / model / "model.pth.tar", weights_only=False)["state_dict"]


def without_times(value):
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIMES}
    return value


def trainlog(res: Path, model: str) -> dict:
    return without_times(json.loads((res / model / "trainlog.json").read_text()))


def saved_state(res: Path) -> dict:
    return torch.load(res / ".izitorch" / "fold_1.pth.tar", weights_only=False)


def assert_close_logs(mine, theirs, where=""):
    if isinstance(theirs, dict):
        assert set(mine) == set(theirs), where
        for key in theirs:
            assert_close_logs(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, float):
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-6), where
    else:
        assert mine == theirs, where


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and ".izitorch" not in p.parts}


def test_two_ranks_of_batch_32_train_as_one_process_of_batch_64(one_rank, two_ranks):
    two, stdout = two_ranks
    assert files(two) == files(one_rank)
    for model in ("a", "b", "c"):
        mine, theirs = weights(two, model), weights(one_rank, model)
        for key, value in theirs.items():
            torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)
        # every test sample counted once, in the test set's order
        matrices = [pickle.loads((root / model / "confusion_matrix.pkl").read_bytes()) for root in (two, one_rank)]
        assert (matrices[0] == matrices[1]).all() and matrices[0].sum() == SAMPLES - 264
        predictions = [json.loads((root / model / "test_predictions.json").read_text()) for root in (two, one_rank)]
        assert predictions[0] == predictions[1] and len(predictions[0]["target"]) == SAMPLES - 264
        assert_close_logs(trainlog(two, model), trainlog(one_rank, model), model)
    # the NaN batch was skipped by every rank of the step, as by the one process
    epochs = trainlog(two, "c")
    assert len(epochs) == 3 and all(entry.get("skipped_batches") == 1 for entry in epochs.values()), epochs  # rank 1's wish to stop was not followed
    assert not any("skipped_batches" in entry for entry in trainlog(two, "a").values())  # a plain MLP has nothing to skip
    assert saved_state(two)["data_parallel"] == 2 and saved_state(one_rank)["data_parallel"] == 1
    assert stdout.count("final test scores:") == 1
    assert not list(Ledger(two).foreign())  # rank 1 wrote nothing; rank 0 recorded all it wrote


def test_a_killed_rank_then_resume_on_as_many_ranks_gives_the_uninterrupted_run(tmp_path, two_ranks, capsys, monkeypatch):
    manifest = data_manifest(tmp_path, 32, "killer.py")
    killed = torchrun(manifest, env={"KILL_RANK": "1"})
    assert killed.returncode != 0
    assert "the ranks lost each other in the middle of a step" in killed.stderr or "interrupted by SIGTERM" in killed.stderr, killed.stderr[-3000:]
    assert "exitcode  : -9" in killed.stderr
    res = tmp_path / "res"
    state = res / ".izitorch" / "fold_1.pth.tar"
    assert saved_state(res)["epoch"] == 1 and not (res / "results.json").exists()
    saved = state.read_bytes()

    # another world size, or no torchrun at all: refused in one line, nothing changed
    code, _, err = cli(capsys, "run", manifest, "--resume")
    assert code == 2 and "trained data-parallel on 2 processes" in error_of(err) and "run.distributed" in error_of(err), err
    with monkeypatch.context() as patch:
        become_the_only_rank(patch)
        code, _, err = cli(capsys, "run", manifest, "--resume")
    assert code == 2 and "resume it with torchrun and 2 processes in all" in error_of(err), err
    assert state.read_bytes() == saved

    resumed = torchrun(manifest, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = two_ranks[0]
    assert files(res) == files(reference)
    for model in ("a", "b", "c"):
        for key, value in weights(reference, model).items():
            assert torch.equal(weights(res, model)[key], value), (model, key)
        assert trainlog(res, model) == trainlog(reference, model)


def test_sigterm_to_torchrun_stops_both_ranks_and_keeps_the_finished_epoch(tmp_path):
    """Both ranks stop on the signal (the step's all-reduce tells the rank that has not seen it
    yet), say so with the way to resume, and the finished epoch is saved (its resume is the
    test above's)."""
    manifest = data_manifest(tmp_path, 32, "killer.py")
    stopped = torchrun(manifest, env={"KILL_RANK": "1", "KILL_HOW": "launcher"})
    assert stopped.returncode != 0
    lines = [line for line in stopped.stderr.splitlines() if "interrupted by SIGTERM; every finished epoch is saved" in line]
    assert len(lines) == 2 and sum("rank 1: interrupted" in line for line in lines) == 1, stopped.stderr[-3000:]
    assert all("--resume (2 processes in all, as before)" in line for line in lines)
    assert saved_state(tmp_path / "res")["epoch"] == 1 and not (tmp_path / "res" / "results.json").exists()


LEGACY = """\
from izitorch import hookimpl


class Count:
    def __init__(self, num_classes):
        self.n = 0

    def update(self, output, target, loss):
        self.n += len(target)

    def compute(self):
        return {"seen": self.n}


@hookimpl
def izitorch_register_metrics(register):
    register("seen", Count)
"""


def test_a_metric_that_cannot_be_merged_is_refused_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "legacy.py").write_text(LEGACY)
    manifest = make_manifest(tmp_path, run={"distributed": "data"}, plugins={"enable": ["legacy.py"]})
    become_the_only_rank(monkeypatch)
    code, _, err = cli(capsys, "run", manifest)
    message = error_of(err)
    assert code == 2 and 'metric "seen" cannot be merged over the ranks' in message and "run.distributed" in message and "m.toml" in message, message
    assert not (tmp_path / "res" / "conf.json").exists()


# -- merging accumulators: two ranks' halves of a stream, merged, equal one accumulator of it all


def across_ranks(factory, batches, members=2, num_classes=None):
    """One accumulator fed every batch, and two fed alternate batches then merged as
    :func:`izitorch.sharding.merge_meters` merges them (their attributes through torch.save)."""
    whole, halves = factory(num_classes, members), [factory(num_classes, members), factory(num_classes, members)]
    for index, batch in enumerate(batches):
        whole.update(*batch)
        halves[index % 2].update(*batch)
    travelled = []
    for half in halves:
        buffer = io.BytesIO()
        torch.save(vars(half), buffer)
        travelled.append(sharding.rebuilt(type(half), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)))
    travelled[0].merge(travelled[1])
    return whole.compute(), travelled[0].compute()


def classification_batches(count=5, members=2, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in range(7, 7 + count):
        outputs = torch.randn(members, size, classes, generator=generator)
        target = torch.randint(0, classes, (size,), generator=generator)
        batches.append((outputs, target, torch.rand(members, generator=generator), None))
    return batches


@pytest.mark.parametrize("name", ["loss", "classification", "top_k"])
def test_merged_classification_accumulators_equal_one_over_every_batch(name):
    from izitorch.plugins.metrics import ConfusionMeter, LossMeter, top_k_meter

    factory = {"loss": LossMeter, "classification": ConfusionMeter, "top_k": top_k_meter(2)}[name]
    batches = classification_batches()
    whole, merged = across_ranks(factory, batches)
    assert whole and whole[0]
    for one, other in zip(whole, merged):
        assert one.keys() == other.keys()
        for key, value in one.items():
            if isinstance(value, float):
                assert other[key] == pytest.approx(value, rel=1e-6)
            else:
                assert np.array_equal(np.asarray(other[key]), np.asarray(value))
    if name == "loss":  # the sample-weighted mean of the batch losses, by hand
        sizes = torch.tensor([b[1].shape[0] for b in batches], dtype=torch.float64)
        losses = torch.stack([b[2] for b in batches]).double()
        expected = (losses * sizes[:, None]).sum(0) / sizes.sum()
        assert [m["loss"] for m in merged] == pytest.approx(expected.tolist(), rel=1e-6)


def test_merged_regression_sums_are_recentred_and_equal_scikit_learn():
    from izitorch.regression import RegressionMeter

    generator = torch.Generator().manual_seed(1)
    batches = []
    for index, size in enumerate((5, 8, 6, 9)):
        target = torch.randn(size, 2, generator=generator) + 100.0 * index  # each rank's first batch has another mean
        outputs = target + torch.randn(2, size, 2, generator=generator)
        batches.append((outputs, target, torch.zeros(2), None))
    _, merged = across_ranks(RegressionMeter, batches)
    truth = torch.cat([b[1] for b in batches]).double().numpy()
    for k in range(2):
        predicted = torch.cat([b[0][k] for b in batches]).double().numpy()
        assert merged[k]["MAE"] == pytest.approx(mean_absolute_error(truth, predicted), rel=1e-9)
        assert merged[k]["MSE"] == pytest.approx(mean_squared_error(truth, predicted), rel=1e-9)
        assert merged[k]["R2"] == pytest.approx(r2_score(truth, predicted), rel=1e-9)


def test_merged_torchmetrics_states_equal_scikit_learn():
    from izitorch import torchmetrics_bridge

    ((_, factory),) = torchmetrics_bridge.factories([{"class": "torchmetrics.classification:MulticlassAUROC", "num_classes": 4, "direction": "higher"}])
    batches = [(b[0].softmax(2), b[1], b[2], b[3]) for b in classification_batches(count=6)]
    whole, merged = across_ranks(factory, batches)
    truth = torch.cat([b[1] for b in batches]).numpy()
    for k in range(2):
        scores = torch.cat([b[0][k] for b in batches]).numpy()
        expected = roc_auc_score(truth, scores, multi_class="ovr", average="macro")
        assert merged[k]["MulticlassAUROC"] == pytest.approx(expected, rel=1e-5)
        assert whole[k]["MulticlassAUROC"] == pytest.approx(expected, rel=1e-5)


# -- shards


def test_a_given_sampler_is_drawn_alike_on_every_rank_and_dealt_out():
    weights_ = torch.ones(11)
    ranks = [Ranks(rank, 3, rank, strategy="data") for rank in range(3)]
    dealt = [sharding.DealtSampler(WeightedRandomSampler(weights_, 11, generator=torch.Generator().manual_seed(5)), r) for r in ranks]
    full = list(WeightedRandomSampler(weights_, 11, generator=torch.Generator().manual_seed(5)))
    shards = [list(sampler) for sampler in dealt]
    assert [len(shard) for shard in shards] == [4, 4, 4] == [len(sampler) for sampler in dealt]
    padded = full + full[:1]
    assert [padded[i] for i in range(12)] == [shards[i % 3][i // 3] for i in range(12)]
    assert dealt[1].generator is not None  # the resume state carries it


def test_shuffled_training_is_sharded_by_a_seeded_distributed_sampler_and_evaluation_without_padding():
    ranks = [Ranks(rank, 2, rank, strategy="data") for rank in range(2)]
    subset = list(range(9))
    samplers = [sharding.train_sampler(subset, RandomSampler(subset), 3, True, r) for r in ranks]
    for sampler in samplers:
        sampler.set_epoch(2)
    drawn = [list(s) for s in samplers]
    assert len(drawn[0]) == len(drawn[1]) == 5 and set(drawn[0]) | set(drawn[1]) == set(range(9))
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3 + 2)).tolist()
    assert drawn[0] == (order + order[:1])[0::2]
    samplers[0].set_epoch(3)
    assert list(samplers[0]) != drawn[0]
    indices = np.arange(7)
    assert [sharding.eval_share(indices, r).tolist() for r in ranks] == [[0, 2, 4, 6], [1, 3, 5]]


def test_auto_spreads_models_when_every_process_has_a_unit_else_shards_the_data():
    from izitorch.distributed import resolve_strategy

    two = Ranks(0, 2, 0, strategy="auto")
    assert resolve_strategy(two, "auto", 2).strategy == "models"
    assert resolve_strategy(two, "auto", 1).strategy == "data"
    assert resolve_strategy(two, "models", 1).strategy == "models" and resolve_strategy(two, "data", 8).strategy == "data"
    assert resolve_strategy(Ranks(), "data", 1).strategy is None  # outside torchrun nothing changes


def test_the_final_tests_predictions_are_gathered_back_in_the_test_sets_order(monkeypatch):
    """Three ranks, two test samples: rank r held samples r, r + 3...; rank 2 held none."""
    parts = [
        [{"predictions": {"target": torch.tensor([10]), "predicted": torch.tensor([0])}}],
        [{"predictions": {"target": torch.tensor([11]), "predicted": torch.tensor([1])}}],
        [{}],
    ]
    monkeypatch.setattr(sharding, "exchange", lambda value, ranks, device, stop_flag=None: parts)
    for rank in range(3):
        (gathered,) = sharding.gather_predictions(parts[rank], Ranks(rank, 3, rank, strategy="data"))
        assert gathered["predictions"]["target"].tolist() == [10, 11] and gathered["predictions"]["predicted"].tolist() == [0, 1]
    parts[:] = [[{}], [{}], [{}]]  # a task without per-sample predictions (regression)
    assert sharding.gather_predictions([{}], Ranks(0, 3, 0, strategy="data")) == [{}]


def test_a_model_compiled_trains_data_parallel_as_it_does_eagerly(tmp_path, capsys, monkeypatch):
    """DistributedDataParallel wraps the model, then torch.compile the wrapper (the order DDP
    asks for); the weights are the eager run's within float tolerance."""
    become_the_only_rank(monkeypatch)
    trained = {}
    for compile_ in (False, True):
        manifest = make_manifest(tmp_path / str(compile_), run={"epochs": 1, "distributed": "data", "compile": compile_})
        code, _, err = cli(capsys, "run", manifest)
        assert code == 0, err
        trained[compile_] = weights(tmp_path / str(compile_) / "res", "mlp")
    for key, value in trained[False].items():
        torch.testing.assert_close(trained[True][key], value, rtol=1e-4, atol=1e-5)


def test_a_rank_that_built_another_run_is_refused_on_every_rank(tmp_path):
    (tmp_path / "ranked.py").write_text(
        "import os\nfrom izitorch.datasets import digits\n\ndef data():\n    return digits(limit=300 if os.environ.get('RANK') == '0' else 301)\n"
    )
    manifest = make_manifest(tmp_path, data={"dataset": "ranked.py:data", "params": None}, run={"distributed": "data"})
    done = torchrun(manifest)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "built another run than rank 0" in line]
    assert len(lines) == 2 and all("rank 1 built another run than rank 0 (the configuration or the data differs)" in line for line in lines), done.stderr[
        -3000:
    ]
    assert not (tmp_path / "res" / "conf.json").exists()


def test_a_sampler_that_yields_more_than_its_length_still_gives_every_rank_as_many():
    class Lying(torch.utils.data.Sampler):
        def __len__(self):
            return 8

        def __iter__(self):
            return iter(range(9))

    ranks = [Ranks(rank, 2, rank, strategy="data") for rank in range(2)]
    assert [list(sharding.DealtSampler(Lying(), r)) for r in ranks] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_a_torchmetrics_metric_whose_states_do_not_add_up_is_refused():
    from izitorch import torchmetrics_bridge
    from izitorch.errors import ManifestError

    entries = [
        {"class": "torchmetrics.classification:MulticlassAccuracy", "num_classes": 4, "direction": "higher"},
        {"class": "torchmetrics.regression:PearsonCorrCoef", "direction": "higher"},
    ]
    (_, accuracy), (_, pearson) = torchmetrics_bridge.factories(entries)
    sharding.check_metrics({"accuracy": accuracy})
    with pytest.raises(ManifestError, match=r'metric "pearson" cannot be merged over the ranks \(torchmetrics\' PearsonCorrCoef updates its state as a whole'):
        sharding.check_metrics({"pearson": pearson})


UNSENDABLE = """\
from izitorch import hookimpl


class Seen:
    names = {"seen": "higher"}

    def __init__(self, num_classes, members):
        self.members, self.count, self.rule = members, 0, lambda x: x  # a lambda does not pickle

    def update(self, outputs, target, losses, mask=None):
        self.count += len(target)

    def merge(self, other):
        self.count += other.count

    def compute(self):
        return [{"seen": float(self.count)} for _ in range(self.members)]


@hookimpl
def izitorch_register_metrics(register):
    register("seen", Seen)
"""


def test_a_metric_whose_accumulator_cannot_travel_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    (tmp_path / "seen.py").write_text(UNSENDABLE)
    manifest = make_manifest(tmp_path, run={"epochs": 1, "distributed": "data"}, plugins={"enable": ["seen.py"]})
    become_the_only_rank(monkeypatch)
    code, _, err = cli(capsys, "run", manifest)
    message = error_of(err.splitlines()[-1])  # after rank 0's line on how the run is shared
    assert code == 1 and 'metric "seen": its accumulator cannot be sent to the other ranks' in message, message
    assert "Traceback" not in err
