"""``res_dir/manifest.toml``: the manifest as the run ran it (``--set`` applied, sweeps
expanded, file references re-rooted at res_dir), which runs again to the same results."""

from __future__ import annotations

import json
import tomllib

from conftest import cli, error_of, make_manifest
from izitorch.rerun import manifest_text

NET = """\
import torch

class Net(torch.nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    def forward(self, x):
        return self.body(x)
"""


def test_the_manifest_as_run_runs_again_to_the_same_results(tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "nets.py").write_text(NET, encoding="utf-8")
    models = [{"name": "net", "model": "nets.py:Net", "params": {}, "sweep": {"params.hidden": [4, 8]}}, {"name": "mlp"}]
    path = make_manifest(project, {"run.res_dir": "out/first"}, models=models)
    monkeypatch.chdir(tmp_path)  # relative res_dir and references: the run's own folder
    assert cli(capsys, "run", path, "--set", "run.epochs=3", "--set", "models[1].params.hidden=8")[0] == 0
    first = tmp_path / "out" / "first"
    written = tomllib.loads((first / "manifest.toml").read_text(encoding="utf-8"))
    assert written["run"]["epochs"] == 3 and written["run"]["res_dir"] == "out/first"
    assert [(m["name"], m["model"], m["params"].get("hidden"), m.get("swept")) for m in written["models"]] == [
        ("net_hidden4", "../../project/nets.py:Net", 4, {"params.hidden": 4}),
        ("net_hidden8", "../../project/nets.py:Net", 8, {"params.hidden": 8}),
        ("mlp", "izitorch.models:MLP", 8, None),
    ]
    code, _, err = cli(capsys, "run", first / "manifest.toml")
    assert code == 2 and error_of(err).startswith(f"{first / 'manifest.toml'}: run.res_dir: ")  # its own folder: refused
    assert cli(capsys, "run", first / "manifest.toml", "--set", "run.res_dir=out/again")[0] == 0
    again, before = (json.loads((res / "results.json").read_text()) for res in (tmp_path / "out" / "again", first))
    for name, entry in before.items():
        scores = {key: value for key, value in entry["mean"].items() if not key.endswith("_time")}
        assert scores == {key: again[name]["mean"][key] for key in scores}  # bit for bit
        assert (again[name]["params"], again[name].get("sweep")) == (entry["params"], entry.get("sweep"))


def test_a_run_given_python_objects_writes_no_manifest():
    config = {"models": [{"name": "m", "model": "Net(\n  (body): Linear()\n)", "params": {}}], "run": {}, "data": {"dataset": "izitorch.datasets:digits"}}
    assert manifest_text(config, ".", __import__("pathlib").Path("res")) is None


def test_a_model_cannot_take_the_name_of_a_run_file(manifest, capsys):
    for name in ("manifest.toml", "Metrics.csv", "plots", "TensorBoard"):
        path = manifest(models=[{"name": name}], name="m.toml")
        code, _, err = cli(capsys, "validate", path)
        assert code == 2 and error_of(err).startswith(f"{path}: models[0].name: ") and "one of the run's own files" in error_of(err)
