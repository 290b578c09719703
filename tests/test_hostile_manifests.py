"""Hostile input, measured (issue 4): generated manifest TEXT never gives a traceback or a hang.

tests/test_manifest.py structures random dict trees; this file goes through the whole path a user
takes: bytes on disk -> ``load_manifest`` (TOML parser, overrides, schema, reference imports and
signatures) -> ``make_plugin_manager`` (plugin discovery, loading, options). Manifests come from
five families: a valid manifest with random mutations (keys deleted, renamed, retyped, moved,
unknown keys, bad references), random TOML trees, text-level garbling of serialized manifests,
raw token soup / bytes, and deep nesting. Each one either loads and configures, or raises an
``IzitorchError`` whose text is one printable line; anything else, or a hang, fails.

``IZITORCH_HYPOTHESIS_EXAMPLES`` sets the number of examples (300 by default); the counts go to
``/tmp/izitorch_hostile_report.txt``. Random strings hold neither ":" nor ".", so they can never
name a module to import; every importable name comes from the fixed lists below.

The last part replays every example line of README.md's "Errors you may meet" through the CLI.
"""

from __future__ import annotations

import collections
import copy
import datetime
import json
import os
import re
import signal
import socket
from pathlib import Path

import attrs
import pytest
import tomli_w
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from izitorch.cli import main
from izitorch.config import Config, DataConfig, ModelSpec, RunConfig
from izitorch.errors import IzitorchError, ManifestError
from izitorch.manifest import load_manifest
from izitorch.pluginmanager import available_plugins, make_plugin_manager

from conftest import ROOT, run_cli
from test_faults import MODELS, error_of

EXAMPLES = int(os.environ.get("IZITORCH_HYPOTHESIS_EXAMPLES", "300"))
REPORT = Path("/tmp/izitorch_hostile_report.txt")
HANG_SECONDS = 10

# -- the vocabulary: real names often, wrong ones sometimes --------------------------------------

SECTIONS = ["run", "data", "models", "plugins"]
RUN_KEYS = [f.name for f in attrs.fields(RunConfig)]
DATA_KEYS = [f.name for f in attrs.fields(DataConfig)]
MODEL_KEYS = [f.name for f in attrs.fields(ModelSpec)]
PLUGIN_NAMES = ["kfold", "checkpoint", "early_stop", "grad_clip", "holdout", "metrics", "trainlog", "console", "loop"]
PLUGIN_KEYS = ["enable", "disable", "k", "policy", "metric", "patience", "min_delta", "value", "max_norm", "norm_type"]
PARAM_KEYS = [
    "class",
    "lr",
    "momentum",
    "betas",
    "weight_decay",
    "hidden",
    "layers",
    "dropout",
    "num_classes",
    "in_features",
    "channels",
    "side",
    "batch_norm",
    "limit",
    "images",
    "normalize",
    "step_size",
    "gamma",
]
NAMES = sorted(set(SECTIONS + RUN_KEYS + DATA_KEYS + MODEL_KEYS + PLUGIN_NAMES + PLUGIN_KEYS + PARAM_KEYS))
GOOD_REFS = [
    "izitorch.datasets:digits",
    "izitorch.models:MLP",
    "izitorch.models:SmallCNN",
    "torch.nn:CrossEntropyLoss",
    "torch.nn:NLLLoss",
    "torch.optim:Adam",
    "torch.optim:SGD",
    "torch.optim.lr_scheduler:StepLR",
]
BAD_REFS = [
    "nope:Nope",
    "torch.nn:Nope",
    "x.py:Y",
    "models.py:Net",
    "../x.py:Y",
    "/nonexistent/x.py:Y",
    "torch.nn:Linar",
    "izitorch.models:MLP.nope",
    "izitorch.models:MLP.forward",
    "math:pi",
    "torch:nn",
    "izitorch.errors:IzitorchError",
    "builtins:dict",
    ":",
    "a:b:c",
    "izitorch.models:",
    ":MLP",
    "izitorch.models",
    "",
    " ",
    "torch.nn :Linear",
]
BAD_PLUGINS = [
    "kfodl",
    "no:console",
    "no:loop",
    "no:nope",
    "nope.py",
    "x.py",
    "izitorch.plugins.kfold",
    "izitorch.plugins.holdout",
    "izitorch.loop",
    "izitorch.nope",
    "os.path",
    "..",
    ".",
    "",
    "a.b",
]
CHOICES = [
    "auto",
    "cpu",
    "cuda",
    "cuda:7",
    "mps",
    "gpu",
    "sequential",
    "vectorized",
    "vectorised",
    "stop",
    "skip_batch",
    "raise",
    "last",
    "all",
    "best",
    "bets",
    "loss",
    "acc",
    "IoU",
    "iou",
    "accuracy",
]

