"""The box-constrained region certificate of one point without neighbouring regions (docs/MATH.md
§3, §7), from a few rows only.

The certificate is min(dB, dD) with dB the smallest box distance from x to a hyperplane of its
region's hidden units and dD the smallest box distance to a decision hyperplane; it is the exact
minimal adversarial norm when dD <= dB (Thm 3.1 of the MMR paper). A box distance is never below
the unconstrained one |g| / ||w||_q, which the batched geometry has already computed for every
unit. So the units are visited in ascending unconstrained distance, their rows built on demand
(:class:`mmr_ext.geometry.regions.PointRows`; for graph networks all rows of the point at once,
:class:`mmr_ext.geometry.graph_reference.GraphPointRows`), until the best box distance found is below the next
unconstrained distance (the early stop of the MMR paper, App. A.1; a relative allowance of
1e-9 covers the rounding of the two computations). The result equals the dense search of
:mod:`.neighbors` with ``neighbors=0`` up to rounding, without materialising the N x d rows.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn

from ..geometry.graph_reference import GraphPointRows
from ..geometry.regions import PointRows
from ..nn.graph import Graph, parse_network
from ..math.norms import dual_exponent
from .hyperplanes import distances, min_distance

__all__ = ["box_region_radius"]

_ROWS_PER_STEP = 32      # unit rows built and solved together
_STOP_RTOL = 1e-9        # the unconstrained distances of the two computations differ by rounding


def box_region_radius(model64: nn.Module, x: torch.Tensor, label: int, free: Dict[float, torch.Tensor],
                      box: Tuple[torch.Tensor, torch.Tensor]) -> Dict[float, Tuple[float, bool]]:
    """``{p: (radius, exact)}`` for one correctly classified point x [1, ...] (float64).

    ``free[p]`` [N]: the unconstrained distances from x to the hidden units' hyperplanes in norm p
    (the boundary distances of :func:`mmr_ext.geometry.compute_geometry`).
    """
    network = parse_network(model64)
    rows = GraphPointRows(network, x) if isinstance(network, Graph) else PointRows(model64, x)
    flat = rows.x.reshape(-1)
    W, c = rows.logits()
    others = torch.arange(W.shape[0], device=W.device) != label
    dw, db = W[label] - W[others], c[label] - c[others]
    margin = dw @ flat + db
    cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    out = {}
    for p, dist_free in free.items():
        q = dual_exponent(p)
        if (margin <= 0).any():  # on a decision hyperplane already
            decision = 0.0
        else:
            decision = min_distance(dw, db, flat, p, q, box)[0]
        lower, order = torch.sort(dist_free.to(torch.float64))
        best = math.inf
        for pos in range(0, order.numel(), _ROWS_PER_STEP):
            nxt = float(lower[pos])
            if not math.isfinite(nxt) or best < nxt * (1.0 - _STOP_RTOL):
                break
            units = order[pos:pos + _ROWS_PER_STEP].tolist()
            missing = [u for u in units if u not in cache]
            if missing:
                w, b = rows.units(torch.tensor(missing, device=flat.device))
                cache.update({u: (w[i], b[i]) for i, u in enumerate(missing)})
            w = torch.stack([cache[u][0] for u in units])
            b = torch.stack([cache[u][1] for u in units])
            best = min(best, float(distances(w, b, flat, p, q, box).min()))
        out[p] = (decision, True) if decision <= best else (min(best, decision), False)
    return out
