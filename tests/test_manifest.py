"""The manifest: a catalogue of bad manifests and their one-line messages, overrides, defaults.

Every mistake must surface as an :class:`izitorch.errors.ManifestError` (or another
``IzitorchError``) whose text is a single line ``<file>: <key.path>: <cause and fix>``.
"""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from izitorch.config import ComponentSpec, Config, DataConfig, ModelSpec, PluginsConfig, RunConfig
from izitorch.errors import IzitorchError, ManifestError
from izitorch.manifest import config_from_dict, load_manifest
from izitorch.pluginmanager import make_plugin_manager
from izitorch.references import resolve

from conftest import TINY_MANIFEST

DATASET = 'dataset = "izitorch.datasets:digits"\n'
MLP = '[[models]]\nname = "mlp"\nmodel = "izitorch.models:MLP"\n'


def manifest(run: str = "", data: str = "", model: str = "", tail: str = "", models: str | None = None) -> str:
    """A small valid manifest with extra lines in [run], [data], the one model, or after it all."""
    models_text = MLP + model + "\n" if models is None else models
    return f"[run]\n{run}\n\n[data]\n{DATASET}{data}\n\n{models_text}\n{tail}"


def model(name: str = "mlp", ref: str = "izitorch.models:MLP", extra: str = "") -> str:
    return f'[[models]]\nname = "{name}"\nmodel = "{ref}"\n{extra}\n'


