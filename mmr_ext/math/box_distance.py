"""lp-distances to hyperplanes inside a box and the closest points (docs/MATH.md §7, the MMR paper, App. A.1).

For a hyperplane {z : <w, z> + b = 0} and a point x in the box [lo, hi]^d the box distance is

    min ||δ||_p  s.t.  <w, x + δ> + b = 0,  lo <= x + δ <= hi,

+inf when the hyperplane misses the box, 0 when x lies on it, never below the unconstrained
distance |g| / ||w||_q (g = <w, x> + b). With a_i = |w_i| and ``room_i`` the distance coordinate i
can travel toward the hyperplane before leaving the box, the problem is
``min ||t||_p  s.t.  Σ a_i t_i = |g|,  0 <= t_i <= room_i``, solved exactly for every p, one
solver per file: p = 1 in :mod:`~mmr_ext.math.box_distance_l1` (greedy), p = 2 and p = inf in
:mod:`~mmr_ext.math.box_distance_l2` (the clip path, closed form on the active segment), general
p in :mod:`~mmr_ext.math.box_distance_lp` (the same in the log domain). This module holds the
public functions, their argument checks and the preparation shared by all p.

Everything runs in float64, vectorised over all (point, hyperplane) pairs in blocks of bounded
memory; distances are cast to x's dtype rounding toward zero. The results carry no gradient.
Reachability is decided with an allowance for float64 rounding: a hyperplane that misses the box
by less than the rounding error of g and of Σ a_i room_i gets the lp-norm of the box's farthest
corner in the direction of the hyperplane (all t_i = room_i) instead of +inf, so a certificate
is never made larger by rounding. g comes from one matmul over all points; a different batch
shape may change its last bit.

:func:`box_closest_point` also returns the minimiser x + δ (float64). :func:`box_min_distance`
adds the speed-up of the paper: per point, hyperplanes are visited in ascending unconstrained
distance and the search stops as soon as the best box distance found is below the next
unconstrained distance (a lower bound for every box distance not yet computed).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple, Union

import torch

from .box_distance_l1 import solve_l1
from .box_distance_l2 import solve_l2, solve_linf
from .box_distance_lp import solve_lp
from .distances import row_norms, safe_distance
from .norms import dual_exponent, exponent
from .rounding import round_down

__all__ = ["box_distance", "box_closest_point", "box_min_distance"]

Bound = Union[float, torch.Tensor]

_EPS = torch.finfo(torch.float64).eps
_PAIR_ELEMENTS = 1 << 20  # float64 elements per [pairs, d] work array (8 MiB)


# ---------------------------------------------------------------------------------------------
# validation (local: mmr_ext.math imports no other mmr_ext package)
# ---------------------------------------------------------------------------------------------

def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def _check_bound(v, name: str, d: int, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if v.is_complex() or v.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got {v.dtype}")
        if v.device != device:
            raise ValueError(f"{name} is on {v.device} but x is on {device}")
        if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != d):
            raise ValueError(f"{name} must be a scalar or have shape ({d},), got {tuple(v.shape)}")
        t = v.detach().to(torch.float64)
    elif isinstance(v, Real) and not isinstance(v, bool):
        t = torch.tensor(float(v), dtype=torch.float64, device=device)
    else:
        raise TypeError(f"{name} must be a number or a tensor, got {type(v).__name__}")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    return t.expand(d).contiguous()


def _pairs_per_block(d: int, chunk_size: Optional[int]) -> int:
    if chunk_size is None:
        return max(1, _PAIR_ELEMENTS // d)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError("chunk_size must be a positive integer (point-hyperplane pairs per block) "
                         f"or None, got {chunk_size!r}")
    return chunk_size


def _prepare(w, b, x, p, lo, hi):
    p = exponent(p)
    q = dual_exponent(p)
    w, b, x = _check_tensor(w, "w"), _check_tensor(b, "b"), _check_tensor(x, "x")
    if w.dim() != 2:
        raise ValueError(f"w must have shape [M, d], got {tuple(w.shape)}")
    M, d = w.shape
    if d == 0:
        raise ValueError("w must have at least one column (d >= 1)")
    if b.shape != (M,):
        raise ValueError(f"b must have shape ({M},) to match w {tuple(w.shape)}, got {tuple(b.shape)}")
    if x.dim() not in (1, 2) or x.shape[-1] != d:
        raise ValueError(f"x must have shape [{d}] or [B, {d}] to match w {tuple(w.shape)}, "
                         f"got {tuple(x.shape)}")
    for t, name in ((w, "w"), (b, "b")):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for t, name in ((w, "w"), (b, "b"), (x, "x")):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf")
    lo64 = _check_bound(lo, "lo", d, x.device)
    hi64 = _check_bound(hi, "hi", d, x.device)
    if (lo64 > hi64).any():
        i = int((lo64 > hi64).nonzero()[0])
        raise ValueError(f"lo must be <= hi, got lo[{i}] = {lo64[i].item()} > hi[{i}] = {hi64[i].item()}")
    single = x.dim() == 1
    x64 = x.detach().to(torch.float64).reshape(-1, d)
    outside = (x64 < lo64) | (x64 > hi64)
    if outside.any():
        excess = torch.maximum(lo64 - x64, x64 - hi64).max().item()
        raise ValueError(f"x must lie in the box [lo, hi]: {int(outside.sum())} coordinate(s) are "
                         f"outside, by up to {excess:.3g}")
    return (w.detach().to(torch.float64), b.detach().to(torch.float64), x64, lo64, hi64,
            p, q, single, x.dtype)


# ---------------------------------------------------------------------------------------------
# float64 kernel on blocks of (point, hyperplane) pairs
# ---------------------------------------------------------------------------------------------

def _pair_distances(w64, x64, lo64, hi64, g, free_dist, scale, m_idx, b_idx, p, q, want_points=False):
    """Box distances of the pairs (x64[b_idx], hyperplane m_idx), and their closest points
    [P, d] (NaN where the distance is +inf) when ``want_points``.

    g: <w, x> + b; free_dist: |g| / ||w||_q; scale: Σ|w_i x_i| + |b| (bounds the error of g).
    """
    w_rows = w64[m_idx]
    x_rows = x64[b_idx]
    a = w_rows.abs()
    # moving toward the hyperplane decreases sign(g) <w, .>: coordinate i goes down when
    # sign(g) w_i > 0 (room x_i - lo_i), up when sign(g) w_i < 0 (room hi_i - x_i)
    down = (torch.sign(g)[:, None] * w_rows) > 0
    room = torch.where(down, x_rows - lo64, hi64 - x_rows)
    room = torch.where(a > 0, room, 0.0)             # unused coordinates never move
    gap = g.abs()
    live = gap > 0
    gap_s = torch.where(live, gap, 1.0)
    if p == 1.0:
        dist, capacity, t = solve_l1(a, room, gap_s, want_points)
    elif math.isinf(p):
        dist, capacity, t = solve_linf(a, room, gap_s, want_points)
    elif p == 2.0:
        dist, capacity, t = solve_l2(a, room, gap_s, want_points)
    else:
        dist, capacity, t = solve_lp(a, room, gap_s, p, q, want_points)
    # feasibility: inside the box g can fall by at most Σ a_i room_i. Decisions within the
    # rounding error of that sum and of g are resolved toward "reachable" (a finite distance),
    # namely the all-saturated corner, the farthest point the box allows (sound for certificates).
    dist = torch.where(gap <= capacity, dist, math.inf)
    slack = 4.0 * (a.shape[1] + 2) * _EPS * (capacity + scale + gap)
    edge = (gap > capacity) & (gap <= capacity + slack)
    if edge.any():
        r = room[edge]
        dist[edge] = r.amax(dim=1) if math.isinf(p) else torch.linalg.vector_norm(r, ord=p, dim=1)
        if want_points:
            t[edge] = r
    dist = torch.where(live, dist, 0.0)
    # the box only adds constraints; this also makes the early stop of box_min_distance exact
    # (and gives +inf for zero rows, whose free_dist is +inf: no hyperplane)
    dist = torch.maximum(dist, free_dist)
    if not want_points:
        return dist
    t = torch.where(live[:, None], t, 0.0)
    point = torch.minimum(torch.maximum(x_rows + torch.where(down, -t, t), lo64), hi64)
    return dist, torch.where(torch.isfinite(dist)[:, None], point, math.nan)


def _geometry(w64, b64, x64, q):
    """g = <w, x> + b, the unconstrained distances and Σ|w_i x_i| + |b|, all [B, M]."""
    g = x64 @ w64.T + b64
    free = safe_distance(g.abs(), row_norms(w64, q, dim=1)[None, :].expand_as(g))
    scale = x64.abs() @ w64.abs().T + b64.abs()
    return g, free, scale


def _all_pairs(w, b, x, p, lo, hi, chunk_size, want_points):
    w64, b64, x64, lo64, hi64, p, q, single, dtype = _prepare(w, b, x, p, lo, hi)
    (B, d), M = x64.shape, w64.shape[0]
    g, free, scale = _geometry(w64, b64, x64, q)
    g, free, scale = g.reshape(-1), free.reshape(-1), scale.reshape(-1)
    out = torch.empty(B * M, dtype=torch.float64, device=x64.device)
    points = torch.empty((B * M, d) if want_points else (0,), dtype=torch.float64, device=x64.device)
    block = _pairs_per_block(d, chunk_size)
    for start in range(0, B * M, block):
        idx = torch.arange(start, min(start + block, B * M), device=x64.device)
        res = _pair_distances(w64, x64, lo64, hi64, g[idx], free[idx], scale[idx], idx % M, idx // M,
                              p, q, want_points)
        if want_points:
            out[idx], points[idx] = res
        else:
            out[idx] = res
    out = round_down(out.reshape(B, M), dtype)
    points = points.reshape(B, M, d) if want_points else None
    if single:
        return out[0], (points[0] if want_points else None)
    return out, points


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def box_distance(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, p: float,
                 lo: Bound = 0.0, hi: Bound = 1.0, *, chunk_size: Optional[int] = None) -> torch.Tensor:
    """lp-distance from x to each hyperplane {z : <w_m, z> + b_m = 0} within the box [lo, hi]^d (docs/MATH.md §7).

    Args:
        w: [M, d] hyperplane normals; b: [M] offsets.
        x: [d] or [B, d] points inside the box.
        p: norm, any float >= 1 or ``float('inf')``.
        lo, hi: box bounds, scalars or [d] tensors (lo <= hi; -inf / +inf allowed for an
            unbounded side, so ``lo=-inf, hi=inf`` gives the unconstrained distance).
        chunk_size: (point, hyperplane) pairs solved per block (default: about 8 MiB per work
            array); only memory and speed depend on it.

    Returns:
        [M] (x of shape [d]) or [B, M] distances in x's dtype, rounded toward zero: 0 where x is on
        the hyperplane, +inf where the hyperplane misses the box or w_m is a zero row, and never
        below the unconstrained distance |<w_m, x> + b_m| / ||w_m||_q.
    """
    return _all_pairs(w, b, x, p, lo, hi, chunk_size, False)[0]


@torch.no_grad()
def box_closest_point(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, p: float,
                      lo: Bound = 0.0, hi: Bound = 1.0, *, chunk_size: Optional[int] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`box_distance` and the minimisers: the points of each hyperplane inside the box closest to x.

    Returns ``(distance, point)``: distance as from :func:`box_distance` ([M] or [B, M]); point
    [M, d] or [B, M, d] in float64, inside the box exactly, on the hyperplane up to float64
    rounding, with ``||point - x||_p`` equal to the distance up to rounding; x itself where x is
    on the hyperplane, NaN where the distance is +inf (the hyperplane misses the box or w_m = 0).
    Where the hyperplane touches the box only within rounding, the point is the box's farthest
    corner toward it (see the module docstring).
    """
    return _all_pairs(w, b, x, p, lo, hi, chunk_size, True)


