"""lp-distances to hyperplanes inside a box (docs/MATH.md §7, the MMR paper, App. A.1).

For a hyperplane {z : <w, z> + b = 0} and a point x in the box [lo, hi]^d the box distance is

    min ||δ||_p  s.t.  <w, x + δ> + b = 0,  lo <= x + δ <= hi,

+inf when the hyperplane misses the box, 0 when x lies on it, never below the unconstrained
distance |g| / ||w||_q (g = <w, x> + b). With a_i = |w_i| and ``room_i`` the distance coordinate i
can travel toward the hyperplane before leaving the box, the problem is
``min ||t||_p  s.t.  Σ a_i t_i = |g|,  0 <= t_i <= room_i``, solved exactly for every p:

- p = 1: greedy, largest a_i first (sort, cumsum, searchsorted);
- 1 < p <= inf: the KKT conditions give ``t_i = min(μ c_i, room_i)`` with ``c_i = a_i^{q-1}``
  (c_i = 1 for p = inf, a_i for p = 2) and one scalar μ >= 0. ``H(μ) = Σ a_i min(μ c_i, room_i)``
  is continuous, non-decreasing and piecewise *linear* in μ with breakpoints room_i / c_i, so
  sorting the breakpoints, one cumsum and one searchsorted locate the active segment, on which μ
  has a closed form: no iteration is needed. For general p the breakpoints and sums are kept in
  the log domain (logcumsumexp), since a_i^{q-1} over- or underflows for p near 1.

Everything runs in float64, vectorised over all (point, hyperplane) pairs in blocks of bounded
memory; results are cast to x's dtype rounding toward zero. The results carry no gradient.
Reachability is decided with an allowance for float64 rounding: a hyperplane that misses the box
by less than the rounding error of g and of Σ a_i room_i gets the lp-norm of the box's farthest
corner in the direction of the hyperplane (all t_i = room_i) instead of +inf, so a certificate
is never made larger by rounding. g comes from one matmul over all points; a different batch
shape may change its last bit.

:func:`box_min_distance` adds the speed-up of the paper: per point, hyperplanes are visited in
ascending unconstrained distance and the search stops as soon as the best box distance found is
below the next unconstrained distance (a lower bound for every box distance not yet computed).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple, Union

import torch

from .checks import check_chunk_size
from .math.norms import dual_exponent
from .radii import round_down

__all__ = ["box_distance", "box_min_distance"]

Bound = Union[float, torch.Tensor]

_EPS = torch.finfo(torch.float64).eps
_PAIR_ELEMENTS = 1 << 20  # float64 elements per [pairs, d] work array (8 MiB)


# ---------------------------------------------------------------------------------------------
# validation
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


def _prepare(w, b, x, p, lo, hi):
    q = dual_exponent(p)
    p = float(p)
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
# float64 kernels on blocks of (point, hyperplane) pairs: a = |w| [P, d], room [P, d], gap [P] > 0
# ---------------------------------------------------------------------------------------------

def _reverse_cumsum(v: torch.Tensor) -> torch.Tensor:
    return torch.flip(torch.cumsum(torch.flip(v, [1]), dim=1), [1])


def _first_at_least(h: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each (non-decreasing) row of h that is >= gap, at most d-1."""
    k = torch.searchsorted(h, gap[:, None].contiguous(), side="left")[:, 0]
    return k.clamp_(max=h.shape[1] - 1)


