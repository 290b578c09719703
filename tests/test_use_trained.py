"""A finished run, used: ``izitorch.load_model``, ``izitorch evaluate``, ``predict`` and ``export``.

References are computed here in plain PyTorch: checkpoints loaded by hand into a fresh model,
scores by ``conftest.plain_scores``, the best epoch read off ``trainlog.json``.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import izitorch
from conftest import cli, error_of, make_manifest, plain_scores
from izitorch.datasets import digits
from izitorch.models import MLP

WIDE = {"name": "wide", "params": {"hidden": 24}}
REGRESSION = """\
from torch.utils.data import TensorDataset

from izitorch.datasets import digits


def regression(limit=300):
    inputs, labels = digits(limit=limit).tensors
    return TensorDataset(inputs, (labels.float() / 9.0).reshape(-1, 1))
"""
BRANCHY = """\
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 1), nn.Linear(64, 1)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)
"""
WRONG_SHAPE = """\
import torch
from torch.utils.data import TensorDataset


def make():
    return TensorDataset(torch.zeros(10, 32), torch.zeros(10, dtype=torch.long))
"""


def train(folder: Path, **tables) -> Path:
    """Train a manifest made by ``make_manifest(folder, **tables)`` in this process; its res_dir."""
    path = make_manifest(folder, **tables)
    izitorch.run(izitorch.load_manifest(path))
    return folder / "res"


@pytest.fixture(scope="module")
def holdout(tmp_path_factory) -> Path:
    """3 epochs with validation, every epoch saved: "a" and "b" train as one vectorized group,
    "wide" alone."""
    models = [{"name": "a"}, {"name": "b", "optimizer": {"lr": 3e-3}}, WIDE]
    return train(tmp_path_factory.mktemp("holdout"), models=models, run={"epochs": 3}, data={"validation": True}, plugins={"checkpoint": {"policy": "all"}})


@pytest.fixture(scope="module")
def kfold(tmp_path_factory) -> Path:
    """Two folds trained at once (parallel folds)."""
    return train(tmp_path_factory.mktemp("kfold"), plugins={"kfold": {"k": 2, "parallel": True}})


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """``frozen(policy)``: a run whose weights never move (SGD, lr 0), so its validation loss is
    the same every epoch and the best epoch is the first; the last is the second."""
    runs = {}

    def make(policy: str) -> Path:
        if policy not in runs:
            runs[policy] = train(
                tmp_path_factory.mktemp(policy),
                models=[{"optimizer": {"class": "torch.optim:SGD", "lr": 0.0}}],
                data={"validation": True},
                plugins={"checkpoint": {"policy": policy}},
            )
        return runs[policy]

    return make


def state_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def equal_weights(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[key], state[key]) for key in own)


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def snapshot(res: Path) -> dict:
    """Every entry under ``res`` with its size, modification time and content hash."""
    return {str(p.relative_to(res)): (p.stat().st_size, p.stat().st_mtime_ns, hash(p.read_bytes())) for p in sorted(res.rglob("*")) if p.is_file()}


def best_by_hand(folder: Path) -> int:
    """The first epoch of a holdout run's model ``folder`` with the best validation score by the
    metric its conf.json records: unset in these manifests, the task's (classification: accuracy)."""
    conf = read(folder.parent / "conf.json")
    assert (conf["task"], conf["best_metric"]) == ("classification", "accuracy")
    log = read(folder / "trainlog.json")
    scores = {int(epoch): entry["val_accuracy"] for epoch, entry in log.items() if "val_accuracy" in entry}
    return min(scores, key=lambda epoch: (-scores[epoch], epoch))


# -- load_model -----------------------------------------------------------------------------


def test_load_model_gives_each_epochs_weights_on_the_cpu_in_eval_mode(holdout):
    for name, hidden in (("a", 16), ("b", 16), ("wide", 24)):
        folder = holdout / name
        best = best_by_hand(folder)
        last = izitorch.load_model(holdout, name, which="last")
        assert isinstance(last, MLP) and not last.training and last.net[0].out_features == hidden
        assert all(p.device.type == "cpu" for p in last.parameters())
        assert equal_weights(last, state_of(folder / "model_epoch3.pth.tar"))
        assert equal_weights(izitorch.load_model(holdout, name, which="best"), state_of(folder / f"model_epoch{best}.pth.tar"))
        tested = read(folder / "test_metrics.json")["epoch"]  # test_weights unset, policy "all": the last
        assert tested == 3
        assert equal_weights(izitorch.load_model(holdout, name), state_of(folder / "model_epoch3.pth.tar"))


