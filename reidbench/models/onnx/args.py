"""Reading a node's inputs and attributes: shapes, axes and scalars as Python values."""

from __future__ import annotations

from typing import Optional

import torch


def ints(t: Optional[torch.Tensor]) -> list[int]:
    return [] if t is None else [int(v) for v in t.flatten().tolist()]


def floats(t: Optional[torch.Tensor]) -> list[float]:
    return [] if t is None else [float(v) for v in t.flatten().tolist()]


def scalar(t: Optional[torch.Tensor], default: Optional[float]) -> Optional[float]:
    return default if t is None or t.numel() == 0 else float(t.flatten()[0])


def optional(i: list, k: int) -> Optional[torch.Tensor]:
    """Optional input ``k``: None when the node omits it (short list or empty name)."""
    return i[k] if len(i) > k else None


def axes_of(i: list, a: dict, k: int) -> list[int]:
    """``axes`` given as input ``k`` (newer opsets) or as an attribute (older ones)."""
    given = optional(i, k)
    return ints(given) if given is not None else list(a.get("axes", []))
