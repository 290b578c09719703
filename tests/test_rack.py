"""The original izitorch API (its README's): ``Rack``, ``ModelConfig``, its argparse menu, and
the programmatic ways in (``Rack.from_manifest``, ``izitorch.run(Config(...))``)."""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import izitorch
from izitorch import ManifestError
from izitorch.checks import DRY_RUN_SAMPLES
from izitorch.config import ComponentSpec, Config, DataConfig, ModelSpec, PluginsConfig, RunConfig
from izitorch.models import MLP
from izitorch.trainRack import ModelConfig, Rack

from conftest import plain_scores, run_cli

SIZE = 300

# ---------------------------------------------------------------------------------------------
# 1. the original izitorch README's "Getting started" example, verbatim, with the user's own modules

README_SCRIPT = """\
import torch
from izitorch.trainRack import Rack, ModelConfig

from mymodels import Model
from mydatasets import Dataset

rack = Rack()

rack.parse_args()

m = Model()

conf = ModelConfig(name='model1', model=m, criterion=torch.nn.CrossEntropyLoss(), 
    optimizer=torch.optim.Adam(m.parameters(), lr = rack.args.lr))

rack.add_model_configs([conf])

rack.set_dataset(Dataset())

rack.launch()
"""

MYMODELS = """\
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)
"""

MYDATASETS = """\
import torch
from sklearn.datasets import load_digits


class Dataset(torch.utils.data.Dataset):
    def __init__(self, limit=300):
        data = load_digits()
        self.x = torch.tensor(data.data[:limit], dtype=torch.float32) / 16.0
        self.y = torch.tensor(data.target[:limit], dtype=torch.long)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]
"""


def read(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    with open(path, "rb") as handle:
        return pickle.load(handle)


def test_readme_getting_started_runs_verbatim(tmp_path):
    assert "rack.parse_args()" in README_SCRIPT and "rack.launch()" in README_SCRIPT
    (tmp_path / "train_model.py").write_text(README_SCRIPT, encoding="utf-8")
    (tmp_path / "mymodels.py").write_text(MYMODELS, encoding="utf-8")
    (tmp_path / "mydatasets.py").write_text(MYDATASETS, encoding="utf-8")
    res = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "train_model.py", "--batch_size", "32", "--lr", "0.005", "--save_all", "1", "--epochs", "3", "--res_dir", str(res), "--device", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf = read(res / "conf.json")
    assert conf["config"]["run"]["batch_size"] == 32
    assert conf["config"]["run"]["epochs"] == 3
    assert conf["device"] == "cpu"
    # and, as the original conf.json did, the parameters passed to the script
    assert {k: conf["args"][k] for k in ("batch_size", "lr", "save_all", "epochs", "device")} == {
        "batch_size": 32,
        "lr": 0.005,
        "save_all": 1,
        "epochs": 3,
        "device": "cpu",
    }
    sys.path.insert(0, str(tmp_path))
    try:
        from mymodels import Model  # the user's own module, as the script imported it
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymodels", None)
    folder = res / "model1"
    states = []
    for epoch in (1, 2, 3):
        checkpoint = torch.load(folder / f"model_epoch{epoch}.pth.tar", weights_only=True)
        assert checkpoint["epoch"] == epoch
        model = Model()
        model.load_state_dict(checkpoint["state_dict"])  # strict: every key fits a fresh Model
        assert [group["lr"] for group in checkpoint["optimizer"]["param_groups"]] == [0.005]
        states.append(checkpoint["state_dict"])
    assert not torch.equal(states[0]["net.0.weight"], states[2]["net.0.weight"])  # it trained
    assert not (folder / "model_epoch4.pth.tar").exists()
    log = read(folder / "trainlog.json")
    assert list(log) == ["1", "2", "3"]
    assert {"loss", "accuracy", "IoU", "test_loss", "test_accuracy", "test_IoU"} <= set(log["3"])
    assert log["3"]["loss"] < log["1"]["loss"]
    split = read(res / "Dataset_split.pkl")
    assert len(split) == 1 and [len(p) for p in split[0]] == [240, 60]
    matrix = read(folder / "confusion_matrix.pkl")
    assert matrix.shape == (10, 10) and matrix.sum() == 60
    assert "model1" in proc.stdout  # the final comparison table names the model


# ---------------------------------------------------------------------------------------------
# in-process helpers: the user's model and dataset, a Rack set up as a script would


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data[:SIZE], dtype=torch.float32) / 16.0, torch.tensor(data.target[:SIZE], dtype=torch.long)


