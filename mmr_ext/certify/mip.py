"""Exact verification by mixed-integer linear programming (Tjeng, Xiao & Tedrake 2019; docs/MATH.md §9.4).

For a point x with label y and the input set S = {z : ||z - x||_p <= eps, lo <= z <= hi}
(p = inf or 1), the network is encoded exactly: every hidden unit with pre-activation bounds
l < 0 < u (from :mod:`mmr_ext.certify.bounds`) gets a binary δ and, for σ(z) = max(z, s z),

    a >= z,  a >= s z,  a <= z - (1 - s) l (1 - δ),  a <= s z + (1 - s) u δ,

which forces a = z when δ = 1 and a = s z when δ = 0. Stable units are linear (a = z, or
a = s z; a dead ReLU disappears). The l1-ball uses auxiliary t >= |z - x| with Σ t <= eps.
Every target class s whose bound-propagation lower bound is not already positive is checked by a
*feasibility* MILP with the constraint ``f_y(z) - f_s(z) <= 0`` (objective 0: HiGHS stops at the
first solution): infeasible for every s proves robustness; a solution is a candidate
counterexample, projected exactly onto S and re-checked with the float64 network.

Statuses: ``'verified'`` (every target infeasible), ``'falsified'`` (a re-checked counterexample:
``max_{s != y} f_s > f_y`` at a point of S), ``'timeout'`` (time limit reached first) and
``'unknown'`` (the solver failed, or only near-ties |f_y - f_s| ~ 1e-6 were found, which the
float64 network cannot decide). Infeasibility proofs are as reliable as HiGHS's floating-point
LP solves (its tolerances only enlarge the feasible set, so they do not make a proof unsound).
Solved with :func:`scipy.optimize.milp` (HiGHS); l2 needs a quadratic constraint and is not
supported.
"""
from __future__ import annotations

import math
import time
from functools import partial
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from numbers import Real
from typing import List, Optional

import multiprocessing as mp
import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from ..attacks import margins, project
from ..checks import check_batch, check_box, check_eps, check_in_box, check_y
from ..math.norms import parse_norm
from ..nn.graph import Graph, parse_network
from .bounds import BoundedNetwork, hidden_bounds, network_margin_bounds
from .graph_bounds import BoundedGraph, graph_margin_bounds, graph_node_bounds
from .graph_mip import GraphEncoder

__all__ = ["MIPResult", "verify_mip"]

_NEAR_TIE = 1e-6  # margin below which a second, strict MILP looks for a real counterexample


@dataclass
class MIPResult:
    """Verdict for one point. ``counterexample`` (shape of one input, x's dtype) and ``target``
    (the class it is assigned) are set when ``status == 'falsified'``."""

    status: str
    counterexample: Optional[torch.Tensor] = None
    target: Optional[int] = None
    time: float = 0.0
    message: str = ""
    targets_solved: List[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"status": self.status, "target": self.target, "time": self.time,
                "message": self.message}


