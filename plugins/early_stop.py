"""Early stopping per model: ``[plugins.early_stop] patience = 5, metric = "loss"``.

A model whose evaluation metric (any registered metric, in its declared direction) has not
improved by ``min_delta`` for ``patience`` evaluations stops training (the others carry on); the
fold ends when every model has stopped. Uses the validation scores when there is a validation
set, else the test scores.
"""

from __future__ import annotations

import attrs

from izitorch.hookspecs import hookimpl
from izitorch.config import at_least, doc
from izitorch.metrics import metric_directions, resolve
from izitorch.options import better, metric_option, plugin_options


@attrs.frozen
class EarlyStopOptions:
    patience: int = attrs.field(default=5, validator=at_least(1), metadata=doc("evaluations without improvement before a model stops"))
    metric: str = metric_option("loss", "what must improve: a registered metric (loss, acc, IoU, ...)")
    min_delta: float = attrs.field(default=0.0, metadata=doc("the smallest change that counts as an improvement"))


class EarlyStopPlugin:
    izitorch_options = EarlyStopOptions  # what `izitorch plugins` lists

    def __init__(self) -> None:
        self.options = EarlyStopOptions()
        self.best: dict[str, float] = {}
        self.waited: dict[str, int] = {}
        self.key, self.direction = "loss", "lower"  # the metric's value key and direction

    @hookimpl
    def izitorch_configure(self, config) -> None:
        self.options = plugin_options(config, "early_stop", EarlyStopOptions)

    @hookimpl
    def izitorch_run_start(self, run) -> None:
        self.key = resolve(self.options.metric, run.metric_factories, "plugins.early_stop.metric")
        self.direction = metric_directions(run)[self.key]

    @hookimpl
    def izitorch_fold_start(self, run, fold) -> None:
        self.best, self.waited = {}, {}

    @hookimpl
    def izitorch_should_stop(self, run, fold, epoch, scores):
        key = self.key
        for slot in fold.slots:
            evaluated = scores[slot.name].get(fold.eval_phase, {}) if slot.name in scores else {}
            if slot.stopped or key not in evaluated:
                continue
            value = evaluated[key]
            if better(self.direction, value, self.best.get(slot.name), self.options.min_delta):
                self.best[slot.name], self.waited[slot.name] = value, 0
                continue
            self.waited[slot.name] = self.waited.get(slot.name, 0) + 1
            if self.waited[slot.name] >= self.options.patience:
                slot.stopped = f"early stop at epoch {epoch}: no {key} improvement for {self.options.patience} evaluations"
        if all(slot.stopped for slot in fold.slots):
            return f"every model stopped early (epoch {epoch})"
        return None

    @hookimpl
    def izitorch_state_dict(self, run):
        return {"early_stop": {"best": dict(self.best), "waited": dict(self.waited)}}

    @hookimpl
    def izitorch_load_state_dict(self, run, state) -> None:
        mine = state.get("early_stop", {})
        self.best, self.waited = dict(mine.get("best", {})), dict(mine.get("waited", {}))