class Digits(torch.utils.data.Dataset):
    """A user's own map-style dataset; records the indices read when ``record`` is a list."""

    def __init__(self, record: list | None = None) -> None:
        self.x, self.y = _digits()
        self.record = record

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        if self.record is not None:
            self.record.append(int(i))
        return self.x[i], self.y[i]


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


def make_rack(res_dir: Path, *argv: str, optimizer=None, model=None, dataset=None) -> Rack:
    """``rack.parse_args(...)`` with tiny defaults (later flags win), one model, the digits."""
    rack = Rack()
    rack.parse_args(["--res_dir", str(res_dir), "--device", "cpu", "--epochs", "2", "--batch_size", "32", "--display_step", "1000", *argv])
    torch.manual_seed(0)
    m = model or Model()
    opt = optimizer(m) if optimizer else torch.optim.Adam(m.parameters(), lr=rack.args.lr)
    rack.add_model_configs([ModelConfig(name="mlp", model=m, criterion=nn.CrossEntropyLoss(), optimizer=opt)])
    rack.set_dataset(dataset if dataset is not None else Digits())
    return rack


def without_times(log: dict) -> dict:
    return {e: {k: v for k, v in entry.items() if not k.endswith("_time")} for e, entry in log.items()}


def flat_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------------------------
# 2. every seed parameter, from the command line and through rack.set_args

# name, command-line text, Python value, check(rack, config)
PARAMETERS = [
    ("device", "cpu", "cpu", lambda r, c: c.run.device == "cpu"),
    ("res_dir", "out/run1", "out/run1", lambda r, c: c.run.res_dir == "out/run1"),
    ("rdm_seed", "7", 7, lambda r, c: c.run.rdm_seed == 7),
    ("dataset", "/data/digits.npz", "/data/digits.npz", lambda r, c: r.args.dataset == "/data/digits.npz" and isinstance(c.data.dataset, Digits)),
    ("num_classes", "12", 12, lambda r, c: c.data.num_classes == 12),
    ("num_workers", "2", 2, lambda r, c: c.run.num_workers == 2),
    ("pin_memory", "1", 1, lambda r, c: c.run.pin_memory is True),
    ("train_ratio", "0.6", 0.6, lambda r, c: c.data.train_ratio == 0.6),
    ("kfold", "3", 3, lambda r, c: c.plugins.tables["kfold"] == {"k": 3}),
    ("validation", "1", 1, lambda r, c: c.data.validation is True),
    ("save_last", "1", 1, lambda r, c: c.plugins.tables["checkpoint"]["policy"] == "last"),
    ("save_all", "1", 1, lambda r, c: c.plugins.tables["checkpoint"]["policy"] == "all"),
    ("save_best", "1", 1, lambda r, c: c.plugins.tables["checkpoint"]["policy"] == "best"),
    ("metric_best", "acc", "acc", lambda r, c: c.plugins.tables["checkpoint"]["metric"] == "acc"),
    ("epochs", "4", 4, lambda r, c: c.run.epochs == 4),
    ("batch_size", "16", 16, lambda r, c: c.run.batch_size == 16),
    ("lr", "0.05", 0.05, lambda r, c: r.args.lr == 0.05),
    ("test_epoch", "3", 3, lambda r, c: c.run.test_epoch == 3),
    ("display_step", "5", 5, lambda r, c: c.run.display_step == 5),
    ("shuffle", "0", 0, lambda r, c: c.run.shuffle is False),
    ("grad_clip", "0.5", 0.5, lambda r, c: c.plugins.tables["grad_clip"] == {"value": 0.5}),
]


def bare_rack() -> Rack:
    rack = Rack()
    m = Model()
    rack.add_model_configs([ModelConfig("mlp", m, nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.1))])
    rack.set_dataset(Digits())
    return rack


def test_parameter_list_is_the_seed_list():
    names = {name for name, *_ in PARAMETERS}
    rack = Rack()
    assert names <= set(vars(rack.args))
    assert len(names) == 21


def test_defaults_map_to_a_plain_holdout_run():
    config = bare_rack().config()
    assert config.plugins.tables == {"checkpoint": {"policy": "last", "metric": "loss"}}
    assert (config.run.shuffle, config.run.test_epoch, config.data.validation, config.data.num_classes) == (True, 1, False, None)
    assert config.models[0].name == "mlp" and isinstance(config.models[0].model, Model)


