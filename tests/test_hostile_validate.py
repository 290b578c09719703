"""Hostile cases of issue 13 (the VALIDATE part), through the command line.

- ``validate`` builds what ``run`` builds (the dataset, one sample and a batch of a few, each
  model, criterion, optimizer and scheduler, one forward and loss per model) and fails with the
  very line ``run`` gives, writing nothing;
- components that are not what their key says are refused saying what the key expects;
- a model or criterion raising anything, a dataset failing in training (with and without
  workers) and a plugin raising in any hook: one line, exit 1, the finished epochs on disk.

Every CLI case asserts the exit code, exactly one stderr line and no traceback. Runs go
in-process through ``izitorch.cli.main`` with ``capfd``, so that what DataLoader worker processes
write to the terminal is seen too; the real entry point is used once for each kind of failure.
"""

from __future__ import annotations

import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, error_of, make_manifest, run_cli

from izitorch import ensemble
from izitorch.checks import _evaluating, dry_run
from izitorch.config import ComponentSpec, Config, DataConfig, ModelSpec, RunConfig
from izitorch.data import build_dataset, build_slots
from izitorch.errors import IzitorchError
from izitorch.stacks import forward_loss
from izitorch.manifest import load_manifest
from izitorch.models import MLP
from izitorch.pluginmanager import _reported
from izitorch.state import Slot


HOSTILE = '''\
"""Models, losses and datasets that misbehave on purpose."""
import os
import random

import numpy as np

import torch
from torch import nn
from torch.utils.data import Dataset

from izitorch.datasets import digits


class KeyNet(nn.Module):
    """An MLP whose training-mode forward call number ``fail_at`` (every call when 0) raises KeyError."""

    def __init__(self, fail_at: int = 0):
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        if self.fail_at == 0 or (self.training and self.calls == self.fail_at):
            raise KeyError("features")
        return self.net(x.flatten(1))


class PerSample(nn.Module):
    """A loss without a ``reduction`` attribute that gives one value per sample."""

    def forward(self, output, target):
        return nn.functional.cross_entropy(output, target, reduction="none")


class LookupLoss(nn.Module):
    def forward(self, output, target):
        raise KeyError("weights")


def plateau(optimizer):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)


def linear_optimizer(params):
    return nn.Linear(2, 2)


class Flagged(Dataset):
    """300 digits that misbehave once the file ``flag`` exists (always, without one):
    ``bad = "raise"``: odd samples raise ValueError; ``"ragged"``: odd samples lose a pixel;
    ``"short"``: the data shrinks to 250 samples, ``__len__`` still says 300."""

    def __init__(self, bad: str = "raise", flag: str = "", extra: int = 0):
        self.x, self.y = digits(limit=300).tensors
        self.bad, self.flag, self.extra = bad, flag, extra

    def __len__(self):
        return 300 + self.extra

    def __getitem__(self, i):
        x, y = self.x, self.y
        if not self.flag or os.path.exists(self.flag):
            if self.bad == "raise" and i % 2:
                raise ValueError(f"corrupt record {i}")
            if self.bad == "short":
                x, y = x[:250], y[:250]
        item = x[i], y[i]
        if self.bad == "ragged" and i % 2 and (not self.flag or os.path.exists(self.flag)):
            item = item[0][:-1], item[1]
        return item


class Noisy(Flagged):
    """Samples augmented with draws from torch's, numpy's and Python's global generators."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + 0.01 * torch.rand(()) + 0.01 * float(np.random.rand()) + 0.01 * random.random(), y


class Triples(Flagged):
    def __getitem__(self, i):
        return self.x[i], self.y[i], i
'''

# Creates the dataset's flag file at the end of epoch 1: the dataset fails from epoch 2 on.
FLAG_PLUGIN = """\
from pathlib import Path
from izitorch import hookimpl

@hookimpl
def izitorch_epoch_finish(run, fold, epoch, scores):
    if epoch == 1:
        Path(run.config.data.params["flag"]).write_text("on")
"""