@torch.no_grad()
def box_min_distance(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, p: float,
                     lo: Bound = 0.0, hi: Bound = 1.0, *, chunk: int = 32,
                     chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smallest box distance over the hyperplanes, with the early stop of the MMR paper, App. A.1 (docs/MATH.md §7).

    Per point the hyperplanes are visited in ascending unconstrained distance u_m (a lower bound
    of the box distance), ``chunk`` at a time, until the best box distance found is strictly
    below the next u_m. The result equals ``box_distance(...).min(-1)`` exactly.

    Returns:
        ``(distance, index)``: shapes [] or [B] (following x). ``distance`` in x's dtype (+inf
        when no hyperplane meets the box); ``index`` (int64) the smallest m attaining it, -1 where
        the distance is +inf.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    w64, b64, x64, lo64, hi64, p, q, single, dtype = _prepare(w, b, x, p, lo, hi)
    B, M = x64.shape[0], w64.shape[0]
    device = x64.device
    best = torch.full((B,), math.inf, dtype=torch.float64, device=device)
    arg = torch.full((B,), -1, dtype=torch.long, device=device)
    block = _pairs_per_block(w64.shape[1], chunk_size)
    if M > 0 and B > 0:
        g, free, scale = _geometry(w64, b64, x64, q)
        free_s, order = torch.sort(free, dim=1, stable=True)
        for pos in range(0, M, chunk):
            # u_next lower-bounds every box distance from pos on; +inf: only zero rows remain
            u_next = free_s[:, pos]
            rows = ((u_next < math.inf) & (best >= u_next)).nonzero()[:, 0]
            if rows.numel() == 0:
                break
            m = order[rows, pos:pos + chunk]                       # [R, c]
            R, c = m.shape
            bb = rows[:, None].expand(R, c).reshape(-1)
            mm = m.reshape(-1)
            dist = torch.empty(R * c, dtype=torch.float64, device=device)
            for start in range(0, R * c, block):
                s = slice(start, start + block)
                dist[s] = _pair_distances(w64, x64, lo64, hi64, g[bb[s], mm[s]], free[bb[s], mm[s]],
                                          scale[bb[s], mm[s]], mm[s], bb[s], p, q)
            dist = dist.reshape(R, c)
            cmin = dist.min(dim=1).values
            cidx = torch.where(dist == cmin[:, None], m, torch.full_like(m, M)).min(dim=1).values
            cur, cur_arg = best[rows], arg[rows]
            take = (cmin < math.inf) & ((cmin < cur) | ((cmin == cur) & (cidx < cur_arg)))
            best[rows] = torch.where(take, cmin, cur)
            arg[rows] = torch.where(take, cidx, cur_arg)
    best = round_down(best, dtype)
    if single:
        return best[0], arg[0]
    return best, arg
