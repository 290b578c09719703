"""Hostile values, misplaced messages, command-line mistakes and saved files of the wrong shape.

Every case goes through ``izitorch.cli.main`` (in this process, except where the real process
matters: a FIFO must not block it) and checks the exit code, that stderr is exactly one
``izitorch: error:`` line without a traceback, and the line itself, built from the manifest's
path and the key path as the manifest spells them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import types
import warnings
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import izitorch
from izitorch import resume
from izitorch.cli import main
from izitorch.guard import Interrupted
from izitorch.errors import MAX_MESSAGE_CHARS, IzitorchError, ManifestError, TrainingError, describe, located_in
from izitorch.manifest import MAX_DEPTH, load_manifest
from izitorch.options import declared_options
from izitorch.plugins.checkpoint import CheckpointOptions
from izitorch.plugins.early_stop import EarlyStopOptions
from izitorch.plugins.grad_clip import GradClipOptions
from izitorch.plugins.kfold import KFoldOptions
from izitorch.plugins.metrics import MetricsOptions

from conftest import TINY_MANIFEST, cli, error_of, run_cli


def write(tmp_path: Path, text: str | None = None, name: str = "m.toml", **replace: str) -> Path:
    body = TINY_MANIFEST.format(res_dir=(tmp_path / "res").as_posix()) if text is None else text
    for old, new in replace.items():
        assert old in body
        body = body.replace(old, new)
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


# -- hostile values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("-1", "run.rdm_seed: expected an integer from 0 to 4294967295 (numpy's seed range), got -1"),
        ("4294967296", "run.rdm_seed: expected an integer from 0 to 4294967295 (numpy's seed range), got 4294967296"),
        ("1e23", "run.rdm_seed: expected an integer, got 1e+23 (a float): write an integer"),
        ("3.0", "run.rdm_seed: expected an integer, got 3.0 (a float): write an integer, e.g. 3"),
    ],
)
def test_rdm_seed_outside_numpys_range_is_one_line(tmp_path, capsys, value, expected):
    path = write(tmp_path, **{"epochs = 2": f"epochs = 2\nrdm_seed = {value}"})
    code, out, err = cli(capsys, "validate", path)
    assert (code, out) == (2, "")
    assert error_of(err) == f"{path}: {expected}"


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_rdm_seed_bounds_are_accepted(tmp_path, seed):
    path = write(tmp_path, **{"epochs = 2": f"epochs = 2\nrdm_seed = {seed}"})
    assert load_manifest(path).run.rdm_seed == seed


def test_a_float_epochs_says_to_write_an_integer(tmp_path, capsys):
    path = write(tmp_path, **{"epochs = 2": "epochs = 1e9"})
    code, _, err = cli(capsys, "run", path)
    assert code == 2
    assert error_of(err) == f"{path}: run.epochs: expected an integer, got 1000000000.0 (a float): write an integer, e.g. 1000000000"
    assert not (tmp_path / "res").exists()


def nested(depth: int) -> str:
    return "{ a = " * depth + "1" + " }" * depth


@pytest.mark.parametrize("how", ["manifest", "--set"])
def test_a_manifest_nested_hundreds_deep_is_refused_at_load_naming_the_key(tmp_path, capsys, how):
    if how == "manifest":
        path = write(tmp_path, **{"params = { limit = 300 }": f"params = {{ limit = 300, deep = {nested(300)} }}"})
        extra: list[str] = []
    else:
        path = write(tmp_path)
        extra = ["--set", f"data.params.deep={nested(300)}"]
    code, _, err = cli(capsys, "run", path, *extra)
    assert code == 2
    # data is level 1, params 2, deep 3, then one level per "a": the first past MAX_DEPTH is named
    key = "data.params.deep" + ".a" * (MAX_DEPTH + 1 - 3)
    assert error_of(err) == f"{path}: {key}: tables and arrays are nested more than {MAX_DEPTH} levels deep; flatten the value"
    assert not (tmp_path / "res").exists()


def test_nesting_up_to_the_limit_still_loads(tmp_path):
    # data (1) > params (2) > deep (3) > a ... : MAX_DEPTH tables in all
    path = write(tmp_path, **{"params = { limit = 300 }": f"params = {{ limit = 300, deep = {nested(MAX_DEPTH - 2)} }}"})
    with pytest.raises(ManifestError) as info:  # loads past the depth check, then the dataset refuses "deep"
        load_manifest(path)
    assert "nested" not in str(info.value) and "deep" in str(info.value)


def test_a_5mb_value_is_cut_in_the_message(tmp_path, capsys):
    huge = "x" * 5_000_000
    path = write(tmp_path, **{"[run]\n": f'[run]\ndevice = "{huge}"\n'})
    code, _, err = cli(capsys, "validate", path)
    assert code == 2
    line = error_of(err)
    assert line == (f'{path}: run.device: expected "auto", "cpu", "cuda", "cuda:<index>" or "mps", got "{"x" * 60}..." (5,000,000 characters)')


def test_a_5mb_key_is_cut_in_the_message(tmp_path, capsys):
    path = write(tmp_path, **{"[run]\n": f"[run]\n{'k' * 5_000_000} = 1\n"})
    code, _, err = cli(capsys, "validate", path)
    assert code == 2
    line = error_of(err)
    assert len(line) <= MAX_MESSAGE_CHARS + 100
    assert line.startswith(f"{path}: run.kkkk") and "characters cut" in line
    assert line.endswith('kkk"')


def test_describe_cuts_long_values_and_keeps_short_ones():
    assert describe("abc") == '"abc"'
    assert describe("y" * 61) == f'"{"y" * 60}..." (61 characters)'
    assert describe(list(range(3))) == "a list"
    assert describe(10**70).endswith("(71 characters)")


def test_a_utf8_bom_is_accepted(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_bytes(b"\xef\xbb\xbf" + TINY_MANIFEST.format(res_dir=(tmp_path / "res").as_posix()).encode("utf-8"))
    code, out, err = cli(capsys, "validate", path)
    assert (code, err) == (0, "")
    assert out.startswith(f"{path}: OK (1 model(s): mlp;")


def test_a_folder_given_as_the_manifest_says_it_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "m.toml"
    folder.mkdir()
    code, _, err = cli(capsys, "run", folder)
    assert code == 2
    assert error_of(err) == f"{folder}: is a folder, not a manifest: give the path of a .toml file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_given_as_the_manifest_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "m.toml"
    os.mkfifo(fifo)
    done = run_cli("validate", str(fifo), cwd=tmp_path, timeout=120)  # opening it would wait for a writer forever
    assert done.returncode == 2 and done.stdout == ""
    assert error_of(done.stderr) == f"{fifo}: is not a regular file (a FIFO, a socket or a device): give the path of a .toml file"


# -- the manifest file and the key path in every error after the manifest is read ----------------


def test_num_classes_errors_name_data_num_classes_and_the_file(tmp_path, capsys):
    path = write(tmp_path)
    code, _, err = cli(capsys, "run", path, "--set", "data.num_classes=5")
    assert code == 2
    assert error_of(err) == (
        f"{path}: data.num_classes: labels range from 0 to 9 but num_classes = 5; labels must lie in [0, num_classes): fix num_classes or the labels"
    )


def test_a_component_failing_to_build_names_the_file_and_key(tmp_path, capsys):
    path = write(tmp_path)
    code, _, err = cli(capsys, "run", path, "--set", "models[0].optimizer.lr=-1.0")
    assert code == 2
    assert error_of(err) == f"{path}: models[0].optimizer: torch.optim:Adam(...) raised ValueError: Invalid learning rate: -1.0"


def test_a_split_error_names_the_file_and_key(tmp_path, capsys):
    path = write(tmp_path)
    code, _, err = cli(capsys, "run", path, "--set", "data.params.limit=5", "--set", "data.train_ratio=0.1")
    assert code == 2
    assert error_of(err) == (
        f"{path}: data.train_ratio: 0.1 leaves 0 training and 5 held-out samples out of 5; use more data or a ratio that leaves both sides non-empty"
    )


def test_a_plugin_failing_to_load_names_the_file_and_key(tmp_path, capsys):
    path = write(tmp_path, **{"[run]": '[plugins]\nenable = ["no_such_pkg.plugin"]\n\n[run]'})
    code, _, err = cli(capsys, "validate", path)
    assert code == 2
    assert error_of(err) == (f"{path}: plugins.enable: plugin \"no_such_pkg.plugin\" failed to load: ModuleNotFoundError: No module named 'no_such_pkg'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_names_the_file_and_key(tmp_path, capsys):
    path = write(tmp_path)
    code, _, err = cli(capsys, "run", path, "--set", 'run.device="cuda"')
    assert code == 2
    assert error_of(err) == f'{path}: run.device: device "cuda" requested but CUDA is not available; use device = "auto" or "cpu"'


def test_located_in_adds_the_file_to_errors_that_name_none():
    def raised(error: IzitorchError) -> str:
        with pytest.raises(type(error)) as info, located_in("m.toml"):
            raise error
        assert info.value.exit_code == error.exit_code
        return str(info.value)

    assert raised(IzitorchError("bad", "data.dataset")) == "m.toml: data.dataset: bad"
    assert raised(TrainingError("bad", "models[0]")) == "m.toml: models[0]: bad"
    assert raised(IzitorchError("bad", "k", "other.json")) == "other.json: k: bad"
    assert raised(TrainingError("model mlp: bad")) == "m.toml: model mlp: bad"
    assert raised(Interrupted(2, "interrupted by SIGINT")) == "interrupted by SIGINT"  # it says how to continue instead


def fingerprint_of(tmp_path: Path, *overrides: str) -> dict[str, str]:
    return resume.fingerprint(load_manifest(write(tmp_path), overrides, check_references=False))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["models[0].optimizer.lr=0.5"], "models[0].optimizer.lr changed (0.01 -> 0.5)"),
        (['models[0].optimizer.class="torch.optim:SGD"'], "models[0].optimizer.class changed (torch.optim:Adam -> torch.optim:SGD)"),
        (['models[0].criterion="torch.nn:NLLLoss"'], "models[0].criterion changed (torch.nn:CrossEntropyLoss -> torch.nn:NLLLoss)"),
        (
            ['models[0].criterion={ class = "torch.nn:CrossEntropyLoss", label_smoothing = 0.1 }'],
            "models[0].criterion.label_smoothing changed ((absent) -> 0.1)",
        ),
        (["models[0].params.hidden=8"], "models[0].params.hidden changed (16 -> 8)"),
    ],
)
def test_a_resume_refusal_spells_keys_as_the_manifest_does(tmp_path, overrides, expected):
    saved = fingerprint_of(tmp_path)
    assert resume.first_difference(saved, fingerprint_of(tmp_path, *overrides)) == expected


# -- the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["validate", "m.toml", "--set"], "argument --set: expected one argument"),
        (["run", "m.toml", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        ([], "the following arguments are required: COMMAND"),
        (["trian", "m.toml"], "argument COMMAND: invalid choice: 'trian'"),
    ],
)
def test_command_line_mistakes_are_one_line(tmp_path, capsys, args, expected):
    code, out, err = cli(capsys, *args)
    assert (code, out) == (2, "")
    assert error_of(err).startswith(expected), err
    assert error_of(err).endswith("; `izitorch --help` (or `izitorch COMMAND --help`) shows the usage")
    assert "usage:" not in err


def test_version_prints_the_version(capsys):
    code, out, err = cli(capsys, "--version")
    assert (code, out, err) == (0, f"izitorch {izitorch.__version__}\n", "")


def toml(value) -> str:
    if isinstance(value, attrs.Factory):  # a default built per instance (an empty list)
        value = value.factory()
    return "(unset)" if value is None else json.dumps(value) if isinstance(value, (bool, str)) else repr(value)


def test_plugins_lists_the_loop_and_each_plugins_options(capsys):
    code, out, err = cli(capsys, "plugins")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"loop {izitorch.__version__} (essential) -> izitorch.loop"
    assert lines[1].startswith("    hooks: izitorch_") and "izitorch_run_folds" in lines[1]
    for name, cls in [
        ("checkpoint", CheckpointOptions),
        ("early_stop", EarlyStopOptions),
        ("grad_clip", GradClipOptions),
        ("kfold", KFoldOptions),
        ("metrics", MetricsOptions),
    ]:
        head = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        shown = [line for line in lines[head + 2 : head + 2 + len(attrs.fields(cls))]]
        expected = [f"    [plugins.{name}] {field.name} = {toml(field.default)}: {field.metadata['doc']}" for field in attrs.fields(cls)]
        assert shown == expected
        assert all(field.metadata["doc"] for field in attrs.fields(cls))
    for name in ("holdout", "trainlog", "console"):  # no table of their own
        head = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        assert head + 2 == len(lines) or not lines[head + 2].startswith("    [plugins.")


def test_declared_options_reads_a_third_party_attrs_class():
    @attrs.frozen
    class Options:
        required: int = attrs.field()
        rate: float = attrs.field(default=0.5, metadata={"doc": "how often"})
        names: tuple = attrs.field(factory=tuple)

    shown = [(o.key, o.default, o.doc) for o in declared_options(types.SimpleNamespace(izitorch_options=Options))]
    assert shown == [("required", "(required)", ""), ("rate", "0.5", "how often"), ("names", "()", "")]
    assert declared_options(types.SimpleNamespace()) == []


# -- saved files that are not what they should be ---------------------------------------------------


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished one-epoch run: its state is resumed with two epochs (so it must be loaded)."""
    base = tmp_path_factory.mktemp("saved")
    path = write(base, **{"epochs = 2": "epochs = 1"})
    assert main(["run", str(path)]) == 0
    return base, path


