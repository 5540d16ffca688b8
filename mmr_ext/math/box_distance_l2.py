"""l2 (and l∞) distance to a hyperplane inside a box (docs/MATH.md §7): the clip-path solver.

``min ||t||_p  s.t.  Σ a_i t_i = gap,  0 <= t_i <= room_i`` (a_i = |w_i|). The KKT conditions
give ``t_i = min(μ c_i, room_i)`` with one scalar μ >= 0 and c_i = a_i for p = 2, c_i = 1 for
p = inf: the clip path of :mod:`mmr_ext.math.breakpoints`. ``H(μ) = <a, t(μ)> = C_m + μ A_m``
is continuous, non-decreasing and piecewise linear with breakpoints room_i / c_i, so one sort,
two prefix sums and one searchsorted locate the segment where H crosses the gap, on which
``μ = (gap - C_m) / A_m``: no iteration.
"""
from __future__ import annotations

import math

import torch

from .breakpoints import clip_breakpoints, exclusive_cumsum, first_at_least, suffix_sum, take, take_before

__all__ = ["solve_clip_path", "solve_l2", "solve_linf"]


def solve_clip_path(a: torch.Tensor, c: torch.Tensor, room: torch.Tensor, gap: torch.Tensor, p: float,
                    want_steps: bool = False):
    """Rows [P, d] of a = |w|, c (a for p = 2, 1 where a > 0 for p = inf) and room >= 0 (0 where
    a = 0), gap [P] > 0. Returns (distance, capacity Σ a_i room_i, t or None) like
    :func:`mmr_ext.math.box_distance_l1.solve_l1`."""
    beta, a_m, c_m = clip_breakpoints(a, c, room)
    beta, order = torch.sort(beta, dim=1, stable=True)
    a_s, c_s, room_s = a_m.gather(1, order), c_m.gather(1, order), room.gather(1, order)
    C = exclusive_cumsum(a_s * room_s)                # Σ_{j < m} a_j room_j (clipped)
    A = suffix_sum(a_s * c_s)                         # Σ_{j >= m} a_j c_j (free)
    h = C[:, 1:] + torch.where(A[:, 1:] > 0, beta * A[:, 1:], 0.0)    # H(β_k)
    h = torch.cummax(h, dim=1).values                 # exact H is non-decreasing; remove rounding
    k = first_at_least(h, gap)
    spent = take(C, k)
    slope_k = take(A, k)
    mu_lo = take_before(beta, k, 0.0)
    mu_hi = take(beta, k)
    mu = torch.where(slope_k > 0, (gap - spent) / torch.where(slope_k > 0, slope_k, 1.0), mu_hi)
    mu = torch.minimum(torch.maximum(mu, mu_lo), mu_hi)
    t = torch.where(c > 0, torch.minimum(mu[:, None] * c, room), 0.0)
    dist = t.amax(dim=1) if math.isinf(p) else torch.linalg.vector_norm(t, ord=p, dim=1)
    return dist, C[:, -1], (t if want_steps else None)


def solve_l2(a: torch.Tensor, room: torch.Tensor, gap: torch.Tensor, want_steps: bool = False):
    """p = 2: the clip path with c = a."""
    return solve_clip_path(a, a, room, gap, 2.0, want_steps)


def solve_linf(a: torch.Tensor, room: torch.Tensor, gap: torch.Tensor, want_steps: bool = False):
    """p = inf: the clip path with c = 1 (every movable coordinate moves by the same amount)."""
    return solve_clip_path(a, (a > 0).to(a.dtype), room, gap, math.inf, want_steps)
