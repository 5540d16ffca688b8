"""Casting float64 results to a narrower dtype without enlarging them (certified radii,
distances; docs/MATH.md §12)."""
from __future__ import annotations

import math

import torch

__all__ = ["round_down"]


def round_down(t64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Casts a float64 tensor of non-negative values to ``dtype``, rounding toward zero.

    A value that rounds up in the narrower dtype is replaced by its lower neighbour, so the cast
    never enlarges a certified radius (+inf stays +inf; finite values never become +inf).
    """
    if dtype == torch.float64:
        return t64
    out = t64.to(dtype)
    up = out.to(torch.float64) > t64
    if up.any():
        out = torch.where(up, torch.nextafter(out, torch.full_like(out, -math.inf)), out)
    return out
