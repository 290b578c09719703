"""Each model's own time: ``train_time`` / ``eval_time`` per pass in the trainlog, its training
time per epoch in the final scores, ``results.json`` and ``izitorch report``.

The loop's clock is replaced by one that only the models' forward passes move (by a cost per
call set on each model), so every expected time is exact: a lone model's time is its own
forward passes', a vectorized group's is divided among its members.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest

from conftest import cli
from izitorch import loop

TICKING = """\
import torch
import izitorch.loop

class Ticking(torch.nn.Module):
    def __init__(self, cost=1.0):
        super().__init__()
        self.cost = cost
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        izitorch.loop.time.now += self.cost  # the test's clock: this model's forward costs `cost`
        return self.linear(x.flatten(1))
"""


class Clock:
    """The ``time`` module as izitorch.loop sees it: a clock only the models move."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def ticking(tmp_path, monkeypatch):
    (tmp_path / "ticking.py").write_text(TICKING, encoding="utf-8")
    monkeypatch.setattr(loop, "time", Clock())
    return lambda name, cost: {"name": name, "model": "ticking.py:Ticking", "params": {"cost": cost, "hidden": None}}


def train_batches(res) -> int:
    (split,) = pickle.loads((res / "Dataset_split.pkl").read_bytes())
    return math.ceil(len(split[0]) / 32)


def test_each_model_has_its_own_time_and_a_group_divides_its_own(manifest, capsys, ticking):
    models = [ticking("slow", 1.0), ticking("fast", 0.25), ticking("g1", 0.5), ticking("g2", 0.5)]
    path = manifest({"run.epochs": 2, "run.multi_model": "auto"}, models=models)
    code, _, err = cli(capsys, "run", path)
    assert code == 0, err
    res = path.parent / "res"
    batches = train_batches(res)
    conf = json.loads((res / "conf.json").read_text())
    assert conf["config"]["run"]["multi_model"] == "auto"
    # slow and fast differ in cost, so they are separate stacks; g1 and g2 share one group whose
    # forward runs once per batch for both (cost 0.5): each member's share is half of it
    expected = {"slow": 1.0, "fast": 0.25, "g1": 0.25, "g2": 0.25}
    for name, cost in expected.items():
        log = json.loads((res / name / "trainlog.json").read_text())
        assert [log[epoch]["train_time"] for epoch in ("1", "2")] == [cost * batches] * 2, name
        final = json.loads((res / name / "test_metrics.json").read_text())
        assert final["train_time"] == cost * batches and final["epoch"] == 2
    summary = json.loads((res / "results.json").read_text())
    assert {name: summary[name]["mean"]["train_time"] for name in expected} == {name: cost * batches for name, cost in expected.items()}
    assert summary["slow"]["epochs"] == [2]
    code, out, _ = cli(capsys, "report", res, "--format", "json")
    report = json.loads(out)
    assert {model["name"]: model["train_time"] for model in report["models"]} == {name: cost * batches for name, cost in expected.items()}
    code, out, _ = cli(capsys, "report", res)
    header, _, *rows = out.splitlines()[1:]  # under "final test scores:"
    column = header.split().index("s/epoch")
    assert {row.split()[0]: row.split()[column] for row in rows if row.split()[0] in expected} == {
        name: f"{cost * batches:.3g}" for name, cost in expected.items()
    }
