"""Checkpoint policies (default plugin): ``[plugins.checkpoint] policy = "last" | "all" | "best"``.

- ``last`` (the original ``save_last``): ``model.pth.tar`` rewritten every epoch;
- ``all`` (``save_all``): ``model_epoch{E}.pth.tar`` for every epoch;
- ``best`` (``save_best``): ``model.pth.tar`` and ``best_epoch.json`` on each epoch that the run
  picks as its best so far (:mod:`izitorch.selection`: ``[run] best_metric``, any registered
  metric such as loss, acc, IoU, in its declared direction, on the validation set when there is
  one). Like the original ``save_best``, it makes the final test score those weights unless
  ``[run] test_weights`` says otherwise, and its ``metric`` (``metric_best``) stands for ``[run]
  best_metric`` when that is unset.

A checkpoint is ``{"epoch", "state_dict", "optimizer", "scheduler"}``, written atomically, with
CPU tensors: a model trained on a GPU loads with a plain ``torch.load`` on any machine.
"""

from __future__ import annotations

import attrs

from izitorch.hookspecs import hookimpl
from izitorch.config import doc, one_of
from izitorch.io import save_torch, write_json
from izitorch.options import metric_option, plugin_options
from izitorch.state import standalone

POLICIES = ("last", "all", "best")


@attrs.frozen
class CheckpointOptions:
    policy: str = attrs.field(
        default="last",
        validator=one_of(*POLICIES),
        metadata=doc('model.pth.tar rewritten every epoch ("last"), one file per epoch ("all"), or when metric improves ("best")'),
    )
    metric: str = metric_option(
        "loss",
        'what "best" compares, where [run] best_metric is unset: a registered metric (loss, acc, IoU, ...)',
        used=lambda options: options.policy == "best",
    )


class CheckpointPlugin:
    izitorch_options = CheckpointOptions  # what `izitorch plugins` lists

    def __init__(self) -> None:
        self.options = CheckpointOptions()

    @hookimpl
    def izitorch_configure(self, config) -> None:
        self.options = plugin_options(config, "checkpoint", CheckpointOptions)

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
            elif slot.best_epoch == epoch:  # the run's best epoch so far (izitorch.selection)
                save_torch(folder / "model.pth.tar", checkpoint(slot, epoch), snapshot=True)
                best = {"epoch": epoch, "metric": run.selection.key, "value": slot.best_value, "phase": fold.eval_phase}
                write_json(folder / "best_epoch.json", best)


def checkpoint(slot, epoch: int) -> dict:
    """The original izitorch's checkpoint layout, plus the scheduler when there is one: a
    snapshot (copies of every tensor and container) that may be serialised later."""
    state = {"epoch": epoch, "state_dict": slot.model.state_dict(), "optimizer": slot.optimizer.state_dict()}
    if slot.scheduler is not None:
        state["scheduler"] = slot.scheduler.state_dict()
    # a vectorized member's tensors are views of the whole group; CPU copies load anywhere
    return standalone(state, device="cpu")