# Random text holds neither ":" nor "." (never a module reference or a dotted plugin name).
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=":."), max_size=12)
KEY = st.sampled_from(NAMES) | TEXT
STRINGS = st.sampled_from(GOOD_REFS + BAD_REFS + BAD_PLUGINS + PLUGIN_NAMES + CHOICES) | TEXT
SCALARS = (
    st.booleans()
    | st.integers(min_value=-3, max_value=40)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | STRINGS
    | st.dates()
    | st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc))
    | st.times()
)
TREES = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(KEY, children, max_size=5), max_leaves=25)

# -- family 1: a valid manifest, mutated ---------------------------------------------------------

BASE = {
    "run": {"res_dir": "res", "epochs": 2, "batch_size": 32, "device": "cpu", "nan_policy": "stop"},
    "data": {"dataset": "izitorch.datasets:digits", "params": {"limit": 100}, "num_classes": 10, "train_ratio": 0.8},
    "models": [
        {
            "name": "mlp",
            "model": "izitorch.models:MLP",
            "params": {"hidden": 16},
            "optimizer": {"class": "torch.optim:Adam", "lr": 0.01},
            "criterion": "torch.nn:CrossEntropyLoss",
        },
        {
            "name": "cnn",
            "model": "izitorch.models:SmallCNN",
            "params": {"channels": 4},
            "scheduler": {"class": "torch.optim.lr_scheduler:StepLR", "step_size": 2},
        },
    ],
    "plugins": {"enable": ["early_stop"], "kfold": {"k": 3}, "checkpoint": {"policy": "best", "metric": "acc"}, "early_stop": {"patience": 2}},
}


def places(node, found=None):
    """Every (container, key) of a tree: where a mutation can act."""
    found = [] if found is None else found
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append((node, key))
        places(value, found)
    return found


PLUGIN_OPTIONS = {
    "k": st.integers(-1, 6),
    "policy": st.sampled_from(["last", "all", "best", "bets"]),
    "metric": st.sampled_from(["loss", "acc", "IoU", "iou", "accuracy", "f1"]),
    "patience": st.integers(-1, 3),
    "min_delta": st.floats(-1, 1),
    "value": st.floats(-1, 2),
    "max_norm": st.floats(-1, 2),
    "norm_type": st.floats(-1, 3) | st.just(float("inf")),
}


@st.composite
def mutated(draw, plugins_only: bool = False):
    """BASE with 0-4 mutations anywhere, or (``plugins_only``) in its [plugins] section only."""
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1 if plugins_only else 0, 4))):
        if plugins_only and isinstance(doc.get("plugins"), dict) and draw(st.booleans()):
            plugins = doc["plugins"]
            name = draw(st.sampled_from(PLUGIN_NAMES + BAD_PLUGINS))
            if draw(st.booleans()):
                plugins[draw(st.sampled_from(["enable", "disable"]))] = [name]
            else:
                options = draw(st.dictionaries(st.sampled_from(sorted(PLUGIN_OPTIONS)), st.none(), max_size=2))
                plugins[name] = {key: draw(PLUGIN_OPTIONS[key] | SCALARS) for key in options}
            continue
        spots = places(doc) if not plugins_only else [(doc, "plugins")] + places(doc["plugins"]) if "plugins" in doc else []
        if not spots:
            break
        node, key = draw(st.sampled_from(spots))
        op = draw(st.sampled_from(["delete", "set", "unknown", "rename", "wrap", "ref", "stringify", "move", "dup"]))
        value = node[key]
        if op == "delete":
            del node[key]
        elif op == "set":
            node[key] = draw(SCALARS | TREES)
        elif op == "unknown" and isinstance(value, dict):
            value[draw(KEY)] = draw(SCALARS)
        elif op == "rename" and isinstance(node, dict):
            new = draw(st.sampled_from(NAMES) | st.just(key[:-1]) | st.just(key + "s") | st.just(key.upper()))
            node[new] = node.pop(key)
        elif op == "wrap":
            node[key] = [value]
        elif op == "ref":
            node[key] = draw(st.sampled_from(GOOD_REFS + BAD_REFS))
        elif op == "stringify" and not isinstance(value, (dict, list)):
            node[key] = str(value)
        elif op == "move" and isinstance(node, dict):
            target = doc.get(draw(st.sampled_from(["run", "data", "plugins"])))
            if isinstance(target, dict):
                target[key] = node.pop(key)
        elif op == "dup" and isinstance(node, list):
            node.append(copy.deepcopy(value))
    return doc


