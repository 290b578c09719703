"""The metric protocol: accumulators over the K members of a stack, with an optional sample mask.

A metric factory registered through ``izitorch_register_metrics`` declares ``names`` (each scalar
value it computes, with the direction that is better: ``"higher"`` or ``"lower"``) and is called
as ``factory(num_classes, members)``; its ``update(outputs [K, B, ...], target [B, ...],
losses [K], mask [K, B] | None)`` runs per batch without synchronising the device, and
``compute()`` returns one dict per member once per phase (see :class:`Metric`). A lone model is
K = 1.

Factories of the previous protocol (no ``names``: ``factory(num_classes)``, ``update(output,
target, loss)``, ``compute() -> dict``) keep working through :func:`legacy_meter`; their values
are logged and shown, but with no declared direction they cannot pick a best epoch.

The declared names make a metric first-class: :func:`directions` tells the checkpoint and
early-stopping plugins (and any plugin that compares scores) which way is better, and
:func:`resolve` turns the name a user writes into the value's key, or one line naming the
known ones.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Protocol

import torch

from izitorch.errors import IzitorchError, ManifestError, TrainingError, describe, error_text

DIRECTIONS = ("higher", "lower")
#: Other spellings a user may write for a value name (``metric = "acc"``).
ALIASES = {"acc": "accuracy", "iou": "IoU", "f1": "F1", "r2": "R2"}
#: The built-in values, listed (and shown) first, in this order.
HEADLINE = ("loss", "accuracy", "IoU")


class Metric(Protocol):
    """What ``factory(num_classes, members)`` returns for a factory registered with
    ``izitorch_register_metrics``; the factory (usually the class) declares :attr:`names`."""

    #: Every scalar value :meth:`compute` may return, with the direction that is better.
    names: ClassVar[dict[str, str]]

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Count one batch. ``outputs`` ``[K, B, ...]`` (member k's output), ``target`` ``[B, ...]``
        (shared), ``losses`` ``[K]`` (each member's mean-reduced batch loss, detached), ``mask``
        ``[K, B]`` bool or None: member k counts only the samples where ``mask[k]`` is True (an
        all-False row: the member is frozen in this batch). Must not synchronise the device
        (no ``.item()``, ``.tolist()`` or boolean indexing)."""

    def compute(self) -> list[dict[str, Any]]:
        """One dict per member, once per phase (``{"mae": 0.31}``); ``{}`` for a member that
        counted nothing. Non-scalar extras (a confusion matrix) may be added, unnamed."""

    # Optional: ``merge(other)`` adds what ``other`` (the same metric's accumulator on another
    # rank, for the same members) counted to this one; ``distributed = "data"`` needs it
    # (:func:`izitorch.sharding.merge_meters`).


def registered(hook: Any) -> dict[str, Any]:
    """Every metric factory the plugins register, by name; a factory whose ``names`` is not a
    table of ``"higher"`` / ``"lower"`` is refused in one line."""
    factories: dict[str, Any] = {}

    def register(name: str, factory: Callable[..., Any]) -> None:
        names = getattr(factory, "names", None)
        if names is not None and (
            not isinstance(names, dict)  # empty: a metric with no scalar value (a confusion matrix only)
            or not all(isinstance(k, str) and v in DIRECTIONS for k, v in names.items())
        ):
            raise IzitorchError(
                f'metric "{name}": names must map each value it computes to "higher" or "lower" (e.g. names = {{"mae": "lower"}}), found {describe(names)}',
                "plugins",
            )
        for other, earlier in factories.items():
            shared = sorted(set(names or ()) & set(getattr(earlier, "names", None) or ()))
            if shared and other != name:
                raise IzitorchError(
                    f'metrics "{other}" and "{name}" both compute "{shared[0]}"; a value needs one metric: rename it in one of them, or disable one plugin',
                    "plugins",
                )
        factories[name] = factory

    hook.izitorch_register_metrics(register=register)
    return factories


def directions(factories: dict[str, Any]) -> dict[str, str]:
    """Each declared value name (and its aliases: ``acc``, ``iou``) -> ``"higher"`` or ``"lower"``."""
    found: dict[str, str] = {}
    for factory in factories.values():
        found.update(getattr(factory, "names", None) or {})
    for alias, name in ALIASES.items():
        if name in found:
            found.setdefault(alias, found[name])
    return found


def metric_directions(run: Any) -> dict[str, str]:
    """:func:`directions` of the run's registered metrics (``run.metric_factories``)."""
    return directions(run.metric_factories)


