"""Linear bound propagation through graph networks (docs/MATH.md §9.3, §10, §11).

The back-substitution of :mod:`.bounds` run along a :class:`~mmr_ext.nn.graph.Graph`: a linear
functional of one node is pushed back node by node in reverse topological order; an affine node
passes its coefficients through the transpose of its linear part (a vector-Jacobian product) and
adds their product with its bias to the constant, a sum passes them to both inputs (a node read by
several others receives the sum of their coefficients), an activation is replaced by its CROWN
relaxation on its pre-activation bounds (the chord above, ``α z`` below with the adaptive α,
stable units exact) and a max pooling by its relaxation of §10 (an entry that dominates its window
on the whole input set is exact; otherwise ``m >= a_{j*}`` below, j* the entry of the largest lower
bound, and ``m <= max_j u_j`` above). The coefficient's sign picks the side, so the result is a
lower bound over the input set, concretised exactly for the lp-ball ∩ box by
:func:`mmr_ext.math.box_support.support_min`. Every node's bounds are those of the back-substitution
from that node, intersected with interval propagation of its inputs' bounds. Dense and simple:
meant for the small graph networks that one verifies (the rows of all units of one node are
processed in chunks).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..math.box_support import support_min
from ..nn.adapters import adapter_of
from ..nn.graph import ACT, ADD, AFFINE, MAXPOOL, Graph, parse_network, window_index

Bounds = Tuple[torch.Tensor, torch.Tensor]  # lower, upper [B, n] per sample, flattened

_ROWS = 512  # functionals back-substituted together per sample


class BoundedGraph:
    """A float64 copy of a graph network with the per-sample shape of every node."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        model64 = copy.deepcopy(model).to(torch.float64).requires_grad_(False)
        self.graph: Graph = parse_network(model64)
        for node in self.graph.nodes:
            if node.op == ACT and not 0.0 <= node.slope <= 1.0:
                raise NotImplementedError(f"activation '{node.name}' has negative_slope {node.slope}: bound "
                                          "propagation supports ReLU and LeakyReLU with slope in [0, 1]")
        self.model = self.graph.as_module()
        with torch.no_grad():
            values = self.graph.values(example[:1].detach().to(torch.float64))
        self.shapes = [tuple(v.shape[1:]) for v in values]
        self.sizes = [v[0].numel() for v in values]
        self.windows = {i: window_index(node.pool, self.shapes[node.inputs[0]], example.device)
                        for i, node in enumerate(self.graph.nodes) if node.op == MAXPOOL}
        self.num_classes = self.sizes[-1]
        self.device = example.device

    def forward(self, x: torch.Tensor) -> Tuple[list, torch.Tensor]:
        """([], logits [B, K]) in float64 (the interface of the chain's BoundedNetwork.forward)."""
        with torch.no_grad():
            z = x.reshape((x.shape[0],) + self.shapes[0]).to(torch.float64)
            return [], self.graph(z).reshape(x.shape[0], -1)


def _affine_back(node, coef: torch.Tensor, in_shape) -> Tuple[torch.Tensor, torch.Tensor]:
    """(coef W, coef · b) for coef [N, n_out] of an affine node."""
    z = torch.zeros((coef.shape[0],) + tuple(in_shape), dtype=coef.dtype, device=coef.device, requires_grad=True)
    with torch.enable_grad():
        out = node.block.linear(z).reshape(coef.shape[0], -1)
        back, = torch.autograd.grad(out, z, grad_outputs=coef)
    with torch.no_grad():
        bias = node.block(torch.zeros((1,) + tuple(in_shape), dtype=coef.dtype, device=coef.device)).reshape(-1)
    return back.reshape(coef.shape[0], -1), coef @ bias