def toml_text(doc: dict) -> str:
    return tomli_w.dumps(doc)


MUTATED_TEXT = mutated().map(toml_text)
PLUGINS_TEXT = mutated(plugins_only=True).map(toml_text)
TREE_TEXT = st.dictionaries(st.sampled_from(SECTIONS) | KEY, TREES, max_size=5).map(toml_text)

# -- family 2: text-level garbling, token soup, bytes, deep nesting -------------------------------

TOKENS = [
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    ",",
    '"',
    "'",
    '"""',
    "'''",
    "\n",
    "\r\n",
    "\r",
    "\t",
    " ",
    "#",
    "\\",
    "\\u12",
    "\\U0010FFFF",
    "0x",
    "0o8",
    "1e400",
    "-",
    "+",
    "inf",
    "nan",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "07:32",
    "\x00",
    "\x7f",
    "\u2028",
    "\ufeff",
    "é",
    "models",
    "[run]",
    "[data]",
    "[[models]]",
    "[plugins]",
    "[plugins.kfold]",
    "epochs = ",
    "name = ",
    "model = ",
    'dataset = "izitorch.datasets:digits"',
    "k = 1",
    'enable = ["kfold"]',
    "run.epochs = 3",
    "params = {",
    "3",
    "-1",
    "0.5",
]
SNIPPET = st.sampled_from(TOKENS) | TEXT


@st.composite
def garbled(draw):
    text = draw(MUTATED_TEXT)
    for _ in range(draw(st.integers(1, 5))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "truncate", "dupline", "swaplines"]))
        if op == "insert":
            text = text[:pos] + draw(SNIPPET) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 20)) :]
        elif op == "truncate":
            text = text[:pos]
        else:
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "dupline":
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


SOUP = st.lists(SNIPPET, max_size=40).map("".join)
BYTES = st.binary(max_size=200).map(lambda b: b.replace(b":", b";").replace(b".", b","))


@st.composite
def deep(draw):
    depth = draw(st.integers(1, 3000))
    kind = draw(st.sampled_from(["array", "inline", "dotted", "headers"]))
    where = draw(
        st.sampled_from(
            [
                '[data]\ndataset = "izitorch.datasets:digits"\nparams = { limit = ',
                "x = ",
                "[run]\nepochs = ",
                '[[models]]\nname = "m"\nmodel = "izitorch.models:MLP"\nparams = ',
            ]
        )
    )
    if kind == "array":
        return where + "[" * depth + "1" + "]" * depth + ("}" if where.endswith("{ limit = ") else "") + "\n"
    if kind == "inline":
        return where + "{a = " * depth + "1" + " }" * depth + ("}" if where.endswith("{ limit = ") else "") + "\n"
    if kind == "dotted":
        return "[plugins]\n" + ".".join(["kfold"] * min(depth, 400)) + " = 1\n"
    return "".join(f"[{'.'.join(['run'] * (i + 1))}]\n" for i in range(min(depth, 60)))


DOCUMENTS = st.one_of(
    MUTATED_TEXT,
    MUTATED_TEXT,
    PLUGINS_TEXT,
    PLUGINS_TEXT,
    TREE_TEXT,
    TREE_TEXT,
    garbled(),
    garbled(),
    SOUP,
    BYTES,
    deep(),
)

# -- the property ---------------------------------------------------------------------------------