# (id, manifest text, expected message after "<file>: "); a compiled pattern is matched in full.
# "{dir}" stands for the manifest's folder, resolved.
CATALOGUE = [
    # -- the file itself
    ("invalid-toml", "[run\nepochs = 3\n", re.compile(r"invalid TOML: .+ \(at line 1, column 5\)")),
    ("invalid-toml-value", "[run]\nepochs = three\n", re.compile(r"invalid TOML: .+ \(at line 2, column 10\)")),
    ("duplicate-key", "[run]\nepochs = 1\nepochs = 2\n", re.compile(r"invalid TOML: .+ \(at line 3, column .+\)")),
    # -- sections
    ("unknown-section", manifest(tail="[plugin]\nenable = []\n"), 'plugin: unknown section "plugin" (did you mean "plugins"?)'),
    ("unknown-section-no-close-match", manifest(tail="[training]\nlr = 1\n"), 'training: unknown section "training"'),
    ("run-not-a-table", "run = 3\n[data]\n" + DATASET + MLP, "run: expected a table ([run]), got 3"),
    # -- unknown keys
    ("unknown-run-key", manifest(run="epoch = 3"), 'run.epoch: unknown key "epoch" (did you mean "epochs"?)'),
    ("unknown-data-key", manifest(data="num_class = 3"), 'data.num_class: unknown key "num_class" (did you mean "num_classes"?)'),
    ("unknown-model-key", manifest(model='optimiser = "torch.optim:SGD"'), 'models[0].optimiser: unknown key "optimiser" (did you mean "optimizer"?)'),
    ("unknown-run-key-original-name", manifest(run="seed = 3"), 'run.seed: unknown key "seed" (did you mean "rdm_seed"?)'),
    # -- scalar types
    ("string-for-int", manifest(run='epochs = "3"'), 'run.epochs: expected an integer, got "3"'),
    ("float-for-int", manifest(run="batch_size = 3.5"), "run.batch_size: expected an integer, got 3.5 (a float): write an integer"),
    ("bool-for-int", manifest(run="epochs = true"), "run.epochs: expected an integer, got true"),
    ("int-for-bool", manifest(run="shuffle = 1"), "run.shuffle: expected true or false, got 1"),
    ("string-for-bool", manifest(data='validation = "yes"'), 'data.validation: expected true or false, got "yes"'),
    ("bool-for-number", manifest(data="train_ratio = true"), "data.train_ratio: expected a number, got true"),
    ("int-for-string", manifest(run="res_dir = 3"), "run.res_dir: expected a string, got 3"),
    ("list-for-table", manifest(data="params = [1, 2]"), "data.params: expected a table, got a list"),
    # -- ranges
    ("epochs-0", manifest(run="epochs = 0"), "run.epochs: expected an integer >= 1, got 0"),
    ("batch-size-0", manifest(run="batch_size = 0"), "run.batch_size: expected an integer >= 1, got 0"),
    ("train-ratio-0", manifest(data="train_ratio = 0"), "data.train_ratio: expected a number between 0 and 1 (exclusive), got 0.0"),
    ("train-ratio-1", manifest(data="train_ratio = 1"), "data.train_ratio: expected a number between 0 and 1 (exclusive), got 1.0"),
    ("train-ratio-1.5", manifest(data="train_ratio = 1.5"), "data.train_ratio: expected a number between 0 and 1 (exclusive), got 1.5"),
    ("test-epoch-0", manifest(run="test_epoch = 0"), "run.test_epoch: expected an integer >= 1, got 0"),
    ("display-step-0", manifest(run="display_step = 0"), "run.display_step: expected an integer >= 1, got 0"),
    ("num-workers-negative", manifest(run="num_workers = -1"), "run.num_workers: expected an integer >= 0, got -1"),
    ("flush-interval-negative", manifest(run="flush_interval = -1"), "run.flush_interval: expected a number of seconds >= 0, got -1.0"),
    ("flush-interval-nan", manifest(run="flush_interval = nan"), "run.flush_interval: expected a number of seconds >= 0, got nan"),
    ("num-classes-1", manifest(data="num_classes = 1"), "data.num_classes: expected an integer >= 2, got 1"),
    # -- choices
    ("bad-device", manifest(run='device = "gpu"'), 'run.device: expected "auto", "cpu", "cuda", "cuda:<index>" or "mps", got "gpu"'),
    ("bad-device-index", manifest(run='device = "cuda:x"'), 'run.device: expected "auto", "cpu", "cuda", "cuda:<index>" or "mps", got "cuda:x"'),
    ("device-with-trailing-newline", manifest(run='device = "cpu\\n"'), 'run.device: expected "auto", "cpu", "cuda", "cuda:<index>" or "mps", got "cpu\\n"'),
    (
        "bad-multi-model",
        manifest(run='multi_model = "vectorised"'),
        'run.multi_model: expected one of "auto", "sequential", "vectorized", got "vectorised" (did you mean "vectorized"?)',
    ),
    # -- [[models]]
    ("no-models", manifest(models=""), "models: no [[models]] entry: a run needs at least one model"),
    ("empty-models-array", "models = []\n" + manifest(models=""), "models: expected at least one [[models]] entry"),
    ("models-as-table", manifest(models='[models]\nname = "a"\nmodel = "izitorch.models:MLP"\n'), "models: expected an array of tables ([[models]] entries)"),
    ("models-item-not-table", "models = [1]\n" + manifest(models=""), "models[0]: expected a table, got 1"),
    (
        "duplicate-model-names",
        manifest(models=model("a") + model("b") + model("a")),
        'models[2].name: duplicate model name "a"; every model needs its own name',
    ),
    (
        "bad-model-name",
        manifest(models=model("my model")),
        "models[0].name: expected a name made of letters, digits, '_', '-', '.', '+' (it names a folder), got \"my model\"",
    ),
    (
        "model-name-with-trailing-newline",
        manifest(models=model("mlp\\n")),
        "models[0].name: expected a name made of letters, digits, '_', '-', '.', '+' (it names a folder), got \"mlp\\n\"",
    ),
    ("model-name-missing", manifest(models='[[models]]\nmodel = "izitorch.models:MLP"\n'), 'models[0].name: missing required key "name"'),
    ("model-reference-missing", manifest(models='[[models]]\nname = "a"\n'), 'models[0].model: missing required key "model"'),
    (
        "model-reference-malformed",
        manifest(models=model(ref="izitorch.models.MLP")),
        'models[0].model: expected a reference "module:attr" or "file.py:attr", got "izitorch.models.MLP"',
    ),
    (
        "model-reference-empty-attr",
        manifest(models=model(ref="izitorch.models:")),
        'models[0].model: expected a reference "module:attr" or "file.py:attr", got "izitorch.models:"',
    ),
    (
        "model-reference-date",
        manifest(models='[[models]]\nname = "a"\nmodel = 1979-05-27\n'),
        'models[0].model: expected a reference "module:attr" or "file.py:attr", got datetime.date(1979, 5, 27)',
    ),
    (
        "model-module-not-importable",
        manifest(models=model(ref="izitorch.modelz:MLP")),
        "models[0].model: cannot import module \"izitorch.modelz\" (No module named 'izitorch.modelz'); check the spelling or install it",
    ),
    (
        "model-attribute-missing",
        manifest(models=model(ref="izitorch.models:MPL")),
        'models[0].model: "izitorch.models" has no attribute "MPL" (did you mean "MLP"?)',
    ),
    (
        "model-not-callable",
        manifest(models=model(ref="izitorch.pluginmanager:DEFAULT_PLUGINS")),
        'models[0].model: "izitorch.pluginmanager:DEFAULT_PLUGINS" is not callable',
    ),
    (
        "second-model-bad",
        manifest(models=model("a") + model("b", "izitorch.models:SmallCN")),
        'models[1].model: "izitorch.models" has no attribute "SmallCN" (did you mean "SmallCNN"?)',
    ),
    (
        "unknown-model-param",
        manifest(model="params = { hiden = 3 }"),
        'models[0].params.hiden: unexpected argument "hiden" for izitorch.models.MLP (did you mean "hidden"?)',
    ),
    ("model-param-wrong-type", manifest(model='params = { hidden = "big" }'), 'models[0].params.hidden: expected a number, got "big"'),
    (
        "missing-required-param",
        manifest(models=model(ref="torch.nn:Linear", extra="params = { in_features = 3 }")),
        'models[0].params: missing argument "out_features" for torch.nn.modules.linear.Linear',
    ),
    ("model-file-missing", manifest(models=model(ref="nofile.py:Net")), 'models[0].model: file "nofile.py" not found (looked in {dir})'),
    # -- criterion / optimizer / scheduler
    (
        "optimizer-without-class",
        manifest(model="optimizer = { lr = 0.1 }"),
        'models[0].optimizer: expected a table with a "class" key, e.g. { class = "torch.optim:Adam", lr = 1e-3 }',
    ),
    ("optimizer-lr-string", manifest(model='optimizer = { class = "torch.optim:Adam", lr = "fast" }'), 'models[0].optimizer.lr: expected a number, got "fast"'),
    (
        "optimizer-unknown-argument",
        manifest(model='optimizer = { class = "torch.optim:SGD", lr = 0.1, momentun = 0.9 }'),
        'models[0].optimizer.momentun: unexpected argument "momentun" for torch.optim.sgd.SGD (did you mean "momentum"?)',
    ),
    ("optimizer-a-number", manifest(model="optimizer = 3"), 'models[0].optimizer: expected a reference "module:attr" or a table with a "class" key, got 3'),
    (
        "optimizer-class-malformed",
        manifest(model='optimizer = { class = "Adam" }'),
        'models[0].optimizer.class: expected a reference "module:attr" or "file.py:attr", got "Adam"',
    ),
    (
        "scheduler-missing-argument",
        manifest(model='scheduler = { class = "torch.optim.lr_scheduler:StepLR" }'),
        'models[0].scheduler: missing argument "step_size" for torch.optim.lr_scheduler.StepLR',
    ),
    (
        "criterion-bad-reference",
        manifest(model='criterion = "torch.nn:CrossEntropyLos"'),
        'models[0].criterion: "torch.nn" has no attribute "CrossEntropyLos" (did you mean "CrossEntropyLoss"?)',
    ),
    (
        "criterion-module-missing",
        manifest(model='criterion = "torch.nnn:CrossEntropyLoss"'),
        "models[0].criterion: cannot import module \"torch.nnn\" (No module named 'torch.nnn'); check the spelling or install it",
    ),
    # -- [data]
    ("dataset-missing", "[run]\n\n" + MLP, 'data.dataset: missing: name a dataset, e.g. dataset = "izitorch.datasets:digits"'),
    (
        "dataset-unknown-param",
        manifest(data="params = { limt = 3 }"),
        'data.params.limt: unexpected argument "limt" for izitorch.datasets.digits (did you mean "limit"?)',
    ),
    ("dataset-param-wrong-type", manifest(data='params = { normalize = "no" }'), 'data.params.normalize: expected true or false, got "no"'),
    # -- [plugins]
    (
        "unknown-plugin-enabled",
        manifest(tail='[plugins]\nenable = ["kfld"]\n'),
        'plugins.enable: unknown plugin "kfld" (did you mean "kfold"?); `izitorch plugins` lists the installed ones',
    ),
    ("enable-not-a-list", manifest(tail='[plugins]\nenable = "kfold"\n'), 'plugins.enable: expected a list of plugin names, got "kfold"'),
    ("disable-loop", manifest(tail='[plugins]\ndisable = ["loop"]\n'), 'plugins.disable: "loop" is the essential plugin and cannot be disabled'),
    (
        "disable-unknown-plugin",
        manifest(tail='[plugins]\ndisable = ["consol"]\n'),
        'plugins.disable: unknown plugin "consol" (did you mean "console"?); `izitorch plugins` lists them',
    ),
    ("table-for-unknown-plugin", manifest(tail="[plugins.xyz]\na = 1\n"), 'plugins.xyz: unknown plugin "xyz"; `izitorch plugins` lists the installed ones'),
    (
        "table-for-misspelled-plugin",
        manifest(tail="[plugins.kfodl]\nk = 3\n"),
        'plugins.kfodl: unknown plugin "kfodl" (did you mean "kfold"?); `izitorch plugins` lists the installed ones',
    ),
    (
        "table-for-disabled-plugin",
        manifest(tail='[plugins]\ndisable = ["checkpoint"]\n[plugins.checkpoint]\npolicy = "best"\n'),
        'plugins.checkpoint: [plugins.checkpoint] configures a plugin that is disabled; remove the table or the "disable" entry',
    ),
    (
        "plugin-entry-not-table",
        manifest(tail="[plugins]\nkfold = 3\n"),
        "plugins.kfold: expected a table [plugins.kfold] (or the lists enable / disable), got 3",
    ),
    ("kfold-k-1", manifest(tail="[plugins.kfold]\nk = 1\n"), "plugins.kfold.k: expected an integer >= 2, got 1"),
    ("kfold-k-string", manifest(tail='[plugins.kfold]\nk = "5"\n'), 'plugins.kfold.k: expected an integer, got "5"'),
    ("kfold-unknown-key", manifest(tail="[plugins.kfold]\nkk = 3\n"), 'plugins.kfold.kk: unknown key "kk" (did you mean "k"?)'),
    (
        "checkpoint-policy",
        manifest(tail='[plugins.checkpoint]\npolicy = "bets"\n'),
        'plugins.checkpoint.policy: expected one of "last", "all", "best", "best_and_last", got "bets" (did you mean "best"?)',
    ),
    (
        "checkpoint-unknown-key",
        manifest(tail='[plugins.checkpoint]\nmetric_best = "acc"\n'),
        'plugins.checkpoint.metric_best: unknown key "metric_best" (did you mean "metric"?)',
    ),
    (
        "grad-clip-both",
        manifest(tail="[plugins.grad_clip]\nvalue = 1.0\nmax_norm = 1.0\n"),
        "plugins.grad_clip: set exactly one of value (clip each element) or max_norm (clip the norm)",
    ),
    (
        "grad-clip-neither",
        manifest(tail="[plugins.grad_clip]\n"),
        "plugins.grad_clip: set exactly one of value (clip each element) or max_norm (clip the norm)",
    ),
    ("grad-clip-negative", manifest(tail="[plugins.grad_clip]\nvalue = -1.0\n"), "plugins.grad_clip.value: expected a number > 0, got -1.0"),
    ("grad-clip-string", manifest(tail='[plugins.grad_clip]\nmax_norm = "big"\n'), 'plugins.grad_clip.max_norm: expected a number, got "big"'),
    ("early-stop-patience-0", manifest(tail="[plugins.early_stop]\npatience = 0\n"), "plugins.early_stop.patience: expected an integer >= 1, got 0"),
]


