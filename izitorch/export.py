"""``izitorch export RES_DIR --model NAME --format safetensors|onnx``: a trained model for deployment.

- ``safetensors``: the model's weights (its ``state_dict``, every tensor contiguous and on the
  CPU) with metadata naming the model's reference, parameters and epoch, so that
  ``Model(**params).load_state_dict(safetensors.torch.load_file(path))`` rebuilds it.
- ``onnx``: the model traced by ``torch.onnx.export`` on two samples of the run's dataset (or of
  ``--data``), with a dynamic batch dimension: inputs ``input`` (or ``input_<i>`` for a tuple of
  inputs), output ``output``.

Both are optional extras (``pip install "izitorch[safetensors]"``, ``"izitorch[onnx]"``, or
``"izitorch[export]"`` for both); a missing one is one line naming the pip command. The file is
written atomically next to where it goes, never inside RES_DIR, and replaces an existing file
only with ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from izitorch.errors import IzitorchError, first_line
from izitorch.evaluate import _setup, batches, check_out, evaluation_data
from izitorch.io import atomic_write
from izitorch.trained import TrainedRun, load_weights

FORMATS = {"safetensors": ("safetensors",), "onnx": ("onnx", "onnxscript")}
SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx"}


def require(fmt: str) -> None:
    """Refuse in one line a format whose packages are not installed, naming the pip command."""
    missing = [module for module in FORMATS[fmt] if importlib.util.find_spec(module) is None]
    if missing:
        raise IzitorchError(f'--format {fmt} needs {" and ".join(missing)}, not installed: pip install "izitorch[{fmt}]"', "--format")


def default_out(name: str, fold: int | None, fmt: str) -> Path:
    """``<model>[_fold<k>].<suffix>`` in the working directory."""
    return Path(f"{name}{f'_fold{fold}' if fold is not None else ''}{SUFFIX[fmt]}")


def export(
    res_dir: str | os.PathLike,
    name: str,
    fmt: str,
    out: str | os.PathLike | None = None,
    fold: int | None = None,
    which: str | None = None,
    data: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    overwrite: bool = False,
) -> Path:
    """Export model ``name`` of the finished run in ``res_dir`` as ``fmt``; return the file written."""
    if fmt not in FORMATS:
        raise IzitorchError(f'expected "safetensors" or "onnx", got "{fmt}"', "--format")
    require(fmt)
    run = TrainedRun(res_dir, overrides, other_data=data is not None)
    index_, spec = run.spec(name, "--model")
    index = run.fold_index(fold, "--fold")
    path = check_out(out if out is not None else default_out(name, fold, fmt), run.res_dir, overwrite)
    checkpoint = run.checkpoint(name, index, which)
    model = load_weights(run.build(name).model, checkpoint)
    if fmt == "safetensors":
        metadata = {
            "izitorch_model": name,
            "model": str(spec.model),
            "params": json.dumps(spec.params),
            "epoch": str(checkpoint.epoch),
            "checkpoint": str(checkpoint.path),
        }
        atomic_write(path, lambda handle: handle.write(safetensors_bytes(model, metadata)))
    else:
        evaluated = evaluation_data(run, data)
        with _setup("--data"):
            inputs, _ = next(batches(run, evaluated.dataset, evaluated.indices[index][:2], torch.device("cpu")))
        proto = onnx_bytes(model, inputs, name)
        atomic_write(path, lambda handle: handle.write(proto))
    return path


def safetensors_bytes(model: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    """The model's ``state_dict`` as a safetensors file: each tensor its own contiguous CPU copy
    (tied weights are written once per name, as ``load_state_dict`` expects them)."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    return save(tensors, metadata=metadata)


def onnx_bytes(model: torch.nn.Module, inputs: Any, name: str) -> bytes:
    """The model exported by ``torch.onnx.export`` on ``inputs`` (a batch of two samples), with
    the batch dimension dynamic; one line when the exporter cannot take the model."""
    if isinstance(inputs, dict):
        raise IzitorchError(
            f"model {name}: takes keyword inputs (a dict), which the ONNX export does not name; export it with torch.onnx.export yourself", "--format"
        )
    args = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    batch = torch.export.Dim("batch")
    try:
        with _exporter_quiet():
            program = torch.onnx.export(
                model,
                args,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=tuple({0: batch} for _ in args),
                dynamo=True,
                verbose=False,
            )
        return program.model_proto.SerializeToString()
    except IzitorchError:
        raise
    except Exception as error:
        cause = error.__cause__ or error  # the exporter wraps what torch.export or a conversion met
        raise IzitorchError(
            f"model {name}: torch.onnx.export cannot take it: {_plain(first_line(cause))}; a model whose code branches on its data (`if x.sum() > 0`) "
            "or calls what ONNX lacks cannot be exported: use --format safetensors, or export it with torch.onnx.export yourself",
            "--format",
        ) from None


def _plain(text: str) -> str:
    """``text`` without the terminal colour codes the exporter puts in its messages."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter's warnings, log lines and printed graphs (optional operators it skips,
    deprecations, the graph it failed on) kept off the console, where izitorch prints one line
    or nothing; its failures still raise."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
