"""Dual norms and distances to hyperplanes (docs/MATH.md §2).

The lp-distance from x to {z : <w, z> + b = 0} is ``|<w, x> + b| / ||w||_q`` with 1/p + 1/q = 1:
:func:`row_norms` gives the dual norms of many rows at once, :func:`safe_distance` the quotient
(+inf for a zero row, which defines no hyperplane). :func:`lp_norm` and :func:`distance` measure
perturbations of a batch in float64.
"""
from __future__ import annotations

import math

import torch

__all__ = ["row_norms", "safe_distance", "lp_norm", "distance"]


def safe_distance(numerator: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """numerator / norm, +inf where norm == 0 (a zero row defines no hyperplane); NaN-free gradients."""
    positive = norm > 0
    safe = torch.where(positive, norm, torch.ones_like(norm))
    return torch.where(positive, numerator / safe, torch.full_like(numerator, math.inf))


def row_norms(V: torch.Tensor, q: float, dim: int) -> torch.Tensor:
    """||.||_q along ``dim``; general q is scaled by the row maximum so that |v|^q cannot overflow."""
    if q in (1.0, 2.0, math.inf):
        return torch.linalg.vector_norm(V, ord=q, dim=dim)
    scale = V.detach().abs().amax(dim=dim, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.linalg.vector_norm(V / scale, ord=q, dim=dim) * scale.squeeze(dim)


def lp_norm(v: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample lp-norm of a batch [B, ...] in float64."""
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1).to(torch.float64), ord=p, dim=1)


def distance(a: torch.Tensor, b: torch.Tensor, p: float) -> torch.Tensor:
    """Per-sample ||a - b||_p in float64 (the difference is taken in float64, so it is exact)."""
    return lp_norm(a.detach().to(torch.float64) - b.detach().to(torch.float64), p)
