"""The output files (README, "Outputs"): their presence, their names and what they contain."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

import izitorch
from izitorch.datasets import digits
from izitorch.models import MLP

from conftest import ROOT, plain_scores, run_cli

SIZE = 300  # the tiny manifest's dataset
CLASSIFICATION = ("loss", "accuracy", "IoU", "balanced_accuracy", "precision", "recall", "F1")
TRAIN_KEYS = {*CLASSIFICATION, "train_step_time", "train_time", "lr"}
TEST_KEYS = {*(f"test_{key}" for key in CLASSIFICATION), "inference_time", "eval_time"}
VAL_KEYS = {*(f"val_{key}" for key in CLASSIFICATION), "inference_time", "eval_time"}
SCORES = ("loss", "accuracy", "IoU")
NOISY_SGD = 'models[0].optimizer={ class = "torch.optim:SGD", lr = 0.5 }'


def tiny(manifest, *sets: str, **changes):
    """Run the tiny digits manifest (``manifest(**changes)``, with ``--set``-style overrides)
    in-process; return (res_dir, results)."""
    path = manifest(**changes)
    config = izitorch.load_manifest(path, sets)
    results = izitorch.run(config)
    return Path(config.run.res_dir), results


def read(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    with open(path, "rb") as handle:
        return pickle.load(handle)


def predict_confusion(checkpoint: Path, test_indices: list[int], hidden: int = 16) -> np.ndarray:
    """The confusion matrix of the checkpointed weights on the given test samples, computed here."""
    state = torch.load(checkpoint, weights_only=True)
    model = MLP(hidden=hidden)
    model.load_state_dict(state["state_dict"])
    model.eval()
    dataset = digits(limit=SIZE)
    inputs, targets = dataset.tensors
    index = torch.as_tensor(test_indices)
    with torch.no_grad():
        predicted = model(inputs[index]).argmax(dim=1)
    return sk_confusion_matrix(targets[index].numpy(), predicted.numpy(), labels=list(range(10)))


def eval_prefix(validation: bool) -> str:
    return "val_" if validation else "test_"


# -- res_dir/conf.json, Dataset_split.pkl, <model>/conf.json ------------------------------------


def test_run_conf_json_records_config_plugins_and_versions(manifest):
    res, _ = tiny(manifest, "run.epochs=1")
    conf = read(res / "conf.json")
    config = conf["config"]
    assert config["run"]["epochs"] == 1
    assert config["run"]["batch_size"] == 32
    assert config["data"]["dataset"] == "izitorch.datasets:digits"
    assert config["data"]["params"] == {"limit": SIZE}
    assert config["data"]["num_classes"] == 10
    assert [m["name"] for m in config["models"]] == ["mlp"]
    assert config["models"][0]["params"] == {"hidden": 16}
    assert config["models"][0]["optimizer"] == {"class": "torch.optim:Adam", "lr": 0.01}  # the manifest's own keys
    plugins = conf["plugins"]
    assert {"loop", "holdout", "metrics", "checkpoint", "trainlog", "console"} <= set(plugins)
    assert "kfold" not in plugins
    assert all(isinstance(v, str) and v for v in plugins.values())
    assert conf["versions"]["torch"] == torch.__version__
    assert conf["versions"]["izitorch"] == izitorch.__version__


def test_conf_json_lists_enabled_optional_plugins(manifest):
    res, _ = tiny(manifest, "run.epochs=1", "plugins.kfold.k=2")
    assert "kfold" in read(res / "conf.json")["plugins"]


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.8])
def test_holdout_split_follows_train_ratio_and_covers_the_dataset(manifest, ratio):
    res, _ = tiny(manifest, "run.epochs=1", f"data.train_ratio={ratio}")
    splits = read(res / "Dataset_split.pkl")
    assert isinstance(splits, list) and len(splits) == 1
    train, test = splits[0]
    assert isinstance(train, list) and all(isinstance(i, int) for i in train)
    assert len(train) == math.floor(ratio * SIZE)
    assert len(test) == SIZE - len(train)
    assert not set(train) & set(test)
    assert sorted(train + test) == list(range(SIZE))
    assert read(res / "conf.json")["splits"] == [{"train": len(train), "test": len(test)}]


def test_holdout_split_with_validation_has_three_disjoint_parts(manifest):
    res, _ = tiny(manifest, "run.epochs=1", "data.validation=true", "data.train_ratio=0.7")
    ((train, val, test),) = read(res / "Dataset_split.pkl")
    assert len(train) == 210
    assert len(val) + len(test) == 90 and abs(len(val) - len(test)) <= 1
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert sorted(train + val + test) == list(range(SIZE))


def test_model_conf_json_has_repr_and_parameter_count(manifest):
    res, _ = tiny(manifest, "run.epochs=1")
    conf = read(res / "mlp" / "conf.json")
    model = MLP(hidden=16)
    assert conf["name"] == "mlp"
    assert conf["parameters"] == sum(p.numel() for p in model.parameters()) == 64 * 16 + 16 + 16 * 10 + 10
    assert conf["model"] == repr(model)
    assert "Adam" in conf["optimizer"]
    assert conf["spec"]["params"] == {"hidden": 16}
    assert conf["scheduler"] is None


def test_model_conf_json_describes_the_scheduler_the_same_way_every_run(manifest):
    """Its class and settings, not its repr (``<... object at 0x...>``, another address each run)."""
    step = 'models[0].scheduler={class="torch.optim.lr_scheduler:StepLR", step_size=2, gamma=0.5}'
    res, _ = tiny(manifest, "run.epochs=1", step)
    assert read(res / "mlp" / "conf.json")["scheduler"] == ("torch.optim.lr_scheduler.StepLR(base_lrs=[0.01], gamma=0.5, last_epoch=0, step_size=2)")


# -- trainlog.json --------------------------------------------------------------------------------


def test_trainlog_keys_per_epoch_without_validation(manifest):
    res, _ = tiny(manifest, "run.epochs=2")
    log = read(res / "mlp" / "trainlog.json")
    assert list(log) == ["1", "2"]
    for entry in log.values():
        assert set(entry) == TRAIN_KEYS | TEST_KEYS
        assert 0.0 <= entry["accuracy"] <= 100.0 and 0.0 <= entry["IoU"] <= 1.0
        assert entry["loss"] > 0 and entry["train_step_time"] > 0 and entry["inference_time"] > 0
    # the last epoch's test scores are those of the saved (last) weights, computed independently
    ((_, test),) = read(res / "Dataset_split.pkl")
    expected = plain_scores(MLP(hidden=16), res / "mlp" / "model.pth.tar", test)
    for key in SCORES:
        assert log["2"][f"test_{key}"] == pytest.approx(expected[key], rel=1e-5), key


def test_trainlog_keys_per_epoch_with_validation(manifest):
    res, _ = tiny(manifest, "run.epochs=2", "data.validation=true")
    log = read(res / "mlp" / "trainlog.json")
    assert list(log) == ["1", "2"]
    for entry in log.values():
        assert set(entry) == TRAIN_KEYS | VAL_KEYS


@pytest.mark.parametrize("epochs,test_epoch,evaluated", [(3, 2, {2, 3}), (4, 2, {2, 4}), (3, 5, {3})])
def test_test_epoch_cadence_and_last_epoch_always_evaluated(manifest, epochs, test_epoch, evaluated):
    res, _ = tiny(manifest, f"run.epochs={epochs}", f"run.test_epoch={test_epoch}")
    log = read(res / "mlp" / "trainlog.json")
    assert list(log) == [str(e) for e in range(1, epochs + 1)]
    for epoch, entry in log.items():
        if int(epoch) in evaluated:
            assert set(entry) == TRAIN_KEYS | TEST_KEYS, epoch
        else:
            assert set(entry) == TRAIN_KEYS, epoch


# -- confusion_matrix.pkl, test_metrics.json, results.json ----------------------------------------


def test_confusion_matrix_matches_the_checkpointed_weights(manifest):
    res, results = tiny(manifest, "run.epochs=2")
    ((_, test),) = read(res / "Dataset_split.pkl")
    matrix = read(res / "mlp" / "confusion_matrix.pkl")
    assert isinstance(matrix, np.ndarray) and matrix.dtype == np.int64 and matrix.shape == (10, 10)
    assert matrix.sum() == len(test)
    assert (matrix == predict_confusion(res / "mlp" / "model.pth.tar", test)).all()
    final = results["mlp"][0]
    assert final["accuracy"] == pytest.approx(100.0 * np.trace(matrix) / matrix.sum())


@pytest.mark.parametrize("validation", [False, True], ids=["test", "val"])
def test_confusion_matrix_comes_from_the_best_epoch_not_the_last(manifest, validation):
    # SGD with a large step makes the accuracy peak before the last epoch on this tiny set (and split).
    res, results = tiny(
        manifest,
        "run.epochs=4",
        f"data.validation={str(validation).lower()}",
        "data.stratify=false",
        NOISY_SGD,
        'plugins.checkpoint.policy="best"',
        'plugins.checkpoint.metric="acc"',
    )
    test = read(res / "Dataset_split.pkl")[0][-1]
    log = read(res / "mlp" / "trainlog.json")
    best = read(res / "mlp" / "best_epoch.json")["epoch"]
    column = eval_prefix(validation) + "accuracy"
    assert best == int(np.argmax([log[str(e)][column] for e in range(1, 5)])) + 1
    checkpoint = torch.load(res / "mlp" / "model.pth.tar", weights_only=True)
    assert checkpoint["epoch"] == best
    matrix = read(res / "mlp" / "confusion_matrix.pkl")
    assert matrix.dtype == np.int64 and matrix.sum() == len(test)
    assert (matrix == predict_confusion(res / "mlp" / "model.pth.tar", test)).all()
    metrics = read(res / "mlp" / "test_metrics.json")
    assert metrics["epoch"] == best
    assert metrics["accuracy"] == pytest.approx(100.0 * np.trace(matrix) / len(test))
    assert results["mlp"][0]["accuracy"] == pytest.approx(metrics["accuracy"])
    if not validation:
        assert best < 4, "precondition: this set-up must peak before the last epoch"
        assert metrics["accuracy"] == pytest.approx(log[str(best)]["test_accuracy"])
        assert metrics["accuracy"] != pytest.approx(log["4"]["test_accuracy"])


def test_test_metrics_and_results_json(manifest):
    """run()'s return, test_metrics.json and results.json hold the scores that the saved weights
    get on the saved test samples, computed independently (``conftest.plain_scores``)."""
    res, results = tiny(manifest, "run.epochs=2")
    ((_, test),) = read(res / "Dataset_split.pkl")
    expected = plain_scores(MLP(hidden=16), res / "mlp" / "model.pth.tar", test)
    metrics = read(res / "mlp" / "test_metrics.json")
    final = results["mlp"][0]
    for key in SCORES:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
        assert final[key] == pytest.approx(expected[key], rel=1e-5), key
    assert metrics["epoch"] == 2
    log = read(res / "mlp" / "trainlog.json")
    # policy "last": the final test uses the last epoch's weights, so it repeats the last evaluation
    for key in SCORES:
        assert metrics[key] == pytest.approx(log["2"][f"test_{key}"], rel=1e-5)
    summary = read(res / "results.json")
    assert list(summary) == ["mlp"]
    assert summary["mlp"]["folds"] == 1
    for key in SCORES:
        assert summary["mlp"]["mean"][key] == pytest.approx(expected[key], rel=1e-5)
        assert summary["mlp"]["std"][key] == 0.0
    assert not (res / "mlp" / "overall.json").exists()


# -- k-fold ---------------------------------------------------------------------------------------


# The tiny run's MLP with a scheduler, and a wider one trained by SGD with momentum.
TWO_MODELS = [
    {"scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.5}},
    {"name": "wide", "params": {"hidden": 24}, "optimizer": {"class": "torch.optim:SGD", "lr": 0.1, "momentum": 0.9}},
]


def test_kfold_writes_one_folder_per_fold_and_partitions_the_data(manifest, tmp_path):
    res, results = tiny(manifest, models=TWO_MODELS, plugins={"kfold": {"k": 3}})
    splits = read(res / "Dataset_split.pkl")
    assert len(splits) == 3 and all(len(s) == 2 for s in splits)
    tests = [set(test) for _, test in splits]
    assert sum(len(t) for t in tests) == SIZE and set().union(*tests) == set(range(SIZE))
    for train, test in splits:
        assert not set(train) & set(test) and len(train) + len(test) == SIZE
    for name in ("mlp", "wide"):
        assert sorted(p.name for p in (res / name).glob("FOLD_*")) == ["FOLD_1", "FOLD_2", "FOLD_3"]
        assert not (res / name / "trainlog.json").exists()
        fold_metrics = []
        for k, (_, test) in enumerate(splits, 1):
            fold = res / name / f"FOLD_{k}"
            for file in ("trainlog.json", "model.pth.tar", "confusion_matrix.pkl", "test_metrics.json"):
                assert (fold / file).is_file(), fold / file
            assert read(fold / "confusion_matrix.pkl").sum() == len(test)
            fold_metrics.append(read(fold / "test_metrics.json"))
        assert len(results[name]) == 3
        overall = read(res / name / "overall.json")
        assert overall["folds"] == 3
        for key in SCORES:
            values = [m[key] for m in fold_metrics]
            assert overall["mean"][key] == pytest.approx(np.mean(values))
            assert overall["std"][key] == pytest.approx(np.std(values))
        assert read(res / "results.json")[name] == overall
    fold_matrix = read(res / "mlp" / "FOLD_2" / "confusion_matrix.pkl")
    assert (fold_matrix == predict_confusion(res / "mlp" / "FOLD_2" / "model.pth.tar", splits[1][1])).all()


def test_kfold_with_validation_has_disjoint_val_sets(manifest):
    res, _ = tiny(manifest, "run.epochs=1", "plugins.kfold.k=3", "data.validation=true")
    splits = read(res / "Dataset_split.pkl")
    assert len(splits) == 3 and all(len(s) == 3 for s in splits)
    assert set().union(*(set(s[2]) for s in splits)) == set(range(SIZE))
    assert sum(len(s[2]) for s in splits) == SIZE
    for train, val, test in splits:
        assert val and not set(val) & set(train) and not set(val) & set(test) and not set(train) & set(test)
        assert sorted(train + val + test) == list(range(SIZE))
    log = read(res / "mlp" / "FOLD_1" / "trainlog.json")
    assert set(log["1"]) == TRAIN_KEYS | VAL_KEYS


RECORDER = """\
import copy, pickle
from izitorch import hookimpl

