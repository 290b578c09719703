"""Checkpoint policies (default plugin): ``[plugins.checkpoint] policy = "last" | "all" | "best" | "best_and_last"``, ``top_k``.

- ``last`` (the original ``save_last``): ``model.pth.tar`` rewritten every epoch;
- ``all`` (``save_all``): ``model_epoch{E}.pth.tar`` for every epoch;
- ``best`` (``save_best``): ``model.pth.tar`` and ``best_epoch.json`` on each epoch that the run
  picks as its best so far (:mod:`izitorch.selection`: ``[run] best_metric``, any registered
  metric such as loss, acc, IoU, in its declared direction, on the validation set when there is
  one). Like the original ``save_best``, it makes the final test score those weights unless
  ``[run] test_weights`` says otherwise, and its ``metric`` (``metric_best``) stands for ``[run]
  best_metric`` when that is unset;
- ``best_and_last``: both, in files of their own: ``model_best.pth.tar`` (with
  ``best_epoch.json``) on each best epoch, ``model_last.pth.tar`` every epoch;
- ``top_k = K`` (with any policy but ``all``): also the K best evaluated epochs so far, each in its
  ``model_epoch{E}.pth.tar``, listed best first in ``top_k.json``; the file of an epoch that
  falls out of the K is deleted (a file this run wrote: :func:`izitorch.io.remove`).

``best_and_last`` and ``top_k`` need a validation set: without one they would choose epochs on
the test set (``policy = "best"`` still does, after a warning, for the original's manifests).

A checkpoint is ``{"epoch", "state_dict", "optimizer", "scheduler"}``, written atomically, with
CPU tensors: a model trained on a GPU loads with a plain ``torch.load`` on any machine.
"""

from __future__ import annotations

from typing import Callable

import attrs

from izitorch.config import at_least, doc, one_of
from izitorch.errors import ManifestError
from izitorch.hookspecs import hookimpl
from izitorch.ensemble.snapshots import Template, member_checkpoint
from izitorch.io import discarding_now, remove, save_torch_built, tensor_bytes, write_json
from izitorch.options import better, metric_option, plugin_options
from izitorch.selection import has_validation
from izitorch.state import standalone

POLICIES = ("last", "all", "best", "best_and_last")


@attrs.frozen
class CheckpointOptions:
    policy: str = attrs.field(
        default="last",
        validator=one_of(*POLICIES),
        metadata=doc(
            'model.pth.tar rewritten every epoch ("last"), one file per epoch ("all"), on each best epoch ("best"), '
            'or model_best.pth.tar and model_last.pth.tar ("best_and_last")'
        ),
    )
    metric: str = metric_option(
        "loss",
        "what picks the best epochs, where [run] best_metric is unset: a registered metric (loss, acc, IoU, ...); "
        "unwritten, the task's headline metric (accuracy, RMSE, IoU)",
        used=lambda options: options.policy in ("best", "best_and_last") or options.top_k > 0,
    )
    top_k: int = attrs.field(
        default=0, validator=at_least(0), metadata=doc("also keep the K best epochs, model_epoch{E}.pth.tar, deleting the others (0: off)")
    )


