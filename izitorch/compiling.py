"""``[run] compile = true``: a stack's forward through ``torch.compile``, eager where it cannot be.

Compilation happens at the first call. Where it fails (no compiler on the platform, a torch
without support, a model dynamo cannot trace) the same call is run eagerly: if that works, the
stack goes on uncompiled after one warning line naming the reason; if it fails too, the error
is the model's own and is raised as such.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from izitorch.errors import first_line
from izitorch.streams import say


def compiled(function: Callable, label: str) -> Callable:
    """``function`` compiled, falling back to ``function`` itself (see the module docstring)."""
    if not hasattr(torch, "compile"):
        _warn(label, "this torch has no torch.compile")
        return function
    try:
        fast = torch.compile(function)
    except Exception as error:  # noqa: BLE001 - unsupported platform or Python version
        _warn(label, first_line(error))
        return function
    return _WithFallback(fast, function, label)


class _WithFallback:
    """The compiled function until a call of it fails where the eager one does not (a
    recompilation, for the other train/eval mode say, may fail later than the first call)."""

    def __init__(self, fast: Callable, eager: Callable, label: str) -> None:
        self.fast, self.eager, self.label = fast, eager, label
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.fast(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - decided below: the compiler's or the model's
            result = self.eager(*args, **kwargs)  # the model's own error is raised from here
            self.failed = True
            _warn(self.label, first_line(error))
            return result


def _warn(label: str, reason: str) -> None:
    say(f"izitorch: warning: compile = true: {label} runs uncompiled ({reason[:200]})", sys.stderr)
