"""Parallel folds (``[plugins.kfold] parallel = true``): every fold trained at once, each blind
to its own test samples, with the same outputs, hooks and per-fold plugin state as sequential
folds, and clear refusals for what it cannot do faithfully."""

from __future__ import annotations

import json
import pickle
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import izitorch
from conftest import make_manifest, merged, plain_scores, run_cli_here
from izitorch import load_manifest

# Two MLPs ("adam", and "sgd" with dropout and Nesterov momentum) over k parallel folds.
MODELS = [
    {"name": "adam"},
    {"name": "sgd", "params": {"dropout": 0.1}, "optimizer": {"class": "torch.optim:SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True}},
]


# A digits dataset whose chosen samples are garbage: noise inputs and shifted labels.
NOISY = """\
import torch
from torch.utils.data import TensorDataset

from izitorch.datasets import digits


def noisy_digits(limit=300, noisy=()):
    inputs, targets = (t.clone() for t in digits(limit=limit).tensors)
    rows = torch.tensor(list(noisy), dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    inputs[rows] = 5 * torch.randn(len(rows), inputs.shape[1], generator=generator)
    targets[rows] = (targets[rows] + 3) % 10
    return TensorDataset(inputs, targets)
"""


def write(
    folder: Path,
    name: str = "m.toml",
    *,
    epochs: int = 3,
    k: int = 3,
    parallel: object = True,
    dataset: str = "izitorch.datasets:digits",
    params: dict | None = None,
    run: dict | None = None,
    data: dict | None = None,
    adam: dict | None = None,
    sgd: dict | None = None,
    enable: tuple[str, ...] = ("kfold",),
    plugins: dict | None = None,
) -> Path:
    """folder/NAME, results in folder/res_<stem>: MODELS (``adam`` and ``sgd`` laid over them)
    over ``k`` folds of the dataset (``params``: 300 digits), with ``run``, ``data`` and
    ``plugins`` laid over those tables."""
    return make_manifest(
        folder,
        name=name,
        models=[merged(MODELS[0], adam or {}), merged(MODELS[1], sgd or {})],
        run={"res_dir": (folder / f"res_{Path(name).stem}").as_posix(), "epochs": epochs, "rdm_seed": 3, **(run or {})},
        data={"dataset": dataset, "params": None, **(data or {})},
        plugins={"enable": list(enable), "kfold": {"k": k, "parallel": parallel}, **(plugins or {})},
        overrides={"data.params": params if params is not None else {"limit": 300}},
    )


def run(path: Path, *overrides: str) -> dict:
    return izitorch.run(load_manifest(str(path), overrides))


def weights(res: Path, model: str, fold: int) -> dict[str, torch.Tensor]:
    return torch.load(res / model / f"FOLD_{fold}" / "model.pth.tar", weights_only=True)["state_dict"]


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_each_fold_model_never_depends_on_its_own_test_or_validation_samples(tmp_path):
    """Garbage in fold 1's test and validation samples leaves fold 1's weights bit for bit as they
    were, while the folds that train on those samples (fold 2 on fold 1's test chunk, fold 3 on its
    validation chunk) change: the masked loss gives them an exact zero."""
    (tmp_path / "noisy.py").write_text(NOISY, encoding="utf-8")
    # not stratified: the garbage changes labels, and a stratified split would move with them
    clean = write(tmp_path, "clean.toml", dataset="noisy.py:noisy_digits", data={"validation": True, "stratify": False})
    run(clean)
    split = pickle.loads((tmp_path / "res_clean" / "Dataset_split.pkl").read_bytes())
    _, val_of_fold_1, test_of_fold_1 = split[0]
    assert len(test_of_fold_1) == len(val_of_fold_1) == 100 and not set(test_of_fold_1) & set(val_of_fold_1)
    assert set(test_of_fold_1) <= set(split[1][0]) and set(val_of_fold_1) <= set(split[2][0])
    spoiled_rows = sorted(int(i) for i in [*test_of_fold_1, *val_of_fold_1])
    spoiled = write(tmp_path, "spoiled.toml", dataset="noisy.py:noisy_digits", params={"noisy": spoiled_rows}, data={"validation": True, "stratify": False})
    run(spoiled)
    assert pickle.loads((tmp_path / "res_spoiled" / "Dataset_split.pkl").read_bytes()) == split
    for model in ("adam", "sgd"):
        before, after = weights(tmp_path / "res_clean", model, 1), weights(tmp_path / "res_spoiled", model, 1)
        assert all(torch.equal(before[name], after[name]) for name in before), model
        for fold in (2, 3):  # they train on fold 1's test or validation samples: their weights must move
            before, after = weights(tmp_path / "res_clean", model, fold), weights(tmp_path / "res_spoiled", model, fold)
            assert not all(torch.equal(before[name], after[name]) for name in before), (model, fold)
        # fold 1's own validation and test scores see the garbage, its training loss does not
        clean_log = read_json(tmp_path / "res_clean" / model / "FOLD_1" / "trainlog.json")
        spoiled_log = read_json(tmp_path / "res_spoiled" / model / "FOLD_1" / "trainlog.json")
        assert [e["loss"] for e in clean_log.values()] == [e["loss"] for e in spoiled_log.values()]
        assert clean_log["3"]["val_accuracy"] > spoiled_log["3"]["val_accuracy"]
        clean_test, spoiled_test = (read_json(tmp_path / res / model / "FOLD_1" / "test_metrics.json") for res in ("res_clean", "res_spoiled"))
        assert clean_test["accuracy"] > spoiled_test["accuracy"]


def load_output(path: Path):
    if path.suffix == ".json":
        return read_json(path)
    if path.suffix == ".pkl":
        return pickle.loads(path.read_bytes())
    if path.suffix == ".toml":  # the manifest as run
        return tomllib.loads(path.read_text(encoding="utf-8"))
    return torch.load(path, weights_only=True)


def structure(value):
    """What a file holds, values left out: keys, lengths, tensor and array shapes and dtypes, types."""
    if isinstance(value, dict):
        return {key: structure(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [structure(item) for item in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return (type(value).__name__, tuple(value.shape), str(value.dtype))
    return type(value).__name__


def test_a_parallel_run_writes_what_a_sequential_one_writes(tmp_path):
    """The same files, each holding the same structure (keys, shapes, dtypes), the same split and
    conf, and scores that are each fold's own: every fold's confusion matrix counts its own test
    labels, and its test accuracy is the one its saved weights get, computed independently."""
    parallel = write(tmp_path, "parallel.toml", epochs=8)
    sequential = write(tmp_path, "sequential.toml", epochs=8, parallel=False)
    results = run(parallel)
    reference = run(sequential)
    res, ref = tmp_path / "res_parallel", tmp_path / "res_sequential"
    relative = sorted(p.relative_to(res).as_posix() for p in res.rglob("*") if p.is_file() and ".izitorch" not in p.parts)
    assert relative == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file() and ".izitorch" not in p.parts)
    for name in relative:
        assert structure(load_output(res / name)) == structure(load_output(ref / name)), name
    assert (res / ".izitorch" / "folds.pth.tar").is_file() and not list((res / ".izitorch").glob("fold_*"))
    split = pickle.loads((res / "Dataset_split.pkl").read_bytes())
    assert split == pickle.loads((ref / "Dataset_split.pkl").read_bytes())
    conf, reference_conf = read_json(res / "conf.json"), read_json(ref / "conf.json")
    assert conf["config"]["plugins"]["kfold"].pop("parallel") is True
    assert reference_conf["config"]["plugins"]["kfold"].pop("parallel") is False
    for each in (conf, reference_conf):  # where each run was described and written
        each["config"].pop("source")
        each["config"]["run"].pop("res_dir")
    assert conf["config"] == reference_conf["config"] and conf["splits"] == reference_conf["splits"]
    assert conf["plugins"] == reference_conf["plugins"] and conf["device"] == reference_conf["device"]
    labels = izitorch.datasets.digits(limit=300).tensors[1].numpy()
    for model in ("adam", "sgd"):
        assert len(results[model]) == 3
        for fold in (1, 2, 3):
            folder = res / model / f"FOLD_{fold}"
            log = read_json(folder / "trainlog.json")
            assert list(log) == [str(e) for e in range(1, 9)] and {"loss", "accuracy", "test_loss", "test_accuracy"} <= set(log["8"])
            test = split[fold - 1][1]
            matrix = pickle.loads((folder / "confusion_matrix.pkl").read_bytes())
            assert (matrix.sum(axis=1) == np.bincount(labels[test], minlength=10)).all()  # the fold's own test set, every sample once
            assert (matrix.sum(axis=1) == pickle.loads((ref / model / f"FOLD_{fold}" / "confusion_matrix.pkl").read_bytes()).sum(axis=1)).all()
            fresh = izitorch.models.MLP(hidden=16, dropout=0.1 if model == "sgd" else 0.0)  # a member's state_dict loads into it
            expected = plain_scores(fresh, folder / "model.pth.tar", test)
            assert read_json(folder / "test_metrics.json")["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-5)
            assert results[model][fold - 1]["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-5)
        mean = np.mean([f["accuracy"] for f in results[model]])
        reference_mean = np.mean([f["accuracy"] for f in reference[model]])
        assert mean > 80.0 and abs(mean - reference_mean) < 6.0, (model, mean, reference_mean)
    assert read_json(res / "results.json")["adam"]["folds"] == 3


def test_train_metrics_count_each_folds_own_samples_only(tmp_path):
    """A fold's training accuracy comes from a confusion matrix of its own training samples."""
    path = write(tmp_path, epochs=1, k=4)
    recorder = tmp_path / "recorder.py"
    recorder.write_text(
        """\
import json
from izitorch import hookimpl
SEEN = {}

@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    SEEN[fold.index] = {name: scores[name]["train"]["confusion_matrix"].sum().item() for name in scores}

@hookimpl
def izitorch_run_finish(run, results):
    with open(run.res_dir / "seen.json", "w") as handle:
        json.dump(SEEN, handle)
""",
        encoding="utf-8",
    )
    run(path, 'plugins.enable=["kfold", "recorder.py"]')
    seen = read_json(tmp_path / "res_m" / "seen.json")
    split = pickle.loads((tmp_path / "res_m" / "Dataset_split.pkl").read_bytes())
    assert seen == {str(i): {"adam": len(split[i][0]), "sgd": len(split[i][0])} for i in range(4)}


STATEFUL = '''\
"""Counts each fold's epochs in plugin state (swapped per fold) and stops fold 2 at epoch 2."""
import json
from izitorch import hookimpl

COUNT = {"epochs": 0}
ORDER = []


@hookimpl
def izitorch_fold_start(run, fold):
    COUNT["epochs"] = 0
    ORDER.append(("fold_start", fold.index + 1, None))


@hookimpl
def izitorch_epoch_start(run, fold, epoch):
    ORDER.append(("epoch_start", fold.index + 1, epoch))


@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    COUNT["epochs"] += 1


@hookimpl
def izitorch_should_stop(run, fold, epoch, scores):
    return "fold 2 is done" if fold.index == 1 and epoch == 2 else None


@hookimpl
def izitorch_fold_finish(run, fold):
    ORDER.append(("fold_finish", fold.index + 1, COUNT["epochs"]))


@hookimpl
def izitorch_state_dict(run):
    return {"stateful": dict(COUNT)}


@hookimpl
def izitorch_load_state_dict(run, state):
    COUNT.update(state.get("stateful", {}))


@hookimpl
def izitorch_run_finish(run, results):
    with open(run.res_dir / "order.json", "w") as handle:
        json.dump(ORDER, handle)
'''


def test_hooks_see_each_fold_in_turn_with_its_own_plugin_state(tmp_path):
    (tmp_path / "stateful.py").write_text(STATEFUL, encoding="utf-8")
    path = write(tmp_path, epochs=3, enable=("kfold", "stateful.py"))
    run(path)
    order = [tuple(entry) for entry in read_json(tmp_path / "res_m" / "order.json")]
    expected = [("fold_start", f, None) for f in (1, 2, 3)]
    expected += [("epoch_start", f, 1) for f in (1, 2, 3)] + [("epoch_start", f, 2) for f in (1, 2, 3)]
    expected += [("epoch_start", f, 3) for f in (1, 3)]  # fold 2 stopped after epoch 2
    expected += [("fold_finish", 1, 3), ("fold_finish", 2, 2), ("fold_finish", 3, 3)]  # each fold counted its own epochs
    assert order == expected
    assert list(read_json(tmp_path / "res_m" / "adam" / "FOLD_2" / "trainlog.json")) == ["1", "2"]
    assert list(read_json(tmp_path / "res_m" / "adam" / "FOLD_3" / "trainlog.json")) == ["1", "2", "3"]


def test_the_best_checkpoint_of_each_fold_is_its_own(tmp_path):
    """checkpoint policy best keeps one best score per fold (swapped state), on each fold's
    validation set. Adam's learning rate is too high on purpose: the validation losses go up and
    down, so the best epoch is not the last one and differs between folds. The kept weights are
    those the same run saves for that epoch under policy all."""
    runs = {}
    for policy in ("best", "all"):
        path = write(
            tmp_path,
            f"{policy}.toml",
            epochs=4,
            data={"validation": True},
            adam={"optimizer": {"lr": 0.3}},
            plugins={"checkpoint": {"policy": policy, "metric": "loss"}},
        )
        runs[policy] = run(path)
    res, every = tmp_path / "res_best", tmp_path / "res_all"
    best_epochs = []
    for fold in (1, 2, 3):
        log = read_json(res / "adam" / f"FOLD_{fold}" / "trainlog.json")
        same_training = read_json(every / "adam" / f"FOLD_{fold}" / "trainlog.json")  # the policy does not change training
        assert [entry["val_loss"] for entry in log.values()] == [entry["val_loss"] for entry in same_training.values()]
        losses = {int(epoch): entry["val_loss"] for epoch, entry in log.items()}
        best = read_json(res / "adam" / f"FOLD_{fold}" / "best_epoch.json")
        assert best["epoch"] == min(losses, key=losses.get) and best["phase"] == "val"
        assert best["value"] == losses[best["epoch"]]
        saved = torch.load(res / "adam" / f"FOLD_{fold}" / "model.pth.tar", weights_only=True)
        reference = torch.load(every / "adam" / f"FOLD_{fold}" / f"model_epoch{best['epoch']}.pth.tar", weights_only=True)
        assert saved["epoch"] == best["epoch"]
        assert all(torch.equal(saved["state_dict"][k], reference["state_dict"][k]) for k in reference["state_dict"])
        assert read_json(res / "adam" / f"FOLD_{fold}" / "test_metrics.json")["epoch"] == best["epoch"]
        best_epochs.append(best["epoch"])
    assert best_epochs != [4, 4, 4] and len(set(best_epochs)) > 1, best_epochs  # the case this test is about
    assert len(runs["best"]["adam"]) == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ("batchnorm", None),
        ("criterion", "needs a CrossEntropyLoss, MSELoss or L1Loss criterion"),
        ("multi_model", 'cannot run with multi_model = "sequential"'),
        ("optimizer", "trains every model as a vectorized group, but adam: optimizer RMSprop is not vectorized"),
    ],
)
def test_what_parallel_folds_cannot_do_is_refused_in_one_line(tmp_path, capsys, change, message):
    if change == "batchnorm":
        (tmp_path / "bn.py").write_text(
            "import torch\n\ndef mlp_bn(hidden=16, batchnorm=True):\n"
            "    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))\n"
        )
        path = write(tmp_path, adam={"model": "bn.py:mlp_bn", "params": None})
        message = "model adam: module '1' is a BatchNorm, whose batch statistics would mix each fold's test samples into its training"
    elif change == "criterion":
        path = write(tmp_path, adam={"criterion": "torch.nn:NLLLoss"})
    elif change == "multi_model":
        path = write(tmp_path, run={"multi_model": "sequential"})
    else:
        path = write(tmp_path, adam={"optimizer": {"class": "torch.optim:RMSprop"}})
    done = run_cli_here(capsys, "run", str(path), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and ("parallel = false" in lines[0] or "drop one" in lines[0]), lines
    assert lines[0].startswith(f"izitorch: error: {path}: plugins.kfold.parallel: "), lines
    assert not (tmp_path / "res_m" / "conf.json").exists()  # refused before anything was written


def test_parallel_must_be_a_boolean(tmp_path, capsys):
    path = write(tmp_path, parallel="yes")
    done = run_cli_here(capsys, "validate", str(path), cwd=tmp_path)
    assert done.returncode == 2 and "plugins.kfold.parallel" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_switching_parallel_on_resume_is_refused(tmp_path, capsys):
    path = write(tmp_path, epochs=1)
    run(path)
    done = run_cli_here(capsys, "run", str(path), "--resume", "--set", "plugins.kfold.parallel=false", "--set", "run.epochs=2", cwd=tmp_path)
    assert done.returncode == 2
    assert "plugins.kfold.parallel changed (True -> False)" in done.stderr, done.stderr


PLAIN_DATASET = '''\
from torch.utils.data import Dataset

from izitorch.datasets import digits


class PlainDigits(Dataset):
    """The same samples as izitorch.datasets:digits, served one by one (the DataLoader path)."""

    def __init__(self, limit=300):
        self.inputs, self.targets = digits(limit=limit).tensors

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]
'''


def test_a_dataset_without_the_fast_path_gives_the_same_parallel_run(tmp_path):
    """Rows travel with the samples through a DataLoader too: same batches, same masks, same results."""
    (tmp_path / "plain.py").write_text(PLAIN_DATASET, encoding="utf-8")
    fast = run(write(tmp_path, "fast.toml", epochs=2))
    slow = run(write(tmp_path, "slow.toml", epochs=2, dataset="plain.py:PlainDigits"))
    for model in ("adam", "sgd"):
        for fold in (1, 2, 3):
            a, b = weights(tmp_path / "res_fast", model, fold), weights(tmp_path / "res_slow", model, fold)
            assert all(torch.equal(a[name], b[name]) for name in a), (model, fold)
        assert [f["accuracy"] for f in fast[model]] == [f["accuracy"] for f in slow[model]]


EPOCH_LOG = """\
from izitorch import hookimpl

@hookimpl
def izitorch_epoch_start(run, fold, epoch):
    with open(run.res_dir / "started.txt", "a") as log:
        log.write(f"{fold.index + 1}:{epoch} ")
"""


def test_more_epochs_on_resume_extend_a_finished_parallel_run(tmp_path):
    (tmp_path / "epochs.py").write_text(EPOCH_LOG, encoding="utf-8")
    path = write(tmp_path, epochs=2, enable=("kfold", "epochs.py"))
    run(path)
    longer = run(path, "run.resume=true", "run.epochs=4")
    # the resumed run trained epochs 3 and 4 only: it continued from the saved state
    assert (tmp_path / "res_m" / "started.txt").read_text().split() == [f"{f}:{e}" for e in (1, 2, 3, 4) for f in (1, 2, 3)]
    reference = run(write(tmp_path, "ref.toml", epochs=4))
    for model in ("adam", "sgd"):
        assert list(read_json(tmp_path / "res_m" / model / "FOLD_2" / "trainlog.json")) == ["1", "2", "3", "4"]
        assert [f["accuracy"] for f in longer[model]] == [f["accuracy"] for f in reference[model]]
        for fold in (1, 2, 3):
            a, b = weights(tmp_path / "res_m", model, fold), weights(tmp_path / "res_ref", model, fold)
            assert all(torch.equal(a[name], b[name]) for name in a), (model, fold)


def test_a_diverging_member_stops_alone_and_names_its_fold(tmp_path):
    path = write(tmp_path, epochs=3, sgd={"optimizer": {"lr": 1e12}})
    results = run(path)
    for fold in (1, 2, 3):
        log = read_json(tmp_path / "res_m" / "sgd" / f"FOLD_{fold}" / "test_metrics.json")
        assert f"at fold {fold}, epoch 1" in log["stopped"] and 'nan_policy = "stop"' in log["stopped"]
        assert "stopped" not in read_json(tmp_path / "res_m" / "adam" / f"FOLD_{fold}" / "test_metrics.json")
        assert list(read_json(tmp_path / "res_m" / "adam" / f"FOLD_{fold}" / "trainlog.json")) == ["1", "2", "3"]
    assert np.mean([f["accuracy"] for f in results["adam"]]) > 60.0


def test_a_model_whose_output_does_not_fit_fails_in_one_line_before_training(tmp_path, capsys):
    (tmp_path / "odd.py").write_text("import torch\n\ndef pairs():\n    return torch.nn.Sequential(torch.nn.Linear(64, 20), torch.nn.Unflatten(1, (10, 2)))\n")
    path = write(tmp_path, adam={"model": "odd.py:pairs", "params": None})
    done = run_cli_here(capsys, "run", str(path), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    # the dry run before training (validate's too) takes each model on its own, on four samples
    assert lines == [
        f"izitorch: error: {path}: model adam: the criterion failed on output (4, 10, 2) and target (4,): Expected target "
        "size [4, 2], got [4]; check that the model's output size matches num_classes and that labels lie in "
        "[0, num_classes)"
    ]
    checked = run_cli_here(capsys, "validate", str(path), cwd=tmp_path)
    assert (checked.returncode, checked.stderr) == (1, done.stderr)


def test_a_member_with_no_sample_of_its_own_in_a_batch_does_not_step(tmp_path):
    """With one sample a batch, every batch is some fold's test sample: that fold's member must
    sit the step out (an Adam step on a zero gradient would still move it). 30 samples, 3 folds,
    2 epochs: each member takes 2 x 20 steps, not 2 x 30."""
    path = write(tmp_path, epochs=2, params={"limit": 30})
    run(path, "run.batch_size=1")
    res = tmp_path / "res_m"
    split = pickle.loads((res / "Dataset_split.pkl").read_bytes())
    assert [len(train) for train, _ in split] == [20, 20, 20]
    for fold in (1, 2, 3):
        state = torch.load(res / "adam" / f"FOLD_{fold}" / "model.pth.tar", weights_only=True)["optimizer"]["state"]
        assert [float(entry["step"]) for entry in state.values()] == [40.0] * 4, fold


def test_each_members_scheduler_drives_its_own_learning_rate(tmp_path):
    """A StepLR (halving every epoch) on "adam": every fold's member ends at lr / 2**epochs, as in
    sequential folds, and the group trains with it: epoch 1 is the run without a scheduler's,
    epoch 2 (at half the lr) is not."""
    scheduler = {"scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.5}}
    scheduled = write(tmp_path, "scheduled.toml", epochs=2, adam=scheduler)
    constant = write(tmp_path, "constant.toml", epochs=2)
    sequential = write(tmp_path, "sequential.toml", epochs=2, adam=scheduler, parallel=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in (scheduled, constant, sequential):
            run(path)
    # each member's scheduler knows its optimizer stepped (torch warns otherwise, at its first step)
    assert [str(w.message) for w in caught if "optimizer.step()" in str(w.message)] == []
    for fold in (1, 2, 3):
        lrs = [
            torch.load(tmp_path / f"res_{name}" / "adam" / f"FOLD_{fold}" / "model.pth.tar", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
            for name in ("scheduled", "constant", "sequential")
        ]
        assert lrs == [pytest.approx(1e-2 / 4), pytest.approx(1e-2), pytest.approx(1e-2 / 4)], fold
        logs = [read_json(tmp_path / f"res_{name}" / "adam" / f"FOLD_{fold}" / "trainlog.json") for name in ("scheduled", "constant")]
        assert logs[0]["1"]["loss"] == logs[1]["1"]["loss"]
        assert logs[0]["2"]["loss"] != logs[1]["2"]["loss"]
        sgd = [read_json(tmp_path / f"res_{name}" / "sgd" / f"FOLD_{fold}" / "trainlog.json") for name in ("scheduled", "constant")]
        assert without_times(sgd[0]) == without_times(sgd[1])  # the other model has no scheduler


def without_times(log: dict) -> dict:
    return {epoch: {k: v for k, v in entry.items() if not k.endswith("_time")} for epoch, entry in log.items()}


STOP_FOLD_1 = """\
from izitorch import hookimpl


@hookimpl
def izitorch_should_stop(run, fold, epoch, scores):
    return "fold 1 is done" if fold.index == 0 and epoch == 1 else None
"""


def test_the_folds_still_training_train_in_train_mode_after_the_first_fold_stopped(tmp_path, monkeypatch):
    """A group runs in the mode of its members: once fold 1 has stopped (its members sit the passes
    out), the other folds' training passes must still run with dropout on, and evaluation with it off."""
    from izitorch import ensemble

    modes = []
    real_forward = ensemble.VectorGroup.forward

    def forward(self, inputs, active=None):
        outputs = real_forward(self, inputs, active)
        modes.append((torch.is_grad_enabled(), self._base.training, [slot.model.training for slot in self.slots]))
        return outputs

    monkeypatch.setattr(ensemble.VectorGroup, "forward", forward)
    (tmp_path / "stop.py").write_text(STOP_FOLD_1, encoding="utf-8")
    run(write(tmp_path, epochs=3, enable=("kfold", "stop.py")))
    assert read_json(tmp_path / "res_m" / "sgd" / "FOLD_1" / "trainlog.json").keys() == {"1"}
    assert list(read_json(tmp_path / "res_m" / "sgd" / "FOLD_2" / "trainlog.json")) == ["1", "2", "3"]
    training = [(base, members) for grad, base, members in modes if grad]
    evaluating = [(base, members) for grad, base, members in modes if not grad]
    assert training and evaluating
    assert all(base and all(members) for base, members in training)
    assert all(not base and not any(members) for base, members in evaluating)


def test_a_members_optimizer_steps_its_own_parameters_and_tells_its_scheduler():
    """The step wrapper a member's optimizer gets back after its deepcopy (its scheduler's) must
    step the copy, not the original it was copied from, and mark the call for the scheduler."""
    from torch import nn

    from izitorch.models import MLP
    from izitorch.parallel import _member
    from izitorch.state import Slot

    torch.manual_seed(0)
    model = MLP(hidden=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    slot = Slot("m", None, model, nn.CrossEntropyLoss(), optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1))
    slot.snapshot_initial_state()
    member = _member(slot)
    assert member.scheduler.optimizer is member.optimizer
    before = [p.detach().clone() for p in model.parameters()]
    for param in member.model.parameters():
        param.grad = torch.ones_like(param)
    member.optimizer.step()
    assert member.optimizer._opt_called and not getattr(optimizer, "_opt_called", False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the original did not move
    assert all(torch.allclose(p, b - 0.1) for p, b in zip(member.model.parameters(), before))
