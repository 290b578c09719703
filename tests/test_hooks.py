"""The hook protocol (``izitorch/hookspecs.py``): the exact sequence of a k-fold run, every hook's contract
exercised by a small local plugin, plugin loading errors, and the meta-tests that keep every
hook tested and documented and every built-in plugin declared."""

from __future__ import annotations

import ast
import inspect
import json
import math
import pickle
import re
import sys
from pathlib import Path
from textwrap import dedent
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import izitorch
from izitorch import IzitorchError, Scores, hookimpl, load_manifest
from izitorch.cli import main as cli_main
from izitorch.datasets import digits
from izitorch.models import MLP
from izitorch.pluginmanager import DEFAULT_PLUGINS, describe_plugins, make_plugin_manager
from izitorch.plugins.early_stop import EarlyStopPlugin

from conftest import make_manifest

ROOT = Path(__file__).resolve().parents[1]
HOOKSPECS = ROOT / "izitorch" / "hookspecs.py"

SIZE = 200
BATCH = 32


def setup_run(
    folder: Path,
    plugin_files: dict[str, str],
    plugins: dict,
    *,
    epochs: int = 2,
    two_models: bool = True,
    first: str = "mlp_a",
    second: str = "mlp_b",
    test_epoch: int = 1,
) -> Path:
    """Write the plugin files and a manifest into ``folder`` (200 digits, on the CPU, one or two
    MLPs, its ``[plugins]`` table ``plugins``); return the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in plugin_files.items():
        (folder / name).write_text(dedent(source), encoding="utf-8")
    models = [{"name": first}] + ([{"name": second, "params": {"hidden": 8}}] if two_models else [])
    return make_manifest(
        folder, run={"device": "cpu", "epochs": epochs, "test_epoch": test_epoch}, data={"params": {"limit": 200}}, models=models, plugins=plugins
    )


def run_manifest(path: Path) -> dict:
    return izitorch.run(load_manifest(str(path)))


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def batches(n_samples: int) -> int:
    return math.ceil(n_samples / BATCH)


def batch_sizes(n_samples: int) -> list[int]:
    return [BATCH] * (n_samples // BATCH) + ([n_samples % BATCH] if n_samples % BATCH else [])


# -- the exact hook sequence ------------------------------------------------------------------

RECORDER = '''\
"""Records (hook, fold index, epoch, detail) for every hook but izitorch_run_fold / izitorch_make_splits."""
import json
from pathlib import Path

from izitorch import hookimpl

LOG = Path(__file__).with_name("calls.jsonl")


def _log(hook, fold=None, epoch=None, detail=None):
    with LOG.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps([hook, fold, epoch, detail]) + "\\n")


@hookimpl
def izitorch_configure(config):
    _log("configure", detail=type(config).__name__)


@hookimpl
def izitorch_register_metrics(register):
    _log("register_metrics")


@hookimpl
def izitorch_run_start(run):
    _log("run_start", detail=len(run.splits))


@hookimpl
def izitorch_run_finish(run, results):
    _log("run_finish", detail=sorted(results))


@hookimpl
def izitorch_run_teardown(run, error):
    _log("run_teardown", detail=type(error).__name__ if error is not None else None)


@hookimpl
def izitorch_fold_start(run, fold):
    _log("fold_start", fold.index)


@hookimpl
def izitorch_fold_finish(run, fold):
    _log("fold_finish", fold.index)


@hookimpl
def izitorch_epoch_start(run, fold, epoch):
    _log("epoch_start", fold.index, epoch)


@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    _log("epoch_finish", fold.index, epoch)


@hookimpl
def izitorch_should_stop(run, fold, epoch, scores):
    _log("should_stop", fold.index, epoch)
    return None


@hookimpl
def izitorch_before_optimizer_step(run, slot):
    _log("before_optimizer_step", detail=slot.name)


@hookimpl
def izitorch_batch_finish(run, fold, step, losses):
    _log("batch_finish", fold.index, fold.epoch, step)


@hookimpl
def izitorch_state_dict(run):
    _log("state_dict")
    return None


@hookimpl
def izitorch_load_state_dict(run, state):
    _log("load_state_dict")
'''


def test_hook_sequence_of_a_two_fold_two_epoch_two_model_run(tmp_path):
    path = setup_run(tmp_path, {"recorder.py": RECORDER}, {"enable": ["kfold", "recorder.py"], "kfold": {"k": 2}})
    results = run_manifest(path)
    assert sorted(results) == ["mlp_a", "mlp_b"] and all(len(folds) == 2 for folds in results.values())

    splits = pickle.loads((tmp_path / "res" / "Dataset_split.pkl").read_bytes())
    n_batches = [batches(len(train)) for train, _test in splits]
    assert sum(len(test) for _train, test in splits) == SIZE
    assert n_batches == [batches(SIZE // 2)] * 2 == [4, 4]

    expected = [["configure", None, None, "Config"], ["register_metrics", None, None, None], ["run_start", None, None, 2]]
    for fold in range(2):
        expected.append(["fold_start", fold, None, None])
        for epoch in (1, 2):
            expected.append(["epoch_start", fold, epoch, None])
            for step in range(1, n_batches[fold] + 1):
                expected.append(["before_optimizer_step", None, None, "mlp_a"])
                expected.append(["before_optimizer_step", None, None, "mlp_b"])
                expected.append(["batch_finish", fold, epoch, step])
            expected.append(["epoch_finish", fold, epoch, None])
            expected.append(["should_stop", fold, epoch, None])
            expected.append(["state_dict", None, None, None])  # the resume state, every epoch
        expected.append(["fold_finish", fold, None, None])
        expected.append(["state_dict", None, None, None])  # the fold's final resume state
    expected.append(["run_finish", None, None, ["mlp_a", "mlp_b"]])
    expected.append(["run_teardown", None, None, None])

    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text(encoding="utf-8").splitlines()]
    assert calls == expected
    counts = {name: sum(1 for c in calls if c[0] == name) for name in ("before_optimizer_step", "batch_finish")}
    assert counts == {"before_optimizer_step": 2 * 2 * sum(n_batches), "batch_finish": 2 * sum(n_batches)}

    plugins = read_json(tmp_path / "res" / "conf.json")["plugins"]
    assert list(plugins) == ["loop", *DEFAULT_PLUGINS, "kfold", "recorder.py"]
    assert plugins["recorder.py"] == "local" and plugins["loop"] == izitorch.__version__


# -- izitorch_run_teardown --------------------------------------------------------------------

ENDING = """\
import signal
from pathlib import Path