def _activation_relaxation(l: torch.Tensor, u: torch.Tensor, slope: float):
    """(lower slope α, upper slope, upper intercept) of σ(z) = max(z, slope·z) on [l, u] (§9.3)."""
    active, inactive = l >= 0, u <= 0
    width = torch.where(active | inactive, torch.ones_like(u), u - l)
    chord = (u - slope * l) / width
    up_slope = torch.where(active, torch.ones_like(u), torch.where(inactive, torch.full_like(u, slope), chord))
    up_shift = torch.where(active | inactive, torch.zeros_like(u), slope * l - chord * l)
    alpha = torch.where(u >= -l, torch.ones_like(u), torch.full_like(u, slope))
    low_slope = torch.where(active, torch.ones_like(u), torch.where(inactive, torch.full_like(u, slope), alpha))
    return low_slope, up_slope, up_shift


def _pool_relaxation(l: torch.Tensor, u: torch.Tensor, index: torch.Tensor):
    """Per window (flattened [B, C·L]): the entry used below (a flat cell index), whether it is
    exact above too, and the constant upper bound max_j u_j (§10)."""
    B = l.shape[0]
    real = index >= 0
    cells = index.clamp(min=0).reshape(-1)
    lw = l[:, cells].reshape((B,) + index.shape).masked_fill(~real, -math.inf)
    uw = u[:, cells].reshape((B,) + index.shape).masked_fill(~real, -math.inf)
    best = lw.argmax(dim=-1, keepdim=True)  # [B, C, L, 1]
    best_low = lw.gather(-1, best)
    others_up = uw.scatter(-1, best, -math.inf).amax(dim=-1, keepdim=True)
    exact = (best_low >= others_up).reshape(B, -1)
    entry = index.expand((B,) + index.shape).gather(-1, best).reshape(B, -1)
    return entry, exact, uw.amax(dim=-1).reshape(B, -1)


