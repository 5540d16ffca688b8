"""The support function of an lp-ball ∩ box: min of a linear function over it (docs/MATH.md §7).

``min <a, z>`` over ``{z : ||z - x||_p <= eps, lo <= z <= hi}``. With room_i the distance
coordinate i can move in the direction that decreases <a, z> before leaving the box, it is
``<a, x> - max Σ |a_i| t_i`` over 0 <= t_i <= room_i and ||t||_p <= eps:

- p = inf: t_i = min(eps, room_i);
- p = 1: fractional knapsack: largest |a_i| first, each up to room_i, until eps is spent;
- p = 2: t_i = min(μ |a_i|, room_i) with ||t||_2 = eps: the clip path of
  :mod:`mmr_ext.math.breakpoints` (sorted breakpoints, closed form on the active segment).
"""
from __future__ import annotations

import math

import torch

from .breakpoints import clip_breakpoints, exclusive_cumsum, l2_segment, sorted_clip_path, suffix_sum

__all__ = ["support_min"]


def _gain_l1_sorted(w: torch.Tensor, room: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Fractional knapsack max Σ w_i t_i, Σ t_i <= e, 0 <= t_i <= room_i, by a full sort."""
    ws, order = torch.sort(w, dim=-1, descending=True)
    rs = room.gather(-1, order)
    spent = rs.cumsum(-1) - rs  # budget used by the better coordinates
    return (ws * torch.minimum(rs, (e - spent).clamp_min(0))).sum(-1)


def _gain_l2_sorted(w: torch.Tensor, room: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """max Σ w_i t_i, Σ t_i^2 <= e^2, 0 <= t_i <= room_i, by a full sort of room_i / w_i."""
    beta, R, C, A = sorted_clip_path(w, room)
    k = l2_segment(beta, R, A, e * e)  # units clipped at their room
    Rk, Ak, Ck = R.gather(-1, k), A.gather(-1, k), C.gather(-1, k)
    # free units: t_i = μ w_i with μ^2 Ak = e^2 - Rk, contributing μ Ak = sqrt(Ak (e^2 - Rk))
    return (Ck + torch.sqrt((Ak * (e * e - Rk)).clamp_min(0)))[..., 0]


def _gain_l1(w, room, e, k):
    """The knapsack gain using only the k best coordinates when their room covers the budget
    (exact then: the greedy never reaches further); the other rows by a full sort."""
    d = w.shape[-1]
    if k >= d:
        return _gain_l1_sorted(w, room, e)
    w = torch.where(room > 0, w, torch.zeros_like(w))  # no room: contributes nothing
    ws, idx = torch.topk(w, k, dim=-1, sorted=True)
    rs = room.gather(-1, idx)
    cum = rs.cumsum(-1)
    gain = (ws * torch.minimum(rs, (e - (cum - rs)).clamp_min(0))).sum(-1)
    rest = cum[..., -1] < e[..., 0]
    if rest.any():
        gain[rest] = _gain_l1_sorted(w[rest], room[rest], e.expand(w.shape[:-1] + (1,))[rest])
    return gain


def _gain_l2(w, room, e, k):
    """The l2 gain when at most k - 1 coordinates are clipped at their room (found among the k
    smallest room_i / w_i); the other rows by a full sort."""
    d = w.shape[-1]
    if k >= d:
        return _gain_l2_sorted(w, room, e)
    beta, w, _ = clip_breakpoints(w, w, room)
    bk, idx = torch.topk(beta, k, dim=-1, largest=False, sorted=True)
    wk, rk = w.gather(-1, idx), room.gather(-1, idx)
    # Σ w^2 outside the k smallest breakpoints, summed directly (no cancellation)
    outside = (w * w).scatter(-1, idx, 0.0).sum(-1, keepdim=True)
    R, C, A = exclusive_cumsum(rk * rk), exclusive_cumsum(wk * rk), suffix_sum(wk * wk) + outside
    m = l2_segment(bk, R, A, e * e)
    Rm, Am, Cm = R.gather(-1, m), A.gather(-1, m), C.gather(-1, m)
    gain = (Cm + torch.sqrt((Am * (e * e - Rm)).clamp_min(0)))[..., 0]
    rest = (m[..., 0] == k) & torch.isfinite(bk[..., -1])  # the k-th breakpoint is passed: more may clip
    if rest.any():
        gain[rest] = _gain_l2_sorted(w[rest], room[rest], e.expand(w.shape[:-1] + (1,))[rest])
    return gain


def support_min(a: torch.Tensor, x: torch.Tensor, p: float, eps: torch.Tensor, lo: float,
                hi: float, top: int = 64) -> torch.Tensor:
    """min over {z : ||z - x||_p <= eps, lo <= z <= hi} of <a_r, z>, for every row a_r (docs/MATH.md §7).

    a: [B or 1, R, d]; x: [B, d] (inside the box); eps: [B]; p in {1, 2, inf}. Returns [B, R],
    exact up to rounding (float64). l1 and l2 first try the ``top`` most relevant coordinates
    (exact when the optimum only involves them) and sort the full rows otherwise. Differentiable
    almost everywhere w.r.t. a.
    """
    xb = x[:, None, :]
    e = eps[:, None, None]
    shared = a.shape[0] == 1 and x.shape[0] > 1  # rows common to all samples: plain matmuls

    def dot(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [B', R, d] x [B, d] -> [B, R]
        return v @ m[0].T if shared else torch.matmul(m, v[:, :, None])[..., 0]

    value = dot(a, x)
    if math.isinf(p):
        down = torch.minimum(x - lo, eps[:, None]).clamp_min(0)
        up = torch.minimum(hi - x, eps[:, None]).clamp_min(0)
        return value - dot(a.clamp_min(0), down) + dot(a.clamp_max(0), up)
    room = torch.where(a > 0, xb - lo, hi - xb).clamp_min(0)  # [B, R, d]
    w = a.abs().expand(room.shape)
    e = e.expand(room.shape[:-1] + (1,))
    gain = (_gain_l1 if p == 1 else _gain_l2)(w, room, e, top)
    return value - gain
