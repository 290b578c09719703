"""Sweeps in the manifest (``izitorch.sweeps``): a ``[[models]]`` table with ``sweep``,
``sweep_mode`` and ``seeds`` stands for the models it expands to, named after their values.

References are built here: the expected names and values by hand, each replica's initial weights
from ``torch.manual_seed`` on the mixed seed computed with numpy's ``SeedSequence``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cli, error_of
from izitorch.data import build_slots
from izitorch.manifest import load_manifest
from izitorch.models import MLP
from izitorch.sweeps import model_name

GRID = {"sweep": {"optimizer.lr": [1e-3, 3e-3], "params.hidden": [8, 16]}}


def names_and_values(path, *overrides):
    config = load_manifest(path, overrides)
    return [(spec.name, spec.optimizer.params["lr"], spec.params["hidden"], spec.seed, spec.swept) for spec in config.models]


def test_a_grid_expands_to_every_combination_in_order(manifest):
    path = manifest(models=[GRID, {"name": "other"}])
    assert names_and_values(path) == [
        ("mlp_lr0.001_hidden8", 1e-3, 8, None, {"optimizer.lr": 1e-3, "params.hidden": 8}),
        ("mlp_lr0.001_hidden16", 1e-3, 16, None, {"optimizer.lr": 1e-3, "params.hidden": 16}),
        ("mlp_lr0.003_hidden8", 3e-3, 8, None, {"optimizer.lr": 3e-3, "params.hidden": 8}),
        ("mlp_lr0.003_hidden16", 3e-3, 16, None, {"optimizer.lr": 3e-3, "params.hidden": 16}),
        ("other", 1e-2, 16, None, {}),
    ]


def test_zip_pairs_the_lists_and_seeds_make_replicas(manifest):
    path = manifest(models=[{**GRID, "sweep_mode": "zip", "seeds": 2}])
    assert [(name, lr, hidden, seed) for name, lr, hidden, seed, _ in names_and_values(path)] == [
        ("mlp_lr0.001_hidden8_s1", 1e-3, 8, 1),
        ("mlp_lr0.001_hidden8_s2", 1e-3, 8, 2),
        ("mlp_lr0.003_hidden16_s1", 3e-3, 16, 1),
        ("mlp_lr0.003_hidden16_s2", 3e-3, 16, 2),
    ]


def test_set_edits_the_table_as_written(manifest):
    path = manifest(models=[GRID])
    overrides = ('models[0].sweep={"optimizer.lr" = [0.1, 0.2]}', "models[0].params.hidden=4", "models[0].seeds=1")
    assert [(name, lr, hidden) for name, lr, hidden, _, _ in names_and_values(path, *overrides)] == [("mlp_lr0.1_s1", 0.1, 4), ("mlp_lr0.2_s1", 0.2, 4)]


def test_keys_ending_alike_are_named_by_their_paths_and_references_by_their_names(manifest):
    assert model_name("m", {"optimizer.lr": 0.1, "scheduler.lr": 2, "params.act": "relu", "seed": 3}) == "m_optimizer-lr0.1_scheduler-lr2_actrelu_s3"
    path = manifest(models=[{"sweep": {"optimizer.class": ["torch.optim:SGD", "torch.optim:Adam"]}}])
    assert [spec.name for spec in load_manifest(path).models] == ["mlp_classSGD", "mlp_classAdam"]


def seeded_weights(run_seed: int, seed: int, hidden: int = 16) -> dict:
    mixed = int(np.random.SeedSequence([run_seed, seed]).generate_state(1)[0])
    torch.manual_seed(mixed)
    np.random.seed(mixed)
    return MLP(hidden=hidden).state_dict()


def initial_weights(path) -> dict[str, dict]:
    """Each model's weights as the run builds them, before its first step."""
    return {slot.name: slot.model.state_dict() for slot in build_slots(load_manifest(path), torch.device("cpu"))}


def test_replicas_start_from_their_own_weights_and_leave_the_others_alone(manifest):
    """Each replica's initial weights come from (rdm_seed, seed) alone; a model without a seed
    starts from the weights it has in a run without the sweep, wherever the sweep sits."""
    models = [{"name": "first"}, {"name": "rep", "seeds": 2}, {"name": "last"}]
    built = initial_weights(manifest({"run.rdm_seed": 7}, models=models))
    for seed in (1, 2):
        expected = seeded_weights(7, seed)
        assert all(torch.equal(built[f"rep_s{seed}"][key], expected[key]) for key in expected)
    assert not torch.equal(built["rep_s1"]["net.0.weight"], built["rep_s2"]["net.0.weight"])
    plain = initial_weights(manifest({"run.rdm_seed": 7}, models=[{"name": "first"}, {"name": "last"}], name="plain.toml"))
    for name in ("first", "last"):
        assert all(torch.equal(built[name][key], plain[name][key]) for key in plain[name])


