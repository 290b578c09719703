"""Which weights the final test scores: the last epoch's, or the best evaluated epoch's.

A core rule, written once for every kind of stack and both fold schedules:

- ``[run] best_metric`` (any registered metric; unset, the task's headline metric of
  :mod:`izitorch.tasks` where a plugin registers it, else ``loss``) judged in its declared
  direction on the phase evaluated each epoch (validation when there is one) picks each model's
  best epoch. The core tracks it on every run (``Slot.best_epoch``, ``Slot.best_value``): the
  checkpoint plugin's ``best`` policy saves those weights, the console and reports can name it.
- ``[run] test_weights = "best"`` keeps a copy of those weights (``Slot.keep_weights``), and the
  final test scores them; ``"last"`` scores what the last epoch left.

``[plugins.checkpoint] policy = "best"`` with its ``metric`` is the original izitorch's
``save_best`` / ``metric_best``, which tested the best epoch: where ``[run]`` leaves
``test_weights`` / ``best_metric`` unset, they follow it. The checkpoint's ``metric`` also names
``best_metric`` for its other options that save best epochs (``"best_and_last"``, ``top_k``).

Without a validation set, the epoch evaluated each epoch is the test set's: choosing on it biases
the test scores reported upward. The options of the original izitorch that do so (``policy =
"best"``, early stopping) still run, after one warning line (:func:`warn_test_set_choices`), so
that its manifests keep working; every newer option that would (``test_weights = "best"``, the
checkpoint's ``"best_and_last"`` and ``top_k``, ``ReduceLROnPlateau``) is refused.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Iterable

import attrs

from izitorch.config import Config
from izitorch.errors import ManifestError
from izitorch.metrics import better, directions, resolve
from izitorch.streams import say
from izitorch.tasks import headline

if TYPE_CHECKING:
    from izitorch.state import Fold, Scores


@attrs.frozen
class Selection:
    """The run's rule, resolved once its metrics are registered."""

    test_weights: str = "last"
    key: str | None = "loss"  # the value key of ``best_metric`` (``acc`` -> ``accuracy``); None: no metric to pick with
    direction: str | None = "lower"


def resolve_selection(config: Config, factories: dict, task: str | None = None) -> Selection:
    """The run's :class:`Selection` for ``task`` (:mod:`izitorch.tasks`; None: not known yet);
    a one-line ``ManifestError`` for a metric nobody registered, or for best weights picked on
    the test set they are then scored on."""
    checkpoint = checkpoint_table(config)
    legacy_best = checkpoint.get("policy") == "best"
    saves_best = legacy_best or checkpoint.get("policy") == "best_and_last" or bool(checkpoint.get("top_k"))
    test_weights = config.run.test_weights or ("best" if legacy_best else "last")
    metric, path = config.run.best_metric, "run.best_metric"
    default = default_metric(task, factories)
    if metric is None and saves_best:
        metric, path = checkpoint.get("metric", default), "plugins.checkpoint.metric"
    elif metric is None:  # the task's metric or loss when a plugin registers it; without one, no epoch is picked
        if default not in directions(factories):
            if test_weights == "best":
                raise ManifestError('needs a metric to pick the best epoch, and "loss" is not registered: set [run] best_metric', path, config.source)
            return Selection(test_weights, None, None)
        metric = default
    elif saves_best and "metric" in checkpoint and checkpoint["metric"] != metric:
        raise ManifestError(
            f'differs from [run] best_metric = "{metric}": the checkpoint saves the epoch the run picks; remove one of the two',
            "plugins.checkpoint.metric",
            config.source,
        )
    try:
        key = resolve(metric, factories, path)
    except ManifestError as error:
        raise error.located(source=config.source) from None
    if config.run.test_weights == "best" and not has_validation(config):
        raise ManifestError(
            'picks the best epoch on the scores it then reports: without a validation set that is the test set; set [data] validation = true, or use "last"',
            "run.test_weights",
            config.source,
        )
    return Selection(test_weights, key, directions(factories)[key])


def default_metric(task: str | None, factories: dict) -> str:
    """What picks the best epoch where the manifest names nothing: the task's headline metric
    (accuracy, RMSE, IoU) when a plugin registers it, else ``loss``."""
    metric = headline(task)
    return metric if metric is not None and metric in directions(factories) else "loss"


def has_validation(config: Config) -> bool:
    """Whether the run evaluates a validation set each epoch (else it evaluates the test set)."""
    return config.data.validation


def checkpoint_table(config: Config) -> dict:
    """``[plugins.checkpoint]`` as written, empty when the plugin is disabled."""
    return config.plugin_table("checkpoint") if "checkpoint" not in config.plugins.disable else {}


def choices_on_test_set(config: Config, plugins: Iterable[str]) -> list[tuple[str, str]]:
    """The options of the original izitorch that, without a validation set, choose epochs by the
    test scores: ``(key path, what)`` for each one this run uses (``plugins``: the enabled ones)."""
    if has_validation(config):
        return []
    found = []
    if "checkpoint" in plugins and checkpoint_table(config).get("policy") == "best":
        found.append(("plugins.checkpoint.policy", 'policy = "best"'))
    if "early_stop" in plugins:
        found.append(("plugins.early_stop", "early stopping"))
    return found


def warn_test_set_choices(config: Config, plugins: Iterable[str]) -> None:
    """One warning line on stderr when :func:`choices_on_test_set` finds any: they still run (the
    original izitorch's manifests keep working), but the test scores they report are biased."""
    found = choices_on_test_set(config, plugins)
    if not found:
        return
    keys = ", ".join(key for key, _ in found)
    what = " and ".join(text for _, text in found)
    where = ": ".join(part for part in (config.source, keys) if part)
    verb = "chooses" if len(found) == 1 else "choose"
    say(
        f"izitorch: warning: {where}: without a validation set, {what} {verb} epochs on the test set, so the test scores reported "
        "are biased upward; set [data] validation = true",
        sys.stderr,
    )


def note_epoch(selection: Selection, fold: Fold, epoch: int, scores: Scores) -> None:
    """Record each model's best epoch so far from this epoch's evaluation, keeping its weights
    when the final test scores the best ones. Runs before ``izitorch_epoch_finish``, so that the
    plugins see ``slot.best_epoch == epoch`` on the epoch that improved."""
    if selection.key is None:
        return
    for slot in fold.slots:
        value = scores[slot.name].get(fold.eval_phase, {}).get(selection.key) if slot.name in scores else None
        if value is None or not better(selection.direction, float(value), slot.best_value):
            continue
        slot.best_value, slot.best_epoch = float(value), epoch
        if selection.test_weights == "best":
            slot.keep_weights(epoch)