from izitorch import hookimpl
from izitorch.errors import TrainingError

HOW = {how!r}
LOG = Path(__file__).with_name("teardown.txt")


@hookimpl
def izitorch_epoch_start(run, fold, epoch):
    if HOW == "ctrl-c" and epoch == 2:
        run.stop_flag.signum = signal.SIGINT  # what the SIGINT handler does: the loop stops at the next batch


@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    if HOW == "error" and epoch == 2:
        raise ValueError("broken in epoch 2")


@hookimpl
def izitorch_run_teardown(run, error):
    with LOG.open("a", encoding="utf-8") as stream:
        stream.write(f"{{type(error).__name__}}\\n")
    if HOW in ("error", "teardown"):
        raise TrainingError("a teardown that fails")  # on an error, dropped: the run's own error is reported
"""


@pytest.mark.parametrize(("how", "error"), [("finish", None), ("teardown", None), ("error", "TrainingError"), ("ctrl-c", "Interrupted")])
def test_run_teardown_is_called_once_however_the_run_ends(tmp_path, how, error):
    path = setup_run(tmp_path, {"ending.py": ENDING.format(how=how)}, {"enable": ["ending.py"]}, two_models=False)
    if how == "finish":
        run_manifest(path)
    else:
        with pytest.raises(Exception) as raised:
            run_manifest(path)
        assert type(raised.value).__name__ == (error or "TrainingError")
        assert ("a teardown that fails" in str(raised.value)) == (how == "teardown")
    assert (tmp_path / "teardown.txt").read_text(encoding="utf-8").splitlines() == [error or "NoneType"]
    finished = how in ("finish", "teardown")
    assert list(read_json(tmp_path / "res" / "mlp_a" / "trainlog.json")) == (["1", "2"] if finished else ["1"])
    assert (tmp_path / "res" / ".izitorch" / "finished.json").is_file() == finished  # a failing teardown does not undo the run


# -- izitorch_should_stop ---------------------------------------------------------------------

STOPPER = """\
from izitorch import hookimpl


