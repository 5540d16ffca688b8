"""Linear bound propagation (CROWN / Wong–Kolter back-substitution) over lp-balls ∩ box.

For a network parsed by :func:`mmr_ext.nn.chain.parse_model` (affine blocks, ReLU or LeakyReLU with
slope s in [0, 1]) and the input set

    S = {z : ||z - x||_p <= eps, lo <= z <= hi},   p in {1, 2, inf},

every quantity is a linear function of the last layer it depends on; going backwards through the
network each activation a = σ(z) with pre-activation bounds l < 0 < u is replaced by a linear
bound valid on [l, u]: the chord ``σ(z) <= s l + (u - s l)/(u - l) (z - l)`` from above and
``σ(z) >= α z`` from below, with α in [s, 1] (adaptive choice of CROWN: α = 1 if u >= -l, else
s; with ``alpha_steps > 0`` the α of the final bound are optimised by projected gradient ascent,
as in α-CROWN; every α in [s, 1] gives a valid bound). Stable units are exact. The coefficient's
sign picks the bound, so the result lower-bounds the quantity over S.

At the input, ``min_{z in S} <a, z>`` is computed *exactly* for the intersection with the box
(no relaxation) by :func:`mmr_ext.math.box_support.support_min` (docs/MATH.md §7).

Pre-activation bounds of hidden layer k come from the same back-substitution started at layer
k (for both signs), intersected with cheaper valid bounds: interval propagation of the bounds of
layer k - 1 and, for the first layer, ``z_j(x) -+ eps ||W_j||_q`` (the ball without the box).
Only the (sample, unit) pairs that the cheap bounds leave unstable are back-substituted:
through leading convolution blocks on the units' receptive fields only (:mod:`.patch_bounds`),
and not at all in a first layer whose interval bound is exact (p = inf, one non-diagonal layer).
All bounds are sound for the exact arithmetic of the model; they are computed in float64 on a
private float64 copy of the model (rounding, relative 1e-15 or so, is not bounded rigorously;
:func:`certified_by_bounds` asks for margins above 1e-9 (1 + max |bound|)). Memory is bounded
by processing rows in chunks.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from numbers import Real
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checks import check_batch, check_box, check_eps, check_in_box, check_y
from ..math.box_support import support_min
from ..math.norms import parse_norm
from ..nn.adapters import adapter_of
from ..nn.chain import AffineBlock, parse_model
from ..nn.graph import ACT, MAXPOOL, Graph, parse_network
from .graph_bounds import BoundedGraph, graph_margin_bounds, graph_node_bounds
from .patch_bounds import PatchBacksub, PatchPlan, patch_plan
from .prediction import reliably_correct

__all__ = ["BoundedNetwork", "layer_bounds", "margin_bounds", "certified_by_bounds", "support_min"]

_CHUNK_ELEMENTS = 1 << 23  # float64 elements per [samples, rows, width] work array (64 MiB)
_PATCH_CHUNK_ELEMENTS = 1 << 20  # per gathered [pairs, 4, patch] array (cache-sized: measured faster)

#: Exact shortcuts of :func:`hidden_bounds` (receptive-field patches through leading convolutions,
#: :mod:`.patch_bounds`; no back-substitution of a first layer whose interval bound is exact).
#: False: the dense back-substitution everywhere, the reference the shortcuts are tested against.
SHORTCUTS = True


# ---------------------------------------------------------------------------------------------
# the network as a chain of linear operators
# ---------------------------------------------------------------------------------------------

@dataclass
class _Block:
    block: AffineBlock
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    bias: torch.Tensor  # [n_out]
    shapes: Tuple[Tuple[int, ...], ...]  # per-sample shapes: input, then after each layer

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    def back(self, lam: torch.Tensor) -> torch.Tensor:
        """Rows lam [N, n_out] -> lam W [N, n_in] (the adjoint of the linear part, layer by layer)."""
        N = lam.shape[0]
        if N == 0:
            return lam.new_zeros((0, self.n_in))
        z = lam.reshape((N,) + self.out_shape)
        for layer, shape in zip(reversed(self.block.layers), reversed(self.shapes[:-1])):
            z = adapter_of(layer).transpose(layer, z, shape)
        return z.reshape(N, -1)

    def forward_abs(self, v: torch.Tensor) -> torch.Tensor:
        """|W| v for v [N, n_in] (composition of per-layer |W|: an upper bound on |W| v)."""
        z = v.reshape((v.shape[0],) + self.in_shape)
        for layer in self.block.layers:
            z = adapter_of(layer).abs_linear(layer, z)
        return z.reshape(v.shape[0], -1)

    def forward_linear(self, v: torch.Tensor) -> torch.Tensor:
        return self.block.linear(v.reshape((v.shape[0],) + self.in_shape)).reshape(v.shape[0], -1)

    def dense(self) -> torch.Tensor:
        """The matrix W [n_out, n_in] of the linear part."""
        rows = []
        step = max(1, _CHUNK_ELEMENTS // max(self.n_in, self.n_out))
        eye = torch.eye(self.n_out, dtype=self.bias.dtype, device=self.bias.device)
        for start in range(0, self.n_out, step):
            rows.append(self.back(eye[start:start + step]))
        return torch.cat(rows, 0)


class BoundedNetwork:
    """A float64 copy of a parsed network prepared for bound propagation and MILP encoding.

    ``blocks[k]`` maps the (flattened) activations of layer k-1 (the input for k = 0) to the
    pre-activations of layer k; ``slopes[k]`` is the negative-side slope of hidden layer k.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor):
        chain = parse_model(model)  # validates the user's model (eval-mode BatchNorm, ...)
        model64 = copy.deepcopy(model).to(torch.float64).requires_grad_(False)
        chain = parse_model(model64)
        for i, s in enumerate(chain.slopes):
            if not 0.0 <= s <= 1.0:
                raise NotImplementedError(f"hidden activation {i} has negative_slope {s}: bound "
                                          "propagation supports ReLU and LeakyReLU with slope in [0, 1]")
        self.model = chain.as_sequential()
        self.slopes: Tuple[float, ...] = chain.slopes
        self.device = example.device
        blocks: List[_Block] = []
        z = example[:1].detach().to(torch.float64)
        with torch.no_grad():
            for i, block in enumerate(chain.blocks):
                in_shape = tuple(z.shape[1:])
                shapes, out = [in_shape], z
                for layer in block.layers:
                    out = layer(out)
                    shapes.append(tuple(out.shape[1:]))
                bias = block(torch.zeros_like(z)).reshape(-1)
                blocks.append(_Block(block, in_shape, tuple(out.shape[1:]), bias, tuple(shapes)))
                z = out if i == len(chain.blocks) - 1 else torch.maximum(out, out * chain.slopes[i])
        if z.dim() != 2:
            raise ValueError(f"the model must output logits [B, K], got shape {tuple(z.shape)}")
        self.blocks = blocks
        self.input_dim = blocks[0].n_in
        self.num_classes = blocks[-1].n_out

    def dense(self, k: int) -> Optional[torch.Tensor]:
        """The matrix of block k (cached), or None when it would exceed the work-array size."""
        cache = self.__dict__.setdefault("_dense", {})
        if k not in cache:
            blk = self.blocks[k]
            cache[k] = blk.dense() if blk.n_in * blk.n_out <= 2 * _CHUNK_ELEMENTS else None
        return cache[k]

    def patch_plan(self, k: int) -> Optional[PatchPlan]:
        """The receptive-field plan of hidden layer k (cached), None where it does not apply."""
        cache = self.__dict__.setdefault("_patch_plans", {})
        if k not in cache:
            cache[k] = patch_plan(self.blocks[:k + 1])
        return cache[k]

    @property
    def num_hidden(self) -> int:
        return len(self.blocks) - 1

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Pre-activations [B, n_k] of every hidden layer and the logits [B, K] (float64)."""
        with torch.no_grad():
            z = x.reshape(x.shape[0], -1).to(torch.float64)
            pre = []
            for k, b in enumerate(self.blocks):
                z = b.block(z.reshape((z.shape[0],) + b.in_shape)).reshape(z.shape[0], -1)
                if k < self.num_hidden:
                    pre.append(z)
                    z = torch.maximum(z, z * self.slopes[k])
        return pre, z


# ---------------------------------------------------------------------------------------------
# back-substitution
# ---------------------------------------------------------------------------------------------

def _relaxation(l: torch.Tensor, u: torch.Tensor, s: float):
    """Slopes (lower α, upper), upper intercept and the unstable mask of σ on [l, u]."""
    unstable = (l < 0) & (u > 0)
    one, slope = torch.ones_like(l), torch.full_like(l, s)
    stable = torch.where(l >= 0, one, slope)
    width = torch.where(unstable, u - l, one)
    up_slope = torch.where(unstable, (u - s * l) / width, stable)
    up_icpt = torch.where(unstable, l * (s - up_slope), torch.zeros_like(l))
    low_slope = torch.where(unstable, torch.where(u >= -l, one, slope), stable)
    return low_slope, up_slope, up_icpt, unstable


Relaxation = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _relaxations(bounds, slopes) -> List[Relaxation]:
    return [_relaxation(l, u, s) for (l, u), s in zip(bounds, slopes)]


def _relax(lam: torch.Tensor, rel: Relaxation, alpha: Optional[torch.Tensor] = None
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coefficients lam [B', R, n] on σ(z) -> coefficients on z and the constant [B, R]."""
    low, up, icpt, unstable = rel
    if alpha is not None:
        low = torch.where(unstable[:, None], alpha, low[:, None])
    else:
        low = low[:, None]
    slope = torch.where(lam >= 0, low, up[:, None])
    new = slope * lam if torch.is_grad_enabled() else slope.mul_(lam)
    if unstable.any():
        cols = unstable.any(0).nonzero()[:, 0]
        const = torch.matmul(lam[..., cols].clamp_max(0), icpt[:, cols, None])[..., 0]
    else:
        const = new.new_zeros(new.shape[:2])
    return new, const