def test_load_model_serves_a_fold_of_a_kfold_run(kfold):
    for fold in (1, 2):
        model = izitorch.load_model(kfold, "mlp", fold=fold)
        assert equal_weights(model, state_of(kfold / "mlp" / f"FOLD_{fold}" / "model.pth.tar"))
    with pytest.raises(izitorch.IzitorchError) as error:
        izitorch.load_model(kfold, "mlp")
    assert str(error.value) == f"{kfold}: fold: the run has 2 folds: name one, from 1 to 2"
    with pytest.raises(izitorch.IzitorchError) as error:
        izitorch.load_model(kfold, "mlp", fold=3)
    assert str(error.value) == f"{kfold}: fold: expected a fold from 1 to 2, got 3"


def test_an_epoch_the_policy_did_not_keep_is_refused_naming_the_policy(frozen):
    best_run = frozen("best")
    assert read(best_run / "mlp" / "best_epoch.json")["epoch"] == 1
    assert equal_weights(izitorch.load_model(best_run, "mlp"), state_of(best_run / "mlp" / "model.pth.tar"))  # the tested weights: the best
    with pytest.raises(izitorch.IzitorchError) as error:
        izitorch.load_model(best_run, "mlp", which="last")
    assert str(error.value) == (
        f'{best_run / "mlp"}: the last epoch (2) was not saved: [plugins.checkpoint] policy = "best" kept epoch 1 of this model; '
        'ask for which="best" (--which best), or train with policy = "all" (every epoch)'
    )
    last_run = frozen("last")
    with pytest.raises(izitorch.IzitorchError) as error:
        izitorch.load_model(last_run, "mlp", which="best")
    assert str(error.value) == (
        f'{last_run / "mlp"}: the best epoch by accuracy (1) was not saved: [plugins.checkpoint] policy = "last" kept epoch 2 of this model; '
        'ask for which="last" (--which last), or train with policy = "all" (every epoch) or "best"'
    )


def test_a_model_given_to_the_rack_as_an_object_loads_into_the_module_passed(tmp_path):
    from izitorch.trainRack import ModelConfig, Rack

    rack = Rack()
    rack.parse_args(["--res_dir", str(tmp_path / "res"), "--device", "cpu", "--epochs", "1", "--batch_size", "32", "--display_step", "1000"])
    model = MLP(hidden=8)
    rack.add_model_configs([ModelConfig("mlp", model, torch.nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=1e-2))])
    rack.set_dataset(digits(limit=120))
    rack.launch()
    with pytest.raises(izitorch.IzitorchError) as error:
        izitorch.load_model(tmp_path / "res", "mlp")
    assert str(error.value).startswith(
        f'{tmp_path / "res" / "conf.json"}: models[0].model: model "mlp" was given to the Rack as a Python object, so conf.json holds only its repr: '
        'build the model yourself and pass it, load_model(res_dir, "mlp", model=YourModel(...))'
    )
    loaded = izitorch.load_model(tmp_path / "res", "mlp", model=MLP(hidden=8))
    assert equal_weights(loaded, state_of(tmp_path / "res" / "mlp" / "model.pth.tar")) and not loaded.training


# -- evaluate -------------------------------------------------------------------------------