def write_run(
    tmp_path: Path, *, models: list[dict] = (), data: dict | None = None, run: dict | None = None, plugins: dict | None = None, epochs: int = 2
) -> Path:
    """A manifest (and hostile.py) in tmp_path: 300 digits, holdout 80/20, batch 32, an MLP and
    ``models``; ``data``, ``run`` and ``plugins`` laid over those tables."""
    (tmp_path / "hostile.py").write_text(HOSTILE, encoding="utf-8")
    tables = {"plugins": plugins} if plugins else {}
    return make_manifest(tmp_path, models=[{}, *models], run={"epochs": epochs, **(run or {})}, data=data or {}, **tables)


def epochs_on_disk(res: Path) -> tuple[list[str], int]:
    """The epochs in mlp's trainlog and the epoch of the saved resume state."""
    log = json.loads((res / "mlp" / "trainlog.json").read_text(encoding="utf-8"))
    state = torch.load(res / ".izitorch" / "fold_1.pth.tar", weights_only=True)
    return list(log), state["epoch"]


def assert_epoch_1_kept(res: Path) -> None:
    assert epochs_on_disk(res) == (["1"], 1)
    assert not (res / ".izitorch.lock").exists()
    assert not (res / "results.json").exists()
    assert sorted(p.name for p in res.rglob("*.tmp")) == []


# -- validate fails with the line run gives -------------------------------------------------------

SAME_LINE = [
    # (id, --set overrides, exit code, the line after "<manifest>: " or the whole line)
    (
        "no-parameters",
        ['models[0].model="torch.nn:Sequential"', "models[0].params={}"],
        2,
        ('{path}: models[0].model: "torch.nn:Sequential" built a model with no parameters: there is nothing to train; check its class and params'),
    ),
    (
        "model-keyerror",
        ['models[0].model="hostile.py:KeyNet"', "models[0].params={}"],
        1,
        "{path}: model mlp: forward failed on input of shape (4, 64): KeyError: 'features'",
    ),
    (
        "criterion-keyerror",
        ['models[0].criterion="hostile.py:LookupLoss"'],
        1,
        (
            "{path}: model mlp: the criterion failed on output (4, 10) and target (4,): KeyError: 'weights'; check that the model's output "
            "size matches num_classes and that labels lie in [0, num_classes)"
        ),
    ),
    (
        "criterion-not-scalar",
        ['models[0].criterion="hostile.py:PerSample"'],
        1,
        '{path}: model mlp: the criterion returned (4,), not a scalar loss; give it reduction = "mean" or "sum", or make it return one value',
    ),
    (
        "output-too-narrow",
        ["models[0].params.num_classes=3"],
        1,
        (
            "{path}: model mlp: output (4, 3) has 3 classes but num_classes = 10 (target (4,)); check that the model's output size matches "
            "num_classes and that labels lie in [0, num_classes)"
        ),
    ),
    (
        "sample-raises",
        ['data.dataset="hostile.py:Flagged"', "data.params={}"],
        1,
        ('{path}: data.dataset: "hostile.py:Flagged" failed loading a batch checked before training: sample 299: ValueError: corrupt record 299'),
    ),
    (
        "items-do-not-collate",
        ['data.dataset="hostile.py:Flagged"', 'data.params={bad="ragged"}'],
        1,
        (
            '{path}: data.dataset: "hostile.py:Flagged" failed loading a batch checked before training: RuntimeError: stack expects '
            "each tensor to be equal size, but got [64] at entry 0 and [63] at entry 1; every sample must have the same shape to be batched"
        ),
    ),
    (
        "len-beyond-data",
        ['data.dataset="hostile.py:Flagged"', 'data.params={bad="none", extra=5}'],
        1,
        (
            '{path}: data.dataset: "hostile.py:Flagged" failed loading a batch checked before training: sample 304: IndexError: '
            "index 304 is out of bounds for dimension 0 with size 300; check that __len__ counts only the samples that exist"
        ),
    ),
    (
        "not-pairs",
        ['data.dataset="hostile.py:Triples"', "data.params={}"],
        2,
        '{path}: data.dataset: "hostile.py:Triples" yields items of 3 elements; izitorch expects (input, target) pairs from __getitem__',
    ),
    (
        "scheduler-factory-plateau",
        ['models[0].scheduler="hostile.py:plateau"'],
        2,
        (
            "{path}: models[0].scheduler: ReduceLROnPlateau steps on [run] best_metric of the evaluated set; without a "
            "validation set that is the test set, whose scores would then steer training: set [data] validation = true"
        ),
    ),
    (
        "optimizer-factory-linear",
        ['models[0].optimizer="hostile.py:linear_optimizer"'],
        2,
        (
            '{path}: models[0].optimizer: "hostile.py:linear_optimizer" gave a Linear, not an optimizer: optimizer expects a '
            'torch.optim.Optimizer, e.g. "torch.optim:Adam"'
        ),
    ),
]


