"""The bundled manifests, the README and the set-up files stay true to the code."""

from __future__ import annotations

import configparser
import json
import math
import re
from pathlib import Path

import attrs
import pytest

from izitorch.config import DataConfig, ModelSpec, RunConfig
from izitorch.manifest import load_manifest
from izitorch.pluginmanager import make_plugin_manager
from izitorch.trainRack import DEFAULT_PARAMETERS

from conftest import ROOT, cli

#: What each task's table is ranked by (README, "Tasks and metrics").
HEADLINE = {"classification": "accuracy", "regression": "RMSE", "segmentation": "IoU"}
MANIFESTS = sorted((ROOT / "manifests").glob("*.toml"))
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_there_is_a_manifest_per_feature():
    names = {path.stem for path in MANIFESTS}
    assert {"digits", "digits_kfold"} <= names
    assert len(names) >= 5


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_bundled_manifest_validates_and_is_listed_in_the_readme(manifest: Path):
    config = load_manifest(manifest)
    make_plugin_manager(config)  # plugin tables are checked here
    assert f"`{manifest.name}`" in README


@pytest.mark.parametrize("manifest", [p for p in MANIFESTS if p.stem != "digits"], ids=lambda p: p.stem)
def test_bundled_manifest_runs_one_epoch(manifest: Path, tmp_path: Path, capsys, monkeypatch):
    """Each bundled manifest trains for one epoch on its first 400 samples (every bundled dataset
    takes ``limit``), in this process, and scores what its task promises."""
    monkeypatch.chdir(tmp_path)
    res = tmp_path / "res"
    code, _, err = cli(capsys, "run", manifest, "--set", f"run.res_dir={res.as_posix()}", "--set", "run.epochs=1", "--set", "data.params.limit=400")
    assert code == 0, err
    summary = json.loads((res / "results.json").read_text())
    config = load_manifest(manifest)
    assert set(summary) == {spec.name for spec in config.models}
    task = json.loads((res / "conf.json").read_text())["task"]
    assert task == (config.run.task or "classification")  # a manifest that does not declare its task is a classification
    for entry in summary.values():
        assert entry["headline"] == HEADLINE[task]
        scores = entry["mean"]
        if task == "regression":
            assert math.isfinite(scores["RMSE"]) and scores["RMSE"] >= 0.0 and "accuracy" not in scores
        elif task == "segmentation":
            assert 0.0 <= scores["IoU"] <= 1.0 and 0.0 <= scores["accuracy"] <= 100.0
        else:
            assert 0.0 <= scores["accuracy"] <= 100.0


@pytest.mark.parametrize("cls,section", [(RunConfig, "run"), (DataConfig, "data"), (ModelSpec, "models")])
def test_every_manifest_key_is_documented(cls, section):
    heading = f"### `[{section}]`" if section != "models" else "### `[[models]]`"
    table = README.split(heading, 1)[1].split("\n### ", 1)[0]
    for field in attrs.fields(cls):
        assert f"| `{field.name}` |" in table, f"{section}.{field.name} is missing from the README's reference"


def test_every_rack_parameter_has_a_home_in_the_readme():
    table = README.split("| `Rack` parameter |", 1)[1].split("\n\n", 1)[0]
    for name in DEFAULT_PARAMETERS:
        assert re.search(rf"`{name}`", table), f"--{name} has no row in the README's Rack table"


def test_readme_setup_commands_match_tox_and_ci():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(ROOT / "tox.ini")
    assert "pip install tox && tox -e demo" in README and "pip install tox && tox -e tests" in README
    assert "manifests/digits.toml" in tox["testenv:demo"]["commands"]
    assert tox["testenv:tests"]["commands"].startswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tox -e tests" in ci


def test_running_from_a_checkout_finds_the_builtin_plugins():
    """``python -m izitorch`` from the repository root imports the checkout, where plugins/ is a
    folder beside izitorch/: the built-ins must still import as izitorch.plugins."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import izitorch, izitorch.plugins.holdout as h\n"
        "print(izitorch.__file__)\nprint(h.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    package, plugin = done.stdout.split()
    assert Path(package) == ROOT / "izitorch" / "__init__.py"
    assert Path(plugin) == ROOT / "plugins" / "holdout.py"