class CheckpointPlugin:
    izitorch_options = CheckpointOptions  # what `izitorch plugins` lists

    def __init__(self) -> None:
        self.options = CheckpointOptions()
        self.top: dict[str, list[list]] = {}  # by model: [[epoch, value], ...] of its top_k epochs, best first
        self.templates: dict[int, Template | None] = {}  # by vector group (id): where its members' state lives

    @hookimpl
    def izitorch_configure(self, config) -> None:
        self.options = options = plugin_options(config, "checkpoint", CheckpointOptions)
        if options.top_k and options.policy == "all":
            raise ManifestError(
                'policy = "all" keeps every epoch, top_k the best K of them (deleting the others): use one of the two',
                "plugins.checkpoint.top_k",
                config.source,
            )
        chooser = "plugins.checkpoint.policy" if options.policy == "best_and_last" else "plugins.checkpoint.top_k" if options.top_k else None
        if chooser is not None and not has_validation(config):
            raise ManifestError(
                "saves the best epochs by [run] best_metric on the evaluated set; without a validation set that is the test set, "
                'whose scores it would then bias: set [data] validation = true (or use policy = "last")',
                chooser,
                config.source,
            )

    @hookimpl
    def izitorch_fold_start(self, run, fold) -> None:
        self.top = {}
        self.templates = {}

    @hookimpl
    def izitorch_epoch_finish(self, run, fold, epoch, scores) -> None:
        policy = self.options.policy
        moment = Moment(fold, self.templates)
        for slot in fold.slots:
            if slot.stopped and "train" not in scores[slot.name]:
                continue  # not trained this epoch: nothing new to save
            folder = run.model_dir(slot, fold)
            best = slot.best_epoch == epoch  # the run's best epoch so far (izitorch.selection)
            names = []
            if policy == "all":
                names.append(f"model_epoch{epoch}.pth.tar")
            elif policy == "last" or (policy == "best" and best):
                names.append("model.pth.tar")
            elif policy == "best_and_last":
                names += ["model_best.pth.tar", "model_last.pth.tar"] if best else ["model_last.pth.tar"]
            dropped = self._rank(run, fold, slot, epoch, scores) if self.options.top_k else None
            if dropped is not None:
                names.append(f"model_epoch{epoch}.pth.tar")
            if names and not discarding_now():  # a rank > 0 under distributed = "data" copies nothing
                build, size = moment.checkpoint(slot, epoch)
                for name in names:
                    save_torch_built(folder / name, build, size)
            if best and policy in ("best", "best_and_last"):
                write_json(folder / "best_epoch.json", {"epoch": epoch, "metric": run.selection.key, "value": slot.best_value, "phase": fold.eval_phase})
            if dropped is not None:
                for old in dropped:
                    remove(folder / f"model_epoch{old}.pth.tar")
                listing = [{"epoch": e, "value": v} for e, v in self.top[slot.name]]
                write_json(folder / "top_k.json", {"metric": run.selection.key, "phase": fold.eval_phase, "epochs": listing})

    def _rank(self, run, fold, slot, epoch: int, scores) -> list[int] | None:
        """Put the epoch among the model's ``top_k`` best so far if it is one of them: return the
        epochs it pushes out (their files are deleted), or None when it is not kept."""
        value = scores[slot.name].get(fold.eval_phase, {}).get(run.selection.key)
        if value is None or value != value:  # not evaluated this epoch, or NaN
            return None
        value, direction, k = float(value), run.selection.direction, self.options.top_k
        kept = self.top.setdefault(slot.name, [])
        if len(kept) == k and not better(direction, value, kept[-1][1]):
            return None
        # best first; on a tie the earlier epoch stays ahead
        place = next((i for i, (_, other) in enumerate(kept) if better(direction, value, other)), len(kept))
        kept.insert(place, [epoch, value])
        dropped = [old for old, _ in kept[k:]]
        del kept[k:]
        return dropped

    @hookimpl
    def izitorch_state_dict(self, run):
        return {"checkpoint": {"top_k": {name: [list(entry) for entry in kept] for name, kept in self.top.items()}}}

    @hookimpl
    def izitorch_load_state_dict(self, run, state) -> None:
        saved = state.get("checkpoint", {}).get("top_k", {})
        self.top = {name: [[int(epoch), float(value)] for epoch, value in kept] for name, kept in saved.items()}


class Moment:
    """The checkpoints of a fold's models at one epoch's end: a vectorized member's is built, when
    its file is serialised, from a copy of its rows of the group made now
    (:mod:`izitorch.ensemble.snapshots`); any other is copied whole now (:func:`checkpoint`)."""

    def __init__(self, fold, templates: dict) -> None:
        self.templates = templates
        stacks = fold.cohort.stacks if fold.cohort is not None else []
        self.members = {id(slot): (stack.group, k) for stack in stacks if stack.vectorized for k, slot in enumerate(stack.members)}

    def checkpoint(self, slot, epoch: int) -> tuple[Callable[[], dict], int]:
        """A function giving ``slot``'s checkpoint of this moment, and its tensors' bytes."""
        group, k = self.members.get(id(slot), (None, 0))
        if group is not None:
            key = id(group)
            if key not in self.templates:
                self.templates[key] = Template.of(group)
            if self.templates[key] is not None:
                scheduler = standalone(slot.scheduler.state_dict(), device="cpu") if slot.scheduler is not None else None
                return member_checkpoint(group, self.templates[key], k, epoch, scheduler)
        state = checkpoint(slot, epoch)
        return lambda: state, tensor_bytes(state)


def checkpoint(slot, epoch: int) -> dict:
    """The original izitorch's checkpoint layout, plus the scheduler when there is one: a
    snapshot (copies of every tensor and container) that may be serialised later."""
    state = {"epoch": epoch, "state_dict": slot.model.state_dict(), "optimizer": slot.optimizer.state_dict()}
    if slot.scheduler is not None:
        state["scheduler"] = slot.scheduler.state_dict()
    # a vectorized member's tensors are views of the whole group; CPU copies load anywhere
    return standalone(state, device="cpu")