@pytest.mark.parametrize("sets, code, expected", [case[1:] for case in SAME_LINE], ids=[case[0] for case in SAME_LINE])
def test_validate_fails_with_the_line_run_gives_and_writes_nothing(tmp_path, capfd, sets, code, expected):
    path = write_run(tmp_path)
    args = [arg for s in sets for arg in ("--set", s)]
    res = tmp_path / "res"
    got, out, err = cli(capfd, "validate", path, *args)
    assert (got, error_of(err)) == (code, expected.format(path=path))
    assert out == "" and not res.exists()  # validate writes nothing
    got, _, err = cli(capfd, "run", path, *args)
    assert (got, error_of(err)) == (code, expected.format(path=path))
    assert not (res / "mlp").exists() and not (res / ".izitorch").exists() and not (res / ".izitorch.lock").exists()


def test_validate_says_ok_to_what_trains_and_its_dry_run_moves_nothing(tmp_path, capfd):
    """The dry run keeps every random generator, each module's mode and every weight and buffer."""
    path = write_run(
        tmp_path,
        data={"dataset": "hostile.py:Noisy", "params": {"limit": None, "bad": "none"}},
        models=[{"name": "cnn", "model": "izitorch.models:SmallCNN", "params": {"hidden": None, "batch_norm": True}, "optimizer": None}],
    )
    code, out, err = cli(capfd, "validate", path)
    assert (code, err) == (0, "") and out.startswith(f"{path}: OK (2 model(s): mlp, cnn; ")
    config = load_manifest(path)
    build_dataset(config), build_slots(config, torch.device("cpu"))  # seed every generator, as the dry run does first
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    np.random.seed(5), random.seed(5), torch.manual_seed(5)  # what the dry run's own steps must not depend on
    dataset, slots, _, _ = dry_run(config, torch.device("cpu"))
    after = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert len(dataset) == 300 and [slot.name for slot in slots] == ["mlp", "cnn"]
    for slot in slots:
        assert all(module.training for module in slot.model.modules())
        for key, value in slot.model.state_dict().items():  # BatchNorm's running statistics included
            assert torch.equal(value, slot.initial_state["model"][key]), key


