"""Sorted breakpoints and prefix sums shared by the lp-ball ∩ box solvers (docs/MATH.md §7).

Every solver of :mod:`mmr_ext.math.box_distance`, :mod:`~mmr_ext.math.box_support` and
:mod:`~mmr_ext.math.box_projection` moves each coordinate along a one-parameter path and finds
where a monotone function of the path crosses a level. For 1 < p <= inf (and the l2 support and
projection) the path is the *clip path*

    t_i(μ) = min(μ c_i, room_i),   μ >= 0,

(c_i = |w_i| for p = 2, 1 for p = inf). With the breakpoints β_i = room_i / c_i sorted ascending,
on the segment β_(m-1) <= μ <= β_(m) the first m coordinates are clipped at their room and the
others move freely, so with the prefix sums (all [..., d + 1], index m)

    R_m = Σ_{i<m} room_i²,   C_m = Σ_{i<m} a_i room_i,   A_m = Σ_{i>=m} a_i c_i

the path's linear gain is ``<a, t(μ)> = C_m + μ A_m`` and, when a = c, its squared l2 norm is
``R_m + μ² A_m``. The box distance for p = 2 and inf solves the first for a level (the gap
|<w, x> + b|), the l2 support function and the l2 projection solve the second (the radius eps).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["first_at_least", "take", "take_before", "clip_breakpoints", "exclusive_cumsum",
           "suffix_sum", "sorted_clip_path", "l2_segment"]


# ---------------------------------------------------------------------------------------------
# indexing along sorted rows [P, d]
# ---------------------------------------------------------------------------------------------

def first_at_least(h: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each (non-decreasing) row of h [P, d] that is >= level [P], at most d-1."""
    k = torch.searchsorted(h, level[:, None].contiguous(), side="left")[:, 0]
    return k.clamp_(max=h.shape[1] - 1)


def take(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """v[k] per row."""
    return v.gather(1, k[:, None])[:, 0]


def take_before(v: torch.Tensor, k: torch.Tensor, first: float) -> torch.Tensor:
    """v[k - 1] per row, ``first`` where k == 0 (exclusive prefix sums from inclusive ones)."""
    return torch.where(k > 0, take(v, (k - 1).clamp_(min=0)), first)


# ---------------------------------------------------------------------------------------------
# the clip path
# ---------------------------------------------------------------------------------------------

def clip_breakpoints(a: torch.Tensor, c: torch.Tensor, room: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(β, a', c'): β_i = room_i / c_i, +inf for coordinates that cannot move (c_i = 0 or
    room_i = 0), whose a and c are zeroed so that they drop out of every prefix sum."""
    move = (c > 0) & (room > 0)
    beta = torch.where(move, room / torch.where(move, c, torch.ones_like(c)), torch.full_like(c, math.inf))
    zero = torch.zeros_like(c)
    return beta, torch.where(move, a, zero), torch.where(move, c, zero)


def exclusive_cumsum(v: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d + 1]: Σ_{i<m} v_i along the last dimension."""
    return torch.cat([v.new_zeros(v.shape[:-1] + (1,)), v.cumsum(-1)], -1)


def suffix_sum(v: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d + 1]: Σ_{i>=m} v_i along the last dimension."""
    return torch.cat([v.flip(-1).cumsum(-1).flip(-1), v.new_zeros(v.shape[:-1] + (1,))], -1)


def sorted_clip_path(w: torch.Tensor, room: torch.Tensor, rest: Optional[torch.Tensor] = None):
    """The clip path with a = c = w >= 0 along the last dimension, breakpoints sorted ascending.

    Returns (β sorted, R, C, A) as in the module docstring; ``rest`` (Σ w² of coordinates left out
    of the rows, [..., 1]) is added to every A_m: they are never clipped.
    """
    beta, w, _ = clip_breakpoints(w, w, room)
    beta, order = torch.sort(beta, dim=-1, stable=True)
    ws, rs = w.gather(-1, order), room.gather(-1, order)
    R, C, A = exclusive_cumsum(rs * rs), exclusive_cumsum(ws * rs), suffix_sum(ws * ws)
    if rest is not None:
        A = A + rest
    return beta, R, C, A


def l2_segment(beta: torch.Tensor, R: torch.Tensor, A: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    """Number m [..., 1] of clipped coordinates where ||t(μ)||_2² = R_m + μ² A_m reaches e2 [..., 1].

    ||t(β_k)||² is non-decreasing in k; m counts the breakpoints passed before the level e2.
    """
    finite = torch.isfinite(beta)
    G = torch.where(finite, R[..., :-1] + torch.where(finite, beta, 0.0) ** 2 * A[..., :-1],
                    torch.full_like(beta, math.inf))
    return (G <= e2).sum(-1, keepdim=True)
