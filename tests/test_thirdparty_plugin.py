"""A third-party plugin, installed as its own distribution with a real ``izitorch`` entry point,
changes a run's behaviour without touching izitorch, and loads only when the manifest names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_manifest, run_cli

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "izitorch-demo-plugin"
version = "1.2.3"
description = "A demo izitorch plugin: stops each fold early and leaves a marker file."
dependencies = ["izitorch"]

[project.entry-points.izitorch]
demo = "izitorch_demo_plugin:DemoPlugin"

[tool.setuptools]
py-modules = ["izitorch_demo_plugin"]
"""

MODULE = '''\
"""Stops every fold after ``stop_after`` epochs and writes ``demo_marker.txt`` into res_dir.

Options (``[plugins.demo]``): ``stop_after`` (integer >= 1, default 1), ``message`` (text).
Written against izitorch's public API only.
"""
from izitorch import ManifestError, hookimpl

__version__ = "1.2.3"


class DemoPlugin:
    def __init__(self):
        self.stop_after = 1
        self.message = "demo was here"
        self.stopped_at = []

    @hookimpl
    def izitorch_configure(self, config):
        table = dict(config.plugin_table("demo"))
        stop_after = table.pop("stop_after", 1)
        message = table.pop("message", "demo was here")
        for key in table:
            raise ManifestError(f'unknown key "{key}"; expected stop_after or message', f"plugins.demo.{key}", config.source)
        if isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1:
            raise ManifestError(f"expected an integer >= 1, got {stop_after!r}", "plugins.demo.stop_after", config.source)
        self.stop_after, self.message = stop_after, str(message)

    @hookimpl
    def izitorch_should_stop(self, run, fold, epoch, scores):
        if epoch >= self.stop_after:
            self.stopped_at.append(epoch)
            return f"the demo plugin stops after {self.stop_after} epoch(s)"
        return None

    @hookimpl
    def izitorch_run_finish(self, run, results):
        text = f"{self.message}; stopped at {self.stopped_at}; models {sorted(results)}"
        (run.res_dir / "demo_marker.txt").write_text(text, encoding="utf-8")
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The demo plugin built and installed (offline) into its own site folder."""
    base = tmp_path_factory.mktemp("thirdparty")
    project, target = base / "izitorch-demo-plugin", base / "site"
    project.mkdir()
    (project / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    (project / "izitorch_demo_plugin.py").write_text(MODULE, encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "--target",
        str(target),
        str(project),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        pytest.fail(f"pip install of the demo plugin failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    assert (target / "izitorch_demo_plugin.py").is_file()
    assert (target / "izitorch_demo_plugin-1.2.3.dist-info" / "entry_points.txt").is_file()
    return target


def env_for(site: Path) -> dict:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def write(folder: Path, plugins: dict, epochs: int = 2) -> Path:
    """A one-MLP run over 200 digits on the CPU, batch 64, with the ``[plugins]`` table ``plugins``."""
    return make_manifest(
        folder, run={"device": "cpu", "epochs": epochs, "batch_size": 64}, data={"params": {"limit": 200}}, **({"plugins": plugins} if plugins else {})
    )


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def check(done: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert done.returncode == code, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def test_enabled_by_name_the_installed_plugin_changes_the_run(site, tmp_path):
    path = write(tmp_path, {"enable": ["demo"]}, epochs=2)
    done = check(run_cli("run", str(path), env=env_for(site)))
    res = tmp_path / "res"
    assert list(read_json(res / "mlp" / "trainlog.json")) == ["1"]  # stopped after epoch 1 of 2
    assert read_json(res / "mlp" / "test_metrics.json")["epoch"] == 1
    assert (res / "demo_marker.txt").read_text(encoding="utf-8") == "demo was here; stopped at [1]; models ['mlp']"
    plugins = read_json(res / "conf.json")["plugins"]
    assert plugins["demo"] == "1.2.3"
    assert list(plugins)[-1] == "demo"
    assert "stopped: the demo plugin stops after 1 epoch(s)" in done.stdout


def test_its_table_configures_it_and_enables_it(site, tmp_path):
    path = write(tmp_path, {"demo": {"stop_after": 2, "message": "from the table"}}, epochs=3)
    check(run_cli("run", str(path), env=env_for(site)))
    res = tmp_path / "res"
    assert list(read_json(res / "mlp" / "trainlog.json")) == ["1", "2"]
    assert (res / "demo_marker.txt").read_text(encoding="utf-8") == "from the table; stopped at [2]; models ['mlp']"
    conf = read_json(res / "conf.json")
    assert conf["plugins"]["demo"] == "1.2.3"
    assert conf["config"]["plugins"] == {"enable": [], "disable": [], "demo": {"stop_after": 2, "message": "from the table"}}


def test_a_bad_option_in_its_table_is_a_one_line_error(site, tmp_path):
    path = write(tmp_path, {"demo": {"stop_after": 0}})
    done = check(run_cli("validate", str(path), env=env_for(site)), code=2)
    assert done.stdout == ""
    assert done.stderr == f"izitorch: error: {path}: plugins.demo.stop_after: expected an integer >= 1, got 0\n"


def test_installed_but_not_enabled_it_does_not_load(site, tmp_path):
    path = write(tmp_path, {}, epochs=2)
    check(run_cli("run", str(path), env=env_for(site)))
    res = tmp_path / "res"
    assert list(read_json(res / "mlp" / "trainlog.json")) == ["1", "2"]
    assert not (res / "demo_marker.txt").exists()
    assert "demo" not in read_json(res / "conf.json")["plugins"]


def test_izitorch_plugins_lists_it_with_version_and_hooks(site):
    out = check(run_cli("plugins", env=env_for(site))).stdout.splitlines()
    index = out.index("demo 1.2.3 (optional) -> izitorch_demo_plugin:DemoPlugin")
    assert out[index + 1] == "    hooks: izitorch_configure, izitorch_run_finish, izitorch_should_stop"
    # without the site folder the entry point is gone, and so is the plugin
    assert not any(line.startswith("demo ") for line in check(run_cli("plugins")).stdout.splitlines())


def set_mtime(folder: Path, seconds: int) -> None:
    """Give ``folder`` the modification time ``seconds`` after the epoch: distinct values make a
    change visible whatever the file system's timestamp granularity, without waiting for the clock."""
    os.utime(folder, (seconds, seconds))


def test_a_plugin_installed_while_the_process_runs_is_found(tmp_path, monkeypatch):
    """The entry points are cached per installation state (sys.path folders and their
    modification times): a distribution that appears later is seen, one that goes is forgotten."""
    from izitorch.pluginmanager import available_plugins

    from izitorch import pluginmanager

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    scans = []
    real_entry_points = pluginmanager.entry_points
    monkeypatch.setattr(pluginmanager, "entry_points", lambda **kw: scans.append(kw) or real_entry_points(**kw))
    assert "late" not in available_plugins()
    assert "late" not in available_plugins() and len(scans) == 1  # nothing changed: not scanned again
    dist = site / "izitorch_late-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: izitorch-late\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[izitorch]\nlate = izitorch_late:Plugin\n")
    set_mtime(site, 1)
    assert available_plugins()["late"].value == "izitorch_late:Plugin" and len(scans) == 2
    for child in dist.iterdir():
        child.unlink()
    dist.rmdir()
    set_mtime(site, 2)
    assert "late" not in available_plugins()
