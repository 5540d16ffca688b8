"""l1 distance to a hyperplane inside a box (docs/MATH.md §7, p = 1): the greedy solver.

``min Σ t_i  s.t.  Σ a_i t_i = gap,  0 <= t_i <= room_i`` (a_i = |w_i|): spend the gap on the
coordinates in decreasing a_i order, each up to its room (sort, cumsum, searchsorted).
"""
from __future__ import annotations

import torch

from .breakpoints import first_at_least, take, take_before

__all__ = ["solve_l1"]


def solve_l1(a: torch.Tensor, room: torch.Tensor, gap: torch.Tensor, want_steps: bool = False):
    """Rows [P, d] of a = |w| >= 0 and room >= 0 (0 where a = 0), gap [P] > 0.

    Returns (distance, capacity Σ a_i room_i, t or None); the distance (and the steps t [P, d],
    the moves toward the hyperplane, when ``want_steps``) are meaningful where gap <= capacity.
    """
    a_s, order = torch.sort(a, dim=1, descending=True, stable=True)
    room_s = room.gather(1, order)
    reach = torch.cumsum(a_s * room_s, dim=1)         # non-decreasing: increments are >= 0
    k = first_at_least(reach, gap)
    spent = take_before(reach, k, 0.0)
    travelled = take_before(torch.cumsum(room_s, dim=1), k, 0.0)
    a_k = take(a_s, k)
    part = (gap - spent) / torch.where(a_k > 0, a_k, 1.0)
    part = torch.minimum(part.clamp(min=0), take(room_s, k))
    t = None
    if want_steps:
        j = torch.arange(a.shape[1], device=a.device)[None, :]
        t_s = torch.where(j < k[:, None], room_s, torch.where(j == k[:, None], part[:, None], 0.0))
        t = torch.zeros_like(a).scatter_(1, order, t_s)
    return travelled + part, reach[:, -1], t