@pytest.mark.parametrize("name,text,value,check", PARAMETERS, ids=[p[0] for p in PARAMETERS])
def test_parameter_from_command_line(name, text, value, check):
    rack = bare_rack()
    args = rack.parse_args([f"--{name}", text])
    assert args is rack.args and getattr(rack.args, name) == value
    assert type(getattr(rack.args, name)) is type(value)
    assert check(rack, rack.config())


@pytest.mark.parametrize("name,text,value,check", PARAMETERS, ids=[p[0] for p in PARAMETERS])
def test_parameter_from_set_args(name, text, value, check):
    rack = bare_rack()
    rack.parse_args([])
    rack.set_args({name: value})
    assert getattr(rack.args, name) == value
    assert check(rack, rack.config())


def test_save_best_wins_over_the_default_save_last():
    rack = bare_rack()
    rack.set_args({"save_best": 1, "metric_best": "IoU"})
    assert rack.config().plugins.tables["checkpoint"] == {"policy": "best", "metric": "IoU"}


def test_add_arguments_custom_parameter():
    rack = Rack()
    rack.add_arguments({"my_param": 3, "my_name": "abc"})
    assert rack.args.my_param == 3  # usable before parse_args
    assert rack.parse_args([]).my_param == 3
    args = rack.parse_args(["--my_param", "5", "--my_name", "xyz"])
    assert args.my_param == 5 and type(args.my_param) is int and args.my_name == "xyz"
    with pytest.raises(SystemExit):
        rack.parse_args(["--my_param", "five"])  # typed from the default
    rack.set_args({"my_param": 7})
    assert rack.args.my_param == 7


def test_set_args_unknown_name_is_a_manifest_error_with_did_you_mean():
    rack = Rack()
    with pytest.raises(ManifestError) as info:
        rack.set_args({"epoch": 3})
    message = str(info.value)
    assert 'unknown parameter "epoch"' in message and 'did you mean "epochs"' in message
    assert "add_arguments" in message and "\n" not in message
    assert rack.args.epochs == 10 and not hasattr(rack.args, "epoch")


def test_launch_without_models_or_dataset(tmp_path):
    rack = Rack()
    rack.set_args({"res_dir": str(tmp_path / "res")})
    with pytest.raises(ManifestError) as info:
        rack.launch()
    assert "add_model_configs" in str(info.value) and "\n" not in str(info.value)
    m = Model()
    rack.add_model_configs([ModelConfig("mlp", m, nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), lr=0.1))])
    with pytest.raises(ManifestError) as info:
        rack.launch()
    assert "set_dataset" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--epochs", "0"], "--epochs"),
        (["--train_ratio", "2"], "--train_ratio"),
        (["--batch_size", "0"], "--batch_size"),
        (["--test_epoch", "0"], "--test_epoch"),
        (["--device", "gpu"], "--device"),
        (["--num_workers", "-1"], "--num_workers"),
        (["--kfold", "1"], "--kfold"),  # checked by the kfold plugin, still named by its flag
        (["--metric_best", "f2"], "--metric_best"),
        (["--grad_clip", "-1"], "--grad_clip"),
    ],
)
def test_invalid_values_name_the_flag(tmp_path, argv, flag):
    rack = bare_rack()
    rack.parse_args(["--res_dir", str(tmp_path / "res"), *argv])
    with pytest.raises(ManifestError) as info:
        rack.launch()
    message = str(info.value)
    assert flag in message and "\n" not in message
    assert not (tmp_path / "res").exists()


def test_invalid_value_through_set_args(tmp_path):
    rack = bare_rack()
    rack.set_args({"res_dir": str(tmp_path / "res"), "epochs": 0})
    with pytest.raises(ManifestError, match="--epochs: expected an integer >= 1, got 0"):
        rack.launch()


# ---------------------------------------------------------------------------------------------
# real launches, in-process


def test_conf_json_records_custom_arguments(tmp_path):
    rack = make_rack(tmp_path / "res", "--epochs", "1")
    rack.add_arguments({"my_param": 3})
    rack.parse_args(["--res_dir", str(tmp_path / "res"), "--device", "cpu", "--epochs", "1", "--my_param", "5"])
    rack.launch()
    conf = read(tmp_path / "res" / "conf.json")
    assert conf["args"]["my_param"] == 5 and conf["args"]["epochs"] == 1
    assert conf["config"]["run"]["epochs"] == 1 and "plugins" in conf and "versions" in conf