def test_a_sweep_trains_as_vectorized_stacks_and_records_its_values(manifest, capsys):
    path = manifest({"run.multi_model": "vectorized"}, models=[{"sweep": {"optimizer.lr": [1e-3, 3e-3, 1e-2]}, "seeds": 2}])
    code, out, err = cli(capsys, "run", path)
    assert code == 0, err
    names = [f"mlp_lr{lr}_s{seed}" for lr in ("0.001", "0.003", "0.01") for seed in (1, 2)]
    assert f"vectorized group of 6: {', '.join(names)} (Adam)" in out
    res = path.parent / "res"
    summary = json.loads((res / "results.json").read_text())
    assert summary["mlp_lr0.003_s2"]["sweep"] == {"optimizer.lr": 3e-3, "seed": 2}
    conf = json.loads((res / "conf.json").read_text())
    recorded = {model["name"]: (model["swept"], model["seed"], model["optimizer"]["lr"]) for model in conf["config"]["models"]}
    assert recorded["mlp_lr0.01_s1"] == ({"optimizer.lr": 1e-2}, 1, 1e-2)
    assert not any(key in model for model in conf["config"]["models"] for key in ("sweep", "seeds", "sweep_mode"))


def test_validate_lists_the_expansion(manifest, capsys):
    path = manifest(models=[{"sweep": {"params.hidden": [4, 8]}, "seeds": 1}])
    code, out, _ = cli(capsys, "validate", path)
    assert code == 0
    assert out.splitlines()[1:] == ["sweeps: 2 model(s)", "  mlp_hidden4_s1: params.hidden = 4, seed = 1", "  mlp_hidden8_s1: params.hidden = 8, seed = 1"]


@pytest.mark.parametrize(
    ("model", "key", "says"),
    [
        ({"sweep": [1, 2]}, "models[0].sweep", 'expected a table of "key.path" = [values], got a list'),
        ({"sweep": {"optimizer.lr": []}}, 'models[0].sweep."optimizer.lr"', "expected a non-empty list of the values optimizer.lr takes"),
        ({"sweep": {"optimizer.lr": 0.1}}, 'models[0].sweep."optimizer.lr"', "expected a non-empty list"),
        ({"sweep": {"name": ["a", "b"]}}, 'models[0].sweep."name"', "cannot be swept"),
        ({"sweep": {"optimizer..lr": [1]}}, 'models[0].sweep."optimizer..lr"', "cannot be swept"),
        ({"sweep": {"optimizer.lr": [1e-3, 0.001]}}, "models[0].sweep", 'both be named "mlp_lr0.001"'),
        ({"sweep": {"model.x": [1]}}, 'models[0].sweep."model.x"', '"model" is "izitorch.models:MLP", not a table'),
        (
            {"sweep": {"optimizer.lr": [1], "params.hidden": [1, 2]}, "sweep_mode": "zip"},
            "models[0].sweep_mode",
            "need one length (optimizer.lr: 1, params.hidden: 2)",
        ),
        ({"sweep_mode": "random"}, "models[0].sweep_mode", 'expected one of "grid", "zip", got "random"'),
        ({"seeds": 0}, "models[0].seeds", "expected an integer >= 1"),
        ({"seeds": True}, "models[0].seeds", "expected an integer >= 1"),
        ({"sweep": {"params.depth": [1, 2]}}, "models[0].params", 'in the sweep\'s model "mlp_depth1"'),
        ({"sweep": {"optimizer.lr": list(range(1, 5000))}}, "models[0].sweep", "expands to 4,999 models, more than 4,096"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_sweep_that_cannot_expand_is_one_line_at_the_table_as_written(manifest, capsys, model, key, says):
    path = manifest(models=[model])
    for command in ("validate", "run"):
        code, _, err = cli(capsys, command, path)
        assert code == 2 and "Traceback" not in err
        line = error_of(err)
        assert line.startswith(f"{path}: {key}") and says in line, line
    assert not (path.parent / "res").exists()


def test_a_mistake_after_a_sweep_names_the_table_as_written(manifest, capsys):
    path = manifest(models=[{"seeds": 3}, {"name": "bad", "params": {"depth": 2}}])
    code, _, err = cli(capsys, "validate", path)
    assert code == 2 and error_of(err).startswith(f"{path}: models[1].params")