@hookimpl
def izitorch_should_stop(run, fold, epoch, scores):
    if fold.index == 0 and epoch == 1:
        return "stop requested by the test plugin"
    return None
"""


def test_should_stop_reason_ends_only_that_fold_early(tmp_path, capsys):
    path = setup_run(tmp_path, {"stopper.py": STOPPER}, {"enable": ["stopper.py"], "kfold": {"k": 2}}, epochs=3, two_models=False)
    run_manifest(path)
    model = tmp_path / "res" / "mlp_a"
    assert list(read_json(model / "FOLD_1" / "trainlog.json")) == ["1"]
    assert list(read_json(model / "FOLD_2" / "trainlog.json")) == ["1", "2", "3"]
    assert read_json(model / "FOLD_1" / "test_metrics.json")["epoch"] == 1
    assert read_json(model / "FOLD_2" / "test_metrics.json")["epoch"] == 3
    out = capsys.readouterr().out
    assert "fold 1 stopped: stop requested by the test plugin" in out
    assert "fold 2 stopped" not in out


# -- izitorch_make_splits ---------------------------------------------------------------------

SPLITTER = """\
import numpy as np

from izitorch import Split, hookimpl


@hookimpl
def izitorch_make_splits(run, dataset):
    assert len(dataset) == 200
    return [
        Split(train=np.arange(0, 120), test=np.arange(150, 200)),
        Split(train=np.arange(80, 200), test=np.array([3, 1, 4, 15, 9, 26])),
    ]
"""


def test_make_splits_from_a_plugin_replaces_holdout(tmp_path):
    path = setup_run(tmp_path, {"splitter.py": SPLITTER}, {"enable": ["splitter.py"]}, epochs=1, two_models=False)
    results = run_manifest(path)
    res = tmp_path / "res"
    saved = pickle.loads((res / "Dataset_split.pkl").read_bytes())
    assert saved == [(list(range(0, 120)), list(range(150, 200))), (list(range(80, 200)), [3, 1, 4, 15, 9, 26])]
    assert read_json(res / "conf.json")["splits"] == [{"train": 120, "test": 50}, {"train": 120, "test": 6}]
    assert len(results["mlp_a"]) == 2
    # the confusion matrix of each fold's final test counts exactly that fold's test samples
    assert pickle.loads((res / "mlp_a" / "FOLD_1" / "confusion_matrix.pkl").read_bytes()).sum() == 50
    assert pickle.loads((res / "mlp_a" / "FOLD_2" / "confusion_matrix.pkl").read_bytes()).sum() == 6


# -- izitorch_run_folds -----------------------------------------------------------------------

FOLDS_RUNNER = """\
from izitorch import hookimpl
from izitorch import loop


@hookimpl
def izitorch_run_folds(run, resuming):
    run.splits = run.splits[::-1]  # a schedule of its own: the last fold first, via the default
    results = loop.izitorch_run_folds(run=run, resuming=resuming)
    return {name: [{**scores, "order": i} for i, scores in enumerate(folds)] for name, folds in results.items()}
