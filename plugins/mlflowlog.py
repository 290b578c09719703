"""MLflow tracking: one MLflow run per model (``[plugins.mlflow]``, off by default).

``pip install "izitorch[mlflow]"`` (the tracking client, ``mlflow-skinny``). Each model gets a run
in the experiment named by ``experiment`` (unset: the name of ``res_dir``), named after the model,
with:

- params: the model's table as the manifest spells it (``model``, ``params.hidden``,
  ``optimizer``, ``optimizer.lr``, ``criterion``, ``scheduler.*``, ``seed``), its sweep values
  (``sweep.optimizer.lr``: the keys a sweep varied), and the run's ``batch_size`` and ``epochs``;
- metrics per epoch at ``step = epoch``: every numeric value of the epoch's scores under the
  trainlog's names (``loss``, ``accuracy``, ``val_loss``, ``test_accuracy``, ``lr``, the
  timings), the same values as ``trainlog.json`` and ``metrics.csv``;
- the final test scores as ``final_test_<metric>`` (at the step of the epoch whose weights they
  score; the training time per epoch as ``final_train_time``), and the checkpoint files kept under fixed names (``model.pth.tar``, or
  ``model_best.pth.tar`` and ``model_last.pth.tar``) as artifacts under ``checkpoint/``.

With k-fold, as MLflow's own autologging does for a parameter search, the model's run is a parent
holding the params and each final test metric's mean over the folds (``final_test_accuracy``)
and standard deviation (``final_test_accuracy_std``), and each fold is a nested child run
(``mlflow.parentRunId``) with the per-epoch metrics, the fold's final scores and checkpoint:
the runs table then compares models in one row each, and a model's folds unfold beneath it.

Where: ``tracking_uri`` as MLflow takes it (a server, ``sqlite:///...``, a folder); unset, a file
store in ``res_dir/mlruns``, which the run claims whole in its record of files, so that
``--overwrite`` deletes it with the rest. MLflow 3 refuses file stores unless
``MLFLOW_ALLOW_FILE_STORE`` is set: the plugin sets it for the duration of a run that uses one.

Runs end FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM; a hard kill leaves them
RUNNING until ``--resume`` reopens them. Each run carries the tags ``izitorch.res_dir``,
``izitorch.model`` (and ``izitorch.fold``): a resume finds the runs of its ``res_dir`` by them
(the newest of each, also one created after the last saved state), and logs to them only the
(metric, step) pairs they do not hold yet. A resumed run trains again, bit for bit, the epochs
after its saved state, so a value the killed run had logged is the value it would log again; its
timings alone would differ, and the first ones stay.

mlflow is imported when the plugin is configured, never by a run that does not enable it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

import attrs

from izitorch.config import FieldError, doc
from izitorch.errors import IzitorchError, TrainingError, error_text, shorten
from izitorch.guard import Interrupted
from izitorch.hookspecs import hookimpl
from izitorch.io import claim_folder, flush
from izitorch.options import plugin_options
from izitorch.plugins.trainlog import describe, flatten

STORE = "mlruns"  # the default file store, in res_dir
#: The checkpoint plugin's files under fixed names: the weights a fold keeps (not the per-epoch ones)
CHECKPOINTS = ("model.pth.tar", "model_best.pth.tar", "model_last.pth.tar")
ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"
#: What MLflow accepts in a metric or param name (colons aside, refused on Windows)
_NAME_ILLEGAL = re.compile(r"[^\w.\- /]")
_BATCH = 100  # params (and tags) per log_batch, MLflow's limit


def _non_empty(_instance: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not value.strip():
        raise FieldError(attribute.name, "is empty: leave the key out for the default")


@attrs.frozen
class MlflowOptions:
    experiment: str | None = attrs.field(default=None, validator=_non_empty, metadata=doc("the MLflow experiment the runs go to (unset: the name of res_dir)"))
    tracking_uri: str | None = attrs.field(
        default=None,
        validator=_non_empty,
        metadata=doc("where MLflow records the runs: a server, sqlite:///file.db, a folder (unset: a file store in res_dir/mlruns)"),
    )


def _mlflow(config) -> Any:
    """The mlflow module; one line and exit 2 when the extra is not installed."""
    try:
        import mlflow
    except ImportError:
        where = "plugins.mlflow" if "mlflow" in config.plugins.tables else "plugins.enable"
        raise IzitorchError('the mlflow plugin needs MLflow: pip install "izitorch[mlflow]"', where, config.source) from None
    return mlflow


class MlflowPlugin:
    izitorch_options = MlflowOptions  # what `izitorch plugins` lists
    izitorch_single_process = True  # one log for the whole run: refused under torchrun (izitorch.runner.check_distributed)

    def __init__(self) -> None:
        self.options = MlflowOptions()
        self.client: Any = None
        self.experiment_id = ""
        self.parents: dict[str, str] = {}  # by model: its run's id (its only run without k-fold)
        self.children: dict[tuple[str, int], str] = {}  # by (model, fold index): the nested run of a fold (k-fold)
        self.open: list[str] = []  # the runs this process started or reopened and has not ended, in order
        self.earlier: dict[tuple[str, int | None], str] = {}  # a resume: the runs of res_dir found in the store
        self.logged: dict[str, set[tuple[str, int]]] = {}  # a reopened run: the (metric, step) it holds
        self._environment: tuple[bool, str | None] | None = None  # MLFLOW_ALLOW_FILE_STORE as it was, while set

    @hookimpl
    def izitorch_configure(self, config) -> None:
        self.options = plugin_options(config, "mlflow", MlflowOptions)
        _mlflow(config)

    # -- the runs' lifetime: opened before the first fold, ended by the run's teardown ------------

    @hookimpl(tryfirst=True)
    def izitorch_run_folds(self, run, resuming: bool) -> None:
        """Open every model's run before the folds train (None: the folds are the schedule's)."""
        self._open(run, resuming)

    @hookimpl
    def izitorch_run_finish(self, run, results) -> None:
        for name, folds in results.items():
            if len(folds) > 1 and name in self.parents:
                self._log(self.parents[name], _mean_and_std(folds), step=0)

    @hookimpl
    def izitorch_run_teardown(self, run, error) -> None:
        self._end("FINISHED" if error is None else _status(error), quietly=error is not None)

    def _open(self, run, resuming: bool) -> None:
        """The experiment, then every model's run: found again on a resume, else created."""
        mlflow = _mlflow(run.config)
        given, res_dir = self.options.tracking_uri, Path(os.path.abspath(run.res_dir))
        folder = _local_folder(given) if given is not None else res_dir / STORE
        if folder is not None and Path(os.path.abspath(folder)) == res_dir:
            raise IzitorchError(
                "is res_dir itself, where MLflow's files would mix with the run's: name a folder inside it (unset: res_dir/mlruns) or elsewhere",
                "plugins.mlflow.tracking_uri",
            )
        if folder is not None and Path(os.path.abspath(folder)).is_relative_to(res_dir):
            claim_folder(folder)  # written by MLflow inside res_dir: the run's, removed whole by --overwrite
        if folder is not None:
            self._allow_file_store()
        uri = given if given is not None else folder.as_uri()
        name = self.options.experiment or res_dir.name
        try:
            if folder is not None:
                # MLflow keeps one store per URI for the process, which lays out its folder once: a
                # second run in this process, after --overwrite removed the folder, lays it out again
                from mlflow.store.tracking.file_store import FileStore

                FileStore(uri)
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None and experiment.lifecycle_stage == "deleted":
                raise IzitorchError(
                    f'the MLflow experiment "{name}" is deleted (in its trash); restore it, or name another one with experiment', "plugins.mlflow.experiment"
                )
            self.experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
        except IzitorchError:
            self._restore_environment()
            raise
        except Exception as error:
            self._restore_environment()
            raise IzitorchError(f'MLflow cannot use "{uri}": {error_text(error)}; check tracking_uri', "plugins.mlflow.tracking_uri") from None
        with _reported("izitorch_run_folds"):
            self.earlier = self._runs_of(run.res_dir) if resuming else {}
            folds = len(run.splits)
            for slot in run.slots:
                tags = {"izitorch.model": slot.name, **({"izitorch.folds": str(folds)} if folds > 1 else {})}
                self.parents[slot.name] = self._run(run, slot, None, slot.name, tags)

    def _fold_run(self, run, slot, fold) -> str:
        """The run a fold's values go to: the model's own without k-fold, else its nested fold run."""
        if fold.count == 1:
            return self.parents[slot.name]
        key = (slot.name, fold.index)
        if key not in self.children:
            tags = {"izitorch.model": slot.name, "izitorch.fold": str(fold.index + 1), "mlflow.parentRunId": self.parents[slot.name]}
            self.children[key] = self._run(run, slot, fold.index, f"{slot.name} fold {fold.index + 1}", tags)
        return self.children[key]

    def _run(self, run, slot, fold: int | None, name: str, tags: dict[str, str]) -> str:
        """A model's (or fold's) run: the one an interrupted run left, reopened, or a new one."""
        found = self.earlier.get((slot.name, fold))
        if found is not None:
            self.client.update_run(found, status="RUNNING")
            self.logged[found] = self._logged(found)
        else:
            created = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, "izitorch.res_dir": str(Path(os.path.abspath(run.res_dir)))})
            found = created.info.run_id
            self._log_params(found, _params(run, slot))
        self.open.append(found)
        return found

    def _runs_of(self, res_dir: Path) -> dict[tuple[str, int | None], str]:
        """The newest run of each model (and fold) that an earlier run of ``res_dir`` created."""
        from mlflow.entities import ViewType

        where, found, token = str(Path(os.path.abspath(res_dir))), {}, None
        newest: dict[tuple[str, int | None], int] = {}
        while True:
            page = self.client.search_runs([self.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            for entry in page:
                tags = entry.data.tags
                if tags.get("izitorch.res_dir") != where or "izitorch.model" not in tags:
                    continue
                fold = tags.get("izitorch.fold")
                key = (tags["izitorch.model"], int(fold) - 1 if fold and fold.isdigit() else None)
                if entry.info.start_time >= newest.get(key, -1):
                    newest[key], found[key] = entry.info.start_time, entry.info.run_id
            token = page.token
            if not token:
                return found

    def _logged(self, run_id: str) -> set[tuple[str, int]]:
        """Every (metric, step) a run already holds."""
        held = set()
        for key in self.client.get_run(run_id).data.metrics:
            held.update((key, metric.step) for metric in self.client.get_metric_history(run_id, key))
        return held

    def _end(self, status: str, quietly: bool = True) -> None:
        """End every run still open with ``status``. After an error (``quietly``) a failure here
        is ignored: the error that ended the training is the one to report."""
        try:
            with _reported("izitorch_run_teardown"):
                while self.open:
                    self.client.set_terminated(self.open[0], status)
                    self.open.pop(0)
        except IzitorchError:
            if not quietly:
                raise
        finally:
            self._restore_environment()

    def _allow_file_store(self) -> None:
        if self._environment is None:
            self._environment = (ALLOW_FILE_STORE in os.environ, os.environ.get(ALLOW_FILE_STORE))
            os.environ[ALLOW_FILE_STORE] = "true"

    def _restore_environment(self) -> None:
        if self._environment is not None:
            was_set, value = self._environment
            if was_set:
                os.environ[ALLOW_FILE_STORE] = value or ""
            else:
                os.environ.pop(ALLOW_FILE_STORE, None)
            self._environment = None

    # -- what each epoch and fold logs ---------------------------------------------------------

    @hookimpl
    def izitorch_epoch_finish(self, run, fold, epoch, scores) -> None:
        for slot in fold.slots:
            phases = scores[slot.name] if slot.name in scores.values else {}
            values = flatten(phases)
            if slot.name in scores.lrs:
                values["lr"] = scores.lrs[slot.name]
            if values:
                self._log(self._fold_run(run, slot, fold), values, step=epoch)

    @hookimpl
    def izitorch_fold_finish(self, run, fold) -> None:
        flush()  # the checkpoints on disk, for MLflow to copy
        for slot in fold.slots:
            run_id = self._fold_run(run, slot, fold)
            final = _final(fold.final_scores.get(slot.name, {}))
            self._log(run_id, final, step=slot.kept_epoch if slot.kept_epoch is not None else fold.epoch)
            folder = run.model_dir(slot, fold)
            for name in CHECKPOINTS:
                if (folder / name).is_file():
                    self.client.log_artifact(run_id, str(folder / name), "checkpoint")
            if fold.count > 1:  # the fold is done; the model's run goes on with the other folds
                self.client.set_terminated(run_id, "FINISHED")
                self.open.remove(run_id)

    def _log(self, run_id: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        held = self.logged.get(run_id)
        now = int(time.time() * 1000)
        metrics = [Metric(_name(key), float(value), now, step) for key, value in values.items()]
        if held is not None:  # a reopened run: what the interrupted one logged stays, once
            metrics = [metric for metric in metrics if (metric.key, step) not in held]
            held.update((metric.key, step) for metric in metrics)
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(_name(key), shorten(value, 5000)) for key, value in params.items()]
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[start : start + _BATCH])


@contextlib.contextmanager
def _reported(hook: str) -> Iterator[None]:
    """What MLflow's calls raise as one line naming the plugin and the hook."""
    try:
        yield
    except IzitorchError:
        raise
    except Exception as error:
        raise TrainingError(f'plugin "mlflow": {hook} raised {error_text(error)}') from None


def _status(error: BaseException) -> str:
    return "KILLED" if isinstance(error, (Interrupted, KeyboardInterrupt)) else "FAILED"


def _local_folder(uri: str) -> Path | None:
    """The folder of a file store (a path, or ``file:``), else None (a server, a database)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # http, sqlite, databricks... (one letter: a Windows drive)
        return None
    return Path(uri)


def _name(key: str) -> str:
    """A metric or param name MLflow accepts (a third-party metric may use any character)."""
    return _NAME_ILLEGAL.sub("_", key).strip("/")[:250] or "_"


def _final(scores: dict[str, Any]) -> dict[str, float]:
    """A fold's final scores as metrics: ``final_test_<metric>``, and ``final_train_time`` (the
    seconds of training per epoch); its ``epoch`` is the step they are logged at."""
    numbers = {key: float(value) for key, value in scores.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {f"final_{key}" if key == "train_time" else f"final_test_{key}": value for key, value in numbers.items() if key != "epoch"}


def _mean_and_std(folds: list[dict]) -> dict[str, float]:
    """Each final test metric's mean over the folds, and its standard deviation (as results.json)."""
    numbers = [_final(fold) for fold in folds]
    keys = [key for key in numbers[0] if all(key in fold for fold in numbers)]
    out = {}
    for key in keys:
        values = [fold[key] for fold in numbers]
        mean = sum(values) / len(values)
        out[key] = mean
        out[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return out


def _params(run, slot) -> dict[str, str]:
    """A model's settings as the manifest spells them, flattened, with its sweep values and the
    run's batch size and epochs."""
    out = {"batch_size": str(run.config.run.batch_size), "epochs": str(run.config.run.epochs)}
    spec = slot.spec
    if spec is None:
        return out
    out["model"] = _text(spec.model)
    _flatten("params", spec.params, out)
    for key in ("criterion", "optimizer", "scheduler"):
        component = getattr(spec, key)
        if component is None:
            continue
        out[key] = _text(component.target)
        _flatten(key, component.params, out)
        if hasattr(component, "interval"):
            out[f"{key}.interval"] = component.interval
    if spec.seed is not None:
        out["seed"] = str(spec.seed)
    out.update((f"sweep.{key}", _text(value)) for key, value in spec.swept.items())  # the keys a sweep varied
    return out


def _flatten(prefix: str, table: dict, out: dict[str, str]) -> None:
    for key, value in table.items():
        if isinstance(value, dict) and value:
            _flatten(f"{prefix}.{key}", value, out)
        else:
            out[f"{prefix}.{key}"] = _text(value)


def _text(value: Any) -> str:
    """A setting as a param's text: a plain value as Python writes it, an object as conf.json does."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float, list, tuple, dict)):
        return str(value)
    return describe(value)
