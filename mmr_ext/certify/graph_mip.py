"""Exact MILP encoding of graph networks (docs/MATH.md §9.4, §10, §11).

One vector of variables per node of the :class:`~mmr_ext.nn.graph.Graph`, bounded by the node
bounds of :func:`mmr_ext.certify.graph_bounds.graph_node_bounds`: the input z in the lp-ball ∩ box
(l1 through auxiliary t >= |z - x|, Σ t <= eps), an affine node ``v = W v_in + b``, a sum
``v = v_1 + v_2``, an activation ``a = max(z, s z)`` with the big-M encoding of :mod:`.mip` (stable
units linear), and a max pooling ``m = max_j a_j`` with ``m >= a_j`` for every entry of the window
and, unless one entry dominates the window on the whole input set (then ``m = a_j``), one binary
δ_j per entry that can be the maximum (Σ δ_j = 1) and ``m <= a_j + (max_i u_i - l_j)(1 - δ_j)``.
Dense matrices of the affine nodes: meant for the small networks one verifies exactly.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from ..nn.graph import ACT, ADD, AFFINE
from .graph_bounds import BoundedGraph


def affine_matrix(net: BoundedGraph, i: int) -> Tuple[np.ndarray, np.ndarray]:
    """(W [n_out, n_in], b [n_out]) of affine node i."""
    node = net.graph.nodes[i]
    shape = net.shapes[node.inputs[0]]
    n_in = net.sizes[node.inputs[0]]
    with torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float64).reshape((n_in,) + shape)
        W = node.block.linear(eye).reshape(n_in, -1).T
        b = node.block(torch.zeros((1,) + shape, dtype=torch.float64)).reshape(-1)
    return W.numpy(), b.numpy()


class GraphEncoder:
    """The MILP rows of one point shared by all target classes (same interface as the chain
    encoder of :mod:`.mip`: :meth:`solve`)."""

    def __init__(self, net: BoundedGraph, x: np.ndarray, p: float, eps: float, lo: float, hi: float,
                 bounds: Dict[int, Tuple[torch.Tensor, torch.Tensor]]):
        self.lb: List[np.ndarray] = []
        self.ub: List[np.ndarray] = []
        self.integrality: List[np.ndarray] = []
        self.entries: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, cols, values)
        self.row_lo: List[float] = []
        self.row_hi: List[float] = []
        self.n_vars = 0
        self.d = x.size
        node_vars: List[np.ndarray] = []
        for i, node in enumerate(net.graph.nodes):
            l, u = (t[0].cpu().numpy() for t in bounds[i])
            if i == 0:
                l, u = np.maximum(lo, x - eps), np.minimum(hi, x + eps)
            v = self.variables(l, u)
            node_vars.append(v)
            if i == 0:
                if p == 1:
                    t = self.variables(np.zeros(x.size), np.full(x.size, eps))
                    for j in range(x.size):  # t_j >= z_j - x_j and t_j >= x_j - z_j
                        self.row([t[j], v[j]], [1.0, -1.0], -x[j], math.inf)
                        self.row([t[j], v[j]], [1.0, 1.0], x[j], math.inf)
                    self.row(t, np.ones(x.size), -math.inf, eps)
                continue
            src = node_vars[node.inputs[0]]
            if node.op == AFFINE:
                W, b = affine_matrix(net, i)
                for j in range(v.size):
                    nz = np.nonzero(W[j])[0]
                    self.row(np.r_[v[j], src[nz]], np.r_[1.0, -W[j, nz]], b[j], b[j])
            elif node.op == ADD:
                other = node_vars[node.inputs[1]]
                for j in range(v.size):
                    self.row([v[j], src[j], other[j]], [1.0, -1.0, -1.0], 0.0, 0.0)
            elif node.op == ACT:
                self.activation(v, src, *(t[0].cpu().numpy() for t in bounds[node.inputs[0]]), node.slope)
            else:
                self.max_pool(v, src, *(t[0].cpu().numpy() for t in bounds[node.inputs[0]]),
                              net.windows[i].reshape(v.size, -1).cpu().numpy())
        self.logits = node_vars[-1]
        self.A = sp.csr_matrix((np.concatenate([e[2] for e in self.entries]),
                                (np.concatenate([e[0] for e in self.entries]),
                                 np.concatenate([e[1] for e in self.entries]))),
                               shape=(len(self.row_lo), self.n_vars))

    def variables(self, lower: np.ndarray, upper: np.ndarray, integer: bool = False) -> np.ndarray:
        idx = self.n_vars + np.arange(lower.size)
        self.n_vars += lower.size
        self.lb.append(np.asarray(lower, dtype=float))
        self.ub.append(np.maximum(np.asarray(upper, dtype=float), lower))
        self.integrality.append(np.full(lower.size, 1.0 if integer else 0.0))
        return idx

    def row(self, cols, values, low: float, high: float) -> None:
        cols = np.asarray(cols)
        self.entries.append((np.full(cols.size, len(self.row_lo)), cols, np.asarray(values, dtype=float)))
        self.row_lo.append(low)
        self.row_hi.append(high)

    def activation(self, a, z, l, u, s: float) -> None:
        """a = max(z, s z) for pre-activation bounds [l, u] (docs/MATH.md §9.4)."""
        for j in range(a.size):
            if l[j] >= 0 or u[j] <= 0:  # stable: linear
                slope = 1.0 if l[j] >= 0 else s
                self.row([a[j], z[j]], [1.0, -slope], 0.0, 0.0)
                continue
            delta = self.variables(np.zeros(1), np.ones(1), integer=True)[0]
            self.row([a[j], z[j]], [1.0, -1.0], 0.0, math.inf)                              # a >= z
            self.row([a[j], z[j]], [1.0, -s], 0.0, math.inf)                                # a >= s z
            self.row([a[j], z[j], delta], [1.0, -1.0, -(1 - s) * l[j]], -math.inf, -(1 - s) * l[j])
            self.row([a[j], z[j], delta], [1.0, -s, -(1 - s) * u[j]], -math.inf, 0.0)

    def max_pool(self, m, a, l, u, windows) -> None:
        """m_k = max of its window's entries (docs/MATH.md §10)."""
        for k in range(m.size):
            cells = windows[k][windows[k] >= 0]
            top = u[cells].max()
            best = cells[np.argmax(l[cells])]
            others = cells[cells != best]
            if others.size == 0 or l[best] >= u[others].max():  # one entry is the maximum everywhere
                self.row([m[k], a[best]], [1.0, -1.0], 0.0, 0.0)
                continue
            for c in cells:  # m >= a_c
                self.row([m[k], a[c]], [1.0, -1.0], 0.0, math.inf)
            candidates = cells[u[cells] >= l[best]]
            deltas = self.variables(np.zeros(candidates.size), np.ones(candidates.size), integer=True)
            self.row(deltas, np.ones(candidates.size), 1.0, 1.0)
            for c, delta in zip(candidates, deltas):  # m <= a_c + (top - l_c)(1 - δ_c)
                big = top - l[c]
                self.row([m[k], a[c], delta], [1.0, -1.0, big], -math.inf, big)

    def solve(self, y: int, s: int, bound: float, time_limit: float):
        """Feasibility of f_y - f_s <= bound; returns (scipy result, x or None)."""
        row = np.zeros(self.n_vars)
        row[self.logits[y]] += 1.0
        row[self.logits[s]] -= 1.0
        A = sp.vstack([self.A, sp.csr_matrix(row[None])]).tocsr()
        lo = np.r_[self.row_lo, -np.inf]
        hi = np.r_[self.row_hi, bound]
        res = milp(np.zeros(self.n_vars), integrality=np.concatenate(self.integrality),
                   bounds=Bounds(np.concatenate(self.lb), np.concatenate(self.ub)),
                   constraints=[LinearConstraint(A, lo, hi)],
                   options={"time_limit": max(float(time_limit), 1e-3), "presolve": True})
        x = None if res.x is None else np.asarray(res.x[:self.d])
        return res, x