def cross_entropy(output, target):
    """A plain function as criterion (its repr holds a memory address)."""
    return nn.functional.cross_entropy(output, target)


def test_conf_json_holds_no_memory_address_for_objects_the_rack_was_given(tmp_path):
    """A Rack passes objects, not references: a dataset, a scheduler and a function criterion had
    reprs such as ``<... object at 0x7f...>``, different in every run."""
    rack = make_rack(tmp_path / "res", "--epochs", "1")
    torch.manual_seed(0)
    model = Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    rack.add_model_configs([ModelConfig(name="fn", model=model, criterion=cross_entropy, optimizer=optimizer, scheduler=scheduler)])
    rack.launch()
    texts = [path.read_text(encoding="utf-8") for path in (tmp_path / "res").rglob("conf.json")]
    assert len(texts) == 3 and not [text for text in texts if "0x" in text]
    conf = read(tmp_path / "res" / "fn" / "conf.json")
    stepped = "torch.optim.lr_scheduler.StepLR(base_lrs=[0.1], gamma=0.5, last_epoch=0, step_size=2)"
    assert conf["scheduler"] == conf["spec"]["scheduler"]["target"] == stepped
    assert conf["criterion"] == conf["spec"]["criterion"]["target"] == f"{__name__}.cross_entropy"
    assert read(tmp_path / "res" / "conf.json")["config"]["data"]["dataset"] == f"{__name__}.Digits(len={len(Digits())})"
    assert conf["model"] == repr(model)


def test_a_second_launch_into_the_same_res_dir_needs_overwrite(tmp_path):
    make_rack(tmp_path / "res", "--epochs", "1").launch()
    before = (tmp_path / "res" / "conf.json").read_bytes()
    rack = make_rack(tmp_path / "res", "--epochs", "2")
    with pytest.raises(ManifestError) as info:
        rack.launch()
    assert "--res_dir" in str(info.value) and "--overwrite" in str(info.value) and "\n" not in str(info.value)
    assert (tmp_path / "res" / "conf.json").read_bytes() == before  # the earlier run is untouched
    rack.set_args({"overwrite": 1})
    rack.launch()
    assert list(read(tmp_path / "res" / "mlp" / "trainlog.json")) == ["1", "2"]
    assert read(tmp_path / "res" / "conf.json")["args"]["epochs"] == 2


def test_rdm_seed_reproducible_and_changes_the_split(tmp_path):
    make_rack(tmp_path / "a", "--rdm_seed", "3").launch()
    make_rack(tmp_path / "b").launch()  # the default seed, 1
    rack = make_rack(tmp_path / "c")
    rack.set_args({"rdm_seed": 3})
    rack.launch()
    log = {k: read(tmp_path / k / "mlp" / "trainlog.json") for k in "abc"}
    split = {k: read(tmp_path / k / "Dataset_split.pkl") for k in "abc"}
    assert without_times(log["a"]) == without_times(log["c"])
    assert split["a"] == split["c"]
    assert split["a"] != split["b"]
    assert sorted(split["a"][0][0] + split["a"][0][1]) == sorted(split["b"][0][0] + split["b"][0][1]) == list(range(SIZE))
    assert without_times(log["a"]) != without_times(log["b"])


def test_num_workers_and_pin_memory_run_and_match_a_single_process_run(tmp_path):
    make_rack(tmp_path / "w0").launch()
    make_rack(tmp_path / "w2", "--num_workers", "2", "--pin_memory", "1").launch()
    conf = read(tmp_path / "w2" / "conf.json")["config"]["run"]
    assert conf["num_workers"] == 2 and conf["pin_memory"] is True
    a, b = (read(tmp_path / k / "mlp" / "trainlog.json") for k in ("w0", "w2"))
    assert list(b) == ["1", "2"]
    assert without_times(a) == without_times(b)


def test_train_ratio_sets_the_split_sizes(tmp_path):
    make_rack(tmp_path / "res", "--train_ratio", "0.6").launch()
    split = read(tmp_path / "res" / "Dataset_split.pkl")
    assert [len(part) for part in split[0]] == [180, 120]
    assert read(tmp_path / "res" / "conf.json")["splits"] == [{"train": 180, "test": 120}]
    assert read(tmp_path / "res" / "mlp" / "confusion_matrix.pkl").sum() == 120


