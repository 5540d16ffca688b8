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
(no relaxation): with room_i the distance coordinate i can move in the direction that decreases
<a, z> before leaving the box, it is ``<a, x> - max Σ |a_i| t_i`` over 0 <= t_i <= room_i and
||t||_p <= eps, i.e.

- p = inf: t_i = min(eps, room_i);
- p = 1: fractional knapsack: largest |a_i| first, each up to room_i, until eps is spent;
- p = 2: t_i = min(μ |a_i|, room_i), with μ solving Σ t_i^2 = eps^2 (a one-dimensional dual,
  piecewise quadratic in μ: sorted breakpoints and a closed form on the active segment).

Pre-activation bounds of hidden layer k come from the same back-substitution started at layer
k (for both signs), intersected with cheaper valid bounds: interval propagation of the bounds of
layer k - 1 and, for the first layer, ``z_j(x) -+ eps ||W_j||_q`` (the ball without the box).
Only the (sample, unit) pairs that the cheap bounds leave unstable are back-substituted. All
bounds are sound for the exact arithmetic of the model; they are computed in float64 on a
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
import torch.nn.functional as F
from torch import nn

from .checks import check_batch, check_box, check_eps, check_in_box, check_y
from .math.norms import parse_norm
from .nn.chain import AffineBlock, batchnorm_scale_shift, linear_part, parse_model
from .nn.layers import Normalize

__all__ = ["BoundedNetwork", "layer_bounds", "margin_bounds", "certified_by_bounds", "support_min"]

_CHUNK_ELEMENTS = 1 << 23  # float64 elements per [samples, rows, width] work array (64 MiB)


# ---------------------------------------------------------------------------------------------
# the input set: exact min of a linear function over the lp-ball ∩ box
# ---------------------------------------------------------------------------------------------