def load_and_configure(path: Path) -> Config:
    """What ``izitorch validate`` does: load the manifest, then configure every enabled plugin."""
    config = load_manifest(path)
    make_plugin_manager(config)
    return config


def assert_one_line_error(error: BaseException, path: Path, expected) -> None:
    assert isinstance(error, IzitorchError), f"{type(error).__name__}: {error}"
    text = str(error)
    assert "\n" not in text and "\r" not in text, text
    prefix = f"{path}: "
    assert text.startswith(prefix), text
    message = text[len(prefix) :]
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(message), message
    else:
        assert message == expected.replace("{dir}", str(path.parent.resolve()))


def test_the_catalogue_is_big_and_unique():
    ids = [case[0] for case in CATALOGUE]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("text, expected", [case[1:] for case in CATALOGUE], ids=[case[0] for case in CATALOGUE])
def test_bad_manifest_gives_one_line(write_manifest, text, expected):
    path = write_manifest(text)
    with pytest.raises(IzitorchError) as info:
        load_and_configure(path)
    assert_one_line_error(info.value, path, expected)


def test_catalogue_base_manifest_is_valid(write_manifest):
    """The cases differ from a valid manifest only by their mistake."""
    config = load_and_configure(write_manifest(manifest()))
    assert [spec.name for spec in config.models] == ["mlp"]