def test_evaluate_reproduces_the_final_test_and_leaves_the_run_as_it_was(holdout, tmp_path, capsys):
    before = snapshot(holdout)
    out = tmp_path / "scores.json"
    code, stdout, err = cli(capsys, "evaluate", holdout, "--out", out)
    assert (code, err) == (0, "")
    assert snapshot(holdout) == before
    assert [line.split()[0] for line in stdout.splitlines()[3:6]] == sorted(["a", "b", "wide"], key=lambda n: -read(out)["models"][n]["mean"]["accuracy"])
    scores = read(out)["models"]
    split = pickle.loads((holdout / "Dataset_split.pkl").read_bytes())[0]
    for name, hidden in (("a", 16), ("b", 16), ("wide", 24)):
        recorded = read(holdout / name / "test_metrics.json")
        fold = scores[name]["folds"][0]
        by_hand = plain_scores(MLP(hidden=hidden), holdout / name / "model_epoch3.pth.tar", split[2])
        assert fold["epoch"] == recorded["epoch"] == 3
        for key in ("loss", "accuracy", "IoU"):
            assert fold[key] == pytest.approx(recorded[key], rel=1e-5, abs=1e-6)  # a, b: the run tested them as a vectorized group
            assert fold[key] == pytest.approx(by_hand[key], rel=1e-5, abs=1e-6)
        assert np.array_equal(np.array(fold["confusion_matrix"]), pickle.loads((holdout / name / "confusion_matrix.pkl").read_bytes()))
    assert scores["wide"]["folds"][0]["loss"] == recorded["loss"]  # a lone model: the same pass as the run's, bit for bit


