"""The neighbouring-regions search of the region certificate (docs/MATH.md §8; the MMR paper,
Croce, Andriushchenko & Hein, AISTATS 2019, App. A.2): a sound lower bound on the minimal
adversarial norm from the explored regions around x (soundness proof in docs/MATH.md §8.3), and
upper bounds from adversarial projections found on the way."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..geometry import RegionGeometry, region_geometry
from ..math.box_distance import box_closest_point
from ..math.distances import lp_norm, row_norms
from .hyperplanes import distances, min_distance

_EXACT_RTOL = 1e-9       # an upper bound within this relative distance of the lower bound is exact
_ADV_RTOL = 1e-9         # logits tolerance (relative to their scale) when checking an adversarial
_VIOLATED_BOX = 64       # box distances solved for ℓ_P (the violated units farthest unconstrained)
_PAIRED_UNITS = 8        # violated units combined with each decision hyperplane in a region
_TAU_GRID = 17           # combination weights per (unit, class) pair and refinement level


@dataclass
class Region:
    """p-independent data of one explored region, seen from the point x."""

    pattern: torch.Tensor      # [N] bool
    w: torch.Tensor            # [N, d]
    b: torch.Tensor            # [N]
    violated: torch.Tensor     # [N] bool: x is on the wrong side of the unit's hyperplane
    dw: torch.Tensor           # [K-1, d] decision rows w_c - w_s, s != c
    db: torch.Tensor           # [K-1]
    margin: torch.Tensor       # [K-1] L_c(x) - L_s(x) of the region's affine logits


@dataclass
class SearchState:
    """A region within the search for one norm."""

    region: Region
    ell: float                 # lower bound on dist(x, Q_P)
    bound: float               # D_P
    open: torch.Tensor         # [N] bool: P^u not explored yet
    frontier: Optional[Tuple[float, int]] = None   # cached (e_P, unit) over the open units


class Point:
    """Geometry of the regions around one correctly classified point (float64)."""

    def __init__(self, model64: nn.Module, x: torch.Tensor, label: int, box):
        self.model = model64
        self.x_in = x                      # [1, *in_shape]
        self.x = x.reshape(-1)             # [d]
        self.label = label
        self.box = box
        self.cache: Dict[bytes, Region] = {}
        geometry = region_geometry(model64, x)
        self.sizes = geometry.layer_sizes
        self.root = self._store(geometry)

    @staticmethod
    def key(pattern: torch.Tensor) -> bytes:
        return np.packbits(pattern.cpu().numpy()).tobytes()

    def _store(self, geometry: RegionGeometry) -> Region:
        x = self.x[None]
        K = geometry.logit_bias.shape[1]
        keep = torch.arange(K, device=self.x.device) != self.label
        dw, db = geometry.decision(torch.tensor([self.label], device=self.x.device))
        logits = geometry.logits(x)[0]
        region = Region(pattern=geometry.pattern[0], w=geometry.weight[0], b=geometry.bias[0],
                         violated=geometry.violated(x)[0], dw=dw[0][keep], db=db[0][keep],
                         margin=(logits[self.label] - logits)[keep])
        self.cache[self.key(region.pattern)] = region
        return region

    def region(self, pattern: torch.Tensor) -> Region:
        found = self.cache.get(self.key(pattern))
        if found is not None:
            return found
        masks = list(torch.split(pattern[None], list(self.sizes), dim=1))
        return self._store(region_geometry(self.model, self.x_in, masks))

    def adversarial_norm(self, region: Region, p: float, q: float, below: float) -> float:
        """Smallest norm < ``below`` of a projection of x onto a decision hyperplane of the region
        at which the network itself is adversarial (a tie within tolerance), else ``below``."""
        live = region.margin > 0
        if not live.any():
            return below
        dist = distances(region.dw[live], region.db[live], self.x, p, q, self.box)
        near = (dist < below).nonzero()[:, 0]
        if near.numel() == 0:
            return below
        # the minimisers of the box distances (docs/MATH.md §7), NaN where a plane misses the box
        lo, hi = (-math.inf, math.inf) if self.box is None else self.box
        _, z = box_closest_point(region.dw[live][near], region.db[live][near], self.x, p, lo, hi)
        z = z[torch.isfinite(z).all(dim=1)]
        if z.shape[0] == 0:
            return below
        norms = lp_norm(z - self.x, p).tolist()
        with torch.no_grad():
            logits = self.model(z.reshape((z.shape[0],) + tuple(self.x_in.shape[1:])))
        others = logits.clone()
        others[:, self.label] = -math.inf
        gap = logits[:, self.label] - others.amax(dim=1)
        tol = _ADV_RTOL * (1.0 + logits.abs().amax(dim=1))
        best = below
        for ok, n in zip((gap <= tol).tolist(), norms):
            if ok and n < best:
                best = n
        return best


def violated_bound(point: Point, region: Region, p: float, q: float) -> float:
    """ℓ_P: the largest distance to a hyperplane of the region that x lies on the wrong side of."""
    idx = region.violated.nonzero()[:, 0]
    if idx.numel() == 0:
        return 0.0
    free = distances(region.w[idx], region.b[idx], point.x, p, q, None)
    ell = free.max().item()
    if point.box is not None:
        top = idx[torch.argsort(free, descending=True)[:_VIOLATED_BOX]]
        ell = max(ell, distances(region.w[top], region.b[top], point.x, p, q, point.box).max().item())
    return ell


def decision_bound(point: Point, region: Region, p: float, q: float, ell: float,
                    crossed: int = -1) -> float:
    """A lower bound on D_P = min_s dist(x, Q_P ∩ {L^P_c <= L^P_s}), at least max(ℓ_P, min_s h_P(s)).

    In a neighbouring region x usually violates a few of the region's constraints and may lie on
    the adversarial side of the region's affine decision function, where h_P(s) = 0. Any
    non-negative combination of two constraints that hold on Q_P ∩ {L^P_s >= L^P_c} gives a
    half-space containing that set (weak duality), so its distance from x, when x violates it,
    is a lower bound too. For each violated unit v among the few farthest ones (and the unit
    crossed to reach the region) and each class s, the combinations
    ``(1 - τ) [unit v, normalised] + τ [decision s, normalised]`` are scanned on a grid of τ in
    [0, 1] and refined once; τ = 0 and τ = 1 give ℓ_v and h_P(s), so this never does worse.
    """
    if region.margin.numel() == 0:
        return math.inf
    idx = region.violated.nonzero()[:, 0]
    if idx.numel() == 0:
        if (region.margin <= 0).any():
            return ell
        return max(ell, min_distance(region.dw, region.db, point.x, p, q, point.box)[0])
    x = point.x
    free = distances(region.w[idx], region.b[idx], x, p, q, None)
    sub = idx[torch.argsort(free, descending=True)[:_PAIRED_UNITS]]
    if crossed >= 0 and bool(region.violated[crossed]) and not (sub == crossed).any():
        sub = torch.cat([sub, sub.new_tensor([crossed])])
    sigma = torch.where(region.pattern[sub], 1.0, -1.0).to(x.dtype)
    unit_norm = row_norms(region.w[sub], q, dim=1)
    keep = unit_norm > 0
    sub, sigma, unit_norm = sub[keep], sigma[keep], unit_norm[keep]
    # constraints "row . z + offset >= 0": the unit's sign on Q_P, and class s not losing to c
    uw = sigma[:, None] * region.w[sub] / unit_norm[:, None]
    ub = sigma * region.b[sub] / unit_norm
    dec_norm = row_norms(region.dw, q, dim=1)
    bounds = torch.full((region.margin.numel(),), ell, dtype=x.dtype, device=x.device)
    # L_c - L_s constant: H_s is empty (margin > 0) or everything (only ℓ_P applies)
    bounds = torch.where((dec_norm == 0) & (region.margin > 0), math.inf, bounds)
    live = (dec_norm > 0).nonzero()[:, 0]
    if uw.shape[0] == 0 or live.numel() == 0:
        return bounds.min().item()
    dw = -region.dw[live] / dec_norm[live, None]
    db = -region.db[live] / dec_norm[live]
    S, V = live.numel(), uw.shape[0]
    grid = torch.linspace(-1.0, 1.0, _TAU_GRID, dtype=x.dtype, device=x.device)
    tau = (0.5 + 0.5 * grid).expand(S, V, _TAU_GRID)
    value = torch.zeros(S, V, dtype=x.dtype, device=x.device)
    best_tau = torch.zeros_like(value)
    for level in range(2):
        if level:
            tau = (best_tau[..., None] + grid / (_TAU_GRID - 1)).clamp(0.0, 1.0)
        rows = (1 - tau)[..., None] * uw[None, :, None, :] + tau[..., None] * dw[:, None, None, :]
        offs = (1 - tau) * ub[None, :, None] + tau * db[:, None, None]
        rows, offs = rows.reshape(-1, rows.shape[-1]), offs.reshape(-1)
        g = rows @ x + offs
        dist = distances(rows, offs, x, p, q, point.box)
        dist = torch.where(g < 0, dist, torch.zeros_like(dist)).reshape(tau.shape)
        arg = dist.argmax(dim=2)
        level_best = dist.gather(2, arg[..., None])[..., 0]
        better = level_best > value
        value = torch.where(better, level_best, value)
        best_tau = torch.where(better, tau.gather(2, arg[..., None])[..., 0], best_tau)
    bounds[live] = torch.maximum(bounds[live], value.amax(dim=1))
    return bounds.min().item()


def frontier(point: Point, state: SearchState, p: float, q: float) -> Tuple[float, int]:
    if state.frontier is None:
        idx = state.open.nonzero()[:, 0]
        value, j = min_distance(state.region.w[idx], state.region.b[idx], point.x, p, q, point.box)
        state.frontier = (max(value, state.ell), int(idx[j]) if j >= 0 else -1)
    return state.frontier


def search(point: Point, p: float, q: float, neighbors: int) -> Tuple[float, bool]:
    """(lower bound, exact) for one norm: the region certificate (box-aware when a box is given)
    improved by up to ``neighbors`` neighbouring regions (see the module docstring)."""
    root = point.root
    states: Dict[bytes, SearchState] = {}
    first = SearchState(root, 0.0, decision_bound(point, root, p, q, 0.0), torch.ones_like(root.pattern))
    states[point.key(root.pattern)] = first
    t, _ = frontier(point, first, p, q)
    if first.bound <= t:           # Theorem 3.1: the projection lies in Q(x) (and in the box)
        return first.bound, True
    best = min(t, first.bound)
    if neighbors == 0:
        return best, False
    upper = point.adversarial_norm(root, p, q, math.inf)
    for _ in range(neighbors):
        if upper <= best * (1.0 + _EXACT_RTOL):
            break
        t, unit, src = min(((*frontier(point, s, p, q), s) for s in states.values()),
                           key=lambda item: item[0])
        if t == math.inf or min(s.bound for s in states.values()) <= t:
            break                   # the bound is min_P D_P already: more regions cannot raise it
        pattern = src.region.pattern.clone()
        pattern[unit] = ~pattern[unit]
        region = point.region(pattern)
        ell = violated_bound(point, region, p, q)
        new = SearchState(region, ell, decision_bound(point, region, p, q, ell, unit), torch.ones_like(pattern))
        for other in states.values():
            diff = (other.region.pattern ^ pattern).nonzero()[:, 0]
            if diff.numel() == 1:
                v = int(diff[0])
                new.open[v] = False
                other.open[v] = False
                if other.frontier is not None and other.frontier[1] == v:
                    other.frontier = None
        states[point.key(pattern)] = new
        if new.bound < upper:
            upper = point.adversarial_norm(region, p, q, upper)
        t = min(frontier(point, s, p, q)[0] for s in states.values())
        best = max(best, min(t, min(s.bound for s in states.values())))
    return best, upper <= best * (1.0 + _EXACT_RTOL)