class _Encoder:
    """Builds the MILP rows shared by all targets of one point."""

    def __init__(self, net: BoundedNetwork, mats: List[sp.csr_matrix], x: np.ndarray, p: float,
                 eps: float, lo: float, hi: float, bounds):
        d = x.size
        self.lb: List[np.ndarray] = [np.maximum(lo, x - eps)]
        self.ub: List[np.ndarray] = [np.minimum(hi, x + eps)]
        self.integrality: List[np.ndarray] = [np.zeros(d)]
        rows: list = []  # (matrix, the variable index of each of its columns)
        row_lo: List[np.ndarray] = []
        row_hi: List[np.ndarray] = []
        n_vars = d
        if p == 1:  # t >= |z - x|, Σ t <= eps
            t_idx = np.arange(d, 2 * d)
            self.lb.append(np.zeros(d))
            self.ub.append(np.full(d, eps))
            self.integrality.append(np.zeros(d))
            n_vars += d
            eye = sp.identity(d, format="csr")
            rows.append((sp.hstack([-eye, eye]).tocsr(), np.r_[np.arange(d), t_idx]))
            row_lo.append(-x)
            row_hi.append(np.full(d, np.inf))
            rows.append((sp.hstack([eye, eye]).tocsr(), np.r_[np.arange(d), t_idx]))
            row_lo.append(x)
            row_hi.append(np.full(d, np.inf))
            rows.append((sp.csr_matrix(np.ones((1, d))), t_idx))
            row_lo.append(np.array([-np.inf]))
            row_hi.append(np.array([eps]))
        # the previous layer's output: W @ prev = W[:, keep] @ v[prev_idx]
        prev_keep = np.arange(d)  # units of the previous layer that have a variable
        prev_idx = np.arange(d)   # ... and the indices of those variables
        for k in range(net.num_hidden):
            Wp = mats[k][:, prev_keep].tocsr()
            b = net.blocks[k].bias.cpu().numpy()
            l, u = (t[0].cpu().numpy() for t in bounds[k])
            s = net.slopes[k]
            dead = u <= 0
            active = (l >= 0) & ~dead  # a unit fixed at 0 (l = u = 0) counts as dead: no variable
            unstable = ~active & ~dead
            keep = np.nonzero(~(dead & (s == 0)))[0]
            a_idx = n_vars + np.arange(keep.size)
            n_vars += keep.size
            pos = {j: i for i, j in enumerate(keep)}
            a_lb = np.where(active, l, s * l)[keep]
            a_ub = np.where(active, u, np.where(dead, s * u, u))[keep]
            self.lb.append(a_lb)
            self.ub.append(a_ub)
            self.integrality.append(np.zeros(keep.size))
            un = np.nonzero(unstable)[0]
            d_idx = n_vars + np.arange(un.size)
            n_vars += un.size
            self.lb.append(np.zeros(un.size))
            self.ub.append(np.ones(un.size))
            self.integrality.append(np.ones(un.size))
            cols = np.r_[prev_idx, a_idx, d_idx]

            def block(units, coef_w, coef_a, coef_d=None):
                """Rows coef_a * a_j - coef_w * (W z)_j + coef_d * δ_j for the given units."""
                m = units.size
                left = -sp.diags(coef_w) @ Wp[units]
                A = sp.csr_matrix((coef_a, (np.arange(m), [pos[j] for j in units])),
                                  shape=(m, keep.size))
                if coef_d is None:
                    D = sp.csr_matrix((m, un.size))
                else:
                    upos = {j: i for i, j in enumerate(un)}
                    D = sp.csr_matrix((coef_d, (np.arange(m), [upos[j] for j in units])),
                                      shape=(m, un.size))
                return (sp.hstack([left, A, D]).tocsr(), cols)

            lin = np.nonzero(active | (dead & (s > 0)))[0]
            if lin.size:  # a = slope * z
                sl = np.where(active[lin], 1.0, s)
                rows.append(block(lin, sl, np.ones(lin.size)))
                row_lo.append(sl * b[lin])
                row_hi.append(sl * b[lin])
            if un.size:
                one = np.ones(un.size)
                lu, uu, bu = l[un], u[un], b[un]
                rows.append(block(un, one, one))                       # a - z >= 0
                row_lo.append(bu)
                row_hi.append(np.full(un.size, np.inf))
                if s > 0:                                              # a - s z >= 0
                    rows.append(block(un, s * one, one))
                    row_lo.append(s * bu)
                    row_hi.append(np.full(un.size, np.inf))
                rows.append(block(un, one, one, -(1 - s) * lu))        # a <= z - (1-s) l (1-δ)
                row_lo.append(np.full(un.size, -np.inf))
                row_hi.append(bu - (1 - s) * lu)
                rows.append(block(un, s * one, one, -(1 - s) * uu))    # a <= s z + (1-s) u δ
                row_lo.append(np.full(un.size, -np.inf))
                row_hi.append(s * bu)
            prev_keep, prev_idx = keep, a_idx
        self.n_vars = n_vars
        parts = []
        for M, cols in rows:
            M = M.tocoo()
            parts.append(sp.csr_matrix((M.data, (M.row, cols[M.col])), shape=(M.shape[0], n_vars)))
        self.A = sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, n_vars))
        self.row_lo = np.concatenate(row_lo) if row_lo else np.zeros(0)
        self.row_hi = np.concatenate(row_hi) if row_hi else np.zeros(0)
        self.last_W = mats[-1][:, prev_keep].toarray()
        self.last_idx = prev_idx
        self.last_b = net.blocks[-1].bias.cpu().numpy()
        self.d = d

    def solve(self, y: int, s: int, bound: float, time_limit: float):
        """Feasibility of f_y - f_s <= bound; returns (scipy result, x or None)."""
        row = np.zeros(self.n_vars)
        row[self.last_idx] = self.last_W[y] - self.last_W[s]
        const = self.last_b[y] - self.last_b[s]
        A = sp.vstack([self.A, sp.csr_matrix(row[None])]).tocsr()
        lo = np.r_[self.row_lo, -np.inf]
        hi = np.r_[self.row_hi, bound - const]
        res = milp(np.zeros(self.n_vars), integrality=np.concatenate(self.integrality),
                   bounds=Bounds(np.concatenate(self.lb), np.concatenate(self.ub)),
                   constraints=[LinearConstraint(A, lo, hi)],
                   options={"time_limit": max(float(time_limit), 1e-3), "presolve": True})
        x = None if res.x is None else np.asarray(res.x[:self.d])
        return res, x


