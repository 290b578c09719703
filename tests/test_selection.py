"""Which weights the final test scores is a core rule (``izitorch.selection``): the best evaluated
epoch's by ``[run] best_metric`` with ``[run] test_weights = "best"``, the last epoch's with
``"last"``, on every kind of stack and fold schedule; the original ``save_best`` still implies it.

References are computed here: the best epoch from the trainlog's validation scores, and the test
scores by evaluating that epoch's checkpoint (``policy = "all"``) with plain PyTorch.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import cli, error_of
from izitorch.datasets import digits
from izitorch.models import MLP

EPOCHS = 5
WANDERING = {"class": "torch.optim:Adam", "lr": 0.1}  # the validation loss wanders: the best epoch is seldom the last
LAYOUTS = {
    "lone": ({}, [{"name": "mlp"}]),
    "vectorized": ({"run.multi_model": "vectorized"}, [{"name": "a"}, {"name": "b", "optimizer": {"class": "torch.optim:Adam", "lr": 0.2}}]),
    "parallel_folds": ({"plugins.kfold": {"k": 3, "parallel": True}, "plugins.enable": ["kfold"]}, [{"name": "mlp"}]),
}


def trained(manifest, capsys, layout: str, **run) -> tuple:
    """A run of ``layout`` that picks its best epochs by the validation loss unless ``run`` says otherwise."""
    run = {"best_metric": "loss", **run}
    overrides, models = LAYOUTS[layout]
    models = [{"optimizer": WANDERING, **model} for model in models]
    # not stratified: on this split the wandering validation loss peaks before the last epoch
    settings = {
        "run.epochs": EPOCHS,
        "data.validation": True,
        "data.stratify": False,
        "plugins.checkpoint": {"policy": "all"},
        **overrides,
        **{f"run.{k}": v for k, v in run.items()},
    }
    path = manifest(settings, models=models)
    code, out, err = cli(capsys, "run", path)
    assert code == 0, err
    return path.parent / "res", [model["name"] for model in models]


def folders(res, names):
    """(model folder, its fold's split) for each model and fold of the run."""
    splits = pickle.loads((res / "Dataset_split.pkl").read_bytes())
    for name in names:
        for index, split in enumerate(splits):
            yield (res / name if len(splits) == 1 else res / name / f"FOLD_{index + 1}"), split


def reference_scores(folder, split, epoch: int) -> dict:
    """The test loss and accuracy of ``epoch``'s checkpoint, evaluated here."""
    data = digits(limit=300)
    test = torch.as_tensor(split[-1])
    inputs, targets = data.tensors[0][test], data.tensors[1][test]
    model = MLP(hidden=16)
    model.load_state_dict(torch.load(folder / f"model_epoch{epoch}.pth.tar", weights_only=True)["state_dict"])
    with torch.no_grad():
        logits = model(inputs)
    return {"loss": torch.nn.functional.cross_entropy(logits, targets).item(), "accuracy": 100.0 * (logits.argmax(1) == targets).float().mean().item()}


def best_epoch(folder, key: str = "val_loss", lower: bool = True) -> int:
    log = {int(epoch): entry[key] for epoch, entry in json.loads((folder / "trainlog.json").read_text()).items()}
    ordered = sorted(log, key=lambda epoch: (log[epoch] if lower else -log[epoch], epoch))
    return ordered[0]  # the earliest of equal scores: a later epoch must beat the best strictly


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_final_test_scores_the_best_epochs_weights(manifest, capsys, layout):
    res, names = trained(manifest, capsys, layout, test_weights="best")
    picked_earlier = 0
    for folder, split in folders(res, names):
        epoch = best_epoch(folder)
        picked_earlier += epoch < EPOCHS
        tested = json.loads((folder / "test_metrics.json").read_text())
        reference = reference_scores(folder, split, epoch)
        assert tested["epoch"] == epoch
        assert tested["loss"] == pytest.approx(reference["loss"], rel=1e-4)
        assert tested["accuracy"] == pytest.approx(reference["accuracy"])
    assert picked_earlier, "every best epoch was the last: the test cannot tell best from last"


@pytest.mark.parametrize("layout", ["lone", "parallel_folds"])
def test_last_scores_the_last_epochs_weights(manifest, capsys, layout):
    res, names = trained(manifest, capsys, layout, test_weights="last")
    for folder, split in folders(res, names):
        tested = json.loads((folder / "test_metrics.json").read_text())
        assert tested["epoch"] == EPOCHS
        assert tested["loss"] == pytest.approx(reference_scores(folder, split, EPOCHS)["loss"], rel=1e-4)


def test_best_metric_picks_in_its_declared_direction(manifest, capsys):
    res, names = trained(manifest, capsys, "lone", test_weights="best", best_metric="acc")
    ((folder, split),) = folders(res, names)
    epoch = best_epoch(folder, "val_accuracy", lower=False)
    tested = json.loads((folder / "test_metrics.json").read_text())
    assert tested["epoch"] == epoch
    assert tested["accuracy"] == pytest.approx(reference_scores(folder, split, epoch)["accuracy"])


def test_the_checkpoint_best_policy_saves_the_runs_pick_and_implies_best(manifest, capsys):
    """The original ``save_best`` / ``metric_best``: ``model.pth.tar`` and ``best_epoch.json`` hold
    the epoch the core picked, and the final test scores it, with no ``[run]`` key set."""
    path = manifest(
        {"run.epochs": EPOCHS, "data.validation": True, "plugins.checkpoint": {"policy": "best", "metric": "acc"}},
        models=[{"optimizer": WANDERING}],
    )
    assert cli(capsys, "run", path)[0] == 0
    folder = path.parent / "res" / "mlp"
    epoch = best_epoch(folder, "val_accuracy", lower=False)
    best = json.loads((folder / "best_epoch.json").read_text())
    assert (best["epoch"], best["metric"], best["phase"]) == (epoch, "accuracy", "val")
    assert torch.load(folder / "model.pth.tar", weights_only=True)["epoch"] == epoch
    assert json.loads((folder / "test_metrics.json").read_text())["epoch"] == epoch


def test_last_overrides_the_checkpoint_best_policy(manifest, capsys):
    path = manifest(
        {
            "run.epochs": EPOCHS,
            "run.test_weights": "last",
            "data.validation": True,
            "data.stratify": False,
            "plugins.checkpoint": {"policy": "best", "metric": "loss"},
        },
        models=[{"optimizer": WANDERING}],
    )
    assert cli(capsys, "run", path)[0] == 0
    folder = path.parent / "res" / "mlp"
    saved = torch.load(folder / "model.pth.tar", weights_only=True)["epoch"]
    assert saved == best_epoch(folder) < EPOCHS  # the checkpoint keeps the best epoch ...
    assert json.loads((folder / "test_metrics.json").read_text())["epoch"] == EPOCHS  # ... the test scores the last


@pytest.mark.parametrize(
    ("settings", "key", "says"),
    [
        ({"run.test_weights": "best"}, "run.test_weights", "without a validation set that is the test set"),
        ({"run.test_weights": "first"}, "run.test_weights", 'expected one of "last", "best"'),
        ({"run.best_metric": "f2", "data.validation": True}, "run.best_metric", '"f2" is not a registered metric'),
        (
            {"run.best_metric": "acc", "plugins.checkpoint": {"policy": "best", "metric": "loss"}},
            "plugins.checkpoint.metric",
            'differs from [run] best_metric = "acc"',
        ),
    ],
)
def test_a_rule_that_cannot_apply_is_refused_in_one_line(manifest, capsys, settings, key, says):
    path = manifest(settings)
    for command in ("validate", "run"):
        code, out, err = cli(capsys, command, path)
        assert code == 2
        assert error_of(err).startswith(f"{path}: {key}: ") and says in error_of(err)
        assert "Traceback" not in err
    assert not (path.parent / "res").exists()


def test_a_state_written_before_the_core_picked_the_best_epoch_resumes_its_best(manifest, capsys):
    """Format-5 states of the previous release kept the best score in the checkpoint plugin's
    state: extended from 3 to 5 epochs, the run must still compare later epochs against it."""
    settings = {"data.validation": True, "data.stratify": False, "run.test_weights": "best", "run.best_metric": "loss", "plugins.checkpoint": {"policy": "all"}}
    whole = manifest({**settings, "run.epochs": EPOCHS}, name="whole.toml", models=[{"optimizer": WANDERING}])
    assert cli(capsys, "run", whole)[0] == 0
    reference = json.loads((whole.parent / "res" / "mlp" / "test_metrics.json").read_text())
    assert reference["epoch"] == 3  # the epochs after 3 are worse: a resume that forgot epoch 3's score picks 4

    short = manifest({**settings, "run.epochs": 3, "run.res_dir": str(whole.parent / "short")}, name="short.toml", models=[{"optimizer": WANDERING}])
    assert cli(capsys, "run", short)[0] == 0
    state_path = whole.parent / "short" / ".izitorch" / "fold_1.pth.tar"
    state = torch.load(state_path, weights_only=True)
    slot = state["folds"][0]["slots"]["mlp"]
    state["folds"][0]["plugins"]["checkpoint"] = {"best": {"mlp": slot.pop("best_value")}}
    del slot["best_epoch"]
    torch.save(state, state_path)

    extended = manifest({**settings, "run.epochs": EPOCHS, "run.res_dir": str(whole.parent / "short")}, name="extended.toml", models=[{"optimizer": WANDERING}])
    assert cli(capsys, "run", extended, "--resume")[0] == 0
    resumed = json.loads((whole.parent / "short" / "mlp" / "test_metrics.json").read_text())
    assert resumed["epoch"] == reference["epoch"]
    assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-5)


