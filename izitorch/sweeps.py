"""Sweeps in the manifest: one ``[[models]]`` table that stands for many models.

A table may carry

- ``sweep = { "optimizer.lr" = [1e-3, 3e-3], "params.hidden" = [32, 64] }``: each key a dotted
  path inside the table, each value the list of values it takes. ``sweep_mode = "grid"`` (the
  default) trains every combination, in the order the keys are written (the last key varies
  fastest); ``"zip"`` pairs the lists in order (all of one length).
- ``seeds = N``: N replicas of each combination that differ only by their initial weights
  (``seed = 1 .. N``, see :func:`izitorch.data.build_slots`); the data stream is the run's, shared
  by every model as always.

The expansion happens on the manifest's tables, after ``--set`` (which therefore edits the table
as written) and before they are structured: each expanded table is an ordinary ``[[models]]``
entry, named after its values (``mlp_lr0.003_hidden64_s2``) and recording them in ``swept``, so it
groups into vectorized stacks as any other model does and ``conf.json`` describes it fully. A
mistake in an expanded table is reported at the table as written, naming the expanded model.
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any, Iterable

import attrs

from izitorch.errors import ManifestError, describe, join_path

#: The keys of a ``[[models]]`` table that describe a sweep; none is left after the expansion.
SWEEP_KEYS = ("sweep", "sweep_mode", "seeds")
MODES = ("grid", "zip")
#: What may not be swept: the name is made from the values, and a sweep does not nest.
FIXED = frozenset({"name", "swept", "seed", *SWEEP_KEYS})
#: At most this many models from one table: a typo (a list of 1,000 values) is refused, not trained.
MAX_MODELS = 4096


@attrs.frozen
class Expansion:
    """One table that swept: where it was written and the models it became."""

    index: int  # its position in [[models]] as written
    first: int  # the position of its first model once expanded
    names: tuple[str, ...]

    def owns(self, position: int) -> bool:
        return self.first <= position < self.first + len(self.names)


def expand_models(raw: dict) -> list[Expansion]:
    """Replace in ``raw["models"]`` (a manifest's tables) each table that sweeps by the tables it
    stands for; return what was expanded. A malformed sweep is a one-line ``ManifestError`` at
    its key (``models[0].sweep."optimizer.lr"``); other mistakes are left to the structuring."""
    models = raw.get("models")
    if not isinstance(models, list) or not any(isinstance(table, dict) and any(key in table for key in SWEEP_KEYS) for table in models):
        return []
    expanded: list[Any] = []
    expansions = []
    for index, table in enumerate(models):
        if not isinstance(table, dict) or not any(key in table for key in SWEEP_KEYS):
            expanded.append(table)
            continue
        values = _combinations(table, f"models[{index}]")
        base = {key: value for key, value in table.items() if key not in SWEEP_KEYS}
        name = base.get("name")
        if not isinstance(name, str):
            raise ManifestError(f"a sweep needs the table's name to name its models, got {describe(name)}", f"models[{index}].name")
        tables = [_one_model(base, name, chosen, f"models[{index}]") for chosen in values]
        names = tuple(model["name"] for model in tables)
        _check_unique(names, f"models[{index}]")
        expansions.append(Expansion(index, len(expanded), names))
        expanded.extend(tables)
    raw["models"] = expanded
    return expansions


def _combinations(table: dict, where: str) -> list[dict[str, Any]]:
    """Each expanded model's values (``{"optimizer.lr": 0.003, "seed": 2}``), in order."""
    sweep = table.get("sweep", {})
    if not isinstance(sweep, dict):
        raise ManifestError(f'expected a table of "key.path" = [values], got {describe(sweep)}', f"{where}.sweep")
    mode = table.get("sweep_mode", "grid")
    if mode not in MODES:
        raise ManifestError(f"expected one of {', '.join(map(describe, MODES))}, got {describe(mode)}", f"{where}.sweep_mode")
    for key, values in sweep.items():
        path = f'{where}.sweep."{key}"'
        if not isinstance(values, list) or not values:
            raise ManifestError(f"expected a non-empty list of the values {key} takes, got {describe(values)}", path)
        first = key.split(".")[0]
        if first in FIXED or not key or any(not part for part in key.split(".")):
            raise ManifestError('cannot be swept: give the dotted path of a setting of the model\'s table ("optimizer.lr", "params.hidden")', path)
    keys = list(sweep)
    if mode == "zip":
        lengths = {len(values) for values in sweep.values()}
        if len(lengths) > 1:
            counts = ", ".join(f"{key}: {len(values)}" for key, values in sweep.items())
            raise ManifestError(f'"zip" pairs the lists in order, so they need one length ({counts}); make them equal, or use "grid"', f"{where}.sweep_mode")
        rows = list(zip(*sweep.values()))
    else:
        rows = list(itertools.product(*sweep.values()))
    seeds = table.get("seeds")
    if seeds is not None and (not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1):
        raise ManifestError(f"expected an integer >= 1 (replicas with other initial weights), got {describe(seeds)}", f"{where}.seeds")
    combinations = [dict(zip(keys, row)) for row in rows]
    if seeds is not None:
        combinations = [{**values, "seed": seed} for values in combinations for seed in range(1, seeds + 1)]
    if len(combinations) > MAX_MODELS:
        raise ManifestError(f"expands to {len(combinations):,} models, more than {MAX_MODELS:,}: sweep fewer values", f"{where}.sweep")
    return combinations


def _one_model(base: dict, name: str, chosen: dict[str, Any], where: str) -> dict:
    """The table of one expanded model: ``base`` with ``chosen``'s values set at their paths."""
    table = copy.deepcopy(base)
    for key, value in chosen.items():
        if key == "seed":
            table["seed"] = value
            continue
        node = table
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ManifestError(f'"{".".join(parts[: depth + 1])}" is {describe(node)}, not a table, so "{key}" cannot be set', f'{where}.sweep."{key}"')
        node[parts[-1]] = copy.deepcopy(value)
    table["name"] = model_name(name, chosen)
    table["swept"] = {key: value for key, value in chosen.items() if key != "seed"}
    return table


def model_with(base: dict, chosen: dict[str, Any], name: str) -> dict:
    """A ``[[models]]`` table: ``base`` with ``chosen``'s values at their dotted keys (recorded
    in ``swept``), named ``name`` (an Optuna trial's model, :mod:`izitorch.tune`)."""
    table = _one_model(base, name, chosen, "models")
    table["name"] = name
    return table


def model_name(name: str, chosen: dict[str, Any]) -> str:
    """``name`` followed by each swept value, labelled by the last part of its key
    (``mlp_lr0.003_hidden64``), then ``_s<seed>`` for a replica."""
    labels = _labels([key for key in chosen if key != "seed"])
    parts = [name]
    for key, label in labels.items():
        parts.append(f"{label}{_shown(chosen[key], key)}")
    if "seed" in chosen:
        parts.append(f"s{chosen['seed']}")
    return "_".join(parts)


def _labels(keys: list[str]) -> dict[str, str]:
    """The last part of each key, or the whole path (dots as ``-``) where two keys end alike."""
    last = [key.split(".")[-1] for key in keys]
    return {key: (tail if last.count(tail) == 1 else key.replace(".", "-")) for key, tail in zip(keys, last)}


_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


def _shown(value: Any, key: str) -> str:
    """A value as a name shows it: numbers in their short form, a reference by its last name
    (``"torch.optim:SGD"`` -> ``SGD``), other text with unsafe characters dropped."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, str):
        short = re.split(r"[:.]", value)[-1] if ":" in value else value
        return _UNSAFE.sub("", short) or "x"
    return _UNSAFE.sub("", describe(value))[:24] or "x"


def _check_unique(names: tuple[str, ...], where: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ManifestError(
                f'two of its models would both be named "{name}" (values that read alike, such as 1e-3 and 0.001); make the values distinct',
                f"{where}.sweep",
            )
        seen.add(name)


def relocated(error: ManifestError, expansions: list[Expansion]) -> ManifestError:
    """``error`` at the table as written when it is about an expanded model (``models[7].params``
    -> ``models[1].params``, naming the expanded model), else as it is."""
    match = re.match(r"models\[(\d+)\]", error.path or "")
    if not match:
        return error
    position = int(match.group(1))
    for expansion in expansions:
        if expansion.owns(position):
            path = join_path(f"models[{expansion.index}]", error.path[match.end() :].lstrip("."))
            return type(error)(f'{error.message} (in the sweep\'s model "{expansion.names[position - expansion.first]}")', path, error.source)
    shift = sum(len(expansion.names) - 1 for expansion in expansions if expansion.first < position)
    if not shift:
        return error
    return type(error)(error.message, join_path(f"models[{position - shift}]", error.path[match.end() :].lstrip(".")), error.source)


def describe_sweeps(models: Iterable[Any]) -> list[str]:
    """``validate``'s lines for the models a sweep made (``ModelSpec`` with ``swept`` values or a
    ``seed``): each one's name and values, in the order they train."""
    lines = []
    for spec in models:
        values = {**spec.swept, **({"seed": spec.seed} if spec.seed is not None else {})}
        if values:
            lines.append(f"  {spec.name}: " + ", ".join(f"{key} = {_toml(value)}" for key, value in values.items()))
    return [f"sweeps: {len(lines)} model(s)"] + lines if lines else []


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
