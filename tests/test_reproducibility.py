"""``[run] deterministic = true``: torch's deterministic-only mode during the run, and only then."""
from __future__ import annotations

import json

import torch

import izitorch
from conftest import run_cli

RECORDER = """\
import json
import torch
from izitorch import hookimpl

@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    seen = {"algorithms": torch.are_deterministic_algorithms_enabled(), "benchmark": torch.backends.cudnn.benchmark,
            "cudnn": torch.backends.cudnn.deterministic}
    (run.res_dir / "seen.json").write_text(json.dumps(seen))
"""

# put_ without accumulation has no deterministic CPU implementation.
SCATTERING = """\
import torch
from torch import nn

class Scattering(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        out = self.linear(x)
        return out.clone().put_(torch.tensor([0], device=out.device), out.flatten()[:1])
"""


def deterministic_manifest(write_manifest, tmp_path, enable: str = '"recorder.py"', model: str = "izitorch.models:MLP"):
    (tmp_path / "recorder.py").write_text(RECORDER)
    path = write_manifest()
    text = path.read_text().replace("[run]\n", "[run]\ndeterministic = true\n").replace(
        'model = "izitorch.models:MLP"', f'model = "{model}"')
    path.write_text(text + f"\n[plugins]\nenable = [{enable}]\n")
    return path


def test_the_run_uses_deterministic_algorithms_and_restores_the_previous_settings(write_manifest, tmp_path):
    path = deterministic_manifest(write_manifest, tmp_path)
    torch.backends.cudnn.benchmark = True
    try:
        first = izitorch.run(izitorch.load_manifest(str(path)))
        assert json.loads((tmp_path / "res" / "seen.json").read_text()) == {"algorithms": True, "benchmark": False, "cudnn": True}
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.deterministic
        # the switch changes no result on the CPU
        again = izitorch.run(izitorch.load_manifest(str(path), ["run.deterministic=false", "run.overwrite=true"]))
        assert json.loads((tmp_path / "res" / "seen.json").read_text())["algorithms"] is False
        assert [(f["accuracy"], f["loss"]) for f in again["mlp"]] == [(f["accuracy"], f["loss"]) for f in first["mlp"]]
        # and a resumed run may switch it (here back on, while extending the run by one epoch)
        izitorch.run(izitorch.load_manifest(str(path), ["run.resume=true", "run.epochs=3"]))
        assert json.loads((tmp_path / "res" / "seen.json").read_text())["algorithms"] is True
    finally:
        torch.backends.cudnn.benchmark = False


def test_an_operation_without_a_deterministic_algorithm_fails_in_one_line_naming_the_switch(write_manifest, tmp_path):
    (tmp_path / "scattering.py").write_text(SCATTERING)
    path = deterministic_manifest(write_manifest, tmp_path, enable="", model="scattering.py:Scattering")
    path.write_text(path.read_text().replace("params = { hidden = 16 }\n", ""))
    done = run_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("izitorch: error: model mlp: forward failed on input of shape (4, 64): put_ does not have a deterministic")
    assert lines[0].endswith("this operation has no deterministic algorithm: set deterministic = false in [run]")
    checked = run_cli("validate", str(path), cwd=tmp_path)  # validate's dry run meets it with the same line
    assert (checked.returncode, checked.stderr) == (1, done.stderr)