"""


def test_run_folds_from_a_plugin_replaces_the_fold_schedule(tmp_path):
    path = setup_run(tmp_path, {"folds_runner.py": FOLDS_RUNNER}, {"enable": ["folds_runner.py"], "kfold": {"k": 2}})
    results = run_manifest(path)
    assert [f["order"] for f in results["mlp_a"]] == [0, 1]
    summary = read_json(tmp_path / "res" / "results.json")["mlp_a"]
    assert summary["folds"] == 2 and summary["mean"]["order"] == 0.5  # run_finish got the plugin's results
    split = pickle.loads((tmp_path / "res" / "Dataset_split.pkl").read_bytes())
    matrix = pickle.loads((tmp_path / "res" / "mlp_a" / "FOLD_1" / "confusion_matrix.pkl").read_bytes())
    assert matrix.sum() == len(split[1][1])  # FOLD_1 is the reversed list's first: the second split


# -- izitorch_run_fold ------------------------------------------------------------------------

FOLD_RUNNER = """\
from izitorch import hookimpl


@hookimpl
def izitorch_run_fold(run, fold):
    if fold.index == 0:  # replace the protocol of the first fold; let the default loop run the second
        return {slot.name: {"accuracy": 10.0, "loss": 0.5} for slot in fold.slots}
    return None
"""


def test_run_fold_from_a_plugin_replaces_the_default_protocol(tmp_path):
    path = setup_run(tmp_path, {"fold_runner.py": FOLD_RUNNER}, {"enable": ["fold_runner.py"], "kfold": {"k": 2}})
    results = run_manifest(path)
    model = tmp_path / "res" / "mlp_a"
    for name in ("mlp_a", "mlp_b"):
        assert results[name][0] == {"accuracy": 10.0, "loss": 0.5}
        assert "confusion_matrix" in results[name][1]  # fold 2: the default loop's final test
    # fold 1 never trained: no epoch hook ran, so nothing was logged or checkpointed
    assert not (model / "FOLD_1").exists()
    assert list(read_json(model / "FOLD_2" / "trainlog.json")) == ["1", "2"]
    assert (model / "FOLD_2" / "model.pth.tar").is_file()
    overall = read_json(tmp_path / "res" / "results.json")["mlp_a"]
    assert overall["folds"] == 2
    assert overall["mean"]["accuracy"] == pytest.approx((10.0 + results["mlp_a"][1]["accuracy"]) / 2)


# -- izitorch_register_metrics ----------------------------------------------------------------

TOP2 = '''\
from izitorch import hookimpl


class Top2:
    """Top-2 accuracy in %, accumulated on the device."""

    def __init__(self, num_classes=None):
        self.hits = None
        self.count = 0

    def update(self, output, target, loss):
        hit = (output.topk(2, dim=1).indices == target[:, None]).any(dim=1).sum()
        self.hits = hit if self.hits is None else self.hits + hit
        self.count += target.shape[0]

    def compute(self):
        return {"top2": float(100.0 * self.hits / self.count)}


@hookimpl
def izitorch_register_metrics(register):
    register("top2", Top2)
'''


def test_register_metrics_adds_a_custom_metric_to_the_logs(tmp_path):
    path = setup_run(tmp_path, {"top2.py": TOP2}, {"enable": ["top2.py"]}, two_models=False)
    run_manifest(path)
    model = tmp_path / "res" / "mlp_a"
    log = read_json(model / "trainlog.json")
    assert list(log) == ["1", "2"]
    for entry in log.values():
        assert 0.0 <= entry["accuracy"] <= entry["top2"] <= 100.0
        assert 0.0 <= entry["test_accuracy"] <= entry["test_top2"] <= 100.0
    final = read_json(model / "test_metrics.json")
    assert final["top2"] == pytest.approx(log["2"]["test_top2"])

    # recompute top-2 of the saved (last-epoch) weights on the saved test indices
    _train, test = pickle.loads((tmp_path / "res" / "Dataset_split.pkl").read_bytes())[0]
    net = MLP(hidden=16)
    net.load_state_dict(torch.load(model / "model.pth.tar", weights_only=False)["state_dict"])
    inputs, targets = digits(limit=SIZE)[test]
    with torch.no_grad():
        top = net(inputs).topk(2, dim=1).indices
    expected = 100.0 * (top == targets[:, None]).any(dim=1).float().mean().item()
    assert final["top2"] == pytest.approx(expected, abs=1e-4)


# -- izitorch_before_optimizer_step -----------------------------------------------------------

FREEZER = """\
import json