OUT = {out!r}
records = {{"initial": {{}}, "start": [], "finish": []}}


def _snapshot(fold, slot):
    return {{
        "fold": fold.index if fold is not None else None,
        "weights": {{k: v.detach().clone() for k, v in slot.model.state_dict().items()}},
        "optimizer_state": len(slot.optimizer.state),
        "lr": slot.optimizer.param_groups[0]["lr"],
        "scheduler_epoch": slot.scheduler.last_epoch if slot.scheduler is not None else None,
    }}


@hookimpl
def izitorch_run_start(run):
    for slot in run.slots:
        records["initial"][slot.name] = _snapshot(None, slot)


@hookimpl
def izitorch_fold_start(run, fold):
    records["start"].append({{slot.name: _snapshot(fold, slot) for slot in fold.slots}})


@hookimpl
def izitorch_fold_finish(run, fold):
    records["finish"].append({{slot.name: _snapshot(fold, slot) for slot in fold.slots}})


@hookimpl
def izitorch_run_finish(run, results):
    with open(OUT, "wb") as handle:
        pickle.dump(records, handle)
"""


def test_every_fold_starts_from_the_initial_weights_and_a_fresh_optimizer(manifest, tmp_path):
    plugin = tmp_path / "recorder.py"
    plugin.write_text(RECORDER.format(out=str(tmp_path / "record.pkl")), encoding="utf-8")
    tiny(manifest, models=TWO_MODELS, plugins={"enable": [plugin.as_posix()], "kfold": {"k": 3}})
    records = read(tmp_path / "record.pkl")
    assert len(records["start"]) == len(records["finish"]) == 3
    for name, initial in records["initial"].items():
        for start, finish in zip(records["start"], records["finish"]):
            begin, end = start[name], finish[name]
            assert all(torch.equal(begin["weights"][k], v) for k, v in initial["weights"].items()), (name, begin["fold"])
            assert begin["optimizer_state"] == 0
            assert begin["lr"] == initial["lr"]
            assert begin["scheduler_epoch"] == initial["scheduler_epoch"]
            # the fold did train: its end state differs from the start (so the check above can fail)
            assert not all(torch.equal(end["weights"][k], v) for k, v in initial["weights"].items())
            assert end["optimizer_state"] > 0
        if name == "mlp":
            assert all(f[name]["lr"] == pytest.approx(initial["lr"] * 0.25) for f in records["finish"])


# -- checkpoint policies --------------------------------------------------------------------------


def test_checkpoint_policy_last(manifest):
    res, _ = tiny(manifest, "run.epochs=3", 'plugins.checkpoint.policy="last"')
    checkpoint = torch.load(res / "mlp" / "model.pth.tar", weights_only=True)
    assert set(checkpoint) == {"epoch", "state_dict", "optimizer"}
    assert checkpoint["epoch"] == 3
    assert set(checkpoint["state_dict"]) == set(MLP(hidden=16).state_dict())
    assert checkpoint["optimizer"]["state"]  # Adam moments after training
    assert not list((res / "mlp").glob("model_epoch*"))
    assert not (res / "mlp" / "best_epoch.json").exists()


def test_checkpoint_policy_all_with_scheduler(manifest):
    res, _ = tiny(
        manifest,
        "run.epochs=3",
        'plugins.checkpoint.policy="all"',
        'models[0].scheduler={ class = "torch.optim.lr_scheduler:StepLR", step_size = 1, gamma = 0.5 }',
    )
    files = sorted(p.name for p in (res / "mlp").glob("model_epoch*.pth.tar"))
    assert files == ["model_epoch1.pth.tar", "model_epoch2.pth.tar", "model_epoch3.pth.tar"]
    weights = []
    for epoch in (1, 2, 3):
        checkpoint = torch.load(res / "mlp" / f"model_epoch{epoch}.pth.tar", weights_only=True)
        assert set(checkpoint) == {"epoch", "state_dict", "optimizer", "scheduler"}
        assert checkpoint["epoch"] == epoch
        assert checkpoint["scheduler"]["last_epoch"] == epoch
        weights.append(checkpoint["state_dict"]["net.0.weight"])
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert not (res / "mlp" / "model.pth.tar").exists()


@pytest.mark.parametrize("validation", [False, True], ids=["test", "val"])
@pytest.mark.parametrize("metric,key,pick", [("loss", "loss", np.argmin), ("acc", "accuracy", np.argmax), ("IoU", "IoU", np.argmax)])
def test_checkpoint_policy_best_picks_the_right_epoch(manifest, metric, key, pick, validation):
    epochs = 4
    res, _ = tiny(
        manifest,
        f"run.epochs={epochs}",
        f"data.validation={str(validation).lower()}",
        NOISY_SGD,
        'plugins.checkpoint.policy="best"',
        f'plugins.checkpoint.metric="{metric}"',
    )
    log = read(res / "mlp" / "trainlog.json")
    column = eval_prefix(validation) + key
    values = [log[str(e)][column] for e in range(1, epochs + 1)]
    expected = int(pick(values)) + 1
    best = read(res / "mlp" / "best_epoch.json")
    assert best["epoch"] == expected, (column, values)
    assert best["value"] == pytest.approx(values[expected - 1])
    checkpoint = torch.load(res / "mlp" / "model.pth.tar", weights_only=True)
    assert set(checkpoint) == {"epoch", "state_dict", "optimizer"}
    assert checkpoint["epoch"] == expected
    assert read(res / "mlp" / "test_metrics.json")["epoch"] == expected


# -- reproducibility ------------------------------------------------------------------------------


def _losses(res: Path) -> dict:
    log = read(res / "mlp" / "trainlog.json")
    return {e: {k: v for k, v in entry.items() if not k.endswith("_time")} for e, entry in log.items()}


def test_same_seed_same_run_other_seed_other_split(manifest, tmp_path):
    first, _ = tiny(manifest, "run.epochs=2", "run.rdm_seed=7", f"run.res_dir={(tmp_path / 'a').as_posix()}")
    second, _ = tiny(manifest, "run.epochs=2", "run.rdm_seed=7", f"run.res_dir={(tmp_path / 'b').as_posix()}")
    other, _ = tiny(manifest, "run.epochs=2", "run.rdm_seed=8", f"run.res_dir={(tmp_path / 'c').as_posix()}")
    assert read(first / "Dataset_split.pkl") == read(second / "Dataset_split.pkl")
    assert _losses(first) == _losses(second)
    assert read(first / "Dataset_split.pkl") != read(other / "Dataset_split.pkl")
    assert _losses(first) != _losses(other)


# -- the digits demo ------------------------------------------------------------------------------


def test_digits_demo_reaches_95_percent(tmp_path):
    res = tmp_path / "digits"
    done = run_cli("run", str(ROOT / "manifests" / "digits.toml"), "--set", f"run.res_dir={res.as_posix()}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = read(res / "results.json")
    assert set(summary) == {"mlp64", "cnn16"}
    for name, entry in summary.items():
        assert entry["mean"]["accuracy"] >= 95.0, (name, entry["mean"]["accuracy"])
        assert (res / name / "best_epoch.json").is_file()
        assert read(res / name / "confusion_matrix.pkl").sum() == len(read(res / "Dataset_split.pkl")[0][2])
    assert "mlp64" in done.stdout and "cnn16" in done.stdout


# -- the run's start files go to the writer at once (izitorch.io.hand_over) ------------------------

START_FILES_PROBE = """\
import json
from izitorch import hookimpl
from izitorch import io as izio


@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    if epoch == 1:
        izio._writer().flush()  # the files handed to the writer so far are on disk; held ones are not
        seen = sorted(p.relative_to(run.res_dir).as_posix() for p in run.res_dir.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run.res_dir).parts))
        with open({out!r}, "w") as handle:
            json.dump(seen, handle)
"""


def test_the_files_of_the_runs_start_reach_the_disk_while_it_trains(manifest, tmp_path):
    """With files held for an hour, the configuration, the split and each model's folder and
    ``conf.json`` are written during the first epoch, not at the end; the epoch's outputs stay held."""
    plugin = tmp_path / "probe.py"
    plugin.write_text(START_FILES_PROBE.format(out=str(tmp_path / "seen.json")), encoding="utf-8")
    res, _ = tiny(manifest, models=TWO_MODELS, run={"flush_interval": 3600}, plugins={"enable": [plugin.as_posix()]})
    seen = read(tmp_path / "seen.json")
    names = sorted(p.name for p in res.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert seen == sorted(["conf.json", "manifest.toml", "Dataset_split.pkl", *(f"{name}/conf.json" for name in names)])
    assert len(names) == 2 and all((res / name / "trainlog.json").is_file() for name in names)  # written at the end