# -- the default metric follows the task ---------------------------------------------------------

REGRESSION = {"data.dataset": "test_task_metrics:diabetes", "data.params": {"limit": 200}, "data.num_classes": None}
REGRESSOR = {"params": {"in_features": 10, "hidden": 32, "num_classes": 1}, "criterion": {"class": "torch.nn:MSELoss"}, "optimizer": WANDERING}


@pytest.mark.parametrize(
    ("settings", "model", "task", "key", "lower"),
    [
        ({}, {"optimizer": WANDERING}, "classification", "accuracy", False),
        (REGRESSION, REGRESSOR, "regression", "RMSE", True),
    ],
    ids=["classification", "regression"],
)
def test_an_unset_best_metric_is_the_tasks_headline(manifest, capsys, settings, model, task, key, lower):
    """No ``best_metric`` anywhere: the best epoch is picked by the task's headline metric
    (accuracy, RMSE), which ``validate`` names and ``conf.json`` records."""
    run = {"run.epochs": EPOCHS, "run.test_weights": "best", "data.validation": True, "data.stratify": False, "plugins.checkpoint": {"policy": "all"}}
    path = manifest({**run, **settings}, models=[model])
    code, out, _ = cli(capsys, "validate", path)
    assert code == 0 and out.endswith(f"; task: {task}, best epoch by {key})\n")
    assert cli(capsys, "run", path)[0] == 0
    res = path.parent / "res"
    conf = json.loads((res / "conf.json").read_text())
    assert (conf["task"], conf["best_metric"]) == (task, key)
    folder = res / "mlp"
    assert json.loads((folder / "test_metrics.json").read_text())["epoch"] == best_epoch(folder, f"val_{key}", lower=lower)


def test_a_metric_written_anywhere_overrides_the_tasks(manifest, capsys):
    """The checkpoint's ``metric`` (the original ``metric_best``) still names what picks the best epoch."""
    path = manifest({"data.validation": True, "plugins.checkpoint": {"policy": "best", "metric": "loss"}})
    code, out, _ = cli(capsys, "validate", path)
    assert code == 0 and out.endswith("; task: classification, best epoch by loss)\n")
    path = manifest({"data.validation": True, "run.best_metric": "f1"}, name="f1.toml")
    code, out, _ = cli(capsys, "validate", path)
    assert code == 0 and out.endswith("; task: classification, best epoch by F1)\n")
