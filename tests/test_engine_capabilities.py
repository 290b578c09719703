"""Mixed precision, gradient accumulation and compile: written once in the engine, so each is
checked on the three ways a model trains (alone, in a vectorized group, as parallel folds)
against references computed here in plain PyTorch."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from torch import nn

from conftest import cli, error_of
from izitorch.datasets import digits

MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small MLP whose initial weights depend on ``seed`` only (not on the global generator)."""

    def __init__(self, seed: int = 0, hidden: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, hidden), nn.Linear(hidden, 10)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))
'''

# Records the dtype of the outputs every metric sees (the stacks' outputs, under autocast or not).
PROBE = """
from izitorch import hookimpl

SEEN = []


class Probe:
    names = {}

    def __init__(self, num_classes, members):
        self.members = members

    def update(self, outputs, target, losses, mask=None):
        SEEN.append(outputs.dtype)

    def compute(self):
        return [{} for _ in range(self.members)]


@hookimpl
def izitorch_register_metrics(register):
    register("probe", Probe)
"""

SAMPLES = 240  # digits kept: a 0.8 holdout trains on 192 = 2 windows of 3 batches of 32
LRS = (0.3, 0.1, 0.2)


def write(tmp_path: Path, name: str, *, models: int = 1, parallel: bool = False, plugins: tuple = (), alone: bool = False, **run: object) -> Path:
    """A manifest of ``models`` Nets (seeds 0, 1, ..., learning rates LRS) trained with plain SGD;
    with ``alone``, the last one is wider, so that it cannot join the others' vectorized group."""
    (tmp_path / "nets.py").write_text(MODELS, encoding="utf-8")
    manifest = {
        "run": {"res_dir": (tmp_path / name).as_posix(), "epochs": 2, "batch_size": 32, "shuffle": False, "display_step": 1000, **run},
        "data": {"dataset": "izitorch.datasets:digits", "params": {"limit": SAMPLES}, "num_classes": 10},
        "models": [
            {
                "name": f"m{k}",
                "model": "nets.py:Net",
                "params": {"seed": k, "hidden": 12 if alone and k == models - 1 else 8},
                "optimizer": {"class": "torch.optim:SGD", "lr": LRS[k]},
            }
            for k in range(models)
        ],
        "plugins": {"enable": list(plugins)},
    }
    if parallel:
        manifest["plugins"]["enable"].append("kfold")
        manifest["plugins"]["kfold"] = {"k": 3, "parallel": True}
    path = tmp_path / f"{name}.toml"
    path.write_bytes(tomli_w.dumps(manifest).encode())
    return path


def weights(res: Path, model: str, fold: int | None = None) -> dict[str, torch.Tensor]:
    folder = res / model if fold is None else res / model / f"FOLD_{fold}"
    return torch.load(folder / "model.pth.tar", weights_only=True)["state_dict"]


def splits(res: Path) -> list:
    with open(res / "Dataset_split.pkl", "rb") as handle:
        saved = pickle.load(handle)
    return saved if isinstance(saved, list) else [saved]


def net(seed: int) -> nn.Module:
    namespace: dict = {}
    exec(MODELS, namespace)
    return namespace["Net"](seed=seed)


def plain_sgd(seed: int, lr: float, windows: list[np.ndarray], epochs: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch: one SGD step per window on the mean loss of all its samples at once."""
    data = digits(limit=SAMPLES)
    x, y = data.tensors
    model = net(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for rows in windows:
            if len(rows) == 0:
                continue
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
    return model.state_dict()


def chunks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def assert_close(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for key in found:
        torch.testing.assert_close(found[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("models, mode", [(1, "sequential"), (2, "vectorized")], ids=["alone", "vectorized"])
def test_accumulating_3_batches_is_one_step_on_the_3_batches_together(tmp_path, capsys, models, mode):
    path = write(tmp_path, "res", models=models, accumulate=3, multi_model=mode)
    code, out, err = cli(capsys, "run", str(path))
    assert code == 0, err
    if models == 2:
        assert "vectorized group of 2" in out + err
    train = np.asarray(splits(tmp_path / "res")[0][0])
    assert len(train) == 192  # 6 batches of 32: two windows of 3
    for k in range(models):
        expected = plain_sgd(k, LRS[k], chunks(train, 96), epochs=2)
        assert_close(weights(tmp_path / "res", f"m{k}"), expected)
        # and it is not what one step per batch gives
        per_batch = plain_sgd(k, LRS[k], chunks(train, 32), epochs=2)
        assert not torch.allclose(weights(tmp_path / "res", f"m{k}")["fc1.weight"], per_batch["fc1.weight"], atol=1e-4)


def test_accumulation_in_parallel_folds_steps_each_fold_on_its_own_samples_of_the_window(tmp_path, capsys):
    path = write(tmp_path, "res", models=1, accumulate=2, parallel=True, epochs=1)
    code, _, err = cli(capsys, "run", str(path))
    assert code == 0, err
    folds = splits(tmp_path / "res")
    shared = np.unique(np.concatenate([np.asarray(fold[0]) for fold in folds]))  # the one training pass, in order
    windows = chunks(shared, 64)  # 2 batches of 32
    for index, fold in enumerate(folds):
        own = set(np.asarray(fold[0]).tolist())
        mine = [np.asarray([row for row in window if row in own], dtype=np.int64) for window in windows]
        assert_close(weights(tmp_path / "res", "m0", index + 1), plain_sgd(0, LRS[0], mine, epochs=1))


def test_a_window_left_short_by_the_end_of_the_epoch_still_steps(tmp_path, capsys):
    path = write(tmp_path, "res", models=1, accumulate=4, epochs=1)  # 6 batches: windows of 4 and 2
    assert cli(capsys, "run", str(path))[0] == 0
    train = np.asarray(splits(tmp_path / "res")[0][0])
    assert_close(weights(tmp_path / "res", "m0"), plain_sgd(0, LRS[0], chunks(train, 128), epochs=1))


def probe_seen(tmp_path: Path) -> list:
    module = next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(tmp_path / "probe.py"))
    return module.SEEN


@pytest.mark.parametrize("models, parallel", [(1, False), (2, False), (1, True)], ids=["alone", "vectorized", "parallel"])
def test_bf16_runs_the_forward_in_bf16_and_keeps_float32_weights(tmp_path, capsys, models, parallel):
    (tmp_path / "probe.py").write_text(PROBE, encoding="utf-8")
    path = write(tmp_path, "res", models=models, parallel=parallel, precision="bf16", plugins=("probe.py",), epochs=1)
    code, _, err = cli(capsys, "run", str(path))
    assert code == 0, err
    seen = probe_seen(tmp_path)
    assert seen and set(seen) == {torch.bfloat16}
    saved = weights(tmp_path / "res", "m0", 1 if parallel else None)
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    assert saved["fc1.weight"].ne(net(0).state_dict()["fc1.weight"]).any()  # it trained


def test_the_default_precision_runs_in_float32(tmp_path, capsys):
    (tmp_path / "probe.py").write_text(PROBE, encoding="utf-8")
    assert cli(capsys, "run", str(write(tmp_path, "res", plugins=("probe.py",), epochs=1)))[0] == 0
    assert set(probe_seen(tmp_path)) == {torch.float32}


@pytest.mark.parametrize("models, parallel", [(1, False), (2, False), (1, True)], ids=["alone", "vectorized", "parallel"])
def test_fp16_resumes_its_loss_scaler_bit_for_bit(tmp_path, capsys, models, parallel):
    straight = write(tmp_path, "straight", models=models, parallel=parallel, precision="fp16", accumulate=2, epochs=3)
    assert cli(capsys, "run", str(straight))[0] == 0
    extended = write(tmp_path, "extended", models=models, parallel=parallel, precision="fp16", accumulate=2, epochs=1)
    assert cli(capsys, "run", str(extended))[0] == 0
    code, _, err = cli(capsys, "run", str(extended), "--resume", "--set", "run.epochs=3")
    assert code == 0, err
    name = "folds.pth.tar" if parallel else "fold_1.pth.tar"
    states = [torch.load(tmp_path / res / ".izitorch" / name, weights_only=True) for res in ("straight", "extended")]
    scalers = [state["scalers"] for state in states]
    assert len(scalers[0]) == 1 and scalers[0][0]["_growth_tracker"] > 0  # one stack; its steps since the last overflow
    assert scalers[0] == scalers[1]
    for fold in range(1, 4) if parallel else [None]:
        for k in range(models):
            found, expected = weights(tmp_path / "extended", f"m{k}", fold), weights(tmp_path / "straight", f"m{k}", fold)
            assert all(torch.equal(found[key], expected[key]) for key in expected)


def test_a_scaler_left_out_of_the_resume_changes_the_result(tmp_path, capsys, monkeypatch):
    """The previous test would pass if the scaler were not saved only if its state did not matter."""
    from izitorch import resume

    straight = write(tmp_path, "straight", precision="fp16", accumulate=2, epochs=3)
    assert cli(capsys, "run", str(straight))[0] == 0
    extended = write(tmp_path, "extended", precision="fp16", accumulate=2, epochs=1)
    assert cli(capsys, "run", str(extended))[0] == 0
    original = resume.restore

    def forgetful(run, cohort, state):
        return original(run, cohort, {**state, "scalers": []})

    monkeypatch.setattr(resume, "restore", forgetful)
    assert cli(capsys, "run", str(extended), "--resume", "--set", "run.epochs=3")[0] == 0
    states = [torch.load(tmp_path / res / ".izitorch" / "fold_1.pth.tar", weights_only=True) for res in ("straight", "extended")]
    assert states[0]["scalers"] != states[1]["scalers"]


@pytest.mark.slow
def test_compile_gives_the_losses_of_eager(tmp_path, capsys):
    """torch.compile of a vectorized pair and of a lone model (tens of seconds on a CPU, most of
    it compiling)."""
    for name, flag in (("eager", False), ("compiled", True)):
        path = write(tmp_path, name, models=3, alone=True, compile=flag, epochs=1)
        code, out, err = cli(capsys, "run", str(path))
        assert code == 0 and "uncompiled" not in err, err
        assert "vectorized group of 2: m0, m1" in out + err and "sequential: m2" in out + err
    for k in range(3):
        found, expected = weights(tmp_path / "compiled", f"m{k}"), weights(tmp_path / "eager", f"m{k}")
        assert_close(found, expected)


def test_a_model_that_cannot_be_compiled_runs_eager_after_one_warning_line(tmp_path, capsys, monkeypatch):
    def failing_compile(function, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("backend compiler failed: no C++ compiler\nmore detail")

        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    code, _, err = cli(capsys, "run", str(write(tmp_path, "compiled", models=2, multi_model="sequential", compile=True, epochs=1)))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "uncompiled" in line]
    assert warnings == [f"izitorch: warning: compile = true: model m{k} runs uncompiled (backend compiler failed: no C++ compiler)" for k in range(2)]
    monkeypatch.undo()
    assert cli(capsys, "run", str(write(tmp_path, "eager", models=2, multi_model="sequential", epochs=1)))[0] == 0
    for k in range(2):
        assert all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "compiled", f"m{k}").values(), weights(tmp_path / "eager", f"m{k}").values()))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"precision": "16"}, 'run.precision: expected one of "32", "bf16", "fp16", got "16"'),
        ({"accumulate": 0}, "run.accumulate: expected an integer >= 1, got 0"),
    ],
)
def test_values_that_do_not_apply_are_refused_in_one_line(tmp_path, capsys, setting, message):
    code, _, err = cli(capsys, "validate", str(write(tmp_path, "res", **setting)))
    assert code == 2 and error_of(err).startswith(f"{tmp_path / 'res.toml'}: {message}")


def test_a_precision_the_device_cannot_autocast_to_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    code, _, err = cli(capsys, "run", str(write(tmp_path, "res", precision="bf16")))
    assert code == 2
    assert error_of(err) == f'{tmp_path / "res.toml"}: run.precision: "bf16" needs autocast, which torch does not offer on cpu; use precision = "32"'
    assert not (tmp_path / "res" / "m0").exists()


def test_a_state_older_than_the_capabilities_resumes_while_they_keep_their_defaults():
    """A state written before ``precision`` and ``accumulate`` existed lacks their keys: it was
    trained as their defaults train, so only a manifest that changes them is refused."""
    from izitorch import resume

    current = {"run.precision": "32", "run.accumulate": "1", "run.epochs": "2"}
    older = {"run.epochs": "2"}
    assert resume.first_difference(older, current) is None
    assert resume.first_difference(older, {**current, "run.accumulate": "4"}) == "run.accumulate changed (1 -> 4)"
    assert resume.first_difference(older, {**current, "models[0].name": "x"}) == "models[0].name changed ((absent) -> x)"