def test_kfold_trains_every_fold(tmp_path):
    results = make_rack(tmp_path / "res", "--kfold", "3").launch()
    assert len(results["mlp"]) == 3
    splits = read(tmp_path / "res" / "Dataset_split.pkl")
    assert len(splits) == 3
    tests = sorted(i for _, test in splits for i in test)
    assert tests == list(range(SIZE))  # the test sets partition the data
    for k, (train, test) in enumerate(splits, 1):
        assert not set(train) & set(test) and len(train) + len(test) == SIZE
        folder = tmp_path / "res" / "mlp" / f"FOLD_{k}"
        assert list(read(folder / "trainlog.json")) == ["1", "2"]
        assert torch.load(folder / "model.pth.tar", weights_only=True)["epoch"] == 2
        assert read(folder / "confusion_matrix.pkl").sum() == len(test)
        expected = plain_scores(Model(), folder / "model.pth.tar", test, limit=SIZE)  # the fold's own, independently
        assert results["mlp"][k - 1]["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-5), k
    assert not (tmp_path / "res" / "mlp" / "FOLD_4").exists()
    assert read(tmp_path / "res" / "mlp" / "overall.json")["folds"] == 3


def test_validation_makes_three_part_splits(tmp_path):
    make_rack(tmp_path / "res", "--validation", "1").launch()
    split = read(tmp_path / "res" / "Dataset_split.pkl")
    assert len(split) == 1 and len(split[0]) == 3
    assert [len(p) for p in split[0]] == [240, 30, 30]
    assert sorted(i for part in split[0] for i in part) == list(range(SIZE))
    log = read(tmp_path / "res" / "mlp" / "trainlog.json")
    assert all({"val_loss", "val_accuracy", "val_IoU"} <= set(entry) for entry in log.values())
    assert read(tmp_path / "res" / "mlp" / "confusion_matrix.pkl").sum() == 30


def test_save_last_keeps_one_checkpoint(tmp_path):
    make_rack(tmp_path / "res", "--save_last", "1").launch()
    folder = tmp_path / "res" / "mlp"
    assert torch.load(folder / "model.pth.tar", weights_only=True)["epoch"] == 2
    assert not list(folder.glob("model_epoch*")) and not (folder / "best_epoch.json").exists()


@pytest.mark.parametrize("metric,validation", [("loss", 0), ("acc", 0), ("IoU", 1), ("acc", 1)])
def test_save_best_picks_the_epoch_by_metric_and_direction(tmp_path, metric, validation):
    noisy = lambda m: torch.optim.SGD(m.parameters(), lr=0.8, momentum=0.9)  # noqa: E731 (scores jump around)
    rack = make_rack(tmp_path / "res", "--epochs", "4", optimizer=noisy)
    rack.set_args({"save_best": 1, "metric_best": metric, "validation": validation})
    rack.launch()
    folder = tmp_path / "res" / "mlp"
    log = read(folder / "trainlog.json")
    key = ("val_" if validation else "test_") + {"loss": "loss", "acc": "accuracy", "IoU": "IoU"}[metric]
    values = {int(e): entry[key] for e, entry in log.items()}
    pick = min if metric == "loss" else max
    best_value = pick(values.values())
    expected = min(e for e, v in values.items() if v == best_value)  # the first epoch reaching it
    best = read(folder / "best_epoch.json")
    assert best["epoch"] == expected and best["value"] == pytest.approx(best_value)
    assert best["phase"] == ("val" if validation else "test")
    assert torch.load(folder / "model.pth.tar", weights_only=True)["epoch"] == expected
    assert read(folder / "test_metrics.json")["epoch"] == expected


def test_test_epoch_evaluates_every_n_epochs_and_the_last(tmp_path):
    make_rack(tmp_path / "res", "--epochs", "3", "--test_epoch", "2").launch()
    log = read(tmp_path / "res" / "mlp" / "trainlog.json")
    assert list(log) == ["1", "2", "3"]
    evaluated = [e for e, entry in log.items() if "test_loss" in entry]
    assert evaluated == ["2", "3"]
    assert not any(k.startswith("test_") for k in log["1"]) and "loss" in log["1"]


def test_display_step_prints_every_n_steps(tmp_path, capsys):
    make_rack(tmp_path / "res", "--display_step", "3").launch()  # 240 training samples / 32 = 8 steps
    out = capsys.readouterr().out
    steps = [line.split()[1] for line in out.splitlines() if line.strip().startswith("step ")]
    assert steps == ["3/8", "6/8"] * 2


def test_shuffle_controls_the_training_order(tmp_path):
    orders = {}
    for flag in ("0", "1"):
        record: list[int] = []
        dataset = Digits(record)
        make_rack(tmp_path / flag, "--shuffle", flag, "--epochs", "1", dataset=dataset).launch()
        train = read(tmp_path / flag / "Dataset_split.pkl")[0][0]
        dry_run = [len(dataset) - 1, *range(DRY_RUN_SAMPLES)]  # before training: the last sample, then the first ones
        assert record[: len(dry_run)] == dry_run
        orders[flag] = (record[len(dry_run) : len(dry_run) + len(train)], train)
    seen, train = orders["0"]
    assert seen == train  # the split's order, untouched
    seen, train = orders["1"]
    assert seen != train and sorted(seen) == sorted(train)


def test_grad_clip_clamps_every_gradient_element(tmp_path):
    def run(name: str, *argv: str) -> float:
        torch.manual_seed(0)
        model = Model()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        rack = make_rack(tmp_path / name, "--epochs", "1", "--save_all", "1", *argv, model=model, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1.0))
        rack.launch()
        final = flat_state(tmp_path / name / "mlp" / "model_epoch1.pth.tar")
        return max((final[k] - initial[k]).abs().max().item() for k in initial)

    clipped = run("clip", "--grad_clip", "0.0001")
    assert clipped <= 8 * 1.0 * 1e-4 + 1e-7  # 8 steps of lr * clip at most
    assert run("free") > 100 * clipped
    assert "grad_clip" in read(tmp_path / "clip" / "conf.json")["plugins"]
    assert "grad_clip" not in read(tmp_path / "free" / "conf.json")["plugins"]