def test_core_errors_are_manifest_errors_with_key_path(write_manifest):
    path = write_manifest(manifest(run="epochs = 0"))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert (info.value.source, info.value.path, info.value.message) == (str(path), "run.epochs", "expected an integer >= 1, got 0")


def test_plugin_errors_surface_when_the_plugin_manager_configures(write_manifest):
    path = write_manifest(manifest(tail="[plugins.kfold]\nk = 1\n"))
    config = load_manifest(path)  # the table is the plugin's business: loading alone succeeds
    assert config.plugin_table("kfold") == {"k": 1}
    with pytest.raises(ManifestError) as info:
        make_plugin_manager(config)
    assert str(info.value) == f"{path}: plugins.kfold.k: expected an integer >= 2, got 1"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}: manifest not found"


def test_missing_file_without_toml_suffix(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}: manifest not found (manifests are .toml files)"


def test_manifest_that_is_a_folder(tmp_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a folder, not a manifest: give the path of a .toml file"


# -- file references --------------------------------------------------------------------------

NET_PY = """\
import torch


class Net(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.width = width
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x)
"""


def test_file_reference_is_relative_to_the_manifest_folder(tmp_path, write_manifest, monkeypatch):
    (tmp_path / "models.py").write_text(NET_PY, encoding="utf-8")
    path = write_manifest(manifest(models=model("net", "models.py:Net", "params = { width = 7 }")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the reference must not depend on the working directory
    config = load_and_configure(path)
    assert config.base_dir == str(tmp_path)
    assert config.models[0].model == "models.py:Net"
    cls = resolve(config.models[0].model, config.base_dir)
    assert cls.__name__ == "Net"
    assert cls(**config.models[0].params).width == 7


def test_file_reference_unknown_argument(tmp_path, write_manifest):
    (tmp_path / "models.py").write_text(NET_PY, encoding="utf-8")
    path = write_manifest(manifest(models=model("net", "models.py:Net", "params = { widht = 7 }")))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == f'{path}: models[0].params.widht: unexpected argument "widht" for models.py:Net (did you mean "width"?)'


def test_file_reference_that_fails_to_import(tmp_path, write_manifest):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    path = write_manifest(manifest(models=model("net", "broken.py:Net")))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == f'{path}: models[0].model: loading "broken.py" failed: RuntimeError: boom'


# -- a valid manifest, structured -------------------------------------------------------------

FULL = """\
[run]
res_dir = "out/full"
device = "cpu"
rdm_seed = 7
epochs = 3
batch_size = 16
num_workers = 0
pin_memory = true
shuffle = false
test_epoch = 2
display_step = 5
multi_model = "sequential"

[data]
dataset = "izitorch.datasets:digits"
params = { limit = 100, normalize = false }
num_classes = 10
train_ratio = 0.75
validation = true

[[models]]
name = "mlp64"
model = "izitorch.models:MLP"
params = { hidden = 64, layers = 2 }
criterion = "torch.nn:CrossEntropyLoss"
optimizer = { class = "torch.optim:SGD", lr = 0.05, momentum = 0.9 }
scheduler = { class = "torch.optim.lr_scheduler:StepLR", step_size = 10, gamma = 0.5 }

[[models]]
name = "cnn"
model = "izitorch.models:SmallCNN"
criterion = { class = "torch.nn:CrossEntropyLoss", label_smoothing = 0.1 }

[plugins]
enable = ["kfold", "grad_clip"]

[plugins.kfold]
k = 3

[plugins.checkpoint]
policy = "best"
metric = "acc"

[plugins.grad_clip]
max_norm = 1.0
"""


def test_valid_manifest_structures_into_the_config(write_manifest):
    path = write_manifest(FULL)
    config = load_and_configure(path)
    assert config.run == RunConfig(
        res_dir="out/full",
        device="cpu",
        rdm_seed=7,
        epochs=3,
        batch_size=16,
        num_workers=0,
        pin_memory=True,
        shuffle=False,
        test_epoch=2,
        display_step=5,
        overwrite=False,
        multi_model="sequential",
    )
    assert config.data == DataConfig(
        dataset="izitorch.datasets:digits", params={"limit": 100, "normalize": False}, num_classes=10, train_ratio=0.75, validation=True
    )
    assert isinstance(config.data.train_ratio, float)
    first, second = config.models
    assert first == ModelSpec(
        name="mlp64",
        model="izitorch.models:MLP",
        params={"hidden": 64, "layers": 2},
        criterion=ComponentSpec("torch.nn:CrossEntropyLoss"),
        optimizer=ComponentSpec("torch.optim:SGD", {"lr": 0.05, "momentum": 0.9}),
        scheduler=ComponentSpec("torch.optim.lr_scheduler:StepLR", {"step_size": 10, "gamma": 0.5}),
    )
    assert second.criterion == ComponentSpec("torch.nn:CrossEntropyLoss", {"label_smoothing": 0.1})
    assert config.plugins == PluginsConfig(
        enable=("kfold", "grad_clip"),
        disable=(),
        tables={"kfold": {"k": 3}, "checkpoint": {"policy": "best", "metric": "acc"}, "grad_clip": {"max_norm": 1.0}},
    )
    assert config.plugin_table("kfold") == {"k": 3}
    assert config.plugin_table("early_stop") == {}
    assert config.source == str(path)
    assert config.base_dir == str(path.parent)


def test_plugin_tables_reach_the_plugins(write_manifest):
    _, versions = make_plugin_manager(load_manifest(write_manifest(FULL)))
    assert list(versions) == ["loop", "holdout", "metrics", "checkpoint", "trainlog", "console", "kfold", "grad_clip"]


def test_defaults_apply(write_manifest):
    config = load_manifest(write_manifest(f"[data]\n{DATASET}\n{MLP}"))
    assert config.run == RunConfig()
    assert (config.run.res_dir, config.run.device, config.run.rdm_seed, config.run.epochs, config.run.batch_size) == ("results", "auto", 1, 10, 128)
    assert (config.run.num_workers, config.run.pin_memory, config.run.shuffle, config.run.test_epoch, config.run.display_step) == (0, False, True, 1, 50)
    assert (config.run.overwrite, config.run.multi_model) == (False, "auto")
    assert config.data == DataConfig(dataset="izitorch.datasets:digits", params={}, num_classes=None, train_ratio=0.8, validation=False)
    spec = config.models[0]
    assert spec.params == {}
    assert spec.criterion == ComponentSpec("torch.nn:CrossEntropyLoss", {})
    assert spec.optimizer == ComponentSpec("torch.optim:Adam", {"lr": 1e-3})
    assert spec.scheduler is None
    assert config.plugins == PluginsConfig((), (), {})
    _, versions = make_plugin_manager(config)
    assert list(versions) == ["loop", "holdout", "metrics", "checkpoint", "trainlog", "console"]


def test_disable_removes_a_default_plugin(write_manifest):
    config = load_manifest(write_manifest(manifest(tail='[plugins]\ndisable = ["console", "checkpoint"]\n')))
    _, versions = make_plugin_manager(config)
    assert list(versions) == ["loop", "holdout", "metrics", "trainlog"]


def test_a_table_enables_its_plugin(write_manifest):
    config = load_manifest(write_manifest(manifest(tail="[plugins.early_stop]\npatience = 2\n")))
    pm, versions = make_plugin_manager(config)
    assert "early_stop" in versions
    assert pm.get_plugin("early_stop").options.patience == 2


def test_checkpoint_options_reach_the_plugin(write_manifest):
    config = load_manifest(write_manifest(manifest(tail='[plugins.checkpoint]\npolicy = "best"\nmetric = "IoU"\n')))
    pm, _ = make_plugin_manager(config)
    options = pm.get_plugin("checkpoint").options
    assert (options.policy, options.metric) == ("best", "IoU")


def test_check_references_false_skips_imports(write_manifest):
    config = load_manifest(write_manifest(manifest(models=model(ref="not_a_module_xyz:Net"))), check_references=False)
    assert config.models[0].model == "not_a_module_xyz:Net"


# -- --set overrides ---------------------------------------------------------------------------

BASE = manifest(run="epochs = 2", model="params = { hidden = 16 }", tail="[plugins.kfold]\n")


def test_override_an_integer(write_manifest):
    config = load_manifest(write_manifest(BASE), overrides=["run.epochs=3"])
    assert config.run.epochs == 3


def test_override_a_model_param(write_manifest):
    config = load_manifest(write_manifest(BASE), overrides=["models[0].params.hidden=32"])
    assert config.models[0].params == {"hidden": 32}


def test_override_creates_a_key_in_a_plugin_table(write_manifest):
    path = write_manifest(BASE)
    assert load_manifest(path).plugin_table("kfold") == {}
    config = load_manifest(path, overrides=["plugins.kfold.k=3"])
    assert config.plugin_table("kfold") == {"k": 3}
    pm, _ = make_plugin_manager(config)
    assert pm.get_plugin("kfold").options.k == 3


def test_override_creates_a_plugin_table(write_manifest):
    config = load_manifest(write_manifest(manifest()), overrides=["plugins.early_stop.patience=4"])
    assert config.plugin_table("early_stop") == {"patience": 4}


def test_override_strings_quoted_or_bare(write_manifest):
    path = write_manifest(BASE)
    config = load_manifest(path, overrides=["run.res_dir=out/x", 'run.device="cpu"'])
    assert (config.run.res_dir, config.run.device) == ("out/x", "cpu")


def test_override_toml_values(write_manifest):
    config = load_manifest(
        write_manifest(BASE),
        overrides=[
            "run.shuffle=false",
            "data.train_ratio=0.5",
            'plugins.enable=["grad_clip"]',
            "plugins.grad_clip.value=0.5",
            'models[0].optimizer={ class = "torch.optim:SGD", lr = 0.1 }',
        ],
    )
    assert config.run.shuffle is False
    assert config.data.train_ratio == 0.5
    assert config.plugins.enable == ("grad_clip",)
    assert config.plugin_table("grad_clip") == {"value": 0.5}
    assert config.models[0].optimizer == ComponentSpec("torch.optim:SGD", {"lr": 0.1})


def test_overrides_apply_in_order(write_manifest):
    config = load_manifest(write_manifest(BASE), overrides=["run.epochs=3", "run.epochs=5"])
    assert config.run.epochs == 5


def test_overrides_do_not_touch_the_file(write_manifest):
    path = write_manifest(BASE)
    load_manifest(path, overrides=["run.epochs=3"])
    assert load_manifest(path).run.epochs == 2


@pytest.mark.parametrize(
    "override, expected",
    [
        ("run.epochs", '--set "run.epochs": expected key.path=value, e.g. --set run.epochs=3'),
        ("=3", '--set "=3": expected key.path=value, e.g. --set run.epochs=3'),
        ("models[3].name=x", '--set "models[3].name=x": index [3] does not exist'),
        ("models[0].params.hidden[2]=3", '--set "models[0].params.hidden[2]=3": index [2] does not exist'),
        ("run.epochs.x=1", '--set "run.epochs.x=1": "x" is not inside a table'),
        ("ru n.epochs=1", '--set "ru n.epochs=1": cannot read the key path "ru n.epochs"'),
        ("run..epochs=1", '--set "run..epochs=1": cannot read the key path "run..epochs"'),
        # a wrong type or an unknown key from --set reads exactly like the same mistake in the file
        ("run.epochs=three", 'run.epochs: expected an integer, got "three"'),
        ("run.epochs=2.5", "run.epochs: expected an integer, got 2.5 (a float): write an integer"),
        ("run.epochs=0", "run.epochs: expected an integer >= 1, got 0"),
        ('models[0].optimizer.lr="fast"', 'models[0].optimizer: expected a table with a "class" key, e.g. { class = "torch.optim:Adam", lr = 1e-3 }'),
        ("run.epoch=3", 'run.epoch: unknown key "epoch" (did you mean "epochs"?)'),
        ("models[0].params.hiden=3", 'models[0].params.hiden: unexpected argument "hiden" for izitorch.models.MLP (did you mean "hidden"?)'),
        ("newsection.a=1", 'newsection: unknown section "newsection"'),
    ],
    ids=lambda value: value if isinstance(value, str) and "=" in value and len(value) < 40 else None,
)
def test_bad_override(write_manifest, override, expected):
    path = write_manifest(BASE)
    with pytest.raises(ManifestError) as info:
        load_manifest(path, overrides=[override])
    assert_one_line_error(info.value, path, expected)


def test_override_of_optimizer_lr_gives_the_typed_error(write_manifest):
    path = write_manifest(manifest(model='optimizer = { class = "torch.optim:Adam", lr = 0.01 }'))
    with pytest.raises(ManifestError) as info:
        load_manifest(path, overrides=['models[0].optimizer.lr="fast"'])
    assert str(info.value) == f'{path}: models[0].optimizer.lr: expected a number, got "fast"'


def test_override_plugin_error_surfaces_at_configure(write_manifest):
    path = write_manifest(BASE)
    with pytest.raises(ManifestError) as info:
        make_plugin_manager(load_manifest(path, overrides=["plugins.kfold.k=1"]))
    assert str(info.value) == f"{path}: plugins.kfold.k: expected an integer >= 2, got 1"


# -- robustness: any TOML-like tree gives a Config or a one-line ManifestError ------------------

RUN_KEYS = [f.name for f in RunConfig.__attrs_attrs__]
DATA_KEYS = [f.name for f in DataConfig.__attrs_attrs__]
MODEL_KEYS = [f.name for f in ModelSpec.__attrs_attrs__]
REFERENCES = [
    "izitorch.models:MLP",
    "izitorch.models:SmallCNN",
    "izitorch.datasets:digits",
    "torch.nn:CrossEntropyLoss",
    "torch.optim:Adam",
    "torch.optim:SGD",
    "torch.optim.lr_scheduler:StepLR",
    "izitorch.models:Nope",
    "izitorch_no_such_module_xyz:A",
    "no_such_file_xyz.py:Net",
    "izitorch.pluginmanager:GROUP",
    ":",
    "a:b:c",
    "mlp",
]
# Text without ":" never names a module, so random strings cannot import anything.
TEXT = st.text(alphabet=st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), max_size=12)
KEYS = (
    st.sampled_from(
        RUN_KEYS + DATA_KEYS + MODEL_KEYS + ["class", "lr", "hidden", "k", "limit", "enable", "disable", "kfold", "grad_clip", "step_size", "epoch"]
    )
    | TEXT
)
SCALARS = (
    st.booleans()
    | st.integers(min_value=-3, max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | st.sampled_from(REFERENCES + ["auto", "cpu", "cuda:1", "sequential", "vectorized", "best"])
    | st.dates()
    | st.datetimes()
    | st.times()
)
TREES = st.recursive(SCALARS, lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=4), max_leaves=12)


def mostly(good, bad=SCALARS | TREES):
    """``good`` nine times in ten, else anything TOML can hold."""
    return st.integers(0, 9).flatmap(lambda i: good if i else bad)


def table(fields: dict, required: tuple = (), unknown=KEYS):
    """Some of ``fields`` (mostly plausible values; ``required`` ones always), sometimes an unknown key."""
    plausible = st.fixed_dictionaries(
        {key: mostly(fields[key]) for key in required}, optional={key: mostly(value) for key, value in fields.items() if key not in required}
    )
    return mostly(plausible, st.tuples(plausible, st.dictionaries(unknown, SCALARS, min_size=1, max_size=1)).map(lambda pair: {**pair[0], **pair[1]}))


def component(classes: list[str], params: dict):
    return mostly(st.sampled_from(classes) | table({"class": st.sampled_from(classes + REFERENCES), **params}, ("class",)))


SMALL_INT = st.integers(min_value=-1, max_value=5)
RUN = table(
    {
        "res_dir": TEXT,
        "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "mps", "gpu"]),
        "rdm_seed": SMALL_INT,
        "epochs": SMALL_INT,
        "batch_size": SMALL_INT,
        "num_workers": SMALL_INT,
        "pin_memory": st.booleans(),
        "shuffle": st.booleans(),
        "test_epoch": SMALL_INT,
        "display_step": SMALL_INT,
        "overwrite": st.booleans(),
        "multi_model": st.sampled_from(["auto", "sequential", "vectorized", "vectorised"]),
    }
)
DATA = table(
    {
        "dataset": mostly(st.just("izitorch.datasets:digits"), st.sampled_from(REFERENCES)),
        "params": table({"limit": SMALL_INT, "normalize": st.booleans(), "images": st.booleans()}),
        "num_classes": SMALL_INT,
        "train_ratio": st.floats(min_value=-0.5, max_value=1.5),
        "validation": st.booleans(),
    },
    ("dataset",),
)
MODEL_ENTRY = table(
    {
        "name": st.sampled_from(["mlp", "cnn", "a.b+c", "bad name"]),
        "model": mostly(st.sampled_from(["izitorch.models:MLP", "izitorch.models:SmallCNN"]), st.sampled_from(REFERENCES)),
        "params": table({"hidden": SMALL_INT, "num_classes": SMALL_INT, "dropout": st.floats(0, 1)}),
        "criterion": component(["torch.nn:CrossEntropyLoss", "torch.nn:NLLLoss"], {"label_smoothing": st.floats(0, 1)}),
        "optimizer": component(["torch.optim:Adam", "torch.optim:SGD"], {"lr": st.floats(0, 1) | TEXT, "momentum": st.floats(0, 1)}),
        "scheduler": component(["torch.optim.lr_scheduler:StepLR"], {"step_size": SMALL_INT, "gamma": st.floats(0, 1)}),
    },
    ("name", "model"),
)
PLUGIN_NAMES = st.sampled_from(["kfold", "grad_clip", "early_stop", "checkpoint", "loop", "kfld", "no:console"])
PLUGINS = table(
    {
        "enable": st.lists(PLUGIN_NAMES, max_size=3),
        "disable": st.lists(PLUGIN_NAMES, max_size=2),
        "kfold": table({"k": SMALL_INT}),
        "checkpoint": table({"policy": st.sampled_from(["last", "all", "best", "bets"])}),
    }
)
MANIFESTS = mostly(
    table({"run": RUN, "data": DATA, "models": st.lists(MODEL_ENTRY, min_size=1, max_size=3), "plugins": PLUGINS}, ("data", "models")),
    st.dictionaries(KEYS, TREES, max_size=4),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(MANIFESTS)
def test_random_trees_give_a_config_or_a_one_line_manifest_error(raw):
    try:
        config = config_from_dict(raw, source="random.toml", base_dir="/nonexistent-izitorch-dir")
    except ManifestError as error:
        text = str(error)
        assert text.startswith("random.toml: ") and len(text) > len("random.toml: "), text
        assert "\n" not in text and "\r" not in text, text
    else:
        assert isinstance(config, Config)
        assert config.models and all(isinstance(spec, ModelSpec) for spec in config.models)
        assert isinstance(config.run, RunConfig) and config.run.epochs >= 1
        assert isinstance(config.data.train_ratio, float) and 0 < config.data.train_ratio < 1


def test_random_tree_examples_that_matter():
    """Fixed examples the strategy may miss: NaN ratio, a date as a reference, a newline in a key."""
    base = {"data": {"dataset": "izitorch.datasets:digits"}, "models": [{"name": "a", "model": "izitorch.models:MLP"}]}
    cases = [
        ({**base, "data": {**base["data"], "train_ratio": math.nan}}, "data.train_ratio: expected a number between 0 and 1 (exclusive), got nan"),
        (
            {**base, "data": {"dataset": datetime.date(2020, 1, 2)}},
            'data.dataset: expected a reference "module:attr" or "file.py:attr", got datetime.date(2020, 1, 2)',
        ),
        ({**base, "run": {"epochs": datetime.time(1, 2)}}, "run.epochs: expected an integer, got datetime.time(1, 2)"),
    ]
    for raw, expected in cases:
        with pytest.raises(ManifestError) as info:
            config_from_dict(raw, source="x.toml")
        assert str(info.value) == f"x.toml: {expected}"
    with pytest.raises(ManifestError) as info:  # TOML allows "a\nb" = 1: the message stays one line
        config_from_dict({**base, "run": {"a\nb": 1}}, source="x.toml")
    assert str(info.value) == 'x.toml: run.a\\nb: unknown key "a\\nb"'
    with pytest.raises(ManifestError) as info:
        config_from_dict({**base, "run": {"device": "cpu\r\n"}}, source="x.toml")
    assert str(info.value) == 'x.toml: run.device: expected "auto", "cpu", "cuda", "cuda:<index>" or "mps", got "cpu\\r\\n"'


# -- the tests' manifest factory ----------------------------------------------------------------


def test_the_manifest_factory_and_the_tiny_manifest_text_are_one_run(manifest, tmp_path):
    """conftest's two descriptions of the tiny run cannot drift apart: the factory's default
    (what most tests use) parses to exactly the data of TINY_MANIFEST's text (what the hostile
    tests edit as text)."""
    from izitorch.manifest import tomllib

    text = TINY_MANIFEST.format(res_dir=(tmp_path / "res").as_posix())
    assert tomllib.loads(manifest().read_text(encoding="utf-8")) == tomllib.loads(text)


def test_the_manifest_factory_lays_changes_over_the_tiny_run(manifest):
    """Dotted keys and nested tables merge, a model entry is laid over the tiny MLP, and None
    leaves a key out, also a key of the default laid under it later."""
    from izitorch.manifest import tomllib

    path = manifest(
        {"run.epochs": 5, "data.params": None}, name="x.toml", run={"seed_note": "kept"}, models=[{"params": None}, {"name": "b", "optimizer": {"lr": 0.5}}]
    )
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert path.name == "x.toml" and data["run"]["epochs"] == 5 and data["run"]["batch_size"] == 32 and data["run"]["seed_note"] == "kept"
    assert "params" not in data["data"] and data["data"]["num_classes"] == 10
    assert [m["name"] for m in data["models"]] == ["mlp", "b"] and "params" not in data["models"][0]
    assert data["models"][1]["params"] == {"hidden": 16}
    assert data["models"][1]["optimizer"] == {"class": "torch.optim:Adam", "lr": 0.5}
