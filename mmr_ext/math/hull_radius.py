"""The lp radius of the convex hull of an l1 and an l∞ ball (docs/MATH.md §4; Croce & Hein, ICLR 2020, Thm. 3.1).

Argument handling and output conventions are those of :mod:`mmr_ext.math.ball_radii`.
"""
from __future__ import annotations

import math

import torch

from .ball_radii import Radius, ball_regimes, finish_radius, outside_l1, prepare_radii

__all__ = ["hull_radius", "hull_value64"]


def hull_value64(e1: torch.Tensor, e_inf: torch.Tensor, p: float, q: float, d: int) -> torch.Tensor:
    """``min_{x ∉ conv(B1 ∪ B∞)} ||x||_p`` on broadcast float64 radii (validated by the caller)."""
    small, large, mid = ball_regimes(e1, e_inf, d)
    e1s = torch.where(mid, e1, torch.full_like(e1, 2.0))
    ei = torch.where(mid, e_inf, torch.ones_like(e_inf))
    if math.isinf(p):
        value = ei                      # e1 / r
    elif p == 1.0:
        value = e1s                     # (floor(r) + α^∞)^0 = 1 since floor(r) >= 1
    else:
        r = e1s / ei                    # in (1, d)
        k = torch.floor(r)
        alpha = r - k
        value = e1s / torch.pow(k + torch.pow(alpha, q), 1.0 / q)
    return torch.where(small, e_inf, torch.where(large, outside_l1(e1, q, d), value))


def hull_radius(e1: Radius, e_inf: Radius, p: float, d: int) -> Radius:
    """Exact ``min_{x ∉ conv(B1 ∪ B∞)} ||x||_p`` (Thm. 3.1, docs/MATH.md §4).

    ``e1 / (r - α + α^q)^{1/q}`` with ``r = min(e1/e∞, d)``, ``α = r - floor(r)``, 1/p + 1/q = 1.
    For ``r <= 1`` the hull is B∞ (value e∞), for ``r >= d`` it is B1 (value ``e1 d^{-1/q}``).
    Endpoints in p (the limits of the formula, and the exact values): ``max(e1, e∞)`` at p = 1 and
    ``max(e∞, e1/d)`` at p = inf. A zero radius is a degenerate ball: ``hull_radius(0, e∞)`` is e∞
    (the hull is B∞) and ``hull_radius(e1, 0)`` is ``e1 d^{-1/q}`` (the hull is B1).
    """
    e1, e_inf, p, q, d, spec = prepare_radii(e1, e_inf, ("e1", "e_inf"), p, d)
    return finish_radius(hull_value64(e1, e_inf, p, q, d), spec)