def _gain_l1_sorted(w: torch.Tensor, room: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Fractional knapsack max Σ w_i t_i, Σ t_i <= e, 0 <= t_i <= room_i, by a full sort."""
    ws, order = torch.sort(w, dim=-1, descending=True)
    rs = room.gather(-1, order)
    spent = rs.cumsum(-1) - rs  # budget used by the better coordinates
    return (ws * torch.minimum(rs, (e - spent).clamp_min(0))).sum(-1)


def _gain_l2_sorted(w: torch.Tensor, room: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """max Σ w_i t_i, Σ t_i^2 <= e^2, 0 <= t_i <= room_i, by a full sort of room_i / w_i."""
    pos = (w > 0) & (room > 0)
    beta = torch.where(pos, room / torch.where(pos, w, torch.ones_like(w)), torch.full_like(w, math.inf))
    beta, order = torch.sort(beta, dim=-1)
    ws = torch.where(pos, w, torch.zeros_like(w)).gather(-1, order)
    rs = room.gather(-1, order)
    zero = ws.new_zeros(ws.shape[:-1] + (1,))
    R = torch.cat([zero, (rs * rs).cumsum(-1)], -1)                    # Σ_{i<m} room^2
    A = torch.cat([(ws * ws).flip(-1).cumsum(-1).flip(-1), zero], -1)  # Σ_{i>=m} w^2
    C = torch.cat([zero, (ws * rs).cumsum(-1)], -1)                    # Σ_{i<m} w room
    finite = torch.isfinite(beta)
    G = torch.where(finite, R[..., :-1] + torch.where(finite, beta, 0.0) ** 2 * A[..., :-1],
                    torch.full_like(beta, math.inf))
    k = (G <= e * e).sum(-1, keepdim=True)  # units clipped at their room
    Rk, Ak, Ck = R.gather(-1, k), A.gather(-1, k), C.gather(-1, k)
    # free units: t_i = μ w_i with μ^2 Ak = e^2 - Rk, contributing μ Ak = sqrt(Ak (e^2 - Rk))
    return (Ck + torch.sqrt((Ak * (e * e - Rk)).clamp_min(0)))[..., 0]


def _gain_l1(w, room, e, k):
    """The knapsack gain using only the k best coordinates when their room covers the budget
    (exact then: the greedy never reaches further); the other rows by a full sort."""
    d = w.shape[-1]
    if k >= d:
        return _gain_l1_sorted(w, room, e)
    w = torch.where(room > 0, w, torch.zeros_like(w))  # no room: contributes nothing
    ws, idx = torch.topk(w, k, dim=-1, sorted=True)
    rs = room.gather(-1, idx)
    cum = rs.cumsum(-1)
    gain = (ws * torch.minimum(rs, (e - (cum - rs)).clamp_min(0))).sum(-1)
    rest = cum[..., -1] < e[..., 0]
    if rest.any():
        gain[rest] = _gain_l1_sorted(w[rest], room[rest], e.expand(w.shape[:-1] + (1,))[rest])
    return gain


def _gain_l2(w, room, e, k):
    """The l2 gain when at most k - 1 coordinates are clipped at their room (found among the k
    smallest room_i / w_i); the other rows by a full sort."""
    d = w.shape[-1]
    if k >= d:
        return _gain_l2_sorted(w, room, e)
    pos = (w > 0) & (room > 0)
    w = torch.where(pos, w, torch.zeros_like(w))
    beta = torch.where(pos, room / torch.where(pos, w, torch.ones_like(w)), torch.full_like(w, math.inf))
    bk, idx = torch.topk(beta, k, dim=-1, largest=False, sorted=True)
    wk, rk = w.gather(-1, idx), room.gather(-1, idx)
    zero = wk.new_zeros(wk.shape[:-1] + (1,))
    # Σ w^2 outside the k smallest breakpoints, summed directly (no cancellation)
    outside = (w * w).scatter(-1, idx, 0.0).sum(-1, keepdim=True)
    R = torch.cat([zero, (rk * rk).cumsum(-1)], -1)
    A = torch.cat([(wk * wk).flip(-1).cumsum(-1).flip(-1), zero], -1) + outside
    C = torch.cat([zero, (wk * rk).cumsum(-1)], -1)
    finite = torch.isfinite(bk)
    G = torch.where(finite, R[..., :-1] + torch.where(finite, bk, 0.0) ** 2 * A[..., :-1],
                    torch.full_like(bk, math.inf))
    m = (G <= e * e).sum(-1, keepdim=True)
    Rm, Am, Cm = R.gather(-1, m), A.gather(-1, m), C.gather(-1, m)
    gain = (Cm + torch.sqrt((Am * (e * e - Rm)).clamp_min(0)))[..., 0]
    rest = (m[..., 0] == k) & finite[..., -1]  # the k-th breakpoint is passed: more may clip
    if rest.any():
        gain[rest] = _gain_l2_sorted(w[rest], room[rest], e.expand(w.shape[:-1] + (1,))[rest])
    return gain


def support_min(a: torch.Tensor, x: torch.Tensor, p: float, eps: torch.Tensor, lo: float,
                hi: float, top: int = 64) -> torch.Tensor:
    """min over {z : ||z - x||_p <= eps, lo <= z <= hi} of <a_r, z>, for every row a_r.

    a: [B or 1, R, d]; x: [B, d] (inside the box); eps: [B]. Returns [B, R], exact up to
    rounding (float64). l1 and l2 first try the ``top`` most relevant coordinates (exact when the
    optimum only involves them) and sort the full rows otherwise. Differentiable almost
    everywhere w.r.t. a.
    """
    xb = x[:, None, :]
    e = eps[:, None, None]
    shared = a.shape[0] == 1 and x.shape[0] > 1  # rows common to all samples: plain matmuls

    def dot(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [B', R, d] x [B, d] -> [B, R]
        return v @ m[0].T if shared else torch.matmul(m, v[:, :, None])[..., 0]

    value = dot(a, x)
    if math.isinf(p):
        down = torch.minimum(x - lo, eps[:, None]).clamp_min(0)
        up = torch.minimum(hi - x, eps[:, None]).clamp_min(0)
        return value - dot(a.clamp_min(0), down) + dot(a.clamp_max(0), up)
    room = torch.where(a > 0, xb - lo, hi - xb).clamp_min(0)  # [B, R, d]
    w = a.abs().expand(room.shape)
    e = e.expand(room.shape[:-1] + (1,))
    gain = (_gain_l1 if p == 1 else _gain_l2)(w, room, e, top)
    return value - gain


# ---------------------------------------------------------------------------------------------
# the network as a chain of linear operators
# ---------------------------------------------------------------------------------------------

def _abs_linear(layer: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """|W| z for one affine layer (elementwise absolute value of its linear part)."""
    if isinstance(layer, nn.Linear):
        return F.linear(z, layer.weight.abs())
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(z, layer.weight.abs(), None)
    if isinstance(layer, (nn.AvgPool2d, nn.Flatten)):
        return layer(z)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, _ = batchnorm_scale_shift(layer)
        return z * scale.abs().reshape((1, -1) + (1,) * (z.dim() - 2))
    if isinstance(layer, Normalize):
        std = layer.std.reshape(()) if layer.std.numel() == 1 else layer.std.reshape((1, -1) + (1,) * (z.dim() - 2))
        return z / std
    raise NotImplementedError(f"no bound propagation for {type(layer).__name__}")


def _adjoint(layer: nn.Module, g: torch.Tensor, in_shape: Tuple[int, ...]) -> torch.Tensor:
    """g [N, *out] -> W^T g [N, *in_shape] for the linear part W of one affine layer."""
    N = g.shape[0]
    if isinstance(layer, nn.Linear):
        return g @ layer.weight
    if isinstance(layer, nn.Flatten):
        return g.reshape((N,) + in_shape)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, _ = batchnorm_scale_shift(layer)
        return g * scale.reshape((1, -1) + (1,) * (g.dim() - 2))
    if isinstance(layer, Normalize):
        std = layer.std.reshape(()) if layer.std.numel() == 1 else layer.std.reshape((1, -1) + (1,) * (g.dim() - 2))
        return g / std
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        stride, pad, dil = (torch.nn.modules.utils._pair(v) for v in (layer.stride, layer.padding, layer.dilation))
        k = layer.weight.shape[-2:]
        H, W = in_shape[-2:]
        # output_padding recovers the rows/columns that the forward's floor division dropped
        op = tuple(size - ((o - 1) * st - 2 * pd + dl * (kk - 1) + 1)
                   for size, o, st, pd, dl, kk in zip((H, W), g.shape[-2:], stride, pad, dil, k))
        if all(0 <= o < max(st, dl) for o, st, dl in zip(op, stride, dil)):
            return F.conv_transpose2d(g, layer.weight, None, stride, pad, op, layer.groups, dil)
    # anything else (AvgPool2d, unusual convolutions): vector-Jacobian product by autograd
    with torch.enable_grad():
        z = torch.zeros((N,) + tuple(in_shape), dtype=g.dtype, device=g.device, requires_grad=True)
        out = linear_part(layer, z)
        grad, = torch.autograd.grad(out, z, g, create_graph=g.requires_grad)
    return grad


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
            z = _adjoint(layer, z, shape)
        return z.reshape(N, -1)

    def forward_abs(self, v: torch.Tensor) -> torch.Tensor:
        """|W| v for v [N, n_in] (composition of per-layer |W|: an upper bound on |W| v)."""
        z = v.reshape((v.shape[0],) + self.in_shape)
        for layer in self.block.layers:
            z = _abs_linear(layer, z)
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
        self.model = model64
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
        # back-substitute only the (sample, unit) pairs the cheap bounds leave unstable
        pairs = ((l < 0) & (u > 0)).nonzero()
        if pairs.numel():
            width = max(d, max(b.n_in for b in net.blocks[:k + 1]))
            chunk = max(1, _CHUNK_ELEMENTS // (2 * width))
            W = net.dense(k)
            for start in range(0, pairs.shape[0], chunk):
                b, j = pairs[start:start + chunk].unbind(1)
                P = b.numel()
                rows = W[j] if W is not None else blk.back(
                    torch.zeros((P, blk.n_out), dtype=torch.float64, device=x.device).index_put_(
                        (torch.arange(P, device=x.device), j), torch.ones(P, dtype=torch.float64,
                                                                          device=x.device)))
                lam = torch.stack([rows, -rows], 1)  # [P, 2, n_in]: +- unit j, on its input
                const = torch.stack([blk.bias[j], -blk.bias[j]], 1)
                sub = [tuple(t[b] for t in r) for r in rels]
                val = _lower(net, k, lam, sub, x[b], p, eps[b], lo, hi, const=const)
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
    net = BoundedNetwork(model, x)
    x64 = x.detach().reshape(x.shape[0], -1).to(device=net.device, dtype=torch.float64)
    return net, x64, p, e, lo, hi


@torch.no_grad()
def layer_bounds(model: nn.Module, x: torch.Tensor, *, norm, eps, lo: float = 0.0, hi: float = 1.0
                 ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Lower and upper bounds [B, n_k] (float64) on every hidden pre-activation over the input set
    {z : ||z - x||_p <= eps, lo <= z <= hi}, one pair per hidden layer, units in the layer's
    flattening order."""
    net, x64, p, e, lo, hi = _prepare(model, x, None, norm, eps, lo, hi)
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
        model: ``nn.Sequential`` of supported layers with ReLU / LeakyReLU (slope in [0, 1]).
        x: inputs [B, ...] in the box; y: int labels [B].
        norm: 1, 2 or inf. eps: radius (number or [B] tensor).
        alpha_steps: Adam steps optimising the lower ReLU slopes of the final bound (0: the
            adaptive CROWN slopes only). The result is never worse than the adaptive one.
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
    y = y.to(net.device)
    out = []
    for start in range(0, x64.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        bounds = hidden_bounds(net, x64[sl], p, e[sl], lo, hi)
        out.append(network_margin_bounds(net, x64[sl], y[sl], p, e[sl], lo, hi, bounds, alpha_steps,
                                  float(alpha_lr)))
    return torch.cat(out, 0)


def certified_by_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm, eps,
                        lo: float = 0.0, hi: float = 1.0, alpha_steps: int = 0) -> torch.Tensor:
    """bool [B]: bound propagation proves that every z with ||z - x||_p <= eps in the box is
    classified as y (all margin lower bounds exceed a float64 rounding allowance)."""
    lb = margin_bounds(model, x, y, norm=norm, eps=eps, lo=lo, hi=hi, alpha_steps=alpha_steps)
    finite = torch.where(torch.isfinite(lb), lb, torch.zeros_like(lb))
    slack = 1e-9 * (1.0 + finite.abs().amax(1))
    return (lb > slack[:, None]).all(1)
