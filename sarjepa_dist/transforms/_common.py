"""Small helpers shared by the transforms."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def check_batch(x: torch.Tensor, name: str = "x") -> None:
    """``TypeError`` unless ``x`` is a tensor, ``ValueError`` unless it is a ``(B, C, H, W)`` batch."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) batch, got shape {tuple(x.shape)}")


def autocast_off(device: torch.device) -> ContextManager[object]:
    """Disable autocast for ``device`` inside the transforms.

    The transforms may run inside a train step's ``torch.autocast`` region. CUDA autocast casts
    some ops (``cumsum``, ``log``, reductions) to float32 or lower, which would silently change
    their numbers (and the float64 integral image) between placements; inputs are computed in the
    dtype they are given, always.
    """
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()