import torch

from izitorch import StashKey, hookimpl

SEEN = StashKey("freezer.seen")


@hookimpl
def izitorch_fold_start(run, fold):
    initial = {s.name: {k: v.detach().clone() for k, v in s.model.state_dict().items()} for s in fold.slots}
    torch.save(initial, run.res_dir / "initial_weights.pt")


@hookimpl
def izitorch_before_optimizer_step(run, slot):
    grads = slot.grads()
    seen = run.stash.setdefault(SEEN, {}).setdefault(slot.name, {"calls": 0, "grads": [], "nonzero": 0})
    seen["calls"] += 1
    seen["grads"].append(len(grads))
    seen["nonzero"] += int(sum(float(g.abs().sum()) for g in grads) > 0)
    if slot.name == "frozen":
        for grad in grads:
            grad.zero_()


@hookimpl
def izitorch_run_finish(run, results):
    (run.res_dir / "seen.json").write_text(json.dumps(run.stash[SEEN]))
"""


def test_before_optimizer_step_sees_gradients_and_can_zero_them(tmp_path):
    path = setup_run(tmp_path, {"freezer.py": FREEZER}, {"enable": ["freezer.py"]}, first="frozen", second="free")
    run_manifest(path)
    res = tmp_path / "res"
    n_train = len(pickle.loads((res / "Dataset_split.pkl").read_bytes())[0][0])
    steps = 2 * batches(n_train)
    seen = read_json(res / "seen.json")
    parameter_tensors = len(list(MLP(hidden=16).parameters()))
    for name in ("frozen", "free"):
        assert seen[name]["calls"] == steps
        assert seen[name]["grads"] == [parameter_tensors] * steps  # every parameter has its gradient
        assert seen[name]["nonzero"] == steps  # and it was not zero before the plugin saw it

    initial = torch.load(res / "initial_weights.pt", weights_only=False)
    frozen = torch.load(res / "frozen" / "model.pth.tar", weights_only=False)["state_dict"]
    free = torch.load(res / "free" / "model.pth.tar", weights_only=False)["state_dict"]
    assert frozen.keys() == initial["frozen"].keys()
    assert all(torch.equal(frozen[k], initial["frozen"][k]) for k in frozen)  # zeroed gradients: no change
    assert not all(torch.equal(free[k], initial["free"][k]) for k in free)  # the other model did train


# -- izitorch_configure, izitorch_batch_finish, izitorch_epoch_finish on one observed run ------

OBSERVER = """\
import json

import torch

from izitorch import Config, StashKey, hookimpl

SEEN = StashKey("observer.seen")
CONFIGURED = []


@hookimpl
def izitorch_configure(config):
    CONFIGURED.append({"is_config": isinstance(config, Config), "epochs": config.run.epochs,
                       "source": config.source, "table": config.plugin_table("kfold")})


@hookimpl
def izitorch_run_start(run):
    run.stash[SEEN] = {"configure": list(CONFIGURED), "batches": [], "epochs": []}


@hookimpl
def izitorch_batch_finish(run, fold, step, losses):
    run.stash[SEEN]["batches"].append({
        "epoch": fold.epoch, "step": step, "names": list(losses),
        "tensors": all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in losses.values()),
        "detached": not any(v.requires_grad for v in losses.values()),
        "values": {k: float(v) for k, v in losses.items()},
    })


@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    run.stash[SEEN]["epochs"].append({
        "epoch": epoch, "scores_epoch": scores.epoch, "names": list(scores),
        "phases": {name: sorted(scores.phases(name)) for name in scores},
        "values": {name: {phase: {k: v for k, v in metrics.items() if isinstance(v, float)}
                          for phase, metrics in scores[name].items()} for name in scores},
    })