def test_the_dry_run_gives_each_submodule_its_own_mode_back():
    model = MLP(hidden=4, dropout=0.5)
    model.net[-1].eval()
    modes = [module.training for module in model.modules()]
    with _evaluating(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == modes and modes.count(False) == 1


# -- components that are not what their key says --------------------------------------------------

KINDS = [
    (
        "optimizer-identity",
        'models[0].optimizer={class="torch.nn:Identity"}',
        ('models[0].optimizer.class: "torch.nn:Identity" is not an optimizer: optimizer expects a torch.optim.Optimizer class, e.g. "torch.optim:Adam"'),
    ),
    (
        "optimizer-linear",
        'models[0].optimizer={class="torch.nn:Linear", lr=0.1}',
        ('models[0].optimizer.class: "torch.nn:Linear" is not an optimizer: optimizer expects a torch.optim.Optimizer class, e.g. "torch.optim:Adam"'),
    ),
    (
        "scheduler-relu",
        'models[0].scheduler="torch.nn:ReLU"',
        (
            'models[0].scheduler.class: "torch.nn:ReLU" is not a learning-rate scheduler: scheduler expects a '
            'torch.optim.lr_scheduler.LRScheduler class, e.g. "torch.optim.lr_scheduler:StepLR"'
        ),
    ),
    (
        "scheduler-sgd",
        'models[0].scheduler={class="torch.optim:SGD", lr=0.1}',
        (
            'models[0].scheduler.class: "torch.optim:SGD" is not a learning-rate scheduler: scheduler expects a '
            'torch.optim.lr_scheduler.LRScheduler class, e.g. "torch.optim.lr_scheduler:StepLR"'
        ),
    ),
    (
        "model-not-a-module",
        'models[0].model="collections:OrderedDict"',
        'models[0].model: "collections:OrderedDict" is not a model: model expects a torch.nn.Module class, e.g. "izitorch.models:MLP"',
    ),
    (
        "model-factory-gives-data",
        'models[0].model="izitorch.datasets:digits"',
        ('models[0].model: "izitorch.datasets:digits" gave a TensorDataset, not a model: model expects a torch.nn.Module, e.g. "izitorch.models:MLP"'),
    ),
    (
        "criterion-reduction-none",
        'models[0].criterion={class="torch.nn:CrossEntropyLoss", reduction="none"}',
        'models[0].criterion.reduction: reduction = "none" gives one loss per sample, but the loss must be a scalar: use "mean" or "sum"',
    ),
]


@pytest.mark.parametrize("setting, expected", [case[1:] for case in KINDS], ids=[case[0] for case in KINDS])
def test_a_component_of_another_kind_is_refused_saying_what_the_key_expects(tmp_path, capfd, setting, expected):
    path = write_run(tmp_path)
    sets = ("--set", setting) + (("--set", "models[0].params={}") if "digits" in setting else ())
    for command in ("validate", "run"):
        code, out, err = cli(capfd, command, path, *sets)
        assert (code, error_of(err)) == (2, f"{path}: {expected}"), command
        assert out == ""
    assert not (tmp_path / "res" / "mlp").exists()


@pytest.mark.parametrize(
    "part, component, expected",
    [
        (
            "optimizer",
            torch.nn.Linear(2, 2),
            'models[0].optimizer: Linear gave a Linear, not an optimizer: optimizer expects a torch.optim.Optimizer, e.g. "torch.optim:Adam"',
        ),
        (
            "criterion",
            torch.nn.CrossEntropyLoss(reduction="none"),
            'models[0].criterion: reduction = "none" gives one loss per sample, but the loss must be a scalar: use "mean" or "sum"',
        ),
    ],
)
def test_built_objects_given_from_python_are_checked_too(tmp_path, part, component, expected):
    spec = ModelSpec(name="m", model=MLP(hidden=4), **{part: ComponentSpec(component)})
    config = Config(RunConfig(res_dir=str(tmp_path / "res")), DataConfig(dataset="izitorch.datasets:digits", params={"limit": 50}), [spec], source="")
    with pytest.raises(IzitorchError) as caught:
        dry_run(config, torch.device("cpu"))
    assert str(caught.value) == expected


# -- a model or criterion raising anything during training ------------------------------------------


def test_a_model_raising_keyerror_in_epoch_2_is_one_line_naming_it_and_epoch_1_is_kept(tmp_path, capfd):
    path = write_run(tmp_path)
    sets = ["--set", 'models[0].model="hostile.py:KeyNet"', "--set", "models[0].params={fail_at=10}"]  # 8 steps per epoch
    code, _, err = cli(capfd, "run", path, *sets)
    assert (code, error_of(err)) == (1, f"{path}: model mlp: forward failed on input of shape (32, 64): KeyError: 'features'")
    assert_epoch_1_kept(tmp_path / "res")


def test_a_vectorized_group_raising_keyerror_is_one_line_naming_its_models(tmp_path, capfd, monkeypatch):
    real = ensemble.VectorGroup.forward
    calls = []

    def forward(self, inputs, active):
        calls.append(1)
        if len(calls) == 12:  # epoch 2's second step (8 training and 2 test steps an epoch)
            raise KeyError("stacked")
        return real(self, inputs, active)

    monkeypatch.setattr(ensemble.VectorGroup, "forward", forward)
    path = write_run(tmp_path, run={"multi_model": "vectorized"}, models=[{"name": "mlp2"}])
    code, _, err = cli(capfd, "run", path)
    assert code == 1
    assert error_of(err).startswith(f"{path}: models mlp, mlp2 (vectorized): KeyError: 'stacked'; ")
    assert_epoch_1_kept(tmp_path / "res")


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_or_exit_in_a_forward_is_not_turned_into_an_error_line(raised):
    class Stops(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise raised()

    slot = Slot("m", None, Stops(), torch.nn.CrossEntropyLoss(), None)
    with pytest.raises(raised):
        forward_loss(slot, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), None)


# -- the dataset failing during training ---------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize(
    "bad, cause",
    [
        ("raise", r"sample (?P<index>\d+): ValueError: corrupt record (?P=index)"),
        ("ragged", r"RuntimeError: .*; every sample must have the same shape to be batched"),
        (
            "short",
            (
                r"sample (?P<index>\d+): IndexError: index (?P=index) is out of bounds for dimension 0 with size 250; "
                r"check that __len__ counts only the samples that exist"
            ),
        ),
    ],
)
def test_a_dataset_failing_in_epoch_2_is_one_line_naming_dataset_phase_and_sample(tmp_path, capfd, bad, cause, workers):
    (tmp_path / "flag.py").write_text(FLAG_PLUGIN, encoding="utf-8")
    flag = (tmp_path / "flag").as_posix()
    path = write_run(tmp_path, run={"num_workers": workers}, plugins={"enable": ["flag.py"]})
    sets = ["--set", 'data.dataset="hostile.py:Flagged"', "--set", f'data.params={{bad="{bad}", flag="{flag}"}}']
    code, _, err = cli(capfd, "run", path, *sets)
    assert code == 1
    line = error_of(err)
    head = f'{path}: data.dataset: "hostile.py:Flagged" failed loading the train set (fold 1, epoch 2): '
    assert line.startswith(head) and re.fullmatch(cause, line[len(head) :]), line
    match = re.fullmatch(cause, line[len(head) :])
    if "index" in match.groupdict():  # the sample named is one that fails, among the training samples
        index = int(match["index"])
        assert (index % 2 == 1) if bad == "raise" else index >= 250
        train = pickle.loads((tmp_path / "res" / "Dataset_split.pkl").read_bytes())[0][0]
        assert index in train
    assert_epoch_1_kept(tmp_path / "res")


