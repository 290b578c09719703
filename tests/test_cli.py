"""The command line, in subprocesses: ``python -m izitorch`` and the ``izitorch`` console script.

A user's mistake prints exactly one line ``izitorch: error: ...`` and exits 2; a failure during
training exits 1; success exits 0.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest

import izitorch
from izitorch import hookspecs, loop
from izitorch.models import MLP
from izitorch.pluginmanager import DEFAULT_PLUGINS, available_plugins

from conftest import make_manifest, plain_scores, run_cli, run_cli_here

BUILTINS = ("holdout", "kfold", "metrics", "checkpoint", "grad_clip", "early_stop", "trainlog", "console")
DEFAULT_PLUGIN_LINE = "plugins: loop, holdout, metrics, checkpoint, trainlog, console"
PICKS = "task: classification, best epoch by accuracy"  # the tiny manifest's task and its headline metric


def assert_one_error_line(done: subprocess.CompletedProcess, code: int, expected: str) -> None:
    """Exit ``code``, nothing on stdout, and stderr exactly ``izitorch: error: <expected>``."""
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"izitorch: error: {expected}"], done.stderr
    assert done.stdout == ""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny run through the CLI, shared by the tests that only read its outputs."""
    folder = tmp_path_factory.mktemp("finished")
    res_dir = folder / "res"
    manifest = make_manifest(folder)
    done = run_cli("run", str(manifest), cwd=folder)
    return manifest, res_dir, done


# -- validate -----------------------------------------------------------------------------------


def test_validate_good_manifest(manifest, tmp_path):
    path = manifest()
    done = run_cli("validate", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{path}: OK (1 model(s): mlp; {DEFAULT_PLUGIN_LINE}; {PICKS})\n"
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "res").exists()  # validating trains nothing and writes nothing


