"""The one metric protocol (izitorch/metrics.py): a registered metric is first-class.

A mean absolute error registered by a plugin file (the README's example, read from the README)
on a tiny regression: its values against scikit-learn on the saved model's predictions, on the
console's epoch line and final table and in ``izitorch report``; ``[plugins.checkpoint]`` and
``[plugins.early_stop]`` accept it, in its declared direction; an unknown or undirected metric
name is one line, exit 2, at ``validate``. A metric of the previous protocol still counts what
the new one counts for a lone model, a vectorized group and parallel folds; masks count only
their samples.
"""

from __future__ import annotations

import json
import pickle
import re

from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_MANIFEST, cli, error_of
from sklearn.metrics import mean_absolute_error

from izitorch.errors import IzitorchError, ManifestError
from izitorch.metrics import LegacyMeters, better, directions, legacy_meter, meters_for, registered, resolve
from izitorch.models import MLP
from izitorch.plugins.metrics import ConfusionMeter, LossMeter


def readme_mae() -> str:
    """The README's example of a metric plugin (section ``izitorch_register_metrics``)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### `izitorch_register_metrics`") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


LEGACY = '''\
from izitorch import hookimpl


class LegacyMeanAbsoluteError:
    """The previous protocol: one model, no declared names."""

    def __init__(self, num_classes=None):
        self.total, self.count = 0.0, 0

    def update(self, output, target, loss):
        self.total = self.total + (output - target).abs().reshape(output.shape[0], -1).mean(1).sum()
        self.count += target.shape[0]

    def compute(self):
        return {"legacy_mae": float(self.total / self.count)}


@hookimpl
def izitorch_register_metrics(register):
    register("legacy", LegacyMeanAbsoluteError)
'''

REGRESSION = '''\
from torch.utils.data import TensorDataset

from izitorch.datasets import digits


def regression(limit=300):
    """The digits' pixels -> label / 9, as a float target [N, 1]."""
    inputs, labels = digits(limit=limit).tensors
    return TensorDataset(inputs, (labels.float() / 9.0).reshape(-1, 1))