def _take(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return v.gather(1, k[:, None])[:, 0]


def _take_before(v: torch.Tensor, k: torch.Tensor, first: float) -> torch.Tensor:
    """v[k - 1] per row, ``first`` where k == 0 (exclusive prefix sums from inclusive ones)."""
    return torch.where(k > 0, _take(v, (k - 1).clamp_(min=0)), first)


def _solve_l1(a, room, gap):
    """min Σ t_i s.t. Σ a_i t_i = gap, 0 <= t <= room: fill the largest a_i first.

    Returns (distance, capacity Σ a_i room_i); the distance is meaningful where gap <= capacity.
    """
    a_s, order = torch.sort(a, dim=1, descending=True, stable=True)
    room_s = room.gather(1, order)
    reach = torch.cumsum(a_s * room_s, dim=1)         # non-decreasing: increments are >= 0
    k = _first_at_least(reach, gap)
    spent = _take_before(reach, k, 0.0)
    travelled = _take_before(torch.cumsum(room_s, dim=1), k, 0.0)
    a_k = _take(a_s, k)
    part = (gap - spent) / torch.where(a_k > 0, a_k, 1.0)
    part = torch.minimum(part.clamp(min=0), _take(room_s, k))
    return travelled + part, reach[:, -1]


def _solve_linear(a, room, gap, c, p):
    """1 < p <= inf with c = a (p = 2) or c = 1 (p = inf): breakpoints room / c in linear scale.

    t_i = min(μ c_i, room_i); H(μ) = Σ a_i t_i is linear between consecutive breakpoints, so on
    the segment where H crosses gap, μ = (gap - Σ_saturated a_j room_j) / Σ_free a_j c_j.
    Returns (distance, capacity) like _solve_l1.
    """
    use = c > 0
    bp = torch.where(use, room / torch.where(use, c, 1.0), 0.0)
    bp_s, order = torch.sort(bp, dim=1, stable=True)
    a_s, c_s, room_s = a.gather(1, order), c.gather(1, order), room.gather(1, order)
    sat = torch.cumsum(a_s * room_s, dim=1)           # Σ_{j <= k} a_j room_j
    slope = _reverse_cumsum(a_s * c_s)                # Σ_{j >= k} a_j c_j
    slope_next = torch.cat([slope[:, 1:], torch.zeros_like(slope[:, :1])], dim=1)
    h = sat + torch.where(slope_next > 0, bp_s * slope_next, 0.0)      # H(bp_k)
    h = torch.cummax(h, dim=1).values                 # exact H is non-decreasing; remove rounding
    k = _first_at_least(h, gap)
    spent = _take_before(sat, k, 0.0)
    slope_k = _take(slope, k)
    mu_lo = _take_before(bp_s, k, 0.0)
    mu_hi = _take(bp_s, k)
    mu = torch.where(slope_k > 0, (gap - spent) / torch.where(slope_k > 0, slope_k, 1.0), mu_hi)
    mu = torch.minimum(torch.maximum(mu, mu_lo), mu_hi)
    t = torch.where(use, torch.minimum(mu[:, None] * c, room), 0.0)
    dist = t.amax(dim=1) if math.isinf(p) else torch.linalg.vector_norm(t, ord=p, dim=1)
    return dist, sat[:, -1]


def _solve_log(a, room, gap, p, q):
    """General 1 < p < inf: _solve_linear with c = (a / max a)^{q-1}, kept in the log domain.

    a^{q-1} over- or underflows for p near 1 (q - 1 = 1/(p - 1) is large); logs of breakpoints,
    of Σ a c (logcumsumexp) and of t stay finite. Returns (distance, capacity).
    """
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
    k = _first_at_least(h, gap)
    spent = _take_before(sat, k, 0.0)                 # < gap by the choice of k
    log_mu = torch.log((gap - spent).clamp(min=0)) - _take(log_slope, k)
    log_mu = torch.maximum(log_mu, _take_before(log_bp_s, k, -math.inf))
    log_mu = torch.minimum(log_mu, _take(log_bp_s, k))
    log_t = torch.where(use, torch.minimum(log_mu[:, None] + log_c, log_room), -math.inf)
    return torch.exp(torch.logsumexp(p * log_t, dim=1) / p), sat[:, -1]


def _dual_norms(w64: torch.Tensor, q: float) -> torch.Tensor:
    """||w_m||_q per row, scaled by the row maximum so that |w|^q cannot overflow."""
    if q in (1.0, 2.0, math.inf):
        return torch.linalg.vector_norm(w64, ord=q, dim=1)
    top = w64.abs().amax(dim=1)
    safe = torch.where(top > 0, top, 1.0)
    return torch.linalg.vector_norm(w64 / safe[:, None], ord=q, dim=1) * top


def _unconstrained(g: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """|g| / ||w||_q, +inf for a zero row (no hyperplane)."""
    pos = wq > 0
    return torch.where(pos, g.abs() / torch.where(pos, wq, 1.0), math.inf)


def _pair_distances(w64, x64, lo64, hi64, g, free_dist, scale, m_idx, b_idx, p, q):
    """Box distances of the pairs (x64[b_idx], hyperplane m_idx).

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
        dist, capacity = _solve_l1(a, room, gap_s)
    elif math.isinf(p):
        dist, capacity = _solve_linear(a, room, gap_s, (a > 0).to(a.dtype), p)
    elif p == 2.0:
        dist, capacity = _solve_linear(a, room, gap_s, a, p)
    else:
        dist, capacity = _solve_log(a, room, gap_s, p, q)
    # feasibility: inside the box g can fall by at most Σ a_i room_i. Decisions within the
    # rounding error of that sum and of g are resolved toward "reachable" (a finite distance),
    # namely the all-saturated corner, the farthest point the box allows (sound for certificates).
    dist = torch.where(gap <= capacity, dist, math.inf)
    slack = 4.0 * (a.shape[1] + 2) * _EPS * (capacity + scale + gap)
    edge = (gap > capacity) & (gap <= capacity + slack)
    if edge.any():
        r = room[edge]
        dist[edge] = r.amax(dim=1) if math.isinf(p) else torch.linalg.vector_norm(r, ord=p, dim=1)
    dist = torch.where(live, dist, 0.0)
    # the box only adds constraints; this also makes the early stop of box_min_distance exact
    # (and gives +inf for zero rows, whose free_dist is +inf: no hyperplane)
    return torch.maximum(dist, free_dist)


def _pairs_per_block(d: int, chunk_size: Optional[int]) -> int:
    check_chunk_size(chunk_size, "point-hyperplane pairs per block")
    if chunk_size is not None:
        return chunk_size
    return max(1, _PAIR_ELEMENTS // d)


def _geometry(w64, b64, x64, q):
    """g = <w, x> + b, the unconstrained distances and Σ|w_i x_i| + |b|, all [B, M]."""
    g = x64 @ w64.T + b64
    free = _unconstrained(g, _dual_norms(w64, q)[None, :].expand_as(g))
    scale = x64.abs() @ w64.abs().T + b64.abs()
    return g, free, scale


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def box_distance(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, p: float,
                 lo: Bound = 0.0, hi: Bound = 1.0, *, chunk_size: Optional[int] = None) -> torch.Tensor:
    """lp-distance from x to each hyperplane {z : <w_m, z> + b_m = 0} within the box [lo, hi]^d.

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
    w64, b64, x64, lo64, hi64, p, q, single, dtype = _prepare(w, b, x, p, lo, hi)
    B, M = x64.shape[0], w64.shape[0]
    g, free, scale = _geometry(w64, b64, x64, q)
    g, free, scale = g.reshape(-1), free.reshape(-1), scale.reshape(-1)
    out = torch.empty(B * M, dtype=torch.float64, device=x64.device)
    block = _pairs_per_block(w64.shape[1], chunk_size)
    for start in range(0, B * M, block):
        idx = torch.arange(start, min(start + block, B * M), device=x64.device)
        out[idx] = _pair_distances(w64, x64, lo64, hi64, g[idx], free[idx], scale[idx],
                                   idx % M, idx // M, p, q)
    out = round_down(out.reshape(B, M), dtype)
    return out[0] if single else out


@torch.no_grad()
def box_min_distance(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, p: float,
                     lo: Bound = 0.0, hi: Bound = 1.0, *, chunk: int = 32,
                     chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smallest box distance over the hyperplanes, with the early stop of the MMR paper, App. A.1.

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
    if M > 0 and B > 0:
        g, free, scale = _geometry(w64, b64, x64, q)
        free_s, order = torch.sort(free, dim=1, stable=True)
        block = _pairs_per_block(w64.shape[1], chunk_size)
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