STATS: collections.Counter = collections.Counter()
SHAPES: set[str] = set()


class Hang(BaseException):
    """Raised by SIGALRM when one example takes longer than HANG_SECONDS (not caught by izitorch)."""


def _alarm(_signum, _frame):
    raise Hang(f"no answer within {HANG_SECONDS} s")


def check_one_line(error: IzitorchError, path: Path) -> None:
    text = str(error)
    assert text and text.isprintable() and len(text.splitlines()) == 1, repr(text)
    if isinstance(error, ManifestError) and error.source:
        assert text.startswith(f"{path}: ") and len(text) > len(f"{path}: "), text


def load_and_configure(path: Path) -> str:
    """``"configured"``, or the stage that refused the manifest with a one-line IzitorchError."""
    try:
        config = load_manifest(path)
    except IzitorchError as error:
        check_one_line(error, path)
        SHAPES.add(re.sub(r'"[^"]*"|\S*\d\S*', "_", str(error)[len(str(path)) :])[:60])
        return "refused by load_manifest"
    assert isinstance(config, Config) and config.models and config.run.epochs >= 1
    try:
        _, versions = make_plugin_manager(config)
    except IzitorchError as error:
        check_one_line(error, path)
        SHAPES.add(re.sub(r'"[^"]*"|\S*\d\S*', "_", str(error))[:60])
        return "refused by make_plugin_manager"
    assert list(versions)[0] == "loop"
    return "configured"


@pytest.fixture(scope="module")
def warm():
    """Import what the examples import, so that the first example is not slow; write the report."""
    for entry_point in available_plugins().values():
        entry_point.load()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"izitorch_warm_{os.getpid()}.toml"
    path.write_text(toml_text(BASE))
    try:
        assert list(make_plugin_manager(load_manifest(path))[1]) == ["loop", "holdout", "metrics", "checkpoint", "trainlog", "console", "early_stop", "kfold"]
    finally:
        path.unlink()
    yield
    outcome = ", ".join(f"{key}: {count}" for key, count in sorted(STATS.items()) if key != "total")
    REPORT.write_text(f"hostile manifests tried: {STATS['total']} ({outcome}); distinct message shapes: {len(SHAPES)}\n")


@settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS)
def test_hostile_manifest_loads_or_fails_with_one_line(tmp_path_factory, warm, document):
    folder = tmp_path_factory.mktemp("hostile", numbered=True)
    path = folder / "m.toml"
    if isinstance(document, bytes):
        path.write_bytes(document)
    else:
        path.write_text(document, encoding="utf-8", newline="")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        outcome = load_and_configure(path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    STATS["total"] += 1
    STATS[outcome] += 1


def test_the_generator_reaches_every_outcome(tmp_path_factory, warm):
    """The families above are not degenerate: valid manifests, and refusals at both stages."""
    if STATS["total"] < EXAMPLES // 2:  # run alone (-k): generate first
        test_hostile_manifest_loads_or_fails_with_one_line(tmp_path_factory, warm)
    assert STATS["total"] >= EXAMPLES // 2
    for outcome in ("configured", "refused by load_manifest", "refused by make_plugin_manager"):
        assert STATS[outcome] > 0, dict(STATS)
    assert len(SHAPES) >= 20, SHAPES


MINIMAL = '[data]\ndataset = "izitorch.datasets:digits"\n[[models]]\nname = "m"\nmodel = "izitorch.models:MLP"\n'


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x = " + "[" * 3000 + "]" * 3000 + "\n", "invalid TOML: arrays or inline tables nested too deeply"),
        ("[data]\nparams = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "invalid TOML: arrays or inline tables nested too deeply"),
        (
            '[plugins]\nenable = ["izitorch.plugins.kfold", "kfold"]\n[data]\ndataset = "izitorch.datasets:digits"\n'
            '[[models]]\nname = "m"\nmodel = "izitorch.models:MLP"\n',
            None,
        ),
        (
            '[plugins]\nenable = ["izitorch.plugins.holdout"]\n[data]\ndataset = "izitorch.datasets:digits"\n'
            '[[models]]\nname = "m"\nmodel = "izitorch.models:MLP"\n',
            'plugins.enable: plugin "izitorch.plugins.holdout" is the plugin "holdout", already enabled; name it once',
        ),
        (
            '[plugins]\nenable = ["izitorch.loop"]\n[data]\ndataset = "izitorch.datasets:digits"\n[[models]]\nname = "m"\nmodel = "izitorch.models:MLP"\n',
            'plugins.enable: plugin "izitorch.loop" is the plugin "loop", already enabled; name it once',
        ),
        (
            '[plugins]\nenable = ["a\\nb.c"]\n[data]\ndataset = "izitorch.datasets:digits"\n[[models]]\nname = "m"\nmodel = "izitorch.models:MLP"\n',
            "plugins.enable: plugin \"a\\nb.c\" failed to load: ModuleNotFoundError: No module named 'a\\nb'",
        ),
        (MINIMAL + '[plugins]\nenable = ["kfold", 3]\n', "plugins.enable: expected a list of plugin names (strings), found 3 in it"),
        (MINIMAL + '[plugins]\nenable = ["nope.py"]\n', 'plugins.enable: file "nope.py" not found (looked in {dir})'),
        (
            MINIMAL.replace('"izitorch.models:MLP"', '"izitorch.models:MLP"\nscheduler = ":MLP"'),
            'models[0].scheduler: expected a reference "module:attr" or "file.py:attr", got ":MLP"',
        ),
    ],
)
def test_examples_the_generator_found(tmp_path, text, expected):
    """Each of these once escaped as a traceback (RecursionError, pluggy's ValueError), printed two
    lines, or named the wrong key ("got a list" for a list of non-strings, ``scheduler.target``)."""
    path = tmp_path / "m.toml"
    path.write_text(text)
    if expected is None:  # the same plugin class twice, under two names: two instances, allowed
        config = load_manifest(path)
        assert list(make_plugin_manager(config)[1])[-2:] == ["izitorch.plugins.kfold", "kfold"]
        return
    with pytest.raises(IzitorchError) as info:
        make_plugin_manager(load_manifest(path))
    check_one_line(info.value, path)
    expected = expected.format(dir=tmp_path.resolve())
    assert str(info.value) in (expected, f"{path}: {expected}")