def resolve(name: str, factories: dict[str, Any], path: str = "") -> str:
    """The value key for the metric name a user wrote (``acc`` -> ``accuracy``), or a one-line
    :class:`ManifestError` at ``path`` listing the known names."""
    known = directions(factories)
    declared = [value for factory in factories.values() for value in (getattr(factory, "names", None) or {})]
    if name in declared:
        return name
    if name in known:
        return ALIASES[name]
    ordered = sorted(dict.fromkeys(declared), key=lambda value: HEADLINE.index(value) if value in HEADLINE else len(HEADLINE))
    listed = ", ".join("/".join([value] + [a for a, target in ALIASES.items() if target == value and a not in declared]) for value in ordered)
    legacy = [registered_as for registered_as, factory in factories.items() if getattr(factory, "names", None) is None]
    if legacy:
        advice = (
            f"metrics registered without declared names ({', '.join(legacy)}) cannot be compared: give the factory "
            'names = {"<value>": "higher" | "lower"}, or fix the name'
        )
    else:
        advice = "register it with izitorch_register_metrics or fix the name"
    raise ManifestError(f"{describe(name)} is not a registered metric (known: {listed or 'none'}); {advice}", path)


def better(direction: str, new: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether ``new`` beats ``best`` by more than ``min_delta`` in ``direction`` (a NaN never
    does, and anything beats a NaN)."""
    if new != new:  # NaN: never an improvement
        return False
    if best is None or best != best:
        return True
    return new < best - min_delta if direction == "lower" else new > best + min_delta


def meters_for(factories: dict[str, Any], num_classes: int | None, members: int) -> list[Any]:
    """A fresh accumulator of every registered metric for a stack of ``members``."""
    return [_Reported(name, _meter(name, factory, num_classes, members), members) for name, factory in factories.items()]


def update_all(meters: list[Any], outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None) -> None:
    """One batch to every accumulator of :func:`meters_for` (one guard around them all, so a
    metric costs the step its own work only); a failure is one line naming the metric."""
    meter = None
    try:
        for meter in meters:
            meter.meter.update(outputs, target, losses, mask)
    except IzitorchError:
        raise
    except Exception as error:  # a plugin's metric may raise anything
        raise TrainingError(f'metric "{meter.name}": update raised {error_text(error)}') from None


def compute_all(meters: list[Any], members: int) -> list[dict[str, Any]]:
    """Every metric's values, one dict per member."""
    values: list[dict[str, Any]] = [{} for _ in range(members)]
    for meter in meters:
        for k, member in enumerate(meter.compute()):
            values[k].update(member)
    return values


def _meter(name: str, factory: Any, num_classes: int | None, members: int) -> Any:
    try:
        if hasattr(factory, "names"):
            return factory(num_classes, members)
        return legacy_meter(factory)(num_classes, members)
    except IzitorchError:
        raise
    except Exception as error:  # a plugin's metric may raise anything
        raise TrainingError(f'metric "{name}": creating its accumulator raised {error_text(error)}') from None


class _Reported:
    """A metric's accumulator whose failures (a plugin's bug) become one line naming the metric,
    and whose ``compute`` is checked to give one dict per member."""

    __slots__ = ("name", "meter", "members")

    def __init__(self, name: str, meter: Any, members: int) -> None:
        self.name, self.meter, self.members = name, meter, members

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        try:
            self.meter.update(outputs, target, losses, mask)
        except IzitorchError:
            raise
        except Exception as error:
            raise TrainingError(f'metric "{self.name}": update raised {error_text(error)}') from None

    def compute(self) -> list[dict[str, Any]]:
        try:
            values = self.meter.compute()
        except IzitorchError:
            raise
        except Exception as error:
            raise TrainingError(f'metric "{self.name}": compute raised {error_text(error)}') from None
        if not isinstance(values, (list, tuple)) or len(values) != self.members or not all(isinstance(v, dict) for v in values):
            raise TrainingError(
                f'metric "{self.name}": compute() returned {describe(values)}; it must return one dict per member '
                f'(here {self.members}), such as [{{"mae": 0.31}}]'
            )
        return list(values)


def legacy_meter(factory: Callable[..., Any]) -> Callable[[int | None, int], "LegacyMeters"]:
    """A factory of the previous protocol as a factory of :class:`Metric` (without ``names``)."""
    return functools.partial(LegacyMeters, factory)


class LegacyMeters:
    """A metric of the previous protocol (``factory(num_classes)``, ``update(output, target, loss)``,
    ``compute() -> dict``): one accumulator per member, each fed its own samples (boolean
    indexing, so a device synchronisation per batch: the price of the old protocol). A member
    that counted nothing reports ``{}``, without calling its accumulator's ``compute``."""

    def __init__(self, factory: Callable[..., Any], num_classes: int | None, members: int) -> None:
        self.meters = [factory(num_classes) for _ in range(members)]
        self.counted = [False] * members

    def update(self, outputs: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        for k, meter in enumerate(self.meters):
            if mask is None:
                meter.update(outputs[k], target, losses[k])
            elif bool(mask[k].any()):
                meter.update(outputs[k][mask[k]], target[mask[k]], losses[k])
            else:
                continue
            self.counted[k] = True

    def compute(self) -> list[dict[str, Any]]:
        return [meter.compute() if counted else {} for meter, counted in zip(self.meters, self.counted)]