def _recheck(net: BoundedNetwork, x0: torch.Tensor, cand: np.ndarray, y: int, p, eps, lo, hi):
    """Projects a solver point exactly onto the input set; returns it if it is misclassified."""
    z = torch.as_tensor(cand, dtype=torch.float64, device=x0.device).reshape(x0.shape)
    z = project(x0, z, norm=p, eps=eps, lo=lo, hi=hi)
    _, logits = net.forward(z.to(torch.float64))
    m = margins(logits, torch.tensor([y], device=x0.device))
    if m.item() < 0:
        return z[0], int(logits[0].scatter(0, torch.tensor([y], device=x0.device), -math.inf).argmax())
    return None, None


def _verify_point(net: BoundedNetwork, mats, x0: torch.Tensor, y: int, p: float, eps: float,
                  lo: float, hi: float, time_limit: float) -> MIPResult:
    start = time.monotonic()
    x64 = x0.reshape(1, -1).to(torch.float64)
    e = torch.full((1,), eps, dtype=torch.float64, device=x0.device)
    _, logits = net.forward(x64)
    yt = torch.tensor([y], device=x0.device)
    if margins(logits, yt).item() < 0:
        target = int(logits[0].scatter(0, yt, -math.inf).argmax())
        return MIPResult("falsified", x0[0].clone(), target, time.monotonic() - start,
                         "the clean point is misclassified")
    if isinstance(net, BoundedGraph):
        bounds = graph_node_bounds(net, x64, p, e, lo, hi)
        lb = graph_margin_bounds(net, x64, yt, p, e, lo, hi, bounds)[0]
    else:
        bounds = hidden_bounds(net, x64, p, e, lo, hi)
        lb = network_margin_bounds(net, x64, yt, p, e, lo, hi, bounds, 0, 0.1)[0]
    order = [int(s) for s in torch.argsort(lb) if int(s) != y and lb[s] <= 0]
    if not order:
        return MIPResult("verified", time=time.monotonic() - start,
                         message="bound propagation alone")
    encoder = GraphEncoder if isinstance(net, BoundedGraph) else partial(_Encoder, mats=mats)
    enc = encoder(net, x=x64[0].cpu().numpy(), p=p, eps=eps, lo=lo, hi=hi, bounds=bounds)
    result = MIPResult("verified")
    ties = []
    for s in order:
        left = time_limit - (time.monotonic() - start)
        if left <= 0:
            result.status, result.message = "timeout", f"time limit {time_limit:g}s"
            break
        res, cand = enc.solve(y, s, 0.0, left)
        if res.status == 2:  # infeasible: f_y - f_s > 0 on the whole set
            result.targets_solved.append(s)
            continue
        if res.status == 1 and cand is None:
            result.status, result.message = "timeout", f"time limit {time_limit:g}s"
            break
        if cand is None:
            result.status, result.message = "unknown", f"HiGHS: {res.message}"
            break
        z, target = _recheck(net, x0, cand, y, p, eps, lo, hi)
        if z is None:  # a near-tie: ask for a strictly violating point
            left = time_limit - (time.monotonic() - start)
            if left <= 0:
                result.status, result.message = "timeout", f"time limit {time_limit:g}s"
                break
            res, cand = enc.solve(y, s, -_NEAR_TIE, left)
            if res.status == 2:
                ties.append(s)
                continue
            if cand is not None:
                z, target = _recheck(net, x0, cand, y, p, eps, lo, hi)
            if z is None:
                status = "timeout" if res.status == 1 else "unknown"
                result.status, result.message = status, f"near-tie for class {s}: {res.message}"
                break
        result.status, result.counterexample, result.target = "falsified", z.to(x0.dtype), target
        result.message = f"counterexample assigned to class {target}"
        break
    if result.status == "verified" and ties:
        result.status = "unknown"
        result.message = (f"min margin within {_NEAR_TIE:g} of 0 for classes {ties}: too close "
                          "to decide in floating point")
    result.time = time.monotonic() - start
    return result


