"""Every hook izitorch calls, grouped by phase. Specs are empty; their docstrings are the contract.

A plugin implements any of these with ``@izitorch.hookimpl`` on a module-level function or on a
method of a class (a class named by an entry point is instantiated once per run). Hooks receive
explicit arguments and return values; plugin state lives on the plugin instance or in
``run.stash``. No plugin may rely on the order in which other plugins' implementations run: the
core computes scores before ``izitorch_epoch_finish``, so every reader sees the same values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from izitorch.config import Config
    from izitorch.state import Fold, Run, Scores, Slot, Split

hookspec = pluggy.HookspecMarker("izitorch")
hookimpl = pluggy.HookimplMarker("izitorch")  # what plugins mark their hooks with; izitorch.hookimpl


# -- set-up -----------------------------------------------------------------------------------


@hookspec(historic=True)
def izitorch_configure(config: "Config") -> None:
    """Read and validate this plugin's ``[plugins.<name>]`` table; raise ``ManifestError`` on error.

    Called once per run, before anything is built (also by ``izitorch validate``). Historic: a
    plugin registered later still receives it.
    """


@hookspec
def izitorch_register_metrics(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Call ``register(name, factory)`` for each metric this plugin provides. Called once per run,
    after ``izitorch_configure`` (also by ``izitorch validate``, which checks the plugins'
    metric options against what is registered).

    The metric protocol (:class:`izitorch.metrics.Metric`), one for a lone model (K = 1), a
    vectorized group and parallel folds alike. The factory (usually a class) declares
    ``names = {"mae": "lower"}``: every scalar value it computes, with the direction that is
    better (``"higher"`` or ``"lower"``). ``factory(num_classes, members)`` returns a fresh
    accumulator for a stack of K = ``members`` models, per phase and epoch:

    - ``update(outputs, target, losses, mask=None)`` per batch: ``outputs`` ``[K, B, ...]``,
      ``target`` ``[B, ...]`` (shared), ``losses`` ``[K]`` (each member's mean-reduced loss,
      detached), ``mask`` ``[K, B]`` bool or None (member k counts only the samples where
      ``mask[k]`` is True: its own fold's, none when frozen). Must not synchronise the device
      (no ``.item()``, ``.tolist()`` or boolean indexing).
    - ``compute() -> list[dict]`` once per phase: one dict per member (``{}`` when it counted
      nothing), such as ``{"mae": 0.31}``; unnamed non-scalar extras are allowed.
    - ``merge(other)``, optional: add what ``other`` counted (the same metric's accumulator on
      another rank, same members) to this one. Under torchrun with ``distributed = "data"``
      each rank counts its shard and the accumulators are merged before ``compute``; a metric
      without it is refused for such a run.

    A declared value is logged (``trainlog.json``, ``test_metrics.json``, ``results.json``),
    shown by the console and ``izitorch report``, and ``[plugins.checkpoint] metric`` /
    ``[plugins.early_stop] metric`` accept it. A factory without ``names`` (the previous
    protocol: ``factory(num_classes)``, ``update(output, target, loss)``, ``compute() -> dict``)
    still works, one accumulator per member, but cannot pick a best epoch.
    """


@hookspec(firstresult=True)
def izitorch_make_splits(run: "Run", dataset: Any) -> "list[Split] | None":
    """Return the list of :class:`~izitorch.state.Split` to train on (one per fold).

    ``holdout`` answers last (``trylast``); ``kfold`` answers first when enabled.
    """


@hookspec
def izitorch_run_start(run: "Run") -> None:
    """Once, after the splits are made (``run.splits``) and before the first fold."""


@hookspec
def izitorch_run_finish(run: "Run", results: "dict[str, list[dict]]") -> None:
    """Once at the end. ``results[model_name]`` lists each fold's final test scores. Under
    torchrun, on rank 0 alone, with every rank's results (``run.ranks``)."""


@hookspec
def izitorch_run_teardown(run: "Run", error: "BaseException | None") -> None:
    """Once ``izitorch_run_start`` was called, however the run ends. On success ``error`` is None:
    after ``izitorch_run_finish`` and the run's mark that it finished (a teardown that fails then
    fails the command, but the run stays finished). Otherwise ``error`` is what ended the run
    (``izitorch.guard.Interrupted`` for Ctrl-C or SIGTERM, a ``TrainingError``...), raised again
    afterwards; what a teardown raises then is dropped, so the run's own error is the one
    reported. Close what the plugin opened (writers, connections): the hooks in between may not
    all have run. The run's held files (:mod:`izitorch.io`) go to disk after it.
    """