# ---------------------------------------------------------------------------------------------
# 3. programmatic assembly


def test_from_manifest_launch(manifest, tmp_path):
    rack = Rack.from_manifest(manifest())
    results = rack.launch()
    assert list(results) == ["mlp"] and len(results["mlp"]) == 1
    ((_, test),) = read(tmp_path / "res" / "Dataset_split.pkl")
    expected = plain_scores(MLP(hidden=16), tmp_path / "res" / "mlp" / "model.pth.tar", test)
    assert results["mlp"][0]["accuracy"] == pytest.approx(expected["accuracy"], rel=1e-5)
    assert list(read(tmp_path / "res" / "mlp" / "trainlog.json")) == ["1", "2"]
    assert read(tmp_path / "res" / "conf.json")["config"]["run"]["epochs"] == 2


def python_config(res_dir: Path) -> Config:
    return Config(
        run=RunConfig(res_dir=str(res_dir), device="cpu", epochs=2, batch_size=32, display_step=1000),
        data=DataConfig(dataset="izitorch.datasets:digits", params={"limit": SIZE}, num_classes=10),
        models=(ModelSpec(name="mlp", model="izitorch.models:MLP", params={"hidden": 16}, optimizer=ComponentSpec("torch.optim:Adam", {"lr": 1e-2})),),
        plugins=PluginsConfig(),
    )


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_config_in_python_then_run_matches_the_cli(manifest, tmp_path):
    results = izitorch.run(python_config(tmp_path / "py"))
    assert list(results) == ["mlp"] and len(results["mlp"]) == 1
    scores = results["mlp"][0]
    ((_, test),) = read(tmp_path / "py" / "Dataset_split.pkl")
    expected = plain_scores(MLP(hidden=16), tmp_path / "py" / "mlp" / "model.pth.tar", test)
    assert {key: scores[key] for key in expected} == pytest.approx(expected, rel=1e-5)
    proc = run_cli("run", str(manifest()))  # the same run described by the tiny manifest
    assert proc.returncode == 0, proc.stderr[-3000:]
    py, cli = tmp_path / "py", tmp_path / "res"
    assert tree(py) == tree(cli)
    assert {"conf.json", "Dataset_split.pkl", "results.json", "mlp/trainlog.json", "mlp/model.pth.tar", "mlp/confusion_matrix.pkl", "mlp/conf.json"} <= tree(py)
    assert read(py / "Dataset_split.pkl") == read(cli / "Dataset_split.pkl")
    py_log, cli_log = (without_times(read(d / "mlp" / "trainlog.json")) for d in (py, cli))
    assert list(py_log) == list(cli_log) == ["1", "2"]
    for epoch in py_log:
        assert py_log[epoch] == pytest.approx(cli_log[epoch], rel=1e-5)
    assert read(py / "results.json")["mlp"]["mean"]["accuracy"] == pytest.approx(scores["accuracy"])


