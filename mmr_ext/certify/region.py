"""Certified lp robustness radii of ReLU networks (docs/MATH.md §3, §5, §7, §8).

:func:`certify` returns a :class:`~mmr_ext.certify.certificate.Certificate`: per norm p a radius
``r`` such that no input within lp-distance ``< r`` of x (inside the box, if one is given)
changes the decision of the network, a flag telling when ``r`` is the exact minimal adversarial
norm, and the universal (Thm 4.1 of the MMR-Universal paper) radius for any p from the l1 and l∞
region certificates. The region certificate of x is ``min(dB, dD)``, exact when ``dD <= dB``
(§3); with a box every distance is the box-constrained one (§7); with ``neighbors > 0`` the
neighbouring-regions search (:mod:`.neighbors`, §8) raises it where it is only a lower bound.
Everything runs in float64 on a float64 copy of the model, and radii are rounded toward zero in
the input's dtype (§12). The universal radius uses the plain region radii only (§5.3).
"""
from __future__ import annotations

import math
import warnings
from numbers import Real
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..checks import check_input, check_labels
from ..geometry import compute_geometry, to_float64
from ..math.norms import dual_exponent, exponent
from ..math.rounding import round_down
from ..nn.graph import Graph, parse_network
from .box_radius import box_region_radius
from .certificate import Certificate
from .neighbors import Point, search
from .prediction import reliably_correct

_CHUNK = 256             # points per call of the batched region geometry


def check_norms(norms) -> Tuple[float, ...]:
    if isinstance(norms, (Real, torch.Tensor, str)) and not isinstance(norms, bool):
        norms = (norms,)
    if isinstance(norms, bytes) or not isinstance(norms, Iterable):
        raise TypeError(f"norms must be a sequence of p >= 1 (e.g. (1, 2, math.inf)), got {norms!r}")
    out: List[float] = []
    for p in norms:
        if isinstance(p, torch.Tensor) and p.numel() == 1:
            p = p.item()
        p = exponent(p)
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError("norms must not be empty")
    return tuple(out)


def check_neighbors(neighbors) -> int:
    if isinstance(neighbors, bool) or not isinstance(neighbors, (int, np.integer)):
        raise TypeError(f"neighbors must be an integer >= 0, got {neighbors!r}")
    if neighbors < 0:
        raise ValueError(f"neighbors must be >= 0, got {neighbors}")
    return int(neighbors)


def check_certify_box(box, x64: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
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
        toward zero), ``correct``, ``universal(p)`` and ``fraction_certified(eps)``. A point
        counts as correct (and gets a positive radius) only when the model predicts its label in
        its own dtype and in float64 with a margin above rounding (docs/MATH.md §12).
    """
    norms = check_norms(norms)
    neighbors = check_neighbors(neighbors)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    graph = isinstance(parse_network(model), Graph)  # clear errors before the model runs
    check_input(model, x)
    model64 = to_float64(model)
    x64 = x.detach().to(torch.float64)
    B, d = x64.shape[0], x64[0].numel()
    K = model64(x64[:1]).shape[1]
    check_labels(y, B, K, x.device, name="y")
    y = y.long()
    box = check_certify_box(box, x64)
    if graph and neighbors > 0:
        warnings.warn("certify: for graph networks (max pooling, sums of branches) the neighbouring-regions search "
                      "is not implemented; the radii are those of each point's own region (docs/MATH.md §11)",
                      stacklevel=3)
        neighbors = 0

    from tqdm.auto import tqdm

    all_norms = list(norms) + [p for p in (1.0, math.inf) if p not in norms]
    plain = {p: torch.empty(B, dtype=torch.float64, device=x.device) for p in all_norms}
    exact = {p: torch.empty(B, dtype=torch.bool, device=x.device) for p in all_norms}
    correct = torch.empty(B, dtype=torch.bool, device=x.device)
    radius = {p: torch.empty(B, dtype=torch.float64, device=x.device) for p in norms}
    flags = {p: torch.empty(B, dtype=torch.bool, device=x.device) for p in norms}
    for start in tqdm(range(0, B, _CHUNK), desc="certify: regions", disable=not progress):
        sl = slice(start, min(start + _CHUNK, B))
        geometry, logits = compute_geometry(model64, x64[sl], all_norms, labels=y[sl])
        ok = reliably_correct(model, x[sl], y[sl], logits)
        correct[sl] = ok
        for p, (boundary, decision) in zip(all_norms, geometry):
            dB = boundary.amin(dim=1) if boundary.shape[1] else torch.full_like(ok, math.inf, dtype=torch.float64)
            dD = decision.amin(dim=1)
            plain[p][sl] = torch.where(ok, torch.minimum(dB, dD).clamp(min=0.0), 0.0)
            exact[p][sl] = ~ok | (dD <= dB)
            if p in radius:
                radius[p][sl], flags[p][sl] = plain[p][sl], exact[p][sl]
        if box is not None and neighbors == 0:  # the box search from a few rows per point
            boundary = dict(zip(all_norms, (g[0] for g in geometry)))
            for i in ok.nonzero()[:, 0].tolist():
                found = box_region_radius(model64, x64[start + i:start + i + 1], int(y[start + i]),
                                          {p: boundary[p][i] for p in norms}, box)
                for p, (lower, is_exact) in found.items():
                    radius[p][start + i] = max(lower, float(plain[p][start + i]))
                    flags[p][start + i] = is_exact

    todo = [] if box is not None and neighbors == 0 else [
        i for i in correct.nonzero()[:, 0].tolist()
        if box is not None or (neighbors > 0 and not all(bool(exact[p][i]) for p in norms))]
    for i in tqdm(todo, desc="certify: box/neighbours", disable=not progress):
        point = Point(model64, x64[i:i + 1], int(y[i]), box)
        for p in norms:
            if box is None and bool(exact[p][i]):
                continue
            lower, is_exact = search(point, p, dual_exponent(p), neighbors)
            radius[p][i] = max(lower, float(plain[p][i]))
            flags[p][i] = is_exact

    dtype = x.dtype
    return Certificate(radius={p: round_down(radius[p], dtype) for p in norms}, exact=flags,
                       correct=correct, rho1=plain[1.0], rho_inf=plain[math.inf], input_dim=d,
                       dtype=dtype, box=box, neighbors=neighbors)
