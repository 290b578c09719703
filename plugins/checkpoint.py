"""Checkpoint policies (default plugin): ``[plugins.checkpoint] policy = "last" | "all" | "best"``.

- ``last`` (the original ``save_last``): ``model.pth.tar`` rewritten every epoch;
- ``all`` (``save_all``): ``model_epoch{E}.pth.tar`` for every epoch;
- ``best`` (``save_best``): ``model.pth.tar`` and ``best_epoch.json`` whenever the evaluation
  ``metric`` (``metric_best``: any registered metric, such as loss, acc, IoU) improves in its
  declared direction, on the validation set when there is one. The best weights are also the
  ones the fold's final test uses.

A checkpoint is ``{"epoch", "state_dict", "optimizer", "scheduler"}``, written atomically, with
CPU tensors: a model trained on a GPU loads with a plain ``torch.load`` on any machine.
"""

from __future__ import annotations

import attrs

from izitorch.hookspecs import hookimpl
from izitorch.config import doc, one_of
from izitorch.io import save_torch, write_json
from izitorch.metrics import metric_directions, resolve
from izitorch.options import better, metric_option, plugin_options
from izitorch.state import standalone

POLICIES = ("last", "all", "best")


@attrs.frozen
class CheckpointOptions:
    policy: str = attrs.field(
        default="last",
        validator=one_of(*POLICIES),
        metadata=doc('model.pth.tar rewritten every epoch ("last"), one file per epoch ("all"), or when metric improves ("best")'),
    )
    metric: str = metric_option("loss", 'what "best" compares: a registered metric (loss, acc, IoU, ...)', used=lambda options: options.policy == "best")


class CheckpointPlugin:
    izitorch_options = CheckpointOptions  # what `izitorch plugins` lists

    def __init__(self) -> None:
        self.options = CheckpointOptions()
        self.best: dict[str, float] = {}
        self.key, self.direction = "loss", "lower"  # the metric's value key and direction

    @hookimpl
    def izitorch_configure(self, config) -> None:
        self.options = plugin_options(config, "checkpoint", CheckpointOptions)

    @hookimpl
    def izitorch_run_start(self, run) -> None:
        if self.options.policy == "best":
            self.key = resolve(self.options.metric, run.metric_factories, "plugins.checkpoint.metric")
            self.direction = metric_directions(run)[self.key]

    @hookimpl
    def izitorch_fold_start(self, run, fold) -> None:
        self.best = {}

    @hookimpl
    def izitorch_epoch_finish(self, run, fold, epoch, scores) -> None:
        for slot in fold.slots:
            if slot.stopped and "train" not in scores[slot.name]:
                continue  # not trained this epoch: nothing new to save
            folder = run.model_dir(slot, fold)
            if self.options.policy == "all":
                save_torch(folder / f"model_epoch{epoch}.pth.tar", checkpoint(slot, epoch), snapshot=True)
            elif self.options.policy == "last":
                save_torch(folder / "model.pth.tar", checkpoint(slot, epoch), snapshot=True)
            else:
                self._save_if_best(run, fold, slot, epoch, scores)

    def _save_if_best(self, run, fold, slot, epoch, scores) -> None:
        key = self.key
        evaluated = scores[slot.name].get(fold.eval_phase, {})
        if key not in evaluated or not better(self.direction, evaluated[key], self.best.get(slot.name)):
            return
        self.best[slot.name] = evaluated[key]
        slot.keep_weights(epoch)
        folder = run.model_dir(slot, fold)
        save_torch(folder / "model.pth.tar", checkpoint(slot, epoch), snapshot=True)
        write_json(folder / "best_epoch.json", {"epoch": epoch, "metric": key, "value": evaluated[key], "phase": fold.eval_phase})

    @hookimpl
    def izitorch_state_dict(self, run):
        return {"checkpoint": {"best": dict(self.best)}}

    @hookimpl
    def izitorch_load_state_dict(self, run, state) -> None:
        self.best = dict(state.get("checkpoint", {}).get("best", {}))


def checkpoint(slot, epoch: int) -> dict:
    """The original izitorch's checkpoint layout, plus the scheduler when there is one: a
    snapshot (copies of every tensor and container) that may be serialised later."""
    state = {"epoch": epoch, "state_dict": slot.model.state_dict(), "optimizer": slot.optimizer.state_dict()}
    if slot.scheduler is not None:
        state["scheduler"] = slot.scheduler.state_dict()
    # a vectorized member's tensors are views of the whole group; CPU copies load anywhere
    return standalone(state, device="cpu")