# ---------------------------------------------------------------------------------------------
# 4. the user's own initialisation is kept, and every fold starts from it


def test_user_initialisation_is_kept_in_every_fold(tmp_path):
    torch.manual_seed(1234)  # the user's initialisation, not the rack's rdm_seed
    model = Model()
    with torch.no_grad():
        model.net[2].bias.fill_(0.25)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    rack = make_rack(
        tmp_path / "res", "--kfold", "2", "--epochs", "1", "--save_all", "1", model=model, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0)
    )
    rack.launch()
    for fold in (1, 2):
        saved = flat_state(tmp_path / "res" / "mlp" / f"FOLD_{fold}" / "model_epoch1.pth.tar")
        assert saved.keys() == initial.keys()
        assert all(torch.equal(saved[k], initial[k]) for k in initial)


def test_every_fold_starts_from_the_initial_weights_with_a_fresh_optimizer(tmp_path):
    """Full-batch SGD with momentum: fold k's first step is exactly w0 - lr * grad(w0, fold k)."""
    lr = 0.5
    torch.manual_seed(99)
    model = Model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    rack = make_rack(
        tmp_path / "res",
        "--kfold",
        "2",
        "--epochs",
        "2",
        "--save_all",
        "1",
        "--batch_size",
        "150",
        model=model,
        optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
    )
    rack.launch()
    splits = read(tmp_path / "res" / "Dataset_split.pkl")
    x, y = _digits()
    firsts = []
    for fold, (train, _test) in enumerate(splits, 1):
        assert len(train) == 150  # one step per epoch
        reference = Model()
        reference.load_state_dict(initial)
        loss = nn.CrossEntropyLoss()(reference(x[train]), y[train])
        grads = dict(zip([n for n, _ in reference.named_parameters()], torch.autograd.grad(loss, list(reference.parameters()))))
        saved = flat_state(tmp_path / "res" / "mlp" / f"FOLD_{fold}" / "model_epoch1.pth.tar")
        for name, grad in grads.items():
            torch.testing.assert_close(saved[name], initial[name] - lr * grad, rtol=1e-5, atol=1e-6)
        momentum = torch.load(tmp_path / "res" / "mlp" / f"FOLD_{fold}" / "model_epoch1.pth.tar", weights_only=True)["optimizer"]["state"]
        torch.testing.assert_close(momentum[0]["momentum_buffer"], grads["net.0.weight"], rtol=1e-5, atol=1e-6)
        firsts.append(saved)
    assert not torch.equal(firsts[0]["net.0.weight"], firsts[1]["net.0.weight"])


# ---------------------------------------------------------------------------------------------
# wiring mistakes refused before training, in one line naming the models


def two_model_rack(res_dir: Path, first: tuple, second: tuple) -> Rack:
    """A Rack of models "a" and "b", each ``(model, optimizer)``."""
    rack = make_rack(res_dir)
    rack.model_configs = [ModelConfig(name, model, nn.CrossEntropyLoss(), optimizer) for name, (model, optimizer) in zip("ab", (first, second))]
    return rack


def refusal(rack: Rack, res_dir: Path) -> str:
    with pytest.raises(ManifestError) as info:
        rack.launch()
    assert not list(res_dir.rglob("trainlog.json"))  # refused before training
    message = str(info.value)
    assert "\n" not in message
    return message


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