def resume_with(tmp_path: Path, base: Path, damage) -> tuple[Path, Path]:
    res_dir = tmp_path / "res"
    shutil.copytree(base / "res", res_dir)
    path = write(tmp_path, **{"epochs = 2": "epochs = 1"})
    state_file = res_dir / ".izitorch" / "fold_1.pth.tar"
    assert state_file.is_file()
    damage(state_file)
    return path, state_file


class Foreign:
    """Not a type torch's weights_only loader accepts."""


def edited(change):
    def damage(file: Path) -> None:
        state = torch.load(file, weights_only=True)
        change(state)
        torch.save(state, file)

    return damage


STATE_CASES = {
    "a list": (lambda f: torch.save([1, 2, 3], f), "the resume state is not one izitorch wrote (it holds a list, not a table)"),
    "missing rng": (edited(lambda s: s.pop("rng")), "the resume state is not one izitorch wrote (rng: missing)"),
    "missing slots": (edited(lambda s: s["folds"][0].pop("slots")), "the resume state is not one izitorch wrote (folds[0].slots: missing)"),
    "slot not a table": (
        edited(lambda s: s["folds"][0]["slots"].update(mlp=[1])),
        "the resume state is not one izitorch wrote (folds[0].slots.mlp: expected a table, found a list)",
    ),
    "epoch a string": (edited(lambda s: s.update(epoch="1")), "the resume state is not one izitorch wrote (epoch: unexpected str)"),
    "torch rng too short": (
        edited(lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8))),
        "the resume state is not one izitorch wrote (rng: not a generator state (RuntimeError))",
    ),
    "numpy rng too short": (
        edited(lambda s: s["rng"]["numpy"].__setitem__(1, torch.zeros(3, dtype=torch.int64))),
        "the resume state is not one izitorch wrote (rng: not a generator state (IndexError))",
    ),
    "python rng wrong": (
        edited(lambda s: s["rng"].update(python=[3, torch.zeros(2, dtype=torch.int64), None])),
        "the resume state is not one izitorch wrote (rng: not a generator state (ValueError))",
    ),
    "format unknown": (
        edited(lambda s: s.update(format="x" * 100)),
        f'written by another izitorch version (format "{"x" * 60}..." (100 characters)); start over with --overwrite',
    ),
    "random bytes": (lambda f: f.write_bytes(os.urandom(4096)), "the resume state cannot be read ("),
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[:1000]), "the resume state cannot be read ("),
    "foreign object": (
        lambda f: torch.save({"format": 4, "x": Foreign()}, f),
        "the resume state cannot be read (UnpicklingError: it is damaged or not a file izitorch wrote)",
    ),
    "a plain pickle": (
        lambda f: f.write_bytes(pickle.dumps({"format": 4})),  # torch warns about its protocol
        "the resume state cannot be read (UnpicklingError: it is damaged or not a file izitorch wrote)",
    ),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_a_damaged_resume_state_is_one_line_without_torchs_advice(one_epoch_run, tmp_path, capsys, case):
    damage, expected = STATE_CASES[case]
    base, _ = one_epoch_run
    path, state_file = resume_with(tmp_path, base, damage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cli(capsys, "run", path, "--resume", "--set", "run.epochs=2")
    assert code == 2
    line = error_of(err)
    assert line.startswith(f"{state_file}: {expected}"), line
    assert line.endswith("start over with --overwrite")
    assert "weights_only" not in line and "weights_only" not in err
    assert not [w for w in caught if "torch" in w.filename or "weights_only" in str(w.message)], [str(w.message) for w in caught]


def test_the_undamaged_state_resumes(one_epoch_run, tmp_path, capsys):
    base, _ = one_epoch_run
    path, _ = resume_with(tmp_path, base, lambda f: None)
    code, _, err = cli(capsys, "run", path, "--resume", "--set", "run.epochs=2")
    assert (code, err) == (0, "")


def results_dir(tmp_path: Path, content: bytes) -> Path:
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    (res_dir / "results.json").write_bytes(content)
    return res_dir


GOOD = {"mlp": {"folds": 1, "mean": {"loss": 0.5, "accuracy": 90.0}, "std": {"loss": 0.0, "accuracy": 0.0}}}


@pytest.mark.parametrize(
    "content, expected",
    [
        (json.dumps(GOOD).encode()[:25], "not a results file izitorch wrote (JSONDecodeError: "),
        (bytes(range(256)) * 4, "not a results file izitorch wrote (UnicodeDecodeError: "),
        (b"", "not a results file izitorch wrote (JSONDecodeError: "),
        (b"[1, 2]", "expected a table of models, found a list; run the manifest again (--overwrite) to rewrite it"),
        (b'{"mlp": 3}', 'mlp.mean: expected the model\'s scores with a "mean" table, found 3;'),
        (b'{"mlp": {"mean": [1]}}', 'mlp.mean: expected the model\'s scores with a "mean" table, found a table;'),
        (b'{"mlp": {"mean": {"accuracy": "high"}}}', 'mlp.mean.accuracy: expected a number, found "high";'),
        (b'{"mlp": {"mean": {"loss": null}}}', "mlp.mean.loss: expected a number, found None;"),
    ],
)
def test_report_of_a_damaged_results_json_is_one_line(tmp_path, capsys, content, expected):
    res_dir = results_dir(tmp_path, content)
    code, out, err = cli(capsys, "report", res_dir)
    assert (code, out) == (2, "")
    assert error_of(err).startswith(f"{res_dir / 'results.json'}: {expected}")


def test_report_of_a_good_results_json_prints_the_table(tmp_path, capsys):
    res_dir = results_dir(tmp_path, json.dumps(GOOD).encode())
    code, out, err = cli(capsys, "report", res_dir)
    assert (code, err) == (0, "")
    assert "90.00" in out and "0.5000" in out


# -- command lines at random ------------------------------------------------------------------------

TOKENS = st.sampled_from(
    [
        "validate",
        "plugins",
        "report",
        "run",
        "--set",
        "--resume",
        "--overwrite",
        "--version",
        "--help",
        "-h",
        "--",
        "-",
        "--set=",
        "m.toml",
        "missing.toml",
        "res",
        "run.epochs=1e9",
        "run.rdm_seed=-1",
        "run.epochs=2",
        'plugins.enable=["x.y"]',
        "data.params={a={a={a=1}}}",
        "=",
        "[",
        "models[9].name=x",
    ]
)
ARGV = st.lists(st.one_of(TOKENS, st.text(max_size=12)), max_size=6).filter(lambda argv: "run" not in argv)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(argv=ARGV)
def test_any_command_line_is_one_line_or_success(tmp_path_factory, argv):
    """A random command line (never a training run) exits 0, or 2 with exactly one error line."""
    folder = tmp_path_factory.mktemp("argv")
    write(folder)
    (folder / "res").mkdir()
    before = os.getcwd()
    os.chdir(folder)
    try:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(before)
    assert "Traceback" not in err.getvalue()
    if code == 0:
        assert err.getvalue() == ""
    else:
        assert code == 2, (argv, err.getvalue())
        error_of(err.getvalue())
    assert sorted(p.name for p in folder.iterdir()) == ["m.toml", "res"]  # nothing written by validate/report/plugins
