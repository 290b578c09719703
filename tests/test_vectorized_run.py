"""Vectorized groups inside real runs: same results as sequential, member identity kept."""

from __future__ import annotations

import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch

import izitorch
from izitorch.models import MLP

from conftest import KILLER, make_manifest, merged, run_cli

# CPU: there a group's dropout masks are the sequential ones (one [K, B, H] draw from the same
# generator); CUDA's counter-based generator draws them differently (tests/test_cuda.py compares
# dropout-free groups there).
# Three members ("a" has its own scheduler, "b" its own Adam settings), two folds, clipped.
MEMBERS = {
    "a": {"optimizer": {"class": "torch.optim:Adam", "lr": 1e-2}, "scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 1, "gamma": 0.7}},
    "b": {"optimizer": {"class": "torch.optim:Adam", "lr": 3e-3, "weight_decay": 1e-3, "betas": [0.8, 0.99]}},
    "c": {"optimizer": {"class": "torch.optim:Adam", "lr": 5e-3}},
}


def manifest(
    tmp_path: Path,
    name: str,
    mode: str = "auto",
    nan_policy: str = "stop",
    model: str = "izitorch.models:MLP",
    plugins: tuple[str, ...] = (),
    dropout: float = 0.2,
    members: dict | None = None,
) -> Path:
    """tmp_path/NAME.toml, results in tmp_path/NAME: the MEMBERS, each with ``members[name]``
    laid over it (``None`` leaves it out), 240 digits, 3 epochs."""
    models = [
        {"name": member, "model": model, "params": {"hidden": 16, "dropout": dropout}, **entry}
        for member, entry in merged(MEMBERS, members or {}).items()
        if entry is not None
    ]
    return make_manifest(
        tmp_path,
        name=f"{name}.toml",
        models=models,
        run={"res_dir": (tmp_path / name).as_posix(), "device": "cpu", "epochs": 3, "display_step": None, "multi_model": mode, "nan_policy": nan_policy},
        data={"params": {"limit": 240}},
        plugins={"enable": list(plugins), "kfold": {"k": 2}, "grad_clip": {"max_norm": 0.5}},
    )


def weights(res: Path, model: str, fold: int) -> dict:
    return torch.load(res / model / f"FOLD_{fold}" / "model.pth.tar", weights_only=True)


def test_a_vectorized_run_matches_a_sequential_one_and_keeps_each_members_files(tmp_path, capsys):
    vec = izitorch.run(izitorch.load_manifest(manifest(tmp_path, "vec", "vectorized")))
    out = capsys.readouterr().out
    assert "vectorized group of 3: a, b, c (Adam)" in out
    seq = izitorch.run(izitorch.load_manifest(manifest(tmp_path, "seq", "sequential")))
    assert "vectorized group" not in capsys.readouterr().out
    for name in "abc":
        for fold in (1, 2):
            v, s = weights(tmp_path / "vec", name, fold), weights(tmp_path / "seq", name, fold)
            assert v["epoch"] == s["epoch"] == 3
            for key in s["state_dict"]:
                assert torch.allclose(v["state_dict"][key], s["state_dict"][key], atol=1e-5), (name, fold, key)
            assert v["optimizer"]["param_groups"][0]["lr"] == pytest.approx(s["optimizer"]["param_groups"][0]["lr"])
            # the member's checkpoint holds the member alone (not the group's stacked storage)
            fresh = MLP(hidden=16, dropout=0.2)
            fresh.load_state_dict(v["state_dict"])
            sizes = [os.path.getsize(tmp_path / mode / name / f"FOLD_{fold}" / "model.pth.tar") for mode in ("vec", "seq")]
            assert abs(sizes[0] - sizes[1]) < 512
        assert [f["accuracy"] for f in vec[name]] == pytest.approx([f["accuracy"] for f in seq[name]], abs=1.0)
    # the per-member StepLR of "a" acted on a's optimizer only
    assert weights(tmp_path / "vec", "a", 1)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.7**3)
    assert weights(tmp_path / "vec", "b", 1)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3)


def test_vectorized_refuses_a_model_it_cannot_group_naming_it(tmp_path):
    path = manifest(tmp_path, "bad", "vectorized", members={"c": {"optimizer": {"class": "torch.optim:RMSprop"}}})
    done = run_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith(
        f'izitorch: error: {path}: run.multi_model: "vectorized" needs every model in a group, but c: optimizer RMSprop is not vectorized'
    )