class Headed(nn.Module):
    """A model on a backbone that may be another model's."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x)))


def test_one_module_in_two_model_configs_is_refused(tmp_path):
    shared = Model()
    message = refusal(two_model_rack(tmp_path / "res", (shared, sgd(shared)), (shared, sgd(shared))), tmp_path / "res")
    assert message.startswith('Rack: models[1].model: model "b" is the same nn.Module object as model "a"')
    assert "copy.deepcopy" in message
    backbone = nn.Linear(64, 32)  # a part of a module shared
    a, b = Headed(backbone), Headed(backbone)
    message = refusal(two_model_rack(tmp_path / "res2", (a, sgd(a)), (b, sgd(b))), tmp_path / "res2")
    assert message.startswith('Rack: models[1].model: model "b" shares parameters with model "a"')


def test_an_optimizer_on_another_models_parameters_is_refused(tmp_path):
    a, b = Model(), Model()
    message = refusal(two_model_rack(tmp_path / "res", (a, sgd(a)), (b, sgd(a))), tmp_path / "res")
    assert message.startswith('Rack: models[1].optimizer: the optimizer of model "b" updates parameters of model "a", not of its own model')
    assert "model.parameters()" in message
    stray = nn.Parameter(torch.zeros(3))  # say, a learnable temperature living outside the model
    optimizer = torch.optim.SGD([*a.parameters(), stray], lr=0.1)
    message = refusal(two_model_rack(tmp_path / "res2", (a, optimizer), (b, sgd(b))), tmp_path / "res2")
    assert message.startswith('Rack: models[0].optimizer: the optimizer of model "a" updates 1 tensor(s) that are not parameters of its model')


def test_an_optimizer_on_a_part_of_its_model_trains(tmp_path):
    """Fine-tuning the head alone is not a wiring mistake: the backbone stays as it was."""
    a, b = Headed(nn.Linear(64, 32)), Model()
    backbone = {k: v.clone() for k, v in a.backbone.state_dict().items()}
    rack = two_model_rack(tmp_path / "res", (a, torch.optim.SGD(a.head.parameters(), lr=0.1)), (b, sgd(b)))
    rack.launch()
    saved = flat_state(tmp_path / "res" / "a" / "model.pth.tar")
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in backbone.items())
    assert list(read(tmp_path / "res" / "a" / "trainlog.json")) == ["1", "2"]


SINGLETON = """\
import torch

SHARED = torch.nn.Linear(64, 10)


def shared():
    return SHARED
"""


def test_a_manifest_model_factory_returning_one_module_twice_is_refused(manifest, tmp_path, capsys):
    """The same check guards manifests: a factory returning a cached module."""
    from izitorch.cli import main

    (tmp_path / "singleton.py").write_text(SINGLETON)
    shared = {"model": "singleton.py:shared", "params": None}
    path = manifest(models=[shared, {**shared, "name": "again"}])
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        (
            f'izitorch: error: {path}: models[1].model: model "again" is the same nn.Module object as model "mlp", so both '
            "would train one set of weights; give each model its own module (build another, or copy.deepcopy it) and "
            "its optimizer on that module's parameters"
        )
    ]
    assert not list((tmp_path / "res").rglob("trainlog.json"))


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("epochs", "ten", 'epochs: expected an integer, got "ten"'),
        ("epochs", 2.5, "epochs: expected an integer, got 2.5"),
        ("batch_size", True, "batch_size: expected an integer, got true"),
        ("lr", "fast", 'lr: expected a number, got "fast"'),
        ("train_ratio", None, "train_ratio: expected a number, got None"),
        ("device", 0, "device: expected a string, got 0"),
        ("shuffle", "no", 'shuffle: expected 0 or 1 (or True / False), got "no"'),
    ],
)
def test_set_args_with_a_value_of_the_wrong_type_names_the_parameter(tmp_path, name, value, expected):
    rack = bare_rack()
    before = getattr(rack.args, name)
    with pytest.raises(ManifestError) as info:
        rack.set_args({name: value})
    assert str(info.value) == f"Rack.set_args: {expected}"
    assert getattr(rack.args, name) == before
    setattr(rack.args, name, value)  # set behind set_args' back: refused at launch, naming the flag
    rack.set_args({"res_dir": str(tmp_path / "res")})
    with pytest.raises(ManifestError) as info:
        rack.launch()
    assert str(info.value) == f"Rack: --{expected}"
    assert not (tmp_path / "res").exists()


def test_set_args_takes_numpy_numbers_paths_and_booleans_for_flags(tmp_path):
    import numpy as np

    rack = bare_rack()
    rack.set_args({"epochs": np.int64(3), "lr": np.float32(0.5), "res_dir": tmp_path / "res", "shuffle": False, "validation": True})
    assert (rack.args.epochs, rack.args.res_dir, rack.args.shuffle, rack.args.validation) == (3, str(tmp_path / "res"), 0, 1)
    assert type(rack.args.epochs) is int and type(rack.args.lr) is float
    config = rack.config()
    assert (config.run.epochs, config.run.res_dir, config.run.shuffle, config.data.validation) == (3, str(tmp_path / "res"), False, True)