'''

MODEL = """
[[models]]
name = "{name}"
model = "izitorch.models:MLP"
params = {{ hidden = 16, num_classes = 1 }}
criterion = "torch.nn:MSELoss"
optimizer = {{ class = "torch.optim:SGD", lr = {lr} }}
"""


def regression_manifest(tmp_path, tail: str = "", epochs: int = 4, models=(("mlp", 0.5),), run: str = "", plugins: str = '"mae.py"') -> Path:
    (tmp_path / "mae.py").write_text(readme_mae(), encoding="utf-8")
    (tmp_path / "legacy.py").write_text(LEGACY, encoding="utf-8")
    (tmp_path / "reg.py").write_text(REGRESSION, encoding="utf-8")
    text = (
        f'[run]\nres_dir = "{(tmp_path / "res").as_posix()}"\nepochs = {epochs}\nbatch_size = 32\ndisplay_step = 1000\n{run}\n'
        '[data]\ndataset = "reg.py:regression"\nvalidation = true\n'
        + "".join(MODEL.format(name=name, lr=lr) for name, lr in models)
        + f"\n[plugins]\nenable = [{plugins}]\n{tail}"
    )
    path = tmp_path / "m.toml"
    path.write_text(text, encoding="utf-8")
    return path


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_registered_mae_is_logged_shown_reported_and_picks_the_best_epoch(tmp_path, capsys):
    path = regression_manifest(tmp_path, '[plugins.checkpoint]\npolicy = "best"\nmetric = "mae"\n')
    code, out, err = cli(capsys, "run", path)
    assert (code, err) == (0, "")
    res = tmp_path / "res"
    log = read_json(res / "mlp" / "trainlog.json")
    val = {int(epoch): entry["val_mae"] for epoch, entry in log.items()}
    assert len(set(val.values())) == 4
    best = read_json(res / "mlp" / "best_epoch.json")
    assert best["epoch"] == min(val, key=val.get) and best["metric"] == "mae"  # the lowest: lower is better
    assert best["value"] == val[best["epoch"]]
    final = read_json(res / "mlp" / "test_metrics.json")
    assert final["epoch"] == best["epoch"]

    # the final test's mae is scikit-learn's on the saved (best) weights' test predictions
    _train, _val, test = pickle.loads((res / "Dataset_split.pkl").read_bytes())[0]
    net = MLP(hidden=16, num_classes=1)
    net.load_state_dict(torch.load(res / "mlp" / "model.pth.tar", weights_only=True)["state_dict"])
    from izitorch.datasets import digits

    inputs, labels = digits(limit=300).tensors
    with torch.no_grad():
        predicted = net(inputs[test]).numpy()
    expected = mean_absolute_error((labels[test].float() / 9.0).reshape(-1, 1).numpy(), predicted)
    assert final["mae"] == pytest.approx(expected, rel=1e-5)
    summary = read_json(res / "results.json")["mlp"]
    assert summary["mean"]["mae"] == pytest.approx(expected, rel=1e-5)
    # the built-in regression values are there too (izitorch's MAE, and this plugin's mae)
    assert summary["directions"] == {"mae": "lower", "loss": "lower", "MAE": "lower", "MSE": "lower", "RMSE": "lower", "R2": "higher"}
    assert summary["mean"]["MAE"] == pytest.approx(expected, rel=1e-5)

    # the console: every epoch line and the final table show it, marked lower-is-better
    lines = out.splitlines()
    for epoch in range(1, 5):
        line = next(line for line in lines if line.startswith(f"epoch {epoch}/4: "))
        assert f"mlp [val] loss {log[str(epoch)]['val_loss']:.4f} mae↓ {val[epoch]:.4f} MAE↓ " in line
    table = lines[lines.index("final test scores:") + 1 :]
    assert table[0].split() == ["model", "params", "folds", "loss", "mae↓", "MAE↓", "MSE↓", "RMSE↓", "R2"]
    assert table[2].split()[4] == f"{expected:.4f}"

    code, report, err = cli(capsys, "report", res)
    assert (code, err) == (0, "")
    assert report.splitlines()[1].split()[:11] == ["model", "params", "folds", "epoch", "s/epoch", "loss", "mae↓", "MAE↓", "MSE↓", "RMSE↓", "R2"]
    assert report.splitlines()[3].split()[6] == f"{summary['mean']['mae']:.4f}"


def test_early_stop_on_mae_stops_when_it_does_not_improve(tmp_path, capsys):
    path = regression_manifest(tmp_path, '[plugins.early_stop]\npatience = 1\nmetric = "mae"\nmin_delta = 1000.0\n', epochs=5)
    code, out, err = cli(capsys, "run", path)
    assert (code, err) == (0, "")
    log = read_json(tmp_path / "res" / "mlp" / "trainlog.json")
    assert list(log) == ["1", "2"]  # epoch 2 did not beat epoch 1 by 1000
    final = read_json(tmp_path / "res" / "mlp" / "test_metrics.json")
    assert final["stopped"] == "early stop at epoch 2: no mae improvement for 1 evaluations"


BUILTIN_KNOWN = "loss, accuracy/acc, IoU/iou, balanced_accuracy, precision, recall, F1/f1, MAE, MSE, RMSE, R2/r2"
MAE_KNOWN = f"known: {BUILTIN_KNOWN.replace('IoU/iou', 'IoU/iou, mae')}"  # the plugin registers before the built-ins


@pytest.mark.parametrize(
    "tail, expected",
    [
        (
            '[plugins.checkpoint]\npolicy = "best"\nmetric = "mea"\n',
            f'plugins.checkpoint.metric: "mea" is not a registered metric ({MAE_KNOWN}); register it with izitorch_register_metrics or fix the name',
        ),
        (
            '[plugins.checkpoint]\nmetric = "f2"\n',  # written, so checked even when "last" does not compare it
            f'plugins.checkpoint.metric: "f2" is not a registered metric ({MAE_KNOWN}); register it with izitorch_register_metrics or fix the name',
        ),
        (
            '[plugins.early_stop]\nmetric = "Mae"\n',
            f'plugins.early_stop.metric: "Mae" is not a registered metric ({MAE_KNOWN}); register it with izitorch_register_metrics or fix the name',
        ),
    ],
)
def test_an_unknown_metric_name_is_one_line_at_validate_and_run(tmp_path, capsys, tail, expected):
    path = regression_manifest(tmp_path, tail)
    code, out, err = cli(capsys, "validate", path)
    assert (code, out) == (2, "")
    assert error_of(err) == f"{path}: {expected}"
    code, out, err = cli(capsys, "run", path)
    assert (code, out) == (2, "")
    assert error_of(err) == f"{path}: {expected}"
    assert not (tmp_path / "res").exists()


def test_a_legacy_metric_cannot_pick_the_best_epoch(tmp_path, capsys):
    path = regression_manifest(tmp_path, '[plugins.checkpoint]\npolicy = "best"\nmetric = "legacy_mae"\n', plugins='"legacy.py"')
    code, out, err = cli(capsys, "validate", path)
    assert (code, out) == (2, "")
    assert error_of(err) == (
        f'{path}: plugins.checkpoint.metric: "legacy_mae" is not a registered metric (known: {BUILTIN_KNOWN}); '
        "metrics registered without declared names (legacy) cannot be compared: give the factory "
        'names = {"<value>": "higher" | "lower"}, or fix the name'
    )


def test_without_the_metrics_plugin_only_a_used_metric_is_checked(tmp_path, capsys):
    path = regression_manifest(tmp_path, plugins='"no:metrics"')
    assert cli(capsys, "validate", path)[0] == 0  # checkpoint "last": its default metric is not used
    path = regression_manifest(tmp_path, "[plugins.early_stop]\npatience = 2\n", plugins='"no:metrics"')
    code, _, err = cli(capsys, "validate", path)
    assert code == 2
    assert error_of(err).startswith(f'{path}: plugins.early_stop.metric: "loss" is not a registered metric (known: none); ')


@pytest.mark.parametrize("layout", ["lone", "vectorized", "parallel_folds"])
def test_a_legacy_metric_counts_what_the_new_protocol_counts(tmp_path, capsys, layout):
    """The legacy adapter feeds each member its own samples (parallel folds: its fold's) and
    leaves nothing out: its MAE equals the protocol's MAE in every phase of every epoch."""
    models, run, tail = (("mlp", 0.5),), "", ""
    if layout != "lone":
        models, run = (("a", 0.5), ("b", 0.1)), 'multi_model = "vectorized"\n'
    if layout == "parallel_folds":
        run, tail = "", "[plugins.kfold]\nk = 3\nparallel = true\n"
    path = regression_manifest(tmp_path, tail, epochs=2, models=models, run=run, plugins='"mae.py", "legacy.py"')
    code, out, err = cli(capsys, "run", path)
    assert (code, err) == (0, "")
    if layout != "lone":
        assert "vectorized" in out
    folders = [tmp_path / "res" / name for name, _ in models]
    if layout == "parallel_folds":
        folders = [folder / f"FOLD_{k}" for folder in folders for k in (1, 2, 3)]
    for folder in folders:
        for entry in read_json(folder / "trainlog.json").values():
            for prefix in ("", "val_"):
                assert entry[prefix + "legacy_mae"] == pytest.approx(entry[prefix + "mae"], rel=1e-5), (folder, prefix)
        final = read_json(folder / "test_metrics.json")
        assert final["legacy_mae"] == pytest.approx(final["mae"], rel=1e-5)
    assert "legacy_mae" in out.split("final test scores:")[1].splitlines()[1].split()  # shown, without a direction


BROKEN = """\
from izitorch import hookimpl


class Broken:
    names = {"broken": "lower"}

    def __init__(self, num_classes, members):
        pass

    def update(self, outputs, target, losses, mask=None):
        UPDATE

    def compute(self):
        return {"broken": 1.0}  # a dict, not one dict per member


@hookimpl
def izitorch_register_metrics(register):
    register("broken", Broken)
"""


@pytest.mark.parametrize(
    "update, expected",
    [
        ('raise KeyError("pred")', "metric \"broken\": update raised KeyError: 'pred'"),
        ("pass", 'metric "broken": compute() returned a table; it must return one dict per member (here 1), such as [{"mae": 0.31}]'),
    ],
)
def test_a_failing_metric_is_one_line_exit_1(tmp_path, capsys, update, expected):
    path = regression_manifest(tmp_path, plugins='"broken.py"')
    (tmp_path / "broken.py").write_text(BROKEN.replace("UPDATE", update), encoding="utf-8")
    code, out, err = cli(capsys, "run", path)
    assert code == 1
    assert error_of(err) == f"{path}: {expected}"


# -- units: masks, directions, names ----------------------------------------------------------------


def mae_factory():
    namespace: dict = {}
    exec(compile(readme_mae(), "mae.py", "exec"), namespace)
    return namespace["MeanAbsoluteError"]


OUTPUTS = torch.tensor([[[0.0], [1.0], [2.0], [3.0]], [[1.0], [1.0], [1.0], [1.0]]])  # [K=2, B=4, 1]
TARGET = torch.tensor([[0.5], [0.0], [4.0], [3.0]])
MASK = torch.tensor([[True, False, True, False], [False, False, False, False]])  # member 1 frozen


def test_a_mask_counts_only_its_samples():
    """By hand: member 0 counts samples 0 and 2 (errors 0.5 and 2.0; losses weigh 2 samples),
    member 1 nothing; without the mask, all four."""
    losses = torch.tensor([0.25, float("nan")])
    mae, loss = mae_factory()(None, 2), LossMeter(None, 2)
    for meter in (mae, loss):
        meter.update(OUTPUTS, TARGET, losses, MASK)
        meter.update(OUTPUTS, TARGET, torch.tensor([1.0, 2.0]))
    assert mae.compute() == [{"mae": pytest.approx((0.5 + 2.0 + 0.5 + 1.0 + 2.0 + 0.0) / 6)}, {"mae": pytest.approx((0.5 + 1.0 + 3.0 + 2.0) / 4)}]
    assert loss.compute() == [{"loss": pytest.approx((0.25 * 2 + 1.0 * 4) / 6)}, {"loss": pytest.approx(2.0)}]

    classes = ConfusionMeter(3, 2)
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 2], [1, 1, 1, 1]]), 3).float()
    classes.update(logits, torch.tensor([0, 2, 2, 1]), torch.zeros(2), MASK)
    member0, member1 = classes.compute()
    assert member0["confusion_matrix"].tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]  # samples 0 and 2 only
    assert member0["accuracy"] == 100.0 and member1["confusion_matrix"].sum() == 0


def test_the_readme_metric_merges_another_process_counts():
    """The README's merge(): a half of the batches in each accumulator (one counted nothing of
    member 1), merged, gives what one accumulator of both halves gives."""
    factory = mae_factory()
    whole, first, second = factory(None, 2), factory(None, 2), factory(None, 2)
    for meter, batches in ((whole, 2), (first, 1)):
        meter.update(OUTPUTS, TARGET, torch.zeros(2), MASK)
        if batches == 2:
            meter.update(OUTPUTS, TARGET, torch.zeros(2))
    second.update(OUTPUTS, TARGET, torch.zeros(2))
    first.merge(second)
    assert first.compute() == [{"mae": pytest.approx(value["mae"])} for value in whole.compute()]
    fresh = factory(None, 2)
    fresh.merge(second)  # an accumulator that counted nothing takes the other's counts
    assert fresh.compute() == second.compute()


class LegacyMAE:
    def __init__(self, num_classes=None):
        self.errors = []

    def update(self, output, target, loss):
        self.errors.append((output - target).abs().reshape(-1))

    def compute(self):
        return {"legacy_mae": float(torch.cat(self.errors).mean())}


def test_the_legacy_adapter_feeds_each_member_its_own_samples():
    meter = legacy_meter(LegacyMAE)(None, 2)
    assert isinstance(meter, LegacyMeters)
    meter.update(OUTPUTS, TARGET, torch.zeros(2), MASK)
    assert meter.compute() == [{"legacy_mae": pytest.approx((0.5 + 2.0) / 2)}, {}]  # member 1 counted nothing
    both = meters_for({"legacy": LegacyMAE, "loss": LossMeter}, None, 1)
    assert [type(meter.meter) for meter in both] == [LegacyMeters, LossMeter]


FACTORIES = {"loss": LossMeter, "classification": ConfusionMeter, "mae": mae_factory()}


def test_directions_and_names_come_from_the_registered_metrics():
    classification = dict.fromkeys(("accuracy", "IoU", "balanced_accuracy", "precision", "recall", "F1", "acc", "iou", "f1"), "higher")
    assert directions(FACTORIES) == {"loss": "lower", "mae": "lower", **classification}
    assert [resolve(name, FACTORIES) for name in ("loss", "acc", "accuracy", "iou", "IoU", "mae")] == ["loss", "accuracy", "accuracy", "IoU", "IoU", "mae"]
    with pytest.raises(ManifestError) as info:
        resolve("Loss", FACTORIES, "plugins.x.metric")
    assert str(info.value) == (
        'plugins.x.metric: "Loss" is not a registered metric (known: loss, accuracy/acc, IoU/iou, balanced_accuracy, precision, recall, F1/f1, mae); '
        "register it with izitorch_register_metrics or fix the name"
    )
    assert better("lower", 0.1, 0.2) and not better("lower", 0.2, 0.1) and better("higher", 0.2, 0.1)
    assert not better("lower", 0.15, 0.2, min_delta=0.1) and better("higher", 1.0, None)
    nan = float("nan")
    assert not better("lower", nan, 0.2) and not better("higher", nan, None) and better("lower", 5.0, nan)


@pytest.mark.parametrize("names", [{"mae": "down"}, ["mae"], {1: "lower"}])
def test_a_metric_declaring_no_direction_is_refused_in_one_line(names):
    """The registry refuses it, before anything is built."""

    class Hook:
        @staticmethod
        def izitorch_register_metrics(register):
            register("bad", type("Bad", (), {"names": names}))

    with pytest.raises(IzitorchError) as info:
        registered(Hook)
    assert str(info.value).startswith('plugins: metric "bad": names must map each value it computes to "higher" or "lower"')
    assert "\n" not in str(info.value)


def test_meters_that_counted_nothing_give_empty_scores():
    assert [meter.compute() for meter in meters_for(FACTORIES, None, 3)] == [[{}, {}, {}]] * 3


def test_two_metrics_computing_the_same_value_are_refused():
    class Hook:
        @staticmethod
        def izitorch_register_metrics(register):
            register("loss", LossMeter)
            register("my_loss", type("MyLoss", (), {"names": {"loss": "higher"}}))

    with pytest.raises(IzitorchError) as info:
        registered(Hook)
    assert str(info.value) == (
        'plugins: metrics "loss" and "my_loss" both compute "loss"; a value needs one metric: rename it in one of them, or disable one plugin'
    )


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"directions": {"mae": "lower"}}, ["mlp", "-", "1", "0.5000", "0.2000"]),  # sorted on mae, lower first
        ({"directions": {"mae": "sideways"}}, 'mlp.directions: expected a table of "higher" / "lower", found a table;'),
        ({"mean": {"loss": 0.5, "mae": "low"}}, 'mlp.mean.mae: expected a number, found "low";'),
    ],
)
def test_report_reads_the_directions_results_json_holds(tmp_path, capsys, entry, expected):
    res = tmp_path / "res"
    res.mkdir()
    summary = {
        "mlp": {"folds": 1, "mean": {"loss": 0.5, "mae": 0.2}, **entry},
        "cnn": {"folds": 1, "mean": {"loss": 0.4, "mae": 0.3}, "directions": {"mae": "lower"}},
    }
    (res / "results.json").write_text(json.dumps(summary), encoding="utf-8")
    code, out, err = cli(capsys, "report", res)
    if isinstance(expected, list):
        assert (code, err) == (0, "")
        assert out.splitlines()[1].split() == ["model", "params", "folds", "loss", "mae↓"]
        assert [line.split() for line in out.splitlines()[3:]] == [expected, ["cnn", "-", "1", "0.4000", "0.3000"]]
    else:
        assert (code, out) == (2, "")
        assert error_of(err).startswith(f"{res / 'results.json'}: {expected}")


TINY_MANIFEST_HEAD = TINY_MANIFEST.format(res_dir="res")


def test_a_third_party_option_declared_with_metric_option_is_checked(write_manifest):
    """Checked when written, or when the plugin says it uses it; named by its key path."""
    import attrs

    from izitorch.manifest import load_manifest
    from izitorch.options import check_metric_options, metric_option

    @attrs.frozen
    class WatchOptions:
        on: bool = False
        watch: str = metric_option("f2", "what to watch", used=lambda options: options.on)

    plugin = type("Watch", (), {"izitorch_options": WatchOptions})
    for table, refused in (
        ("", False),
        ("[plugins.watch]\non = true\n", True),
        ('[plugins.watch]\nwatch = "f2"\n', True),
        ('[plugins.watch]\nwatch = "acc"\non = true\n', False),
    ):
        config = load_manifest(write_manifest(TINY_MANIFEST_HEAD + table))
        if not refused:
            check_metric_options([("watch", plugin)], config, FACTORIES)
            continue
        with pytest.raises(ManifestError) as info:
            check_metric_options([("watch", plugin)], config, FACTORIES)
        assert str(info.value).startswith(f'{config.source}: plugins.watch.watch: "f2" is not a registered metric (known: ')