def test_evaluate_runs_where_the_runs_device_is_missing(holdout, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(holdout, copy)
    conf = read(copy / "conf.json")
    conf["config"]["run"]["device"] = "cuda:7"  # trained on a machine with eight GPUs
    (copy / "conf.json").write_text(json.dumps(conf), encoding="utf-8")
    code, _, err = cli(capsys, "evaluate", copy, "--out", tmp_path / "scores.json")
    assert (code, err) == (0, "")
    assert read(tmp_path / "scores.json")["models"]["wide"]["folds"][0]["loss"] == read(holdout / "wide" / "test_metrics.json")["loss"]


def test_evaluate_scores_the_data_given_with_the_weights_asked_for(holdout, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code, _, err = cli(capsys, "evaluate", holdout, "--data", "izitorch.datasets:digits", "--set", "data.params.limit=120", "--which", "best", "--out", out)
    assert (code, err) == (0, "")
    result = read(out)
    assert result["which"] == "best"
    for name, hidden in (("a", 16), ("wide", 24)):
        best = best_by_hand(holdout / name)
        by_hand = plain_scores(MLP(hidden=hidden), holdout / name / f"model_epoch{best}.pth.tar", range(120), limit=120)
        fold = result["models"][name]["folds"][0]
        assert fold["epoch"] == best
        assert fold["accuracy"] == pytest.approx(by_hand["accuracy"]) and fold["loss"] == pytest.approx(by_hand["loss"], rel=1e-5)


def test_evaluate_scores_every_fold_on_its_own_test_split(kfold, capsys):
    from izitorch.evaluate import evaluate

    evaluation = evaluate(kfold)
    for fold in (1, 2):
        recorded = read(kfold / "mlp" / f"FOLD_{fold}" / "test_metrics.json")
        scored = evaluation.scores["mlp"][fold - 1]
        for key in ("loss", "accuracy", "IoU"):
            assert scored[key] == pytest.approx(recorded[key], rel=1e-5, abs=1e-6)  # parallel folds tested as a vectorized group
    code, stdout, err = cli(capsys, "evaluate", kfold)
    assert (code, err) == (0, "")
    assert " ± " in stdout.splitlines()[3]  # mean ± std over the two folds


# -- predict --------------------------------------------------------------------------------


def test_predict_writes_classes_and_probabilities_and_keeps_an_existing_file(holdout, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    args = ("predict", holdout, "--model", "wide", "--data", "izitorch.datasets:digits", "--set", "data.params.limit=50", "--out", out)
    code, stdout, err = cli(capsys, *args)
    assert (code, err) == (0, "")
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    model = MLP(hidden=24)
    model.load_state_dict(state_of(holdout / "wide" / "model_epoch3.pth.tar"))
    inputs, labels = digits(limit=50).tensors
    with torch.no_grad():
        logits = model.eval()(inputs)
    assert [int(r["index"]) for r in rows] == list(range(50))
    assert [int(r["target"]) for r in rows] == labels.tolist()
    assert [int(r["predicted"]) for r in rows] == logits.argmax(1).tolist()
    probabilities = np.array([[float(r[f"prob_{c}"]) for c in range(10)] for r in rows])
    assert np.allclose(probabilities, torch.softmax(logits, 1).numpy(), atol=1e-6)
    written = out.read_bytes()
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert error_of(err) == f"--out: {out} exists; pass --overwrite to replace it, or choose another name"
    assert out.read_bytes() == written
    code, _, err = cli(capsys, *args, "--overwrite")
    assert (code, err) == (0, "") and out.read_bytes() == written


@pytest.fixture(scope="module")
def regression(tmp_path_factory) -> Path:
    """A regression (MSE, one output) and a model whose forward branches on its data, run from
    its own folder with relative paths (res_dir "res", the dataset "reg.py:regression")."""
    folder = tmp_path_factory.mktemp("regression")
    (folder / "reg.py").write_text(REGRESSION, encoding="utf-8")
    (folder / "nets.py").write_text(BRANCHY, encoding="utf-8")
    models = [
        {"model": "izitorch.models:MLP", "params": {"hidden": 8, "num_classes": 1}, "criterion": "torch.nn:MSELoss"},
        {"name": "branchy", "model": "nets.py:Branchy", "params": None, "criterion": "torch.nn:MSELoss"},
    ]
    make_manifest(folder, models=models, data={"dataset": "reg.py:regression", "num_classes": None}, run={"epochs": 1, "res_dir": "res"})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        izitorch.run(izitorch.load_manifest("m.toml"))
    return folder / "res"


def test_predict_writes_the_output_values_of_a_regression(regression, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded relative references are found from res_dir
    code, _, err = cli(capsys, "evaluate", regression, "--out", "scores.json")
    assert (code, err) == (0, "")
    assert read(tmp_path / "scores.json")["models"]["mlp"]["folds"][0]["loss"] == read(regression / "mlp" / "test_metrics.json")["loss"]
    data = f"{regression.parent / 'reg.py'}:regression"
    code, _, err = cli(capsys, "predict", regression, "--model", "mlp", "--data", data, "--set", "data.params.limit=40", "--out", "preds.csv")
    assert (code, err) == (0, "")
    rows = list(csv.reader((tmp_path / "preds.csv").open(encoding="utf-8")))
    assert rows[0] == ["index", "target", "output_0"]
    model = MLP(hidden=8, num_classes=1)
    model.load_state_dict(state_of(regression / "mlp" / "model.pth.tar"))
    inputs, labels = digits(limit=40).tensors
    with torch.no_grad():
        expected = model.eval()(inputs)[:, 0]
    assert np.allclose([float(r[2]) for r in rows[1:]], expected.numpy(), atol=1e-6)
    assert np.allclose([float(r[1]) for r in rows[1:]], labels.float().numpy() / 9.0)


# -- export ---------------------------------------------------------------------------------


def test_export_safetensors_holds_the_weights_and_where_they_come_from(holdout, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    out = tmp_path / "a.safetensors"
    code, _, err = cli(capsys, "export", holdout, "--model", "a", "--format", "safetensors", "--which", "best", "--out", out)
    assert (code, err) == (0, "")
    best = best_by_hand(holdout / "a")
    expected = state_of(holdout / "a" / f"model_epoch{best}.pth.tar")
    with safe_open(out, framework="pt") as file:
        assert set(file.keys()) == set(expected)
        assert all(torch.equal(file.get_tensor(key), expected[key]) for key in expected)
        metadata = file.metadata()
    assert (metadata["model"], json.loads(metadata["params"]), metadata["epoch"]) == ("izitorch.models:MLP", {"hidden": 16}, str(best))


def test_export_onnx_computes_what_the_model_computes_for_any_batch(holdout, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    out = tmp_path / "wide.onnx"
    code, _, err = cli(capsys, "export", holdout, "--model", "wide", "--format", "onnx", "--out", out)
    assert (code, err) == (0, "")
    inputs = digits(limit=5).tensors[0]  # the export traced two samples: the batch dimension is dynamic
    (output,) = ReferenceEvaluator(str(out)).run(None, {"input": inputs.numpy()})
    model = MLP(hidden=24)
    model.load_state_dict(state_of(holdout / "wide" / "model_epoch3.pth.tar"))
    with torch.no_grad():
        assert np.allclose(output, model.eval()(inputs).numpy(), atol=1e-5)


def test_a_model_the_onnx_exporter_cannot_take_is_one_line(regression, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    code, out, err = cli(capsys, "export", regression, "--model", "branchy", "--format", "onnx", "--out", tmp_path / "b.onnx")
    assert (code, out) == (2, "")
    assert error_of(err).startswith("--format: model branchy: torch.onnx.export cannot take it: Could not guard on data-dependent expression")
    assert error_of(err).endswith("use --format safetensors, or export it with torch.onnx.export yourself")
    assert not list(tmp_path.iterdir())


def test_a_missing_extra_is_one_line_naming_the_pip_command(holdout, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnx", "safetensors") else real(name, *a))
    code, _, err = cli(capsys, "export", holdout, "--model", "a", "--format", "onnx", "--out", tmp_path / "a.onnx")
    assert code == 2
    assert error_of(err) == '--format: --format onnx needs onnx, not installed: pip install "izitorch[onnx]"'
    code, _, err = cli(capsys, "export", holdout, "--model", "a", "--format", "safetensors", "--out", tmp_path / "a.st")
    assert error_of(err) == '--format: --format safetensors needs safetensors, not installed: pip install "izitorch[safetensors]"'
    assert not list(tmp_path.iterdir())


def test_ctrl_c_while_predicting_leaves_no_file(holdout, tmp_path, monkeypatch, capsys):
    from izitorch import predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict.torch, "softmax", interrupted)  # in the middle of writing the rows
    out = tmp_path / "preds.csv"
    code, _, err = cli(capsys, "predict", holdout, "--model", "a", "--data", "izitorch.datasets:digits", "--out", out)
    assert code == 130
    assert err == "izitorch: predict interrupted; nothing was written\n"
    assert list(tmp_path.iterdir()) == []


# -- mistakes: one line, exit 2 ----------------------------------------------------------------


class Reduce:
    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def damaged_copy(holdout: Path, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(holdout, copy)
    if damage == "unfinished":
        (copy / ".izitorch" / "finished.json").unlink()
    elif damage == "checkpoint":
        path = copy / "wide" / "model_epoch3.pth.tar"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "pickle":  # a split file that would make a directory if unpickled naively
        (copy / "Dataset_split.pkl").write_bytes(pickle.dumps(Reduce(os.mkdir, (str(tmp_path / "pwned"),))))
    elif damage == "conf":
        (copy / "conf.json").write_text('{"config": 3}', encoding="utf-8")
    return copy


@pytest.mark.parametrize(
    "damage, args, expected",
    [
        (None, ["evaluate", "{tmp}/missing"], "{tmp}/missing: no such folder: give the res_dir of a finished run"),
        (
            None,
            ["evaluate", "{tmp}"],
            "{tmp}: holds no izitorch run (no conf.json, which the trainlog plugin writes when a run starts): give the res_dir of a finished run",
        ),
        (
            "unfinished",
            ["evaluate", "{run}"],
            "{run}: holds a run that has not finished (it is running, or was stopped: no .izitorch/finished.json); wait for it, or finish it with "
            "`izitorch run MANIFEST --resume`",
        ),
        (
            None,
            ["predict", "{run}", "--model", "wdie", "--data", "izitorch.datasets:digits", "--out", "{tmp}/p.csv"],
            '{run}: --model: no model "wdie" in this run (its models: a, b, wide) (did you mean "wide"?)',
        ),
        (
            None,
            ["export", "{run}", "--model", "a", "--fold", "2", "--format", "safetensors"],
            "{run}: --fold: expected a fold 1, or leave it out (the run has one split), got 2",
        ),
        (
            None,
            ["predict", "{run}", "--model", "wide", "--data", "wrong.py:make", "--out", "{tmp}/p.csv"],
            "--data: model wide: forward failed on input of shape (10, 32): mat1 and mat2 shapes cannot be multiplied (10x32 and 64x24)",
        ),
        (
            None,
            ["evaluate", "{run}", "--data", "nomodule_here:make"],
            "--data: cannot import module \"nomodule_here\" (No module named 'nomodule_here'); check the spelling or install it",
        ),
        (
            None,
            ["predict", "{run}", "--model", "wide", "--data", "izitorch.datasets:digits", "--out", "{run}/p.csv"],
            "--out: {run}/p.csv is inside the run's res_dir",
        ),
        ("checkpoint", ["evaluate", "{run}"], "{run}/wide/model_epoch3.pth.tar: not a checkpoint izitorch wrote ("),
        ("pickle", ["evaluate", "{run}"], "{run}/Dataset_split.pkl: not a split file izitorch wrote (UnpicklingError: "),
        (None, ["evaluate", "{run}", "--set", "run.epoch=3"], '--set: run.epoch: unknown key "epoch" (did you mean "epochs"?)'),
        ("conf", ["evaluate", "{run}"], '{run}/conf.json: expected the run\'s configuration under "config", found 3; it is not a conf.json izitorch wrote'),
        (None, ["evaluate", "{run}", "--set", "models[0].params.hidden=8"], "{run}/a/model_epoch3.pth.tar: the weights do not fit the model"),
    ],
)
def test_each_mistake_is_one_line_exit_2(holdout, tmp_path, monkeypatch, capsys, damage, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wrong.py").write_text(WRONG_SHAPE, encoding="utf-8")
    run = damaged_copy(holdout, tmp_path, damage) if damage else holdout
    before = snapshot(run)
    fill = {"tmp": str(tmp_path), "run": str(run)}
    code, out, err = cli(capsys, *[a.format(**fill) for a in args])
    assert code == 2
    message = error_of(err)
    assert message.startswith(expected.format(**fill)), message
    assert snapshot(run) == before
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "pwned").exists()


def test_a_run_with_schedulers_is_read_back_with_them(tmp_path):
    """conf.json records a scheduler with its ``interval``: the run rebuilds with the same
    scheduler (class, arguments, interval), and its model loads."""
    res = train(
        tmp_path,
        run={"epochs": 1},
        models=[
            {"name": "step", "scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 5}},
            {
                "name": "cycle",
                "params": {"hidden": 8},
                "scheduler": {"class": "torch.optim.lr_scheduler:OneCycleLR", "max_lr": 0.1, "total_steps": 8, "interval": "step"},
            },
        ],
    )
    from izitorch.trained import TrainedRun

    specs = {spec.name: spec.scheduler for spec in TrainedRun(res).config.models}
    assert (specs["step"].params, specs["step"].interval) == ({"step_size": 5}, "epoch")
    assert (specs["cycle"].params, specs["cycle"].interval) == ({"max_lr": 0.1, "total_steps": 8}, "step")
    assert not izitorch.load_model(res, "cycle").training


def test_conf_json_holds_the_manifests_keys_and_one_in_the_older_form_still_loads(tmp_path):
    """conf.json's ``config`` is written in the manifest's keys (``class = ...``, a plugin's
    table under ``plugins``); one written in the older form (``{"target", "params"}``, the
    plugins' ``tables``) is read back the same."""
    res = train(
        tmp_path,
        run={"epochs": 1},
        plugins={"checkpoint": {"policy": "last"}},
        models=[{"name": "step", "scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 5}}],
    )
    from izitorch.trained import TrainedRun

    conf = read(res / "conf.json")
    model = conf["config"]["models"][0]
    assert model["optimizer"] == {"class": "torch.optim:Adam", "lr": 1e-2}
    assert model["scheduler"] == {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 5, "interval": "epoch"}
    assert conf["config"]["plugins"]["checkpoint"] == {"policy": "last"}
    new = TrainedRun(res).config
    older = json.loads(json.dumps(conf))  # the same run as an older izitorch recorded it
    for spec in older["config"]["models"]:
        for key in ("criterion", "optimizer", "scheduler"):
            if spec.get(key):
                interval = {"interval": spec[key].pop("interval")} if "interval" in spec[key] else {}
                spec[key] = {"target": spec[key].pop("class"), "params": spec[key], **interval}
    plugins = older["config"]["plugins"]
    older["config"]["plugins"] = {"enable": plugins.pop("enable"), "disable": plugins.pop("disable"), "tables": plugins}
    (res / "conf.json").write_text(json.dumps(older), encoding="utf-8")
    assert TrainedRun(res).config == new
    assert equal_weights(izitorch.load_model(res, "step"), torch.load(res / "step" / "model.pth.tar", weights_only=True)["state_dict"])
