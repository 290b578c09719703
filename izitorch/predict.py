"""``izitorch predict RES_DIR --model NAME --data REF --out preds.csv``: one model's predictions.

One row per sample of the dataset given, in its order: ``index`` (the sample's index in the
dataset), ``target`` where each sample's target is one value, then

- for a classifier (``[run] task = "classification"`` where the run names it; otherwise a
  class-index criterion, ``CrossEntropyLoss`` or ``NLLLoss``, on outputs of shape ``(batch,
  classes)``): ``predicted``, the class of the highest output, and ``prob_<c>`` for each class,
  the softmax of the outputs;
- for any other model: ``output_<i>``, the output values of the sample, flattened.

The file is written atomically (a temporary file moved into place when every row is written),
so a failure part-way leaves no half file; an existing ``--out`` is replaced only with
``--overwrite``.
"""

from __future__ import annotations

import csv
import io
import os
from typing import IO, Any

import torch

from izitorch import precision
from izitorch.errors import IzitorchError, located_in
from izitorch.evaluate import _setup, batches, check_out, evaluation_data
from izitorch.io import atomic_write
from izitorch.trained import TrainedRun, load_weights

CLASS_CRITERIA = (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)


def is_classifier(run: TrainedRun, criterion: Any, output: torch.Tensor) -> bool:
    """Whether ``output`` holds class scores: the run's ``task`` says so where it has one, else a
    class-index criterion on ``(batch, classes)`` outputs."""
    task = getattr(run.config.run, "task", None)
    if task in ("classification", "regression", "segmentation"):
        return task == "classification" and output.dim() == 2
    return isinstance(criterion, CLASS_CRITERIA) and output.dim() == 2


def predict(
    res_dir: str | os.PathLike,
    name: str,
    data: str,
    out: str | os.PathLike,
    fold: int | None = None,
    which: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    overwrite: bool = False,
) -> int:
    """Write model ``name``'s predictions on every sample of ``data`` to ``out`` (CSV); return
    the number of rows."""
    from izitorch.data import pick_device

    run = TrainedRun(res_dir, overrides, other_data=True)
    run.spec(name, "--model")
    index = run.fold_index(fold, "--fold")
    path = check_out(out, run.res_dir, overwrite)
    checkpoint = run.checkpoint(name, index, which)
    with located_in(str(run.conf_file)):
        device = pick_device(run.config.run.device)
        precision.check(run.config.run.precision, device)
    slot = run.build(name)
    load_weights(slot.model, checkpoint).to(device)
    evaluated = evaluation_data(run, data)
    rows = 0

    def write(handle: IO[bytes]) -> None:
        nonlocal rows
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = csv.writer(text)
        header: list[str] | None = None
        autocast = precision.autocast(run.config.run.precision, device)
        with torch.no_grad(), _setup("--data"):
            for inputs, target in batches(run, evaluated.dataset, evaluated.indices[index], device):
                with autocast:
                    output = call(slot, inputs)
                output = output.float()
                classifier = is_classifier(run, slot.criterion, output)
                columns = _values(output, classifier)
                targets = target.reshape(len(target), -1) if isinstance(target, torch.Tensor) and target.dim() > 0 else None
                with_target = targets is not None and targets.shape[1] == 1
                if header is None:
                    header = ["index"] + (["target"] if with_target else []) + _header(columns.shape[1], classifier)
                    writer.writerow(header)
                elif len(header) != 1 + with_target + columns.shape[1] + (1 if classifier else 0):
                    raise IzitorchError(f"model {name}: the output of a batch has another shape ({tuple(output.shape)}) than the first batch's", "--data")
                samples = evaluated.indices[index][rows : rows + len(output)].tolist()
                predicted = output.argmax(1).tolist() if classifier else None
                target_values = targets[:, 0].tolist() if with_target else None
                for k, row in enumerate(columns.tolist()):
                    line: list[Any] = [samples[k]]
                    if with_target:
                        line.append(target_values[k])
                    if classifier:
                        line.append(predicted[k])
                    writer.writerow(line + row)
                rows += len(output)
        text.flush()
        text.detach()  # the handle stays open for atomic_write to sync and move it

    atomic_write(path, write)
    return rows


def call(slot: Any, inputs: Any) -> torch.Tensor:
    """The model's output on a batch, which must be one tensor to be written as rows."""
    from izitorch.stacks import call_model

    output = call_model(slot, inputs)
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        raise IzitorchError(
            f"model {slot.name}: the output is {type(output).__name__}, not a tensor with a batch dimension; predict writes one tensor per batch", "--model"
        )
    return output


def _values(output: torch.Tensor, classifier: bool) -> torch.Tensor:
    """The columns after ``index`` and ``target``: class probabilities, or the flattened outputs."""
    if classifier:
        return torch.softmax(output, dim=1).cpu()
    return output.reshape(len(output), -1).cpu()


def _header(width: int, classifier: bool) -> list[str]:
    if classifier:
        return ["predicted"] + [f"prob_{c}" for c in range(width)]
    return [f"output_{i}" for i in range(width)]
