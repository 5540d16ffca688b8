"""lp distance to a hyperplane inside a box for general 1 < p < inf (docs/MATH.md §7).

The clip path ``t_i = min(μ c_i, room_i)`` with ``c_i = a_i^{q-1}`` (1/p + 1/q = 1), solved like
:mod:`mmr_ext.math.box_distance_l2` but in the log domain: a^{q-1} over- or underflows for p
near 1 (q - 1 = 1/(p - 1) is large), while the logs of the breakpoints, of Σ a c
(logcumsumexp) and of t stay finite. c is scaled by (max a)^{q-1}, which only rescales μ.
"""
from __future__ import annotations

import math

import torch

from .breakpoints import first_at_least, take, take_before

__all__ = ["solve_lp"]


def solve_lp(a: torch.Tensor, room: torch.Tensor, gap: torch.Tensor, p: float, q: float,
             want_steps: bool = False):
    """Rows [P, d] of a = |w| and room >= 0 (0 where a = 0), gap [P] > 0. Returns (distance,
    capacity Σ a_i room_i, t or None) like :func:`mmr_ext.math.box_distance_l1.solve_l1`."""
    use = (a > 0) & (room > 0)
    amax = a.amax(dim=1, keepdim=True)
    amax = torch.where(amax > 0, amax, 1.0)
    log_a = torch.where(use, torch.log(torch.where(use, a, amax)), -math.inf)
    log_c = torch.where(use, (q - 1.0) * (log_a - torch.log(amax)), -math.inf)   # <= 0
    log_room = torch.log(room)                        # -inf for room 0, +inf for room inf
    log_bp = torch.where(use, log_room - log_c, -math.inf)
    log_bp_s, order = torch.sort(log_bp, dim=1, stable=True)
    a_s, room_s, use_s = a.gather(1, order), room.gather(1, order), use.gather(1, order)
    sat = torch.cumsum(torch.where(use_s, a_s * room_s, 0.0), dim=1)
    log_ac = (log_a + log_c).gather(1, order)         # log(a_j c_j), -inf where unused
    log_slope = torch.flip(torch.logcumsumexp(torch.flip(log_ac, [1]), dim=1), [1])
    log_slope_next = torch.cat([log_slope[:, 1:], torch.full_like(log_slope[:, :1], -math.inf)], dim=1)
    # bp_k Σ_{j>k} a_j c_j <= Σ_{j>k} a_j room_j: the exponent overflows only for infinite room
    has_next = log_slope_next > -math.inf
    h = sat + torch.where(has_next, torch.exp(torch.where(has_next, log_bp_s + log_slope_next, 0.0)), 0.0)
    h = torch.cummax(h, dim=1).values
    k = first_at_least(h, gap)
    spent = take_before(sat, k, 0.0)                  # < gap by the choice of k
    log_mu = torch.log((gap - spent).clamp(min=0)) - take(log_slope, k)
    log_mu = torch.maximum(log_mu, take_before(log_bp_s, k, -math.inf))
    log_mu = torch.minimum(log_mu, take(log_bp_s, k))
    log_t = torch.where(use, torch.minimum(log_mu[:, None] + log_c, log_room), -math.inf)
    dist = torch.exp(torch.logsumexp(p * log_t, dim=1) / p)
    return dist, sat[:, -1], (torch.exp(log_t) if want_steps else None)