# -- the fold protocol --------------------------------------------------------------------------


@hookspec(firstresult=True)
def izitorch_run_folds(run: "Run", resuming: bool) -> "dict[str, list[dict]] | None":
    """Train every split of ``run.splits``; return each model's final test scores per fold.

    The schedule of the folds. The default (``izitorch.loop``) takes them one after another:
    per split, slots reset to their initial weights, torch, numpy and ``random`` seeded with
    ``rdm_seed + fold`` (``izitorch.reproducibility.seed_everything``), loaders made, then
    ``izitorch_run_fold(run, fold)``; with ``resuming``, finished folds are read from their saved
    state instead. Under torchrun with ``distributed = "models"`` it trains this rank's units
    (``izitorch.spread``): each a fold of its own holding one stack's models. ``[plugins.kfold]
    parallel = true`` answers it by training all folds at once as one cohort (``izitorch.parallel``) with the same fold protocol (``izitorch.loop.train``),
    which calls the per-fold hooks below in fold order.
    """


@hookspec(firstresult=True)
def izitorch_run_fold(run: "Run", fold: "Fold") -> "dict[str, dict] | None":
    """Train and evaluate every slot of one fold; return each slot's final test scores.

    The default (``izitorch.loop``) calls, in this order::

        izitorch_fold_start(run, fold)
        [resume: slots, izitorch_load_state_dict(run, state) and RNG states restored]
        for epoch in first..epochs:
            izitorch_epoch_start(run, fold, epoch)
            train pass: per batch, per stack of models (one model, or a vectorized group):
                        forward, losses, finiteness check (nan_policy), backward; at the end of
                        each accumulation window (every batch by default), per model that steps
                        izitorch_before_optimizer_step(run, slot), then the optimizer step
                        and the schedulers with interval = "step" of the models that stepped;
                        then izitorch_batch_finish(run, fold, step, losses)
            schedulers with interval = "epoch" step (ReduceLROnPlateau: after the evaluation)
            evaluation pass on val or test (every test_epoch epochs and at the last epoch)
            each model's best epoch so far, ReduceLROnPlateau steps on its metric
            izitorch_epoch_finish(run, fold, epoch, scores)
            izitorch_should_stop(run, fold, epoch, scores) -> stop when a reason is returned
            resume state saved (izitorch_state_dict(run) gathered from every plugin)
        final test pass with the weights each slot kept (``Slot.keep_weights``)
        izitorch_fold_finish(run, fold)
        final resume state saved (izitorch_state_dict again)
    """


@hookspec
def izitorch_fold_start(run: "Run", fold: "Fold") -> None:
    """A fold begins: slots hold their initial weights and fresh optimizer/scheduler state."""


@hookspec
def izitorch_fold_finish(run: "Run", fold: "Fold") -> None:
    """A fold ended: ``fold.final_scores[name]`` holds each slot's final test scores."""


@hookspec
def izitorch_epoch_start(run: "Run", fold: "Fold", epoch: int) -> None:
    """An epoch (1-based) begins."""


@hookspec
def izitorch_epoch_finish(run: "Run", fold: "Fold", epoch: int, scores: "Scores") -> None:
    """An epoch ended; ``scores`` holds every slot's train (and val/test) metrics for it, and
    ``scores.lrs`` the learning rate each trained slot's epoch started with."""


@hookspec(firstresult=True)
def izitorch_should_stop(run: "Run", fold: "Fold", epoch: int, scores: "Scores") -> "str | None":
    """Return a reason (a short sentence) to end this fold's training early, or None."""


# -- per step -----------------------------------------------------------------------------------


@hookspec
def izitorch_before_optimizer_step(run: "Run", slot: "Slot") -> None:
    """One slot's gradients are ready (``slot.grads()``) and its optimizer is about to step."""


@hookspec
def izitorch_batch_finish(run: "Run", fold: "Fold", step: int, losses: "dict[str, Any]") -> None:
    """A training batch ended; ``losses[name]`` is each slot's loss tensor (no ``.item()`` done).

    Called only when a plugin implements it, so that an unobserved batch costs nothing.
    """


# -- checkpoint / resume ------------------------------------------------------------------------


@hookspec
def izitorch_state_dict(run: "Run") -> "dict | None":
    """Return this plugin's state to checkpoint as ``{plugin_name: state}``, or None."""


@hookspec
def izitorch_load_state_dict(run: "Run", state: dict) -> None:
    """Restore this plugin's state from ``state`` (what all plugins' ``izitorch_state_dict`` gave)."""