# -- a plugin raising in a hook ---------------------------------------------------------------------------

HOOK_CALLS = {
    "izitorch_run_start": "run",
    "izitorch_fold_start": "run, fold",
    "izitorch_epoch_start": "run, fold, epoch",
    "izitorch_batch_finish": "run, fold, step, losses",
    "izitorch_before_optimizer_step": "run, slot",
    "izitorch_should_stop": "run, fold, epoch, scores",
    "izitorch_state_dict": "run",
    "izitorch_fold_finish": "run, fold",
    "izitorch_run_finish": "run, results",
    "izitorch_run_teardown": "run, error",
    "izitorch_make_splits": "run, dataset",
    "izitorch_register_metrics": "register",
}


def boom_plugin(hook: str, raise_: str = 'ValueError("boom")', when: str = "True") -> str:
    """A local plugin whose ``hook`` raises ``raise_`` when ``when`` holds."""
    return (
        f"from izitorch import hookimpl\n\n@hookimpl\ndef {hook}({HOOK_CALLS.get(hook, 'run, fold, epoch, scores')}):\n    if {when}:\n        raise {raise_}\n"
    )


@pytest.mark.parametrize("hook", sorted(HOOK_CALLS))
def test_a_plugin_raising_in_any_hook_is_one_line_naming_plugin_hook_and_error(tmp_path, capfd, hook):
    (tmp_path / "boom.py").write_text(boom_plugin(hook), encoding="utf-8")
    path = write_run(tmp_path, epochs=1, plugins={"enable": ["boom.py"]})
    code, _, err = cli(capfd, "run", path, "--set", "data.params.limit=100")
    assert (code, error_of(err)) == (1, f'{path}: plugin "boom.py": {hook} raised ValueError: boom')
    assert not (tmp_path / "res" / ".izitorch.lock").exists()