def _backsub(net: BoundedNetwork, k: int, lam: torch.Tensor, rels: Sequence[Relaxation],
             alphas=None, const: Optional[torch.Tensor] = None):
    """Coefficients lam [B' (1 or B), R, n] on the output of block k (or, when ``const`` is
    given, already on its input, with that constant) -> (coefficients on x [B', R, d], constant)."""
    for j in range(k, -1, -1):
        if const is None or j < k:
            blk = net.blocks[j]
            c = lam @ blk.bias
            const = c if const is None else const + c
            Bp, R, n = lam.shape
            lam = blk.back(lam.reshape(Bp * R, n)).reshape(Bp, R, -1)
        if j == 0:
            break
        lam, c = _relax(lam, rels[j - 1], None if alphas is None else alphas[j - 1])
        const = const + c
    return lam, const


def _lower(net, k, lam, rels, x, p, eps, lo, hi, alphas=None, const=None) -> torch.Tensor:
    coef, const = _backsub(net, k, lam, rels, alphas, const)
    return support_min(coef, x, p, eps, lo, hi) + const.expand(x.shape[0], -1)


def _ball_rows_norm(net: BoundedNetwork, q: float) -> torch.Tensor:
    """||W0_j||_q of the rows of the first block (cached per dual exponent)."""
    cache = net.__dict__.setdefault("_row_norms", {})
    if q not in cache:
        W = net.dense(0)
        if W is None:
            blk = net.blocks[0]
            step = max(1, _CHUNK_ELEMENTS // blk.n_in)
            eye = torch.eye(blk.n_out, dtype=torch.float64, device=blk.bias.device)
            W = torch.cat([torch.linalg.vector_norm(blk.back(eye[i:i + step]), ord=q, dim=1)
                           for i in range(0, blk.n_out, step)])
            cache[q] = W
        else:
            cache[q] = torch.linalg.vector_norm(W, ord=q, dim=1)
    return cache[q]


def _interval_exact(blk: _Block) -> bool:
    """Whether interval propagation through the block is exact: at most one layer that is not
    diagonal (scale) or a reshape, so that the composition of per-layer |W| is |W|."""
    return sum(adapter_of(layer).kind not in ("scale", "flatten") for layer in blk.block.layers) <= 1


def _dense_lower(net: BoundedNetwork, k: int, b, j, rels, x, p, eps, lo, hi) -> torch.Tensor:
    """[P, 2]: lower bounds of +- unit j of layer k for samples b, by dense back-substitution."""
    blk, W = net.blocks[k], net.dense(k)
    P = b.numel()
    rows = W[j] if W is not None else blk.back(
        torch.zeros((P, blk.n_out), dtype=torch.float64, device=x.device).index_put_(
            (torch.arange(P, device=x.device), j), torch.ones(P, dtype=torch.float64, device=x.device)))
    lam = torch.stack([rows, -rows], 1)  # [P, 2, n_in]: +- unit j, on its input
    const = torch.stack([blk.bias[j], -blk.bias[j]], 1)
    sub = [tuple(t[b] for t in r) for r in rels]
    return _lower(net, k, lam, sub, x[b], p, eps[b], lo, hi, const=const)


def hidden_bounds(net: BoundedNetwork, x: torch.Tensor, p: float, eps: torch.Tensor, lo: float,
                   hi: float) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    B, d = x.shape
    bounds: List[Tuple[torch.Tensor, torch.Tensor]] = []
    rels: List[Relaxation] = []
    # interval hull of the input set: every |z_i - x_i| <= eps
    prev_lo = torch.maximum(x - eps[:, None], torch.full_like(x, lo))
    prev_hi = torch.minimum(x + eps[:, None], torch.full_like(x, hi))
    for k in range(net.num_hidden):
        blk = net.blocks[k]
        # interval propagation through block k (sound: |W| <= composition of |W_layer|)
        center, radius = (prev_lo + prev_hi) / 2, (prev_hi - prev_lo) / 2
        mid = blk.forward_linear(center) + blk.bias
        rad = blk.forward_abs(radius)
        l, u = mid - rad, mid + rad
        if k == 0:  # the ball without the box: z0 -+ eps ||W_j||_q
            q = 1.0 if math.isinf(p) else (math.inf if p == 1 else 2.0)
            z0 = blk.forward_linear(x) + blk.bias
            r0 = eps[:, None] * _ball_rows_norm(net, q)[None]
            l, u = torch.maximum(l, z0 - r0), torch.minimum(u, z0 + r0)
        # back-substitute only the (sample, unit) pairs the cheap bounds leave unstable; for
        # p = inf the set is a box, on which the interval bound of an exact block is exact
        exact = SHORTCUTS and k == 0 and math.isinf(p) and _interval_exact(blk)
        pairs = ((l < 0) & (u > 0)).nonzero() if not exact else l.new_zeros((0, 2), dtype=torch.long)
        if pairs.numel():
            plan = net.patch_plan(k) if SHORTCUTS else None
            if plan is not None:
                patches = PatchBacksub(plan, rels, [b.bias for b in net.blocks[:k + 1]], x)
                chunk = max(1, _PATCH_CHUNK_ELEMENTS // (4 * plan.width))
            else:
                width = max(d, max(b.n_in for b in net.blocks[:k + 1]))
                chunk = max(1, _CHUNK_ELEMENTS // (2 * width))
            for start in range(0, pairs.shape[0], chunk):
                b, j = pairs[start:start + chunk].unbind(1)
                val = (patches.lower(b, j, p, eps, lo, hi) if plan is not None
                       else _dense_lower(net, k, b, j, rels, x, p, eps, lo, hi))
                l[b, j] = torch.maximum(l[b, j], val[:, 0])
                u[b, j] = torch.minimum(u[b, j], -val[:, 1])
        bounds.append((l, u))
        s = net.slopes[k]
        rels.append(_relaxation(l, u, s))
        prev_lo, prev_hi = torch.maximum(l, s * l), torch.maximum(u, s * u)
    return bounds


def _prepare(model, x, y, norm, eps, lo, hi):
    p = parse_norm(norm)
    check_batch(x)
    if y is not None:
        check_y(y, x)
    lo, hi = check_box(lo, hi)
    check_in_box(x, lo, hi)
    e = check_eps(eps, x)
    net = BoundedGraph(model, x) if isinstance(parse_network(model), Graph) else BoundedNetwork(model, x)
    x64 = x.detach().reshape(x.shape[0], -1).to(device=x.device, dtype=torch.float64)
    return net, x64, p, e, lo, hi


@torch.no_grad()
def layer_bounds(model: nn.Module, x: torch.Tensor, *, norm, eps, lo: float = 0.0, hi: float = 1.0
                 ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Lower and upper bounds [B, n_k] (float64) on every hidden pre-activation over the input set
    {z : ||z - x||_p <= eps, lo <= z <= hi}, one pair per hidden layer, units in the layer's
    flattening order. For a graph network (docs/MATH.md §11): one pair per activation and per max
    pooling, on the node it reads, in node order."""
    net, x64, p, e, lo, hi = _prepare(model, x, None, norm, eps, lo, hi)
    if isinstance(net, BoundedGraph):
        bounds = graph_node_bounds(net, x64, p, e, lo, hi)
        return [bounds[node.inputs[0]] for node in net.graph.nodes if node.op in (ACT, MAXPOOL)]
    return hidden_bounds(net, x64, p, e, lo, hi)


def _spec(y: torch.Tensor, K: int) -> torch.Tensor:
    """Rows e_y - e_s for every s: [B, K, K] (row s = y is zero)."""
    eye = torch.eye(K, dtype=torch.float64, device=y.device)
    return eye[y][:, None, :] - eye[None]


def network_margin_bounds(net: BoundedNetwork, x64, y, p, e, lo, hi, bounds, alpha_steps: int,
                   alpha_lr: float) -> torch.Tensor:
    L = net.num_hidden
    lam = _spec(y, net.num_classes)
    rels = _relaxations(bounds, net.slopes)
    lb = _lower(net, L, lam, rels, x64, p, e, lo, hi)
    if alpha_steps > 0 and L > 0:
        alphas = []
        for k in range(L):
            l, u = bounds[k]
            low, _, _, _ = _relaxation(l, u, net.slopes[k])
            alphas.append(low[:, None, :].expand(-1, lam.shape[1], -1).clone().requires_grad_(True))
        opt = torch.optim.Adam(alphas, lr=alpha_lr)
        for _ in range(alpha_steps):
            with torch.enable_grad():
                val = _lower(net, L, lam, rels, x64, p, e, lo, hi, alphas)
                loss = -val.sum()
                opt.zero_grad()
                loss.backward()
            opt.step()
            with torch.no_grad():
                for a, s in zip(alphas, net.slopes):
                    a.clamp_(s, 1.0)
                lb = torch.maximum(lb, _lower(net, L, lam, rels, x64, p, e, lo, hi,
                                              [a.detach() for a in alphas]))
    return lb.scatter(1, y[:, None], math.inf)


@torch.no_grad()
def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm, eps, lo: float = 0.0,
                  hi: float = 1.0, alpha_steps: int = 0, alpha_lr: float = 0.1,
                  batch_size: int = 32) -> torch.Tensor:
    """Lower bounds [B, K] (float64) on f_y(z) - f_s(z) over {||z - x||_p <= eps, lo <= z <= hi}.

    Args:
        model: a supported network (chain or graph) with ReLU / LeakyReLU (slope in [0, 1]).
        x: inputs [B, ...] in the box; y: int labels [B].
        norm: 1, 2 or inf. eps: radius (number or [B] tensor).
        alpha_steps: Adam steps optimising the lower ReLU slopes of the final bound (0: the
            adaptive CROWN slopes only). The result is never worse than the adaptive one. Graph
            networks (max pooling, sums of branches; :mod:`.graph_bounds`) use the adaptive
            slopes only.
        batch_size: samples processed together (memory only).

    Returns:
        float64 [B, K]; +inf in column y. Entry s > 0 proves that no z in the set is classified
        as s; all entries > 0 prove robustness.
    """
    net, x64, p, e, lo, hi = _prepare(model, x, y, norm, eps, lo, hi)
    if isinstance(alpha_steps, bool) or not isinstance(alpha_steps, int) or alpha_steps < 0:
        raise ValueError(f"alpha_steps must be an integer >= 0, got {alpha_steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(alpha_lr, bool) or not isinstance(alpha_lr, Real) or not alpha_lr > 0:
        raise ValueError(f"alpha_lr must be a positive number, got {alpha_lr!r}")
    y = y.to(x64.device)
    out = []
    for start in range(0, x64.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        if isinstance(net, BoundedGraph):
            out.append(graph_margin_bounds(net, x64[sl], y[sl], p, e[sl], lo, hi))
            continue
        bounds = hidden_bounds(net, x64[sl], p, e[sl], lo, hi)
        out.append(network_margin_bounds(net, x64[sl], y[sl], p, e[sl], lo, hi, bounds, alpha_steps,
                                  float(alpha_lr)))
    return torch.cat(out, 0)


def certified_by_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm, eps,
                        lo: float = 0.0, hi: float = 1.0, alpha_steps: int = 0) -> torch.Tensor:
    """bool [B]: bound propagation proves that every z with ||z - x||_p <= eps in the box is
    classified as y (all margin lower bounds exceed a float64 rounding allowance), and the model
    classifies x itself as y in its own dtype beyond rounding (:func:`reliably_correct`)."""
    lb = margin_bounds(model, x, y, norm=norm, eps=eps, lo=lo, hi=hi, alpha_steps=alpha_steps)
    finite = torch.where(torch.isfinite(lb), lb, torch.zeros_like(lb))
    slack = 1e-9 * (1.0 + finite.abs().amax(1))
    with torch.no_grad():
        correct = reliably_correct(model, x, y.to(x.device).long())
    return (lb > slack[:, None]).all(1) & correct