def test_a_killed_vectorized_run_resumes_bit_for_bit(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER)
    reference = manifest(tmp_path, "ref", plugins=("killer.py",))
    killed = manifest(tmp_path, "killed", plugins=("killer.py",))
    assert run_cli("run", str(reference), cwd=tmp_path).returncode == 0
    # a member's entry keeps only the hyper-parameters that moved (a's scheduled lr); its group
    # entry holds the weights and moments
    saved = torch.load(tmp_path / "ref" / ".izitorch" / "fold_2.pth.tar", weights_only=True)["folds"][0]["slots"]
    assert saved["a"]["optimizer"]["param_groups"] == [{"lr": pytest.approx(1e-2 * 0.7**3)}]
    assert saved["b"]["optimizer"]["param_groups"] == [{}] and saved["b"]["model"] is None
    done = run_cli("run", str(killed), cwd=tmp_path, env={"KILL_AT": "2,2,3"})
    assert done.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "results.json").exists()
    done = run_cli("run", str(killed), "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in "abc":
        for fold in (1, 2):
            ref, res = weights(tmp_path / "ref", name, fold), weights(tmp_path / "killed", name, fold)
            for key in ref["state_dict"]:
                assert torch.equal(ref["state_dict"][key], res["state_dict"][key]), (name, fold, key)
            folder = Path(name) / f"FOLD_{fold}"
            logs = [json.loads((tmp_path / run / folder / "trainlog.json").read_text()) for run in ("ref", "killed")]
            strip = [{e: {k: v for k, v in d.items() if not k.endswith("_time")} for e, d in log.items()} for log in logs]
            assert strip[0] == strip[1]
            matrices = [pickle.loads((tmp_path / run / folder / "confusion_matrix.pkl").read_bytes()) for run in ("ref", "killed")]
            assert (matrices[0] == matrices[1]).all()


def test_a_diverging_member_stops_alone_and_the_others_are_unaffected(tmp_path):
    # member "b" gets an absurd learning rate and diverges; "a" and "c" must train as without it
    # (no dropout: removing a member changes which random numbers the others draw)
    path = manifest(tmp_path, "nan", dropout=0.0, members={"b": {"optimizer": {"lr": 1e37}}})
    alone = manifest(tmp_path, "alone", dropout=0.0, members={"b": None})
    izitorch.run(izitorch.load_manifest(path))
    izitorch.run(izitorch.load_manifest(alone))
    metrics = json.loads((tmp_path / "nan" / "b" / "FOLD_1" / "test_metrics.json").read_text())
    assert "loss is nan" in metrics["stopped"] or "loss is inf" in metrics["stopped"]
    # "a" is built first, so its initial weights do not depend on b: it must train exactly as
    # without b; "c" (initialised after b) must still train every epoch with finite weights
    with_b, without_b = weights(tmp_path / "nan", "a", 1), weights(tmp_path / "alone", "a", 1)
    assert with_b["epoch"] == 3
    for key in without_b["state_dict"]:
        assert torch.allclose(with_b["state_dict"][key], without_b["state_dict"][key], atol=1e-5), key
    c = weights(tmp_path / "nan", "c", 1)
    assert c["epoch"] == 3 and all(torch.isfinite(t).all() for t in c["state_dict"].values())
    assert list(json.loads((tmp_path / "nan" / "c" / "FOLD_1" / "trainlog.json").read_text())) == ["1", "2", "3"]


# Records every step's losses as izitorch_batch_finish sees them, into the file named by LOSSES_TO.
LOSS_RECORDER = """\
import json, os
from izitorch import hookimpl

SEEN = []

@hookimpl
def izitorch_batch_finish(run, fold, step, losses):
    SEEN.append([fold.index, fold.epoch, step, {name: loss.item() for name, loss in losses.items()}])

@hookimpl
def izitorch_run_finish(run, results):
    with open(os.environ["LOSSES_TO"], "w") as handle:
        json.dump(SEEN, handle)
"""


def test_batch_finish_sees_each_members_own_loss_as_sequential_training_does(tmp_path):
    (tmp_path / "recorder.py").write_text(LOSS_RECORDER)
    seen = {}
    for mode in ("vectorized", "sequential"):
        path = manifest(tmp_path, mode, mode, plugins=("kfold", "grad_clip", "recorder.py"))
        done = run_cli("run", str(path), cwd=tmp_path, env={"LOSSES_TO": str(tmp_path / f"{mode}.json")})
        assert done.returncode == 0, done.stderr[-2000:]
        seen[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    vectorized, sequential = seen["vectorized"], seen["sequential"]
    assert len(vectorized) == len(sequential) == 2 * 3 * 4  # 2 folds x 3 epochs x 120 samples / 32
    for (fold, epoch, step, losses), expected in zip(vectorized, sequential):
        assert [fold, epoch, step] == expected[:3]
        assert list(losses) == ["a", "b", "c"]
        assert list(losses.values()) == pytest.approx(list(expected[3].values()), abs=1e-5), (fold, epoch, step)