def test_a_plugin_raising_at_epoch_2_keeps_epoch_1_through_the_real_entry_point(tmp_path):
    plugin = boom_plugin("izitorch_epoch_finish", 'ValueError("no score for epoch 2")', "epoch == 2")
    (tmp_path / "boom.py").write_text(plugin, encoding="utf-8")
    path = write_run(tmp_path, plugins={"enable": ["boom.py"]})
    done = run_cli("run", path.name, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 1
    assert error_of(done.stderr) == 'm.toml: plugin "boom.py": izitorch_epoch_finish raised ValueError: no score for epoch 2'
    assert_epoch_1_kept(tmp_path / "res")


def test_a_plugin_raising_while_configured_fails_validate_with_exit_2(tmp_path, capfd):
    (tmp_path / "boom.py").write_text(
        "from izitorch import hookimpl\n\n@hookimpl\ndef izitorch_configure(config):\n    raise RuntimeError('no table\\nsecond line')\n", encoding="utf-8"
    )
    path = write_run(tmp_path, plugins={"enable": ["boom.py"]})
    code, _, err = cli(capfd, "validate", path)
    assert (code, error_of(err)) == (2, f'{path}: plugin "boom.py": izitorch_configure raised RuntimeError: no table')


def test_a_plugins_own_izitorch_error_passes_unchanged(tmp_path, capfd):
    plugin = boom_plugin("izitorch_epoch_start", 'IzitorchError("boom.py wants [plugins.boom] seed = 1")')
    (tmp_path / "boom.py").write_text(plugin.replace("from izitorch import hookimpl", "from izitorch import IzitorchError, hookimpl"))
    path = write_run(tmp_path, plugins={"enable": ["boom.py"]})
    code, _, err = cli(capfd, "run", path)
    assert (code, error_of(err)) == (2, f"{path}: boom.py wants [plugins.boom] seed = 1")  # located in the manifest, not wrapped


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit, IzitorchError])
def test_a_hook_wrapper_lets_interrupts_exits_and_izitorch_errors_through(raised):
    def hook(run):
        raise raised("stop")

    with pytest.raises(raised) as caught:
        _reported(hook, "p", "izitorch_epoch_start")(None)
    assert type(caught.value) is raised


BAD_OPTIMIZER = '''\
import torch


class Flaky(torch.optim.SGD):
    """An optimizer whose step fails at its third call with an error of no usual kind."""

    calls = 0

    def step(self, closure=None):
        Flaky.calls += 1
        if Flaky.calls == 3:
            raise KeyError("momentum_buffer")
        return super().step(closure)
'''


def test_an_optimizer_raising_any_error_is_one_line_naming_the_model(manifest, tmp_path, capsys):
    (tmp_path / "flaky.py").write_text(BAD_OPTIMIZER)
    path = manifest(models=[{"optimizer": {"class": "flaky.py:Flaky"}}])
    code, _, err = cli(capsys, "run", path)
    assert code == 1
    assert error_of(err) == f"{path}: model mlp: the backward pass or optimizer step failed: KeyError: 'momentum_buffer'"
