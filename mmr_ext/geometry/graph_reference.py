"""Linear-region geometry of graph networks by identity propagation (docs/MATH.md §10-11).

The reference algorithm of :mod:`.reference` run along a :class:`~mmr_ext.nn.graph.Graph`:
every node carries its value and its linear part on the region (the tangents of the identity),
affine nodes apply their block, activations their mask, additions add the two branches' rows
(§11) and max pooling selects each window's maximiser (§10). The boundary hyperplanes are, in
node order, every activation's units (their pre-activations) and, for every max-pooling window
k and every other entry j of it, the selection hyperplane ``a_{w(k)} - a_j = 0``. It materialises
V of every node for every sample: exact, differentiable, and as slow and memory hungry as the
chain reference.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from ..nn.chain import activation_mask
from ..nn.graph import ACT, AFFINE, INPUT, MAXPOOL, Graph, window_index
from .memory import MemoryBudget
from .reference import Plane, concatenate, distances_of



def max_pool_selection(values: torch.Tensor, tangents: torch.Tensor, index: torch.Tensor):
    """Max pooling of one node on the region (docs/MATH.md §10).

    Args:
        values: the pooled node's values [B, C, H, W]; tangents: its rows [B, d, C·H·W].
        index: :func:`~mmr_ext.nn.graph.window_index` [C, L, k].

    Returns:
        pooled values [B, C·L], pooled rows [B, d, C·L], and the selection hyperplanes of every
        window k and entry j as a :data:`~mmr_ext.geometry.reference.Plane`: values
        ``a_{w(k)} - a_j`` [B, C·L·k], rows ``V_{w(k)} - V_j`` [B, d, C·L·k] and the mask of the
        listed ones (not the selected entry, not padding), in (channel, window, entry) order.
    """
    B, d = tangents.shape[:2]
    C, L, k = index.shape
    flat = values.reshape(B, -1)
    real = (index >= 0).unsqueeze(0)
    cells = index.clamp(min=0).reshape(-1)  # padding reads cell 0, then counts as 0 (never listed)
    window = flat[:, cells].reshape(B, C, L, k) * real
    selected = window.masked_fill(~real, -math.inf).argmax(dim=3, keepdim=True)  # padding never selected
    pooled = window.gather(3, selected).squeeze(3)
    rows = tangents[:, :, cells].reshape(B, d, C, L, k)
    if not bool(real.all()):
        rows = rows * real
    picked = rows.gather(4, selected.unsqueeze(1).expand(B, d, C, L, 1))
    kept = real & (torch.arange(k, device=index.device) != selected)  # [B, C, L, k]
    plane = ((pooled.unsqueeze(3) - window).reshape(B, -1), (picked - rows).reshape(B, d, -1), kept.reshape(B, -1))
    return pooled.reshape(B, C * L), picked.reshape(B, d, C * L), plane


def graph_hyperplanes(graph: Graph, x: torch.Tensor) -> Tuple[List[Plane], torch.Tensor, torch.Tensor]:
    """The region's boundary hyperplanes (:data:`~mmr_ext.geometry.reference.Plane`, node by
    node), the logits [B, K] and their rows [B, d, K]."""
    B, d = x.shape[0], x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    values: List[torch.Tensor] = []
    tangents: List[torch.Tensor] = []  # per node: rows [B, d, n] of the node's linear part
    planes: List[Plane] = []
    for node in graph.nodes:
        if node.op == INPUT:
            value, rows = x, eye.unsqueeze(0).expand(B, d, d)
        elif node.op == AFFINE:
            source = values[node.inputs[0]]
            value = node.block(source)
            flat = tangents[node.inputs[0]].reshape((B * d,) + tuple(source.shape[1:]))
            rows = node.block.linear(flat).reshape(B, d, -1)
        elif node.op == ACT:
            f, V = values[node.inputs[0]], tangents[node.inputs[0]]
            planes.append((f.reshape(B, -1), V, None))
            mask = activation_mask(f.detach(), node.slope)
            value, rows = f * mask, V * mask.reshape(B, 1, -1)
        elif node.op == MAXPOOL:
            a = values[node.inputs[0]]
            index = window_index(node.pool, tuple(a.shape[1:]), a.device)
            pooled, rows, plane = max_pool_selection(a, tangents[node.inputs[0]], index)
            planes.append(plane)
            value = pooled.reshape(node.pool(a.detach()).shape)
        else:  # ADD
            first, second = node.inputs
            value = values[first] + values[second]
            rows = tangents[first] + tangents[second]
        values.append(value)
        tangents.append(rows)
    return planes, values[-1].reshape(B, -1), tangents[-1]


def largest_rows(graph: Graph, x: torch.Tensor) -> int:
    """Elements per sample of the largest rows tensor of :func:`graph_hyperplanes` (d times the
    largest node, or max-pooling window table)."""
    d = x[0].numel()
    with torch.no_grad():
        values = graph.values(x[:1])
    sizes = [v[0].numel() for v in values]
    for node in graph.nodes:
        if node.op == MAXPOOL:
            sizes.append(window_index(node.pool, tuple(values[node.inputs[0]].shape[1:])).numel())
    return d * max(sizes)


def graph_geometry(graph: Graph, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor],
                   budget: MemoryBudget = MemoryBudget()):
    """(boundary, decision) for every dual exponent in qs, and the logits (same contract as
    :func:`mmr_ext.geometry.reference.reference_geometry`); at most the budget's samples per
    pass, each pass checkpointed (rebuilt in the backward) when gradients are recorded."""
    B = x.shape[0]
    n = budget.samples_per_pass(largest_rows(graph, x), B)

    def one_pass(xs, ys):
        planes, logits, V_logits = graph_hyperplanes(graph, xs)
        return distances_of(planes, logits, V_logits, qs, ys), logits

    if n >= B:
        return one_pass(x, labels)
    parts = []
    for start in range(0, B, n):
        args = (x[start:start + n], None if labels is None else labels[start:start + n])
        parts.append(checkpoint(one_pass, *args, use_reentrant=False) if torch.is_grad_enabled() else one_pass(*args))
    return concatenate(parts)


class GraphPointRows:
    """The hyperplanes ``{z : <w, z> + b = 0}`` of the linear region of one point of a graph network
    (float64), in the order of the boundary distances of :func:`graph_geometry`, with the interface
    of :class:`mmr_ext.geometry.regions.PointRows` (``x``, :meth:`units`, :meth:`logits`). All rows
    are built at once (dense [N, d]): meant for one point of a small network at a time."""

    def __init__(self, graph: Graph, x: torch.Tensor):
        self.x = x.detach().to(torch.float64)[:1]
        flat = self.x.reshape(-1)
        with torch.no_grad():
            planes, logits, V_logits = graph_hyperplanes(graph, self.x)
        weights, values = [], []
        for v, V, kept in planes:
            rows = V[0].t()  # [n, d]
            if kept is not None:
                v, rows = v[:, kept[0]], rows[kept[0]]
            weights.append(rows)
            values.append(v[0])
        self.weight = torch.cat(weights) if weights else flat.new_zeros((0, flat.numel()))
        self.bias = (torch.cat(values) if values else flat.new_zeros(0)) - self.weight @ flat
        self.logit_weight = V_logits[0].t()
        self.logit_bias = logits[0] - self.logit_weight @ flat

    def units(self, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows [R, d] and offsets [R] of the hyperplanes with these indices."""
        return self.weight[index], self.bias[index]

    def logits(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The region's logits as an affine map: rows [K, d] and offsets [K]."""
        return self.logit_weight, self.logit_bias