def test_validate_with_overrides_lists_the_enabled_plugins(manifest, tmp_path):
    path = manifest()
    done = run_cli("validate", str(path), "--set", "plugins.kfold.k=3", "--set", "plugins.grad_clip.value=1.0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{path}: OK (1 model(s): mlp; {DEFAULT_PLUGIN_LINE}, kfold, grad_clip; {PICKS})\n"


BAD = [
    # (id, command, the tiny manifest's change (make_manifest's arguments), extra CLI args, expected message after "<file>: ")
    ("epochs-0", "validate", {"run": {"epochs": 0}}, [], "run.epochs: expected an integer >= 1, got 0"),
    ("lr-fast", "validate", {"models": [{"optimizer": {"lr": "fast"}}]}, [], 'models[0].optimizer.lr: expected a number, got "fast"'),
    ("plugin-table", "validate", {"plugins": {"kfold": {"k": 1}}}, [], "plugins.kfold.k: expected an integer >= 2, got 1"),
    ("set-syntax", "validate", {}, ["--set", "run.epochs"], '--set "run.epochs": expected key.path=value, e.g. --set run.epochs=3'),
    ("set-type", "run", {}, ["--set", "run.batch_size=big"], 'run.batch_size: expected an integer, got "big"'),
    (
        "run-unknown-plugin",
        "run",
        {"plugins": {"enable": ["kfld"]}},
        [],
        'plugins.enable: unknown plugin "kfld" (did you mean "kfold"?); `izitorch plugins` lists the installed ones',
    ),
]


@pytest.mark.parametrize("command, change, extra, expected", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_manifest_exits_2_with_one_line(tmp_path, capsys, command, change, extra, expected):
    res_dir = tmp_path / "res"
    path = make_manifest(tmp_path, **change)
    done = run_cli_here(capsys, command, str(path), *extra, cwd=tmp_path)
    assert_one_error_line(done, 2, f"{path}: {expected}")
    assert not res_dir.exists()  # nothing is written for a manifest that does not load


def test_invalid_toml_exits_2(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[run\nepochs = 2\n", encoding="utf-8")
    done = run_cli("validate", str(path), cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"izitorch: error: {path}: invalid TOML: "), done.stderr
    assert lines[0].endswith("(at line 1, column 5)")


def test_missing_manifest_exits_2(tmp_path):
    path = tmp_path / "nope.toml"
    assert_one_error_line(run_cli("run", str(path), cwd=tmp_path), 2, f"{path}: manifest not found")


# -- run ----------------------------------------------------------------------------------------


def test_run_writes_results(finished):
    _, res_dir, done = finished
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    summary = json.loads((res_dir / "results.json").read_text(encoding="utf-8"))
    assert list(summary) == ["mlp"]
    assert summary["mlp"]["folds"] == 1
    ((_, test),) = pickle.loads((res_dir / "Dataset_split.pkl").read_bytes())
    expected = plain_scores(MLP(hidden=16), res_dir / "mlp" / "model.pth.tar", test)  # computed independently
    assert summary["mlp"]["mean"]["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-5)
    assert summary["mlp"]["std"]["accuracy"] == 0.0
    trainlog = json.loads((res_dir / "mlp" / "trainlog.json").read_text(encoding="utf-8"))
    assert list(trainlog) == ["1", "2"]
    assert "final test scores:" in done.stdout
    assert f"izitorch: results in {res_dir.as_posix()}" in done.stdout


def test_run_refuses_an_existing_res_dir_then_overwrite_replaces_it(finished, tmp_path):
    _, res_dir, first = finished
    assert first.returncode == 0, first.stderr
    copy = tmp_path / "res"
    shutil.copytree(res_dir, copy)
    path = make_manifest(tmp_path)  # its res_dir is the copy
    before = (copy / "results.json").read_bytes()

    refused = run_cli("run", str(path), cwd=tmp_path)
    assert_one_error_line(
        refused,
        2,
        f'{path}: run.res_dir: res_dir "{copy.as_posix()}" already holds a run; '
        "pass --resume to continue it, --overwrite to replace it, or choose another res_dir",
    )
    assert (copy / "results.json").read_bytes() == before  # untouched

    done = run_cli("run", str(path), "--overwrite", "--set", "run.epochs=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trainlog = json.loads((copy / "mlp" / "trainlog.json").read_text(encoding="utf-8"))
    assert list(trainlog) == ["1"]  # the earlier two-epoch log is gone: --set run.epochs=1 ran one epoch
    conf = json.loads((copy / "conf.json").read_text(encoding="utf-8"))
    assert conf["config"]["run"]["epochs"] == 1
    assert conf["config"]["run"]["overwrite"] is True


def test_training_failure_exits_1_naming_the_model(tmp_path):
    path = make_manifest(tmp_path, models=[{"params": {"num_classes": 3}}])
    done = run_cli("run", str(path), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"izitorch: error: {path}: model mlp: "), lines[0]
    assert "num_classes" in lines[0]


# -- plugins ------------------------------------------------------------------------------------


def parse_plugins(stdout: str) -> dict[str, dict]:
    """Each plugin: a head line, its hooks, then one line per key of its [plugins.<name>] table."""
    listed = {}
    for line in stdout.splitlines():
        if not line.startswith(" "):
            name, version, flag, arrow, origin = line.split(" ")
            assert arrow == "->", line
            listed[name] = {"version": version, "flag": flag, "origin": origin, "options": []}
        elif line.startswith("    hooks: "):
            assert "hooks" not in listed[name], line
            listed[name]["hooks"] = line[len("    hooks: ") :].split(", ")
        else:
            assert line.startswith(f"    [plugins.{name}] "), line
            listed[name]["options"].append(line.split(" ")[5])
    assert all("hooks" in entry for entry in listed.values()), stdout
    return listed


def hooks_seen_by_pluggy(name: str) -> list[str]:
    """The hooks a real plugin manager registers for the installed plugin ``name``."""
    obj = available_plugins()[name].load()
    plugin = obj() if isinstance(obj, type) else obj
    pm = pluggy.PluginManager("izitorch")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name=name)
    return sorted(caller.name for caller in pm.get_hookcallers(plugin))


# a few hooks each built-in must implement (the full list is checked against pluggy)
CORE_HOOKS = {
    "holdout": {"izitorch_make_splits"},
    "kfold": {"izitorch_configure", "izitorch_make_splits"},
    "metrics": {"izitorch_register_metrics"},
    "checkpoint": {"izitorch_configure", "izitorch_epoch_finish"},
    "grad_clip": {"izitorch_configure", "izitorch_before_optimizer_step"},
    "early_stop": {"izitorch_configure", "izitorch_should_stop"},
    "trainlog": {"izitorch_run_start", "izitorch_epoch_finish", "izitorch_fold_finish", "izitorch_run_finish"},
    "console": {"izitorch_epoch_start", "izitorch_batch_finish", "izitorch_epoch_finish", "izitorch_run_finish"},
}


def test_plugins_lists_every_builtin_with_its_hooks(tmp_path):
    done = run_cli("plugins", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = parse_plugins(done.stdout)
    assert set(BUILTINS) <= set(listed)
    for name in BUILTINS:
        entry = listed[name]
        assert entry["version"] == izitorch.__version__
        assert entry["flag"] == ("(default)" if name in DEFAULT_PLUGINS else "(optional)")
        assert entry["origin"].startswith(f"izitorch.plugins.{name}")
        assert entry["hooks"] == hooks_seen_by_pluggy(name), name
        assert CORE_HOOKS[name] <= set(entry["hooks"]), name
    assert {name for name in BUILTINS if listed[name]["flag"] == "(default)"} == {"holdout", "metrics", "checkpoint", "trainlog", "console"}
    assert listed["loop"]["flag"] == "(essential)" and listed["loop"]["origin"] == "izitorch.loop"
    assert listed["loop"]["hooks"] == sorted(hook for hook in dir(loop) if hook.startswith("izitorch_"))
    assert listed["kfold"]["options"] == ["k", "parallel"]


# -- report -------------------------------------------------------------------------------------


def test_report_prints_the_table(finished, tmp_path):
    _, res_dir, first = finished
    assert first.returncode == 0, first.stderr
    summary = json.loads((res_dir / "results.json").read_text(encoding="utf-8"))
    done = run_cli("report", str(res_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "final test scores:"
    header = [
        "model",
        "params",
        "folds",
        "epoch",
        "s/epoch",
        "loss",
        "acc",
        "%",
        "IoU",
        "balanced_accuracy",
        "precision",
        "recall",
        "F1",
        "95%",
        "CI",
        "acc",
        "%",
    ]
    header += ["p", "vs", "best", "(accuracy)"]
    assert lines[1].split() == header
    row = lines[3].split()
    assert row[0] == "mlp" and row[2] == "1" and row[3] == "2"  # one fold, scored at epoch 2
    mean = summary["mlp"]["mean"]
    assert row[4] == f"{mean['train_time']:.3g}"  # seconds of training per epoch
    assert row[5:8] == [f"{mean['loss']:.4f}", f"{mean['accuracy']:.2f}", f"{mean['IoU']:.4f}"]
    assert row[8:12] == [f"{mean['balanced_accuracy']:.2f}", *(f"{mean[key]:.4f}" for key in ("precision", "recall", "F1"))]
    assert row[-1] == "-"  # one model: nothing to compare
    assert lines[4].startswith("95% CI acc %: ") and len(lines) == 5


def test_report_without_results_exits_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("report", str(empty), cwd=tmp_path)
    assert_one_error_line(done, 2, f'{empty / "conf.json"} not found: "{empty}" holds no izitorch run (a run writes conf.json when it starts)')


# -- the console script -------------------------------------------------------------------------

SCRIPT = Path(sys.executable).parent / ("izitorch.exe" if os.name == "nt" else "izitorch")


@pytest.mark.skipif(not SCRIPT.exists(), reason="the izitorch console script is not installed next to this Python")
def test_console_script_works_like_python_m(manifest, tmp_path):
    good = manifest()
    done = subprocess.run([str(SCRIPT), "validate", str(good)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{good}: OK (1 model(s): mlp; {DEFAULT_PLUGIN_LINE}; {PICKS})\n"

    bad = manifest(run={"res_dir": "res", "epochs": 0}, name="bad.toml")
    done = subprocess.run([str(SCRIPT), "validate", str(bad)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert_one_error_line(done, 2, f"{bad}: run.epochs: expected an integer >= 1, got 0")