@seed(20261125)
@settings(max_examples=4, deadline=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
@given(document=st.one_of(MUTATED_TEXT, garbled(), TREE_TEXT))
def test_the_cli_validate_prints_the_same_one_line(tmp_path_factory, document):
    """``izitorch validate`` on generated manifests: exit 2 and the in-process message, or OK."""
    path = tmp_path_factory.mktemp("cli", numbered=True) / "m.toml"
    path.write_text(document, encoding="utf-8", newline="")
    try:
        expected = None
        make_plugin_manager(load_manifest(path))
    except IzitorchError as error:
        expected = error
    done = run_cli("validate", str(path), env={"OMP_NUM_THREADS": "1"}, timeout=60)
    if expected is None:  # at most the warning of choices made on the test set (BASE has no validation set)
        assert done.returncode == 0 and len(done.stderr.splitlines()) <= 1, done.stderr
        assert done.stderr in ("", *(line + "\n" for line in done.stderr.splitlines() if line.startswith("izitorch: warning: "))), done.stderr
        assert done.stdout.startswith(f"{path}: OK (")
    else:
        assert done.returncode == expected.exit_code == 2
        assert error_of(done.stderr) == str(expected)


# -- README "Errors you may meet": every line is produced by the CLI -------------------------------


def readme_error_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Errors you may meet", 1)[1]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


README_LINES = readme_error_lines()

README_MANIFEST = """\
[run]
res_dir = "results/digits"
epochs = 3
batch_size = 32
display_step = 1000

[data]
dataset = "izitorch.datasets:digits"
params = { limit = 300 }
num_classes = 10

[[models]]
name = "mlp"
model = "izitorch.models:MLP"
params = { hidden = 16 }
optimizer = { class = "torch.optim:Adam", lr = 1e-2 }
"""
RESIZABLE_DIGITS = """\
from pathlib import Path
from izitorch.datasets import digits

def make():
    return digits(limit=int((Path(__file__).parent / "size.txt").read_text()))
"""
FLAKY_MLP = ['models[0].model="models.py:Flaky"']  # 300 digits: 240 training samples, 8 steps per epoch

PLATEAU_MIN = 'class="torch.optim.lr_scheduler:ReduceLROnPlateau", mode="min"'
ONE_CYCLE = 'class="torch.optim.lr_scheduler:OneCycleLR", max_lr=0.1, total_steps=10, interval="step"'  # 3 epochs of 8 steps

# README line prefix -> (exit code, manifest text or None for README_MANIFEST, runs before, argv)
README_CASES = {
    "m.toml: invalid TOML": (2, '[run]\nres_dir = "r"\nepochs 3\n', [], ["validate", "m.toml"]),
    "m.toml: run.epoch:": (2, None, [], ["validate", "m.toml", "--set", "run.epoch=3"]),
    "m.toml: run.epochs:": (2, None, [], ["validate", "m.toml", "--set", 'run.epochs="3"']),
    "m.toml: data.train_ratio:": (2, None, [], ["validate", "m.toml", "--set", "data.train_ratio=1.5"]),
    "m.toml: models[0].optimizer.lr:": (2, None, [], ["validate", "m.toml", "--set", 'models[0].optimizer.lr="fast"']),
    "m.toml: models[0].model:": (2, None, [], ["validate", "m.toml", "--set", 'models[0].model="torch.nn:Linar"']),
    "m.toml: models[0].params.hiden:": (2, None, [], ["validate", "m.toml", "--set", "models[0].params.hiden=16"]),
    "m.toml: models[0].scheduler:": (2, None, [], ["validate", "m.toml", "--set", 'models[0].scheduler="torch.optim.lr_scheduler:StepLR"']),
    "m.toml: models[0].optimizer.class:": (2, None, [], ["validate", "m.toml", "--set", 'models[0].optimizer={class="torch.nn:Linear", lr=0.1}']),
    "m.toml: models[0].scheduler.mode:": (
        2,
        None,
        [],
        ["validate", "m.toml", "--set", "data.validation=true", "--set", 'run.best_metric="acc"', "--set", f"models[0].scheduler={{{PLATEAU_MIN}}}"],
    ),
    "m.toml: models[0].scheduler.total_steps:": (
        2,
        None,
        [],
        ["run", "m.toml", "--set", f"models[0].scheduler={{{ONE_CYCLE}}}"],
    ),
    "m.toml: plugins.checkpoint.top_k:": (2, None, [], ["validate", "m.toml", "--set", "plugins.checkpoint.top_k=3"]),
    "m.toml: models[1].name:": (2, README_MANIFEST + '\n[[models]]\nname = "mlp"\nmodel = "izitorch.models:SmallCNN"\n', [], ["validate", "m.toml"]),
    "m.toml: plugins.enable:": (2, None, [], ["validate", "m.toml", "--set", 'plugins.enable=["kfodl"]']),
    "m.toml: plugins.kfold.k:": (2, None, [], ["validate", "m.toml", "--set", "plugins.kfold.k=1"]),
    "m.toml: plugins.checkpoint.metric:": (2, None, [], ["validate", "m.toml", "--set", 'plugins.checkpoint.metric="f2"']),
    "m.toml: run.task:": (2, None, [], ["validate", "m.toml", "--set", 'run.task="regression"']),
    'm.toml: run.res_dir: res_dir "results/digits" already': (2, None, [["run", "m.toml", "--set", "run.epochs=1"]], ["run", "m.toml"]),
    'm.toml: run.res_dir: res_dir "." is': (2, None, [], ["run", "m.toml", "--set", 'run.res_dir="."']),
    'm.toml: run.res_dir: res_dir "results/digits" holds': (2, None, ["foreign"], ["run", "m.toml"]),
    "m.toml: models[0].name:": (2, None, [], ["validate", "m.toml", "--set", 'models[0].name=".."']),
    'm.toml: res_dir "results/digits" is in use': (2, None, ["lock"], ["run", "m.toml"]),
    "m.toml: cannot resume: data.dataset": (
        2,
        README_MANIFEST.replace('"izitorch.datasets:digits"\nparams = { limit = 300 }', '"data.py:make"'),
        [["run", "m.toml", "--set", "run.epochs=1"], "shrink"],
        ["run", "m.toml", "--resume"],
    ),
    "m.toml: cannot resume: models": (
        2,
        None,
        [["run", "m.toml", "--set", "run.epochs=1"]],
        ["run", "m.toml", "--resume", "--set", "models[0].params.hidden=32"],
    ),
    "m.toml: data.num_classes:": (2, None, [], ["run", "m.toml", "--set", "data.num_classes=5"]),
    "m.toml: run.rdm_seed:": (2, None, [], ["validate", "m.toml", "--set", "run.rdm_seed=-1"]),
    "m.toml: data.stratify:": (2, None, [], ["validate", "m.toml", "--set", "data.params={limit=50}", "--set", "plugins.kfold.k=5"]),
    "m.toml: data.group_by:": (2, None, [], ["validate", "m.toml", "--set", 'data.group_by="ward"', "--set", "plugins.kfold.k=3"]),
    "m.toml: data.sampler.replacment:": (
        2,
        None,
        [],
        ["validate", "m.toml", "--set", 'data.sampler={class="torch.utils.data:RandomSampler", replacment=true}'],
    ),
    "argument --set:": (2, None, [], ["validate", "m.toml", "--set"]),
    "m.toml: model mlp: loss is nan": (
        1,
        None,
        [],
        ["run", "m.toml", "--set", 'run.nan_policy="raise"', "--set", FLAKY_MLP[0], "--set", "models[0].params.nan_from=23"],
    ),
    "interrupted by SIGINT": (130, None, [], ["run", "m.toml", "--set", FLAKY_MLP[0], "--set", "models[0].params.sigint_at=12"]),
    "m.toml: model cnn: output (4, 3) has 3 classes": (
        1,
        None,
        [],
        ["run", "m.toml", "--set", 'models[0].name="cnn"', "--set", 'models[0].model="izitorch.models:SmallCNN"', "--set", "models[0].params={num_classes=3}"],
    ),
}


def readme_pattern(line: str) -> str:
    """The README line as a regex; only a pid, a host, a time and a label vary."""
    pattern = re.escape(line)
    pattern = pattern.replace(r"pid\ 4242\ on\ host,\ since\ 2026\-11\-25T02:10:00", r"pid\ \d+\ on\ \S+,\ since\ \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
    pattern = re.sub(r"labels\\ [0-9a-f]{12}", r"labels\\ [0-9a-f]{12}", pattern)
    return pattern.replace(r"Target\ 7\ is", r"Target\ \d+\ is")


def case_of(line: str) -> str:
    keys = [key for key in README_CASES if line.startswith(key)]
    assert len(keys) == 1, f"README line without exactly one case here: {line}"
    return keys[0]


def test_every_readme_error_line_has_a_case():
    assert len(README_LINES) >= 15
    assert sorted(case_of(line) for line in README_LINES) == sorted(README_CASES)


@pytest.mark.parametrize("line", README_LINES, ids=lambda line: line[:40])
def test_the_cli_prints_the_readme_error_line(line, tmp_path, monkeypatch, capsys):
    code, text, before, argv = README_CASES[case_of(line)]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models.py").write_text(MODELS, encoding="utf-8")
    (tmp_path / "m.toml").write_text(text or README_MANIFEST, encoding="utf-8")
    (tmp_path / "data.py").write_text(RESIZABLE_DIGITS, encoding="utf-8")
    (tmp_path / "size.txt").write_text("300")
    for step in before:
        if step == "lock":  # a live process (this one's parent) holds the lock of res_dir
            lock = tmp_path / "results" / "digits" / ".izitorch.lock"
            lock.parent.mkdir(parents=True)
            lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-11-25T02:10:00"}))
        elif step == "foreign":  # a folder of the user's
            (tmp_path / "results" / "digits").mkdir(parents=True)
            (tmp_path / "results" / "digits" / "raw.csv").write_text("a,b\n")
        elif step == "shrink":  # the dataset changes behind the saved run
            (tmp_path / "size.txt").write_text("200")
        else:
            assert main(step) == 0
    capsys.readouterr()
    assert main(argv) == code
    message = error_of(capsys.readouterr().err)
    assert re.fullmatch(readme_pattern(line), message), f"\n{message}\n{line}"
