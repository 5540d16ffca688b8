"""Certified lp robustness radii of ReLU networks (docs/MATH.md §3, §5, §7, §8).

:func:`certify` returns a :class:`Certificate`: per norm p a radius ``r`` such that no input within
lp-distance ``< r`` of x (inside the box, if one is given) changes the decision of the network,
a flag telling when ``r`` is the exact minimal adversarial norm, and the universal (Thm 4.1)
radius for any p from the l1 and l∞ region certificates.

Region certificate (§3). With dB the distance to the closest hidden-unit hyperplane of the
linear region Q(x) and dD the distance to the closest decision hyperplane, a correctly classified
x gets ``min(dB, dD)``, exact when ``dD <= dB``. With ``box=(lo, hi)`` every distance is the
box-constrained one (§7), solved by :func:`mmr_ext.box_min_distance` only for the few hyperplanes
that can be the closest.

Neighbouring regions (§8, the MMR paper, App. A.2). For a pattern P (which hidden units are active),
Q_P is the polyhedron on which the network equals the affine network with P's fixed slopes
(:mod:`mmr_ext.regions`); ``π^P_u`` is unit u's hyperplane there and ``P^u`` is P with u flipped.
Let E be a set of explored patterns containing the pattern of x, all distances measured from x
(box-constrained with a box), and

    ℓ_P     = max over the units v whose sign at x contradicts P of dist(x, π^P_v)   (0 for Q(x)),
    e_P(u)  = max(dist(x, π^P_u), ℓ_P),
    t       = min over P in E and units u with P^u not in E of e_P(u),
    D_P     = a lower bound on min over s != c of dist(x, Q_P ∩ {L^P_c <= L^P_s}), L^P the
              region's affine logits: at least max(ℓ_P, h_P(s)) with h_P(s) = dist(x, {L^P_c =
              L^P_s}), or 0 when L^P_c(x) <= L^P_s(x); sharpened by weak duality (any non-negative
              combination of constraints valid on that set defines a half-space containing it,
              whose distance from x, when x violates it, is a lower bound; see _decision_bound).

Claim: every z with ``||z - x|| < min(t, min_P D_P)`` (in the box) is classified as c, so
``min(t, min_P D_P)`` is a sound lower bound on the minimal adversarial norm.

1. Coverage: the ball ``{||z - x|| < t}`` lies in the union of the Q_P, P in E. Take z in it and
   the segment x -> z; the regions of all patterns are closed and cover the space, so if the
   segment leaves the union there is a last covered point y, y in Q_P (P in E), followed by
   points of some Q_R, R not in E, with y in Q_R. Every unit u on which P and R differ has true
   pre-activation 0 at y, so ``f^P_u(y) = 0``. If ``f^P_u`` is not identically zero, y lies on
   the hyperplane π^P_u and in Q_P, hence ``||y - x|| >= dist(x, Q_P ∩ π^P_u) >= e_P(u)``
   (dist(x, Q_P) >= ℓ_P since any point of Q_P lies beyond every hyperplane that x is on the
   wrong side of); as ``||y - x|| < t``, P^u must be in E, y lies in Q_{P^u} too (u's output is 0
   at y under both slopes) and we repeat with P^u, which differs from R in one unit fewer. If
   only units with ``f^P_u ≡ 0`` remain, flipping them changes nothing, Q_R = Q_P and the points
   after y are covered: a contradiction either way.
2. Decision: an adversarial z (some logit >= the logit of c; ties count) with ``||z - x|| < t``
   lies in some Q_P, P in E, where the logits are L^P, so z is in Q_P ∩ {L^P_c <= L^P_s} for
   some s and ``||z - x|| >= dist(x, Q_P ∩ {L^P_c <= L^P_s}) >= D_P``.

The exploration repeatedly crosses the unexplored hyperplane attaining t (the closest frontier
hyperplane, measured as e_P(u)), adds the neighbouring region and updates t and the D_P. The
returned radius is the maximum of the bounds seen, starting from the plain region certificate, so
exploring never lowers a radius. Upper bounds come from the projections of x onto the decision
hyperplanes of explored regions: a projection at which the network itself is adversarial (up to
a relative tolerance of 1e-9 on the logits) is an adversarial example; when its norm is <= the
lower bound the radius is flagged exact. The search stops after ``neighbors`` regions, when it is
exact, or when ``min_P D_P <= t`` (further regions cannot raise the bound).

Soundness notes. Everything is computed in float64 on float64 copies of the model and inputs and
radii are rounded toward zero when cast to the input dtype; float64 rounding itself (relative
1e-13 or so on well-scaled networks) is not bounded rigorously; for a float32 model the radii
are those of its weights evaluated in float64. Misclassified points get radius 0
(flagged exact: x itself is misclassified). The universal radius uses the plain region
certificates ρ1 and ρ∞ only, never box-aware or neighbour-improved ones: Thm 4.1 needs both balls
inside one convex set on which the decision is constant; the union of explored regions is not
convex, and with a box the hull of the box-clipped balls does not contain the clipped hull (e.g.
the hyperplane ``2 z1 + z2 = 0.3``, x = (0.2, 0.9), box [0, 1]^2: box l1 and l∞ distances 0.8
and 0.6 would give an l2 hull radius of 0.759, but the box l2 distance is 0.632).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .box import box_distance, box_min_distance
from .nn.chain import parse_model
from .checks import check_input, check_labels
from .math.norms import dual_exponent
from .geometry import compute_geometry
from .radii import round_down, universal_radius
from .reference import row_norms, safe_distance
from .regions import RegionGeometry, region_geometry, to_float64

__all__ = ["Certificate", "certify"]

_EXACT_RTOL = 1e-9       # an upper bound within this relative distance of the lower bound is exact
_ADV_RTOL = 1e-9         # logits tolerance (relative to their scale) when checking an adversarial
_CHUNK = 256             # points per call of the batched region geometry
_VIOLATED_BOX = 64       # box distances solved for ℓ_P (the violated units farthest unconstrained)
_PAIRED_UNITS = 8        # violated units combined with each decision hyperplane in a region
_TAU_GRID = 17           # combination weights per (unit, class) pair and refinement level


# ---------------------------------------------------------------------------------------------
# the certificate
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Certificate:
    """Result of :func:`certify` for a batch of B points.

    Attributes:
        radius: ``{p: [B]}`` certified lp radius per requested norm (keys are floats: 1.0, 2.0,
            inf, ...): no perturbation of lp-norm < radius (within the box, if given) changes the
            decision; 0 for misclassified points.
        exact: ``{p: [B]}`` bool, True where the radius is the minimal adversarial lp-norm (also
            True for misclassified points, whose minimal adversarial norm is 0).
        correct: [B] bool, the prediction (argmax, ties to the first class) equals the label.
        rho1, rho_inf: [B] float64 plain region certificates in l1 and l∞ (no box, no neighbouring
            regions), the inputs of :meth:`universal`.
        input_dim: d, the number of input entries per point.
        dtype: the dtype of the returned radii (the dtype of x).
        box: the (lo, hi) bounds used, as float64 [d] tensors, or None.
        neighbors: the number of neighbouring regions explored at most per point and norm.
    """

    radius: Dict[float, torch.Tensor]
    exact: Dict[float, torch.Tensor]
    correct: torch.Tensor
    rho1: torch.Tensor = field(repr=False)
    rho_inf: torch.Tensor = field(repr=False)
    input_dim: int = 0
    dtype: torch.dtype = torch.float64
    box: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)
    neighbors: int = 0

    @property
    def norms(self) -> Tuple[float, ...]:
        """The norms certified individually (the keys of ``radius``)."""
        return tuple(self.radius)

    def universal(self, p) -> torch.Tensor:
        """Universal lp radius [B] from the l1 and l∞ region certificates (Croce & Hein, ICLR 2020, Thm 4.1).

        ``hull_radius(ρ1, ρ∞, p, d)``: valid for every p >= 1 at once, 0 for misclassified
        points. It ignores the box and the neighbouring regions (see the module docstring), so for
        a p in ``norms`` it never exceeds ``radius[p]`` computed without them.
        """
        dual_exponent(p)
        if self.input_dim == 1:  # every lp-norm is |.| in one dimension
            value = torch.maximum(self.rho1, self.rho_inf)
        else:
            value = universal_radius(self.rho1, self.rho_inf, p, self.input_dim)
        return round_down(value, self.dtype)

    def fraction_certified(self, eps: Mapping) -> Dict[str, object]:
        """Fractions of points certified at the radii ``eps = {p: ε_p}``.

        A point is certified at ε_p when it is correctly classified and its radius exceeds ε_p
        strictly (at radius exactly ε a perturbation of norm ε may reach a tie). Returns::

            {"radius":    {p: fraction with radius[p] > ε_p},      # each norm's own certificate
             "union":     fraction certified for every p in eps at once by the per-norm radii,
             "universal": {p: fraction with universal(p) > ε_p},   # Thm 4.1 from l1 and l∞ only
             "union_universal": fraction certified for every p in eps by Thm 4.1 alone}

        "radius"/"union" use the strongest certificate computed for each norm (box, neighbouring
        regions); "radius" covers the p of eps among ``norms`` and "union" is None unless all of
        them are. "universal"/"union_universal" (any p) show
        what one l1 + l∞ computation guarantees for all norms (the MMR-Universal certificate of
        Croce & Hein, ICLR 2020); for the union l1 + l2 + l∞ it is the fraction with ρ1 > ε1, ρ∞ > ε∞ and
        hull(ρ1, ρ∞) > ε2. Both are fractions of all B points (misclassified ones count as not
        certified).
        """
        if not isinstance(eps, Mapping) or not eps:
            raise TypeError("eps must be a non-empty dict {p: epsilon}")
        parsed = {}
        for p, e in eps.items():
            dual_exponent(p)
            if isinstance(e, bool) or not isinstance(e, Real) or math.isnan(float(e)) or float(e) < 0:
                raise ValueError(f"eps[{p}] must be a number >= 0, got {e!r}")
            parsed[float(p)] = float(e)
        union_r = torch.ones_like(self.correct)
        union_u = torch.ones_like(self.correct)
        out: Dict[str, object] = {"radius": {}, "union": None, "universal": {}, "union_universal": 0.0}
        for p, e in parsed.items():
            cert_u = self.correct & (self.universal(p) > e)
            out["universal"][p] = cert_u.double().mean().item()
            union_u &= cert_u
            if p in self.radius:
                cert_r = self.correct & (self.radius[p] > e)
                out["radius"][p] = cert_r.double().mean().item()
                union_r &= cert_r
        if all(p in self.radius for p in parsed):
            out["union"] = union_r.double().mean().item()
        out["union_universal"] = union_u.double().mean().item()
        return out


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------

def _check_norms(norms) -> Tuple[float, ...]:
    if isinstance(norms, (Real, torch.Tensor)) and not isinstance(norms, bool):
        norms = (norms,)
    if isinstance(norms, (str, bytes)) or not isinstance(norms, Iterable):
        raise TypeError(f"norms must be a sequence of p >= 1 (e.g. (1, 2, math.inf)), got {norms!r}")
    out: List[float] = []
    for p in norms:
        if isinstance(p, torch.Tensor) and p.numel() == 1:
            p = p.item()
        dual_exponent(p)
        if float(p) not in out:
            out.append(float(p))
    if not out:
        raise ValueError("norms must not be empty")
    return tuple(out)


def _check_neighbors(neighbors) -> int:
    if isinstance(neighbors, bool) or not isinstance(neighbors, (int, np.integer)):
        raise TypeError(f"neighbors must be an integer >= 0, got {neighbors!r}")
    if neighbors < 0:
        raise ValueError(f"neighbors must be >= 0, got {neighbors}")
    return int(neighbors)


def check_box(box, x64: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if box is None:
        return None
    if not isinstance(box, (tuple, list)) or len(box) != 2:
        raise TypeError(f"box must be None or a pair (lo, hi), got {box!r}")
    in_shape = tuple(x64.shape[1:])
    d = x64[0].numel()
    bounds = []
    for name, v in zip(("lo", "hi"), box):
        if isinstance(v, torch.Tensor):
            if v.is_complex() or v.dtype == torch.bool:
                raise TypeError(f"box {name} must be real, got {v.dtype}")
            t = v.detach().to(device=x64.device, dtype=torch.float64)
            try:
                t = torch.broadcast_to(t, in_shape) if t.numel() != d or t.dim() > 1 else t.reshape(in_shape)
            except RuntimeError:
                raise ValueError(f"box {name} of shape {tuple(v.shape)} does not fit inputs of shape "
                                 f"{in_shape}") from None
        elif isinstance(v, Real) and not isinstance(v, bool):
            t = torch.full(in_shape, float(v), dtype=torch.float64, device=x64.device)
        else:
            raise TypeError(f"box {name} must be a number or a tensor, got {type(v).__name__}")
        if torch.isnan(t).any():
            raise ValueError(f"box {name} contains NaN")
        bounds.append(t.reshape(d).contiguous())
    lo, hi = bounds
    if not (lo < hi).all():
        i = int((lo >= hi).nonzero()[0])
        raise ValueError(f"box must have lo < hi, got lo = {lo[i].item()} >= hi = {hi[i].item()} at entry {i}")
    flat = x64.reshape(x64.shape[0], d)
    outside = (flat < lo) | (flat > hi)
    if outside.any():
        rows = outside.any(dim=1).nonzero()[:, 0]
        raise ValueError(f"x must lie inside the box [lo, hi]: {rows.numel()} point(s) are outside "
                         f"(first: index {int(rows[0])})")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# distances from one point (float64, flat [d]) to hyperplanes w [M, d], b [M]
# ---------------------------------------------------------------------------------------------

def _distances(w, b, x, p, q, box) -> torch.Tensor:
    """All distances [M], box-constrained when ``box`` is given (+inf for zero rows)."""
    if box is None:
        return safe_distance((w @ x + b).abs(), row_norms(w, q, dim=1))
    return box_distance(w, b, x, p, box[0], box[1])


def _min_distance(w, b, x, p, q, box) -> Tuple[float, int]:
    """(smallest distance, its row) over the rows; (inf, -1) without rows or reachable planes."""
    if w.shape[0] == 0:
        return math.inf, -1
    if box is None:
        dist = _distances(w, b, x, p, q, None)
        index = int(dist.argmin())
        value = dist[index].item()
        return (value, index) if value < math.inf else (math.inf, -1)
    value, index = box_min_distance(w, b, x, p, box[0], box[1])
    return value.item(), int(index)


def _projection(w: np.ndarray, g: float, x: np.ndarray, p: float, q: float, box) -> Optional[np.ndarray]:
    """A minimiser δ of ||δ||_p s.t. <w, x + δ> + b = 0 (g = <w, x> + b != 0) in the box, or None.

    Coordinate i moves by t_i >= 0 toward the hyperplane, within its room: p = 1 fills the
    largest |w_i| first; otherwise t_i = min(μ c_i, room_i) with c_i = |w_i|^{q-1} (docs/MATH.md §7),
    μ by bisection (closed form without a box).
    """
    a = np.abs(w)
    direction = -np.sign(g) * np.sign(w)
    if box is None:
        room = np.where(a > 0, np.inf, 0.0)
    else:
        lo, hi = box
        room = np.where(direction < 0, x - lo, hi - x)
        room = np.where(a > 0, np.maximum(room, 0.0), 0.0)
    need = abs(g)
    if np.sum(a * room) < need:
        return None
    t = np.zeros_like(x)
    if p == 1.0:
        order = np.argsort(-a, kind="stable")
        reach = np.cumsum(a[order] * room[order])
        k = int(np.searchsorted(reach, need, side="left"))
        k = min(k, len(order) - 1)
        t[order[:k]] = room[order[:k]]
        spent = reach[k - 1] if k > 0 else 0.0
        t[order[k]] = min((need - spent) / a[order[k]], room[order[k]])
    else:
        amax = a.max()
        c = np.ones_like(a) if math.isinf(p) else (a / amax) ** (q - 1.0)
        c = np.where(a > 0, c, 0.0)
        slope = np.sum(a * c)
        mu_lo = need / slope                       # H(μ) <= μ Σ a c
        if box is None or np.all(np.isinf(room[a > 0])):
            mu = mu_lo
        else:
            use = c > 0
            mu_hi = max(mu_lo, float(np.max(np.where(use, room / np.where(use, c, 1.0), 0.0))))

            def reached(mu):
                return np.sum(a * np.minimum(mu * c, room)) >= need

            for _ in range(200):
                if mu_hi - mu_lo <= 1e-15 * mu_hi:
                    break
                mid = 0.5 * (mu_lo + mu_hi)
                if reached(mid):
                    mu_hi = mid
                else:
                    mu_lo = mid
            mu = mu_hi
        t = np.minimum(mu * c, room)
    return direction * t


def _norm(v: np.ndarray, p: float) -> float:
    return float(np.abs(v).max(initial=0.0)) if math.isinf(p) else float(np.linalg.norm(v, ord=p))


# ---------------------------------------------------------------------------------------------
# one point: cached regions and the neighbour search
# ---------------------------------------------------------------------------------------------

@dataclass
class _Region:
    """p-independent data of one explored region, seen from the point x."""

    pattern: torch.Tensor      # [N] bool
    w: torch.Tensor            # [N, d]
    b: torch.Tensor            # [N]
    violated: torch.Tensor     # [N] bool: x is on the wrong side of the unit's hyperplane
    dw: torch.Tensor           # [K-1, d] decision rows w_c - w_s, s != c
    db: torch.Tensor           # [K-1]
    margin: torch.Tensor       # [K-1] L_c(x) - L_s(x) of the region's affine logits


@dataclass
class _State:
    """A region within the search for one norm."""

    region: _Region
    ell: float                 # lower bound on dist(x, Q_P)
    bound: float               # D_P
    open: torch.Tensor         # [N] bool: P^u not explored yet
    frontier: Optional[Tuple[float, int]] = None   # cached (e_P, unit) over the open units


class _Point:
    """Geometry of the regions around one correctly classified point (float64)."""

    def __init__(self, model64: nn.Module, x: torch.Tensor, label: int, box):
        self.model = model64
        self.x_in = x                      # [1, *in_shape]
        self.x = x.reshape(-1)             # [d]
        self.label = label
        self.box = box
        self.box_np = None if box is None else (box[0].cpu().numpy(), box[1].cpu().numpy())
        self.x_np = self.x.cpu().numpy()
        self.cache: Dict[bytes, _Region] = {}
        geometry = region_geometry(model64, x)
        self.sizes = geometry.layer_sizes
        self.root = self._store(geometry)

    @staticmethod
    def key(pattern: torch.Tensor) -> bytes:
        return np.packbits(pattern.cpu().numpy()).tobytes()

    def _store(self, geometry: RegionGeometry) -> _Region:
        x = self.x[None]
        K = geometry.logit_bias.shape[1]
        keep = torch.arange(K, device=self.x.device) != self.label
        dw, db = geometry.decision(torch.tensor([self.label], device=self.x.device))
        logits = geometry.logits(x)[0]
        region = _Region(pattern=geometry.pattern[0], w=geometry.weight[0], b=geometry.bias[0],
                         violated=geometry.violated(x)[0], dw=dw[0][keep], db=db[0][keep],
                         margin=(logits[self.label] - logits)[keep])
        self.cache[self.key(region.pattern)] = region
        return region

    def region(self, pattern: torch.Tensor) -> _Region:
        found = self.cache.get(self.key(pattern))
        if found is not None:
            return found
        masks = list(torch.split(pattern[None], list(self.sizes), dim=1))
        return self._store(region_geometry(self.model, self.x_in, masks))

    def adversarial_norm(self, region: _Region, p: float, q: float, below: float) -> float:
        """Smallest norm < ``below`` of a projection of x onto a decision hyperplane of the region
        at which the network itself is adversarial (a tie within tolerance), else ``below``."""
        live = region.margin > 0
        if not live.any():
            return below
        dist = _distances(region.dw[live], region.db[live], self.x, p, q, self.box)
        w_np = region.dw[live].cpu().numpy()
        g_np = region.margin[live].cpu().numpy()
        order = torch.argsort(dist).tolist()
        points = []
        for j in order:
            if not dist[j] < below:
                break
            delta = _projection(w_np[j], float(g_np[j]), self.x_np, p, q, self.box_np)
            if delta is not None:
                z = self.x_np + delta
                points.append(z if self.box_np is None else np.clip(z, *self.box_np))
        if not points:
            return below
        norms = [_norm(z - self.x_np, p) for z in points]
        z = torch.as_tensor(np.stack(points), device=self.x.device)
        with torch.no_grad():
            logits = self.model(z.reshape((len(points),) + tuple(self.x_in.shape[1:])))
        others = logits.clone()
        others[:, self.label] = -math.inf
        gap = logits[:, self.label] - others.amax(dim=1)
        tol = _ADV_RTOL * (1.0 + logits.abs().amax(dim=1))
        best = below
        for ok, n in zip((gap <= tol).tolist(), norms):
            if ok and n < best:
                best = n
        return best


def _ell(point: _Point, region: _Region, p: float, q: float) -> float:
    """ℓ_P: the largest distance to a hyperplane of the region that x lies on the wrong side of."""
    idx = region.violated.nonzero()[:, 0]
    if idx.numel() == 0:
        return 0.0
    free = _distances(region.w[idx], region.b[idx], point.x, p, q, None)
    ell = free.max().item()
    if point.box is not None:
        top = idx[torch.argsort(free, descending=True)[:_VIOLATED_BOX]]
        ell = max(ell, _distances(region.w[top], region.b[top], point.x, p, q, point.box).max().item())
    return ell


def _decision_bound(point: _Point, region: _Region, p: float, q: float, ell: float,
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
        return max(ell, _min_distance(region.dw, region.db, point.x, p, q, point.box)[0])
    x = point.x
    free = _distances(region.w[idx], region.b[idx], x, p, q, None)
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
        dist = _distances(rows, offs, x, p, q, point.box)
        dist = torch.where(g < 0, dist, torch.zeros_like(dist)).reshape(tau.shape)
        arg = dist.argmax(dim=2)
        level_best = dist.gather(2, arg[..., None])[..., 0]
        better = level_best > value
        value = torch.where(better, level_best, value)
        best_tau = torch.where(better, tau.gather(2, arg[..., None])[..., 0], best_tau)
    bounds[live] = torch.maximum(bounds[live], value.amax(dim=1))
    return bounds.min().item()


def _frontier(point: _Point, state: _State, p: float, q: float) -> Tuple[float, int]:
    if state.frontier is None:
        idx = state.open.nonzero()[:, 0]
        value, j = _min_distance(state.region.w[idx], state.region.b[idx], point.x, p, q, point.box)
        state.frontier = (max(value, state.ell), int(idx[j]) if j >= 0 else -1)
    return state.frontier


def _search(point: _Point, p: float, q: float, neighbors: int) -> Tuple[float, bool]:
    """(lower bound, exact) for one norm: the region certificate (box-aware when a box is given)
    improved by up to ``neighbors`` neighbouring regions (see the module docstring)."""
    root = point.root
    states: Dict[bytes, _State] = {}
    first = _State(root, 0.0, _decision_bound(point, root, p, q, 0.0), torch.ones_like(root.pattern))
    states[point.key(root.pattern)] = first
    t, _ = _frontier(point, first, p, q)
    if first.bound <= t:           # Theorem 3.1: the projection lies in Q(x) (and in the box)
        return first.bound, True
    best = min(t, first.bound)
    if neighbors == 0:
        return best, False
    upper = point.adversarial_norm(root, p, q, math.inf)
    for _ in range(neighbors):
        if upper <= best * (1.0 + _EXACT_RTOL):
            break
        t, unit, src = min(((*_frontier(point, s, p, q), s) for s in states.values()),
                           key=lambda item: item[0])
        if t == math.inf or min(s.bound for s in states.values()) <= t:
            break                   # the bound is min_P D_P already: more regions cannot raise it
        pattern = src.region.pattern.clone()
        pattern[unit] = ~pattern[unit]
        region = point.region(pattern)
        ell = _ell(point, region, p, q)
        new = _State(region, ell, _decision_bound(point, region, p, q, ell, unit), torch.ones_like(pattern))
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
        t = min(_frontier(point, s, p, q)[0] for s in states.values())
        best = max(best, min(t, min(s.bound for s in states.values())))
    return best, upper <= best * (1.0 + _EXACT_RTOL)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norms=(1, 2, math.inf),
            box=None, neighbors: int = 0, progress: bool = False) -> Certificate:
    """Certified lp radii of a ReLU network at the points x with labels y.

    Args:
        model: ``nn.Sequential`` of supported layers (eval mode); a float64 copy is used.
        x: float32/float64 batch [B, ...] on the model's device and in its dtype.
        y: integer labels [B] in [0, K).
        norms: the norms p >= 1 (``math.inf`` allowed) to certify individually; l1 and l∞ are
            always computed internally for :meth:`Certificate.universal`.
        box: None, or ``(lo, hi)`` with numbers or tensors broadcastable to one input (e.g.
            ``(0, 1)`` for images): inputs are constrained to the box, every distance becomes the
            box-constrained one (docs/MATH.md §7). x must lie inside, with lo < hi.
        neighbors: explore up to this many neighbouring linear regions per point and norm where
            the region certificate is only a lower bound (docs/MATH.md §8; the paper used 5).
        progress: show a tqdm progress bar.

    Returns:
        :class:`Certificate` with ``radius[p]`` and ``exact[p]`` ([B], in x's dtype, rounded
        toward zero), ``correct``, ``universal(p)`` and ``fraction_certified(eps)``.
    """
    norms = _check_norms(norms)
    neighbors = _check_neighbors(neighbors)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    check_input(model, x)
    model64 = to_float64(model)
    parse_model(model64)
    x64 = x.detach().to(torch.float64)
    B, d = x64.shape[0], x64[0].numel()
    K = model64(x64[:1]).shape[1]
    check_labels(y, B, K, x.device, name="y")
    y = y.long()
    box = check_box(box, x64)

    from tqdm.auto import tqdm

    all_norms = list(norms) + [p for p in (1.0, math.inf) if p not in norms]
    plain = {p: torch.empty(B, dtype=torch.float64, device=x.device) for p in all_norms}
    exact = {p: torch.empty(B, dtype=torch.bool, device=x.device) for p in all_norms}
    correct = torch.empty(B, dtype=torch.bool, device=x.device)
    for start in tqdm(range(0, B, _CHUNK), desc="certify: regions", disable=not progress):
        sl = slice(start, min(start + _CHUNK, B))
        geometry, logits = compute_geometry(model64, x64[sl], all_norms, labels=y[sl])
        ok = logits.argmax(dim=1) == y[sl]
        correct[sl] = ok
        for p, (boundary, decision) in zip(all_norms, geometry):
            dB = boundary.amin(dim=1) if boundary.shape[1] else torch.full_like(ok, math.inf, dtype=torch.float64)
            dD = decision.amin(dim=1)
            plain[p][sl] = torch.where(ok, torch.minimum(dB, dD).clamp(min=0.0), 0.0)
            exact[p][sl] = ~ok | (dD <= dB)

    radius = {p: plain[p].clone() for p in norms}
    flags = {p: exact[p].clone() for p in norms}
    todo = [i for i in correct.nonzero()[:, 0].tolist()
            if box is not None or (neighbors > 0 and not all(bool(exact[p][i]) for p in norms))]
    for i in tqdm(todo, desc="certify: box/neighbours", disable=not progress):
        point = _Point(model64, x64[i:i + 1], int(y[i]), box)
        for p in norms:
            if box is None and bool(exact[p][i]):
                continue
            lower, is_exact = _search(point, p, dual_exponent(p), neighbors)
            radius[p][i] = max(lower, float(plain[p][i]))
            flags[p][i] = is_exact

    dtype = x.dtype
    return Certificate(radius={p: round_down(radius[p], dtype) for p in norms}, exact=flags,
                       correct=correct, rho1=plain[1.0], rho_inf=plain[math.inf], input_dim=d,
                       dtype=dtype, box=box, neighbors=neighbors)