@hookimpl
def izitorch_run_finish(run, results):
    (run.res_dir / "seen.json").write_text(json.dumps(run.stash[SEEN]))
"""


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("observed")
    path = setup_run(folder, {"observer.py": OBSERVER}, {"enable": ["observer.py"]}, epochs=3, test_epoch=2)
    run_manifest(path)
    res = folder / "res"
    n_train = len(pickle.loads((res / "Dataset_split.pkl").read_bytes())[0][0])
    return SimpleNamespace(path=path, res=res, n_train=n_train, seen=read_json(res / "seen.json"))


def test_configure_receives_the_config(observed):
    assert observed.seen["configure"] == [{"is_config": True, "epochs": 3, "source": str(observed.path), "table": {}}]


def test_configure_is_historic(tmp_path):
    path = setup_run(tmp_path, {}, {"kfold": {"k": 3}}, two_models=False)
    config = load_manifest(str(path))
    pm, versions = make_plugin_manager(config)
    assert pm.hook.izitorch_configure.is_historic()
    assert pm.get_plugin("kfold").options.k == 3  # read during make_plugin_manager
    received = []

    class Late:
        @hookimpl
        def izitorch_configure(self, config):
            received.append(config)

    pm.register(Late())  # registered after configure was called: still receives it
    assert len(received) == 1 and received[0] is config


def test_batch_finish_gets_every_models_loss_tensor(observed):
    batch_calls = observed.seen["batches"]
    n = batches(observed.n_train)
    assert [(b["epoch"], b["step"]) for b in batch_calls] == [(e, s) for e in (1, 2, 3) for s in range(1, n + 1)]
    assert all(b["names"] == ["mlp_a", "mlp_b"] and b["tensors"] and b["detached"] for b in batch_calls)
    # the logged training loss is the sample-weighted mean of exactly these batch losses
    log = read_json(observed.res / "mlp_b" / "trainlog.json")
    sizes = batch_sizes(observed.n_train)
    for epoch in (1, 2, 3):
        losses = [b["values"]["mlp_b"] for b in batch_calls if b["epoch"] == epoch]
        assert log[str(epoch)]["loss"] == pytest.approx(np.dot(losses, sizes) / observed.n_train, rel=1e-5)


def test_epoch_finish_gets_train_and_test_scores(observed):
    epochs = observed.seen["epochs"]
    assert [(e["epoch"], e["scores_epoch"]) for e in epochs] == [(1, 1), (2, 2), (3, 3)]
    # test_epoch = 2: epoch 1 has only train scores; epoch 2 and the last epoch are evaluated
    assert [e["phases"] for e in epochs] == [
        {"mlp_a": ["train"], "mlp_b": ["train"]},
        {"mlp_a": ["test", "train"], "mlp_b": ["test", "train"]},
        {"mlp_a": ["test", "train"], "mlp_b": ["test", "train"]},
    ]
    log = read_json(observed.res / "mlp_a" / "trainlog.json")
    for e in epochs:
        values = e["values"]["mlp_a"]
        entry = log[str(e["epoch"])]
        assert entry["loss"] == pytest.approx(values["train"]["loss"])
        assert entry["accuracy"] == pytest.approx(values["train"]["accuracy"])
        if "test" in values:
            assert entry["test_accuracy"] == pytest.approx(values["test"]["accuracy"])
        else:
            assert "test_accuracy" not in entry


# -- izitorch_state_dict / izitorch_load_state_dict ------------------------------------------


def test_builtin_plugins_round_trip_their_state():
    early_stop = EarlyStopPlugin()
    early_stop.best, early_stop.waited = {"mlp_a": 0.3}, {"mlp_a": 4}
    state = early_stop.izitorch_state_dict(run=None)
    assert state == {"early_stop": {"best": {"mlp_a": 0.3}, "waited": {"mlp_a": 4}}}
    state = pickle.loads(pickle.dumps(state))  # what a checkpoint file would hold

    restored_early_stop = EarlyStopPlugin()
    restored_early_stop.izitorch_load_state_dict(run=None, state=state)
    assert (restored_early_stop.best, restored_early_stop.waited) == ({"mlp_a": 0.3}, {"mlp_a": 4})

    # the restored counter is live: with patience 5 and 4 evaluations waited, one more stops the model
    slot = SimpleNamespace(name="mlp_a", stopped=None)
    fold = SimpleNamespace(slots=[slot], eval_phase="test")
    scores = Scores(7)
    scores.add("test", {"mlp_a": {"loss": 0.9}})
    assert restored_early_stop.izitorch_should_stop(run=None, fold=fold, epoch=7, scores=scores) == "every model stopped early (epoch 7)"
    assert slot.stopped.startswith("early stop at epoch 7")

    # a plugin absent from the state starts empty
    fresh = EarlyStopPlugin()
    fresh.izitorch_load_state_dict(run=None, state={"checkpoint": {"best": {}}})
    assert (fresh.best, fresh.waited) == ({}, {})


def test_state_dict_hooks_collect_every_plugins_state_through_the_manager(tmp_path):
    path = setup_run(tmp_path, {}, {"enable": ["early_stop"]}, two_models=False)
    pm, _ = make_plugin_manager(load_manifest(str(path)))
    pm.get_plugin("early_stop").waited = {"mlp_a": 2}
    state = {}
    for part in pm.hook.izitorch_state_dict(run=None):
        state.update(part)
    assert state["early_stop"] == {"best": {}, "waited": {"mlp_a": 2}}

    other, _ = make_plugin_manager(load_manifest(str(path)))
    other.hook.izitorch_load_state_dict(run=None, state=state)
    assert other.get_plugin("early_stop").waited == {"mlp_a": 2}


# -- meta-tests -------------------------------------------------------------------------------


def hook_names() -> list[str]:
    tree = ast.parse(HOOKSPECS.read_text(encoding="utf-8"))
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("izitorch_")]


META_TESTS = (
    "test_every_hook_has_a_test_and_a_readme_entry",
    "test_every_builtin_plugin_is_declared_and_listed",
    "test_only_a_hook_implemented_or_called_counts_as_exercised",
)


def exercised_hooks(source: str) -> set[str]:
    """The hooks that ``source`` implements (a ``@hookimpl`` function or method) or calls
    (``<hook caller>.izitorch_x(...)``), in its code or in the plugin sources its strings hold.
    A name in a comment, a docstring or any other text does not count."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("izitorch_"):
            if any("hookimpl" in ast.unparse(decorator) for decorator in node.decorator_list):
                found.add(node.name)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("izitorch_"):
            found.add(node.func.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "izitorch_" in node.value:
            found |= exercised_hooks(node.value)  # a local plugin that the test writes to a file
    return found


def test_only_a_hook_implemented_or_called_counts_as_exercised():
    assert exercised_hooks("# izitorch_fold_start is tested elsewhere\nx = 'izitorch_epoch_start'\n") == set()
    assert exercised_hooks('def f():\n    """izitorch_fold_start"""\n') == set()
    assert exercised_hooks("def izitorch_fold_start(run, fold):\n    pass\n") == set()  # not a hook implementation
    assert exercised_hooks("@hookimpl\ndef izitorch_fold_start(run, fold):\n    pass\n") == {"izitorch_fold_start"}
    assert exercised_hooks("run.hook.izitorch_should_stop(run=run)\n") == {"izitorch_should_stop"}
    plugin = 'PLUGIN = """\n@hookimpl(tryfirst=True)\ndef izitorch_epoch_finish(run):\n    pass\n"""\n'
    assert exercised_hooks(plugin) == {"izitorch_epoch_finish"}


def test_every_hook_has_a_test_and_a_readme_entry():
    names = hook_names()
    assert len(names) >= 15 and set(names) == {n for n in dir(izitorch.hookspecs) if n.startswith("izitorch_")}
    exercised = set()
    for file in sorted((ROOT / "tests").glob("test_*.py")):
        text = file.read_text(encoding="utf-8")
        if file.resolve() == Path(__file__).resolve():
            for meta in META_TESTS:  # the meta-tests themselves do not count
                text = text.replace(inspect.getsource(globals()[meta]), "")
        exercised |= exercised_hooks(text)
    assert [name for name in names if name not in exercised] == []

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^### `(izitorch_\w+)`\s*$", readme, flags=re.MULTILINE))
    assert [name for name in names if name not in headings] == []


def test_every_builtin_plugin_is_declared_and_listed():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["entry-points"]["izitorch"]
    modules = sorted(p.stem for p in (ROOT / "plugins").glob("*.py") if p.stem != "__init__")
    assert len(modules) >= 8
    declared_modules = {value.split(":")[0]: name for name, value in declared.items()}
    assert [m for m in modules if f"izitorch.plugins.{m}" not in declared_modules] == []

    listed = {info.name: info for info in describe_plugins()}
    for module in modules:
        name = declared_modules[f"izitorch.plugins.{module}"]
        info = listed[name]
        assert info.origin == declared[name]
        assert info.version == izitorch.__version__
        assert info.hooks and all(h.startswith("izitorch_") for h in info.hooks), (name, info.hooks)
        assert info.default == (name in DEFAULT_PLUGINS)
    assert set(DEFAULT_PLUGINS) <= set(listed)


# -- loading errors and enable / disable ------------------------------------------------------

MISSPELLED = """\
from izitorch import hookimpl


@hookimpl
def izitorch_epoch_finsh(run, fold, epoch, scores):
    pass
"""


def test_a_misspelled_hook_fails_the_run_with_a_did_you_mean(tmp_path, capsys):
    path = setup_run(tmp_path, {"typo.py": MISSPELLED}, {"enable": ["typo.py"]}, two_models=False)
    with pytest.raises(IzitorchError) as caught:
        run_manifest(path)
    message = str(caught.value)
    assert "\n" not in message
    assert "izitorch_epoch_finsh" in message and 'did you mean "izitorch_epoch_finish"' in message
    assert "typo.py" in message
    assert not (tmp_path / "res").exists()  # failed before anything was written

    assert cli_main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"izitorch: error: {message}\n" and captured.out == ""


def test_an_unknown_plugin_name_is_one_line_with_did_you_mean(tmp_path, capsys):
    path = setup_run(tmp_path, {}, {"enable": ["kfod"]}, two_models=False)
    assert cli_main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f'izitorch: error: {path}: plugins.enable: unknown plugin "kfod" (did you mean "kfold"?)')
    assert not (tmp_path / "res").exists()