def _sparse_blocks(net: BoundedNetwork) -> List[sp.csr_matrix]:
    """The matrix of every block as scipy CSR, built in row chunks (convolutions are sparse)."""
    out = []
    for blk in net.blocks:
        step = max(1, (1 << 22) // blk.n_in)
        eye = torch.eye(blk.n_out, dtype=torch.float64, device=blk.bias.device)
        chunks = [sp.csr_matrix(blk.back(eye[i:i + step]).cpu().numpy())
                  for i in range(0, blk.n_out, step)]
        out.append(sp.vstack(chunks).tocsr())
    return out


def _worker(args):
    model, x, y, p, eps, lo, hi, time_limit = args
    torch.set_num_threads(1)
    net = BoundedNetwork(model, x)
    return _verify_point(net, _sparse_blocks(net), x, y, p, eps, lo, hi, time_limit)


def verify_mip(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm, eps, lo: float = 0.0,
               hi: float = 1.0, time_limit: float = 120.0, workers: int = 1) -> List[MIPResult]:
    """Exact robustness verdicts for every point of x in the l∞- or l1-ball of radius eps ∩ box.

    Args:
        model: a ReLU / LeakyReLU network, chain or graph (see :mod:`mmr_ext.certify.bounds`;
            graph networks are encoded by :mod:`.graph_mip`).
        x: inputs [B, ...] in the box; y: int labels [B].
        norm: inf or 1. eps: radius (number or [B] tensor).
        time_limit: seconds per point (over all target classes).
        workers: processes solving points in parallel (1: in this process; graph networks are
            always solved in this process).

    Returns:
        One :class:`MIPResult` per point.
    """
    p = parse_norm(norm)
    if p == 2:
        raise ValueError("norm=2 needs a quadratic constraint: verify_mip supports norm 1 and inf")
    check_batch(x)
    check_y(y, x)
    lo, hi = check_box(lo, hi)
    check_in_box(x, lo, hi)
    e = check_eps(eps, x)
    if isinstance(time_limit, bool) or not isinstance(time_limit, Real) or not time_limit > 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    graph = isinstance(parse_network(model), Graph)
    net = BoundedGraph(model, x) if graph else BoundedNetwork(model, x)
    x = x.detach()
    if graph or workers == 1 or x.shape[0] == 1:  # graph networks: in this process
        mats = None if graph else _sparse_blocks(net)
        return [_verify_point(net, mats, x[i:i + 1], int(y[i]), p, float(e[i]), lo, hi,
                              float(time_limit)) for i in range(x.shape[0])]
    model64 = net.model.cpu()
    jobs = [(model64, x[i:i + 1].cpu(), int(y[i]), p, float(e[i]), lo, hi, float(time_limit))
            for i in range(x.shape[0])]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_worker, jobs))
    for r in results:
        if r.counterexample is not None:
            r.counterexample = r.counterexample.to(x.device)
    return results
