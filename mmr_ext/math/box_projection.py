"""Euclidean projection onto an lp-ball ∩ box, in float64 (docs/MATH.md §7).

``min ||v - z||_2`` over ``{v : ||v - x||_p <= eps, lo <= v <= hi}``. The problem is separable
after the substitution v = x + δ: every |δ_i| is capped by the room ``cap_i`` toward the face of
the box that z_i points to, and the ball adds one scalar dual variable:

- p = inf: clamp, |δ_i| = min(|u_i|, cap_i, eps) with u = z - x;
- p = 1: |δ_i| = clamp(|u_i| - λ, 0, cap_i) with the smallest λ >= 0 such that Σ |δ_i| <= eps;
- p = 2: |δ_i| = min(s |u_i|, cap_i), s in (0, 1] with ||δ||_2 = eps: the clip path of
  :mod:`mmr_ext.math.breakpoints`.
"""
from __future__ import annotations

import math

import torch

from .breakpoints import l2_segment, sorted_clip_path

__all__ = ["project_ball_box"]

_EPS = torch.finfo(torch.float64).eps


def _project_l1(u: torch.Tensor, cap: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """|δ| for min ||δ - u||_2 s.t. ||δ||_1 <= eps, |δ_i| <= cap_i (signs follow u); u = |u| here.

    δ_i = clamp(u_i - λ, 0, cap_i) with the smallest λ >= 0 such that Σ δ_i <= eps.
    S(λ) = Σ clamp(u_i - λ, 0, cap_i) = P(λ; u) - P(λ; u - cap), P(λ; t) = Σ max(t_i - λ, 0),
    is non-increasing and piecewise linear with breakpoints u_i and u_i - cap_i: evaluate it on
    both sorted lists (prefix sums + searchsorted), bracket the crossing of eps between the
    nearest breakpoints and interpolate. Exact up to rounding; O(d log d).
    """
    B, d = u.shape
    s1, _ = torch.sort(u, dim=1)
    t2s, _ = torch.sort(u - cap, dim=1)
    s2 = t2s.clamp_min(0)  # breakpoints u_i - cap_i that lie in λ >= 0 (still sorted)
    c1 = torch.cat([s1.new_zeros(B, 1), s1.cumsum(1)], 1)  # prefix sums of ascending values
    c2 = torch.cat([t2s.new_zeros(B, 1), t2s.cumsum(1)], 1)

    def S(lam: torch.Tensor) -> torch.Tensor:  # lam [B, M] -> [B, M]
        k1 = torch.searchsorted(s1, lam, right=True)  # count of values <= lam
        k2 = torch.searchsorted(t2s, lam, right=True)
        p1 = (c1[:, -1:] - c1.gather(1, k1)) - lam * (d - k1)
        p2 = (c2[:, -1:] - c2.gather(1, k2)) - lam * (d - k2)
        return p1 - p2

    zero = u.new_zeros(B, 1)
    lam_lo, lam_hi = zero[:, 0].clone(), u.amax(1)  # S(0) > eps (caller), S(max u) = 0
    e = eps[:, None]
    for bp in (s1, s2):  # each list is sorted, so S is monotone along it
        sv = S(bp)
        k = (sv > e).sum(1, keepdim=True)  # breakpoints with S > eps come first
        below = bp.gather(1, (k - 1).clamp_min(0))[:, 0]
        above = bp.gather(1, k.clamp_max(d - 1))[:, 0]
        lam_lo = torch.where(k[:, 0] > 0, torch.maximum(lam_lo, below), lam_lo)
        lam_hi = torch.where(k[:, 0] < d, torch.minimum(lam_hi, above), lam_hi)
    ends = S(torch.stack([lam_lo, lam_hi], 1))
    s_lo, s_hi = ends[:, 0], ends[:, 1]
    slope = torch.where(s_lo > s_hi, (lam_hi - lam_lo) / (s_lo - s_hi).clamp_min(1e-300),
                        torch.zeros_like(s_lo))
    lam = (lam_lo + (s_lo - eps) * slope).clamp(lam_lo, lam_hi)
    return (u - lam[:, None]).clamp_min(0).minimum(cap)


def _project_l2(u: torch.Tensor, cap: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """|δ| for min ||δ - u||_2 s.t. ||δ||_2 <= eps, |δ_i| <= cap_i; u = |u| here.

    δ_i = min(s u_i, cap_i) with s in (0, 1] such that Σ min(s u_i, cap_i)^2 = eps^2: the clip
    path with c = u, closed form on the segment where its l2 norm reaches eps.
    """
    beta, R, _, A = sorted_clip_path(u, cap)
    k = l2_segment(beta, R, A, (eps * eps)[:, None])
    Rk, Ak = R.gather(1, k)[:, 0], A.gather(1, k)[:, 0]
    s = torch.sqrt((eps * eps - Rk).clamp_min(0) / Ak.clamp_min(1e-300))
    s = torch.where(Ak > 0, s, torch.full_like(s, math.inf)).clamp_max(1.0)
    return torch.minimum(s[:, None] * u, cap)


def project_ball_box(x64: torch.Tensor, z64: torch.Tensor, p: float, eps: torch.Tensor, lo: float,
                     hi: float) -> torch.Tensor:
    """δ [B, d] (float64) such that x + δ is the projection of z onto the lp-ball ∩ box (docs/MATH.md §7).

    x64, z64: float64 [B, d], x inside the box [lo, hi]; p in {1, 2, inf}; eps: float64 [B] >= 0.
    ||δ||_p <= eps holds for the returned float64 δ (shrunk by a few ulps where rounding would
    exceed it); x + δ may leave the box by rounding, so callers clamp.
    """
    u = z64 - x64
    up = u > 0
    cap = torch.where(up, hi - x64, x64 - lo).clamp_min(0)
    a = u.abs()
    if math.isinf(p):
        mag = torch.minimum(a, torch.minimum(cap, eps[:, None]))
    else:
        clipped = torch.minimum(a, cap)
        norm_clipped = torch.linalg.vector_norm(clipped, ord=p, dim=1)
        inside = norm_clipped <= eps
        mag = (_project_l1 if p == 1 else _project_l2)(a, cap, eps)
        mag = torch.where(inside[:, None], clipped, mag)
        # rounding safety: the stored δ must satisfy the constraint, not just up to 1 ulp
        n = torch.linalg.vector_norm(mag, ord=p, dim=1)
        shrink = torch.where(n > eps, eps / n.clamp_min(1e-300) * (1 - 4 * _EPS), torch.ones_like(n))
        mag = mag * shrink[:, None]
    return torch.where(up, mag, -mag)