def test_disable_console_silences_the_run(tmp_path, capsys):
    loud = setup_run(tmp_path / "loud", {}, {}, epochs=1, two_models=False)
    assert cli_main(["run", str(loud)]) == 0
    out = capsys.readouterr().out
    assert "final test scores:" in out and "epoch 1/1" in out

    quiet = setup_run(tmp_path / "quiet", {}, {"disable": ["console"]}, epochs=1, two_models=False)
    assert cli_main(["run", str(quiet)]) == 0
    assert capsys.readouterr().out == ""
    plugins = read_json(tmp_path / "quiet" / "res" / "conf.json")["plugins"]
    assert "console" not in plugins and "trainlog" in plugins
    assert list(read_json(tmp_path / "quiet" / "res" / "mlp_a" / "trainlog.json")) == ["1"]


def test_no_prefix_blocks_trainlog(tmp_path):
    path = setup_run(tmp_path, {}, {"enable": ["no:trainlog"]}, two_models=False)
    results = run_manifest(path)
    res = tmp_path / "res"
    assert len(results["mlp_a"]) == 1 and results["mlp_a"][0]["accuracy"] > 0
    assert (res / "mlp_a" / "model.pth.tar").is_file()  # the run happened (checkpoint is still on)
    assert list(res.rglob("trainlog.json")) == []
    assert not (res / "conf.json").exists() and not (res / "results.json").exists()
