"""Mixed precision (``[run] precision``): autocast of forward and loss, and fp16's loss scaler.

``"32"`` runs as written. ``"bf16"`` and ``"fp16"`` run each stack's forward and loss under
``torch.autocast`` (the weights, their gradients and the optimizer state stay float32);
``"fp16"``, whose range is narrow, scales the loss with a ``torch.amp.GradScaler`` per stack: a
step whose gradients overflow is skipped for the whole stack and the scale is lowered. The
scaler's state is part of the resume state.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from izitorch.config import PRECISIONS  # noqa: F401 - the values of [run] precision
from izitorch.errors import IzitorchError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
KEY = "run.precision"


def check(precision: str, device: torch.device) -> None:
    """Refuse, in one line, a precision this device cannot autocast to."""
    if precision == "32":
        return
    dtype = DTYPES[precision]
    if precision == "fp16" and not hasattr(torch.amp, "GradScaler"):  # torch < 2.3
        raise IzitorchError(f'"fp16" needs torch.amp.GradScaler (torch >= 2.3; this is {torch.__version__}); use precision = "bf16" or "32"', KEY)
    available = getattr(torch.amp, "is_autocast_available", lambda device_type: True)  # older torch: the probe below decides
    if not available(device.type):
        raise IzitorchError(f'"{precision}" needs autocast, which torch does not offer on {device.type}; use precision = "32"', KEY)
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise IzitorchError(f'"bf16" is not supported by {torch.cuda.get_device_name(device)}; use precision = "fp16" or "32"', KEY)
    try:
        with torch.autocast(device.type, dtype=dtype):
            probe = torch.nn.functional.linear(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device))
    except Exception as error:  # noqa: BLE001 - whatever this torch build says
        raise IzitorchError(f'"{precision}" cannot run on {device.type} with this torch ({type(error).__name__}); use precision = "32"', KEY) from None
    if probe.dtype is not dtype:
        raise IzitorchError(f'"{precision}" is not applied on {device.type} by this torch; use precision = "32"', KEY)


def autocast(precision: str, device: torch.device) -> Any:
    """The context a stack's forward and loss run in."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def new_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A fresh loss scaler for one stack under fp16, else None."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


class ScaledStep:
    """What ``GradScaler.unscale_`` and ``GradScaler.step`` take as an optimizer for a stack:
    its parameters (whose gradients are unscaled in place and checked for overflow) and a
    ``step`` that updates the members in ``stepping`` (``GradScaler.step`` skips it when the
    gradients overflowed: ``stepped`` says whether it ran)."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.param_groups = [{"params": stack.scaled_params()}]
        self.stepping: list[bool] = []
        self.stepped = False

    def step(self) -> None:
        self.stack.step(self.stepping)
        self.stepped = True