def lower_bounds(net: BoundedGraph, start: int, coef: torch.Tensor, bounds: Dict[int, Bounds], x: torch.Tensor,
                 p: float, eps: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Lower bounds [B, R] of ``coef[b, r] · value(start)`` over the input set of each sample b."""
    B, R = coef.shape[:2]
    coefs: Dict[int, torch.Tensor] = {start: coef.reshape(B * R, -1)}
    const = coef.new_zeros(B * R)
    for i in range(start, 0, -1):
        c = coefs.pop(i, None)
        if c is None:
            continue
        node = net.graph.nodes[i]

        def give(j: int, v: torch.Tensor) -> None:
            coefs[j] = coefs[j] + v if j in coefs else v

        if node.op == AFFINE:
            back, shift = _affine_back(node, c, net.shapes[node.inputs[0]])
            give(node.inputs[0], back)
            const = const + shift
        elif node.op == ADD:
            give(node.inputs[0], c)
            give(node.inputs[1], c)
        elif node.op == ACT:
            l, u = (t.repeat_interleave(R, 0) for t in bounds[node.inputs[0]])
            low, up, shift = _activation_relaxation(l, u, node.slope)
            pos, neg = c.clamp(min=0), c.clamp(max=0)
            give(node.inputs[0], pos * low + neg * up)
            const = const + (neg * shift).sum(1)
        else:  # MAXPOOL
            l, u = (t.repeat_interleave(R, 0) for t in bounds[node.inputs[0]])
            entry, exact, top = _pool_relaxation(l, u, net.windows[i])
            pos, neg = c.clamp(min=0), c.clamp(max=0)
            lower_side = torch.where(exact, c, pos)  # a dominating entry is exact for both signs
            const = const + torch.where(exact, torch.zeros_like(neg), neg * top).sum(1)
            give(node.inputs[0], c.new_zeros((c.shape[0], net.sizes[node.inputs[0]])).scatter_add(1, entry, lower_side))
    c0 = coefs.get(0)
    if c0 is None:
        return const.reshape(B, R)
    return const.reshape(B, R) + support_min(c0.reshape(B, R, -1), x, p, eps, lo, hi)


def _interval(net: BoundedGraph, i: int, values: Dict[int, Bounds]) -> Bounds:
    """Interval bounds of node i from those of its inputs (sound, looser)."""
    node = net.graph.nodes[i]
    if node.op == AFFINE:
        l, u = values[node.inputs[0]]
        shape = (l.shape[0],) + net.shapes[node.inputs[0]]
        centre, radius = ((u + l) / 2).reshape(shape), ((u - l) / 2).reshape(shape)
        mid = node.block(centre).reshape(l.shape[0], -1)
        for layer in node.block.layers:  # the composed |W_k| bound |W| radius from above
            radius = adapter_of(layer).abs_linear(layer, radius)
        spread = radius.reshape(l.shape[0], -1)
        return mid - spread, mid + spread
    if node.op == ADD:
        (la, ua), (lb, ub) = values[node.inputs[0]], values[node.inputs[1]]
        return la + lb, ua + ub
    if node.op == ACT:
        l, u = values[node.inputs[0]]
        return torch.maximum(l, l * node.slope), torch.maximum(u, u * node.slope)
    l, u = values[node.inputs[0]]
    index = net.windows[i]
    cells = index.clamp(min=0).reshape(-1)
    real = index >= 0
    lw = l[:, cells].reshape((l.shape[0],) + index.shape).masked_fill(~real, -math.inf)
    uw = u[:, cells].reshape((l.shape[0],) + index.shape).masked_fill(~real, -math.inf)
    return lw.amax(-1).reshape(l.shape[0], -1), uw.amax(-1).reshape(l.shape[0], -1)


def graph_node_bounds(net: BoundedGraph, x: torch.Tensor, p: float, eps: torch.Tensor, lo: float, hi: float
                      ) -> Dict[int, Bounds]:
    """Bounds [B, n] on every node's value over {||z - x||_p <= eps, lo <= z <= hi} (x [B, d]
    float64): back-substitution for the inputs of activations and max poolings, interval
    propagation for the other nodes, both intersected with the interval bounds."""
    B = x.shape[0]
    # |z_i - x_i| <= ||z - x||_p for every p
    values: Dict[int, Bounds] = {0: (torch.clamp(x - eps[:, None], min=lo), torch.clamp(x + eps[:, None], max=hi))}
    needed = {node.inputs[0] for node in net.graph.nodes if node.op in (ACT, MAXPOOL)}
    for i in range(1, len(net.graph.nodes)):
        l, u = _interval(net, i, values)
        if i in needed:
            n = net.sizes[i]
            eye = torch.eye(n, dtype=x.dtype, device=x.device)
            lows, ups = [], []
            for s in range(0, n, _ROWS):
                rows = eye[s:s + _ROWS]
                coef = torch.cat([rows, -rows]).unsqueeze(0).expand(B, -1, -1)
                lb = lower_bounds(net, i, coef, values, x, p, eps, lo, hi)
                lows.append(lb[:, :rows.shape[0]])
                ups.append(-lb[:, rows.shape[0]:])
            l, u = torch.maximum(l, torch.cat(lows, 1)), torch.minimum(u, torch.cat(ups, 1))
        values[i] = (l, torch.maximum(u, l))
    return values


def graph_margin_bounds(net: BoundedGraph, x: torch.Tensor, y: torch.Tensor, p: float, eps: torch.Tensor,
                        lo: float, hi: float, bounds: Optional[Dict[int, Bounds]] = None) -> torch.Tensor:
    """Lower bounds [B, K] on f_y - f_s over the input set (from ``bounds`` of
    :func:`graph_node_bounds` when given); +inf in column y."""
    if bounds is None:
        bounds = graph_node_bounds(net, x, p, eps, lo, hi)
    K = net.num_classes
    eye = torch.eye(K, dtype=torch.float64, device=x.device)
    spec = eye[y][:, None, :] - eye[None]
    lb = lower_bounds(net, len(net.graph.nodes) - 1, spec, bounds, x, p, eps, lo, hi)
    return lb.scatter(1, y[:, None], math.inf)
