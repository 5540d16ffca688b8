"""Fast linear-region geometry (MATH.md §1-2): compact V(l) representations and native distances.

Rows of V(l) are kept in the cheapest exact form and never densified needlessly:
- ``Dense``   V [Bp, n, d]: rows over the whole input (after fully connected layers). The first
  layer's rows are sample-independent (Bp = 1), so their norms come from the weights.
- ``Patches`` P [Bp, C, H, W, Cin, Rh, Rw]: a conv unit's row lives on its receptive field, an
  Rh x Rw window of the input starting at (y*Sh - Ph, x*Sw - Pw); entries outside the image are 0.
  Conv layers extend patches (no multiplication by the zeros outside the receptive field), a
  Linear layer after Flatten contracts each position's patches and overlap-adds them (fold).

All products are ordinary differentiable torch ops, so gradients w.r.t. the parameters follow;
the dual norms, distances and their gradients come from the native kernel (``ops.row_distances``).
Layers or layouts outside this scheme make :func:`region_distances` use the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .chain import AffineBlock, Chain, activation_mask, batchnorm_scale_shift, linear_part, parse_model
from .checks import check_input, check_labels, dual_exponent
from .layers import Normalize
from .native import native_or_warn
from .reference import decision_geometry, reference_geometry


class Unsupported(Exception):
    """A layer/layout the compact representations do not cover (the reference handles it)."""


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class Dense:
    V: Optional[torch.Tensor]  # [Bp, n, d]; None means the identity (the raw input)
    d: int
    mask: Optional[torch.Tensor] = None  # [B, n] per-sample row scales not yet multiplied into V

    def materialize(self) -> "Dense":
        V = self.V if self.V is not None else torch.eye(self.d, dtype=self.mask.dtype, device=self.mask.device)[None]
        return Dense(V * self.mask[:, :, None], self.d) if self.mask is not None else Dense(V, self.d)

    def rows(self) -> torch.Tensor:
        return self.materialize().V


@dataclass
class Patches:
    P: torch.Tensor  # [Bp, C, H, W, Cin, Rh, Rw]
    stride: Tuple[int, int]  # cumulative stride (Sh, Sw) of the unit grid in the input
    offset: Tuple[int, int]  # cumulative padding (Ph, Pw): window of (y, x) starts at y*Sh - Ph
    in_shape: Tuple[int, int, int]  # (Cin, Hin, Win)
    flat: bool = False  # set by Flatten: the next Linear reads units in (C, H, W) order

    def rows(self) -> torch.Tensor:
        Bp, C, H, W = self.P.shape[:4]
        return self.P.reshape(Bp, C * H * W, -1)


@dataclass
class KernelPatches:
    """Rows of a conv applied to the raw image: every unit of channel c has the same kernel
    K[c] [Cin, Rh, Rw] (restricted to in-image pixels), so they are never stored per unit or per
    sample; the per-sample mask Σ of the following activation is kept aside and folded into the
    next layer's products (transposed convolutions with K)."""

    K: torch.Tensor  # [C, Cin, Rh, Rw]
    grid: Tuple[int, int]  # (H, W) unit grid
    stride: Tuple[int, int]
    offset: Tuple[int, int]
    in_shape: Tuple[int, int, int]
    mask: Optional[torch.Tensor] = None  # [B, C, H, W]
    flat: bool = False

    def materialize(self) -> Patches:
        C, Cin, Rh, Rw = self.K.shape
        H, W = self.grid
        inside = _window_inside(self.grid, (Rh, Rw), self.stride, self.offset, self.in_shape, self.K)
        P = self.K[None, :, None, None] * inside[None, None, :, :, None]
        if self.mask is not None:
            P = P * self.mask[:, :, :, :, None, None, None]
        return Patches(P, self.stride, self.offset, self.in_shape, self.flat)

    def rows(self) -> torch.Tensor:
        return self.materialize().rows()


def _window_inside(grid, size, stride, offset, in_shape, like: torch.Tensor) -> torch.Tensor:
    """[H, W, Rh, Rw] 0/1: whether each entry of each unit's input window lies inside the image."""
    rows = [(torch.arange(n)[:, None] * s - o + torch.arange(r)[None, :] >= 0)
            & (torch.arange(n)[:, None] * s - o + torch.arange(r)[None, :] < limit)
            for n, r, s, o, limit in zip(grid, size, stride, offset, in_shape[1:])]
    return (rows[0][:, None, :, None] & rows[1][None, :, None, :]).to(dtype=like.dtype, device=like.device)


def _identity(x: torch.Tensor):
    if x.dim() == 2:
        return Dense(None, x.shape[1])
    if x.dim() == 4:
        Cin, H, W = x.shape[1:]
        eye = torch.eye(Cin, dtype=x.dtype, device=x.device)[:, :, None, None]
        return KernelPatches(eye, (H, W), (1, 1), (0, 0), (Cin, H, W))
    raise Unsupported(f"input of rank {x.dim()}")


def _scale_units(rep, scale: torch.Tensor):
    """Multiplies every row by the per-channel scale of its unit (BatchNorm, Normalize)."""
    if isinstance(rep, KernelPatches):
        if rep.mask is not None or scale.numel() not in (1, rep.K.shape[0]):
            return _scale_units(rep.materialize(), scale)
        return replace(rep, K=rep.K * scale.reshape(-1, 1, 1, 1))
    if isinstance(rep, Patches):
        C = rep.P.shape[1]
        s = scale.expand(C) if scale.numel() == 1 else scale
        if s.numel() != C:
            raise Unsupported("channel count mismatch")
        return replace(rep, P=rep.P * s.reshape(1, C, 1, 1, 1, 1, 1))
    n = rep.d if rep.V is None else rep.V.shape[1]
    s = scale.expand(n) if scale.numel() == 1 else scale
    if s.numel() != n:
        raise Unsupported("per-feature scale size mismatch")
    if rep.V is None:
        return Dense(torch.diag(s)[None], rep.d)
    if rep.mask is not None:  # a diagonal scale folds into the pending mask
        return replace(rep, mask=rep.mask * s)
    return Dense(rep.V * s.reshape(1, -1, 1), rep.d)


def _overlap_add(Y: torch.Tensor, step: Tuple[int, int]) -> torch.Tensor:
    """Sums blocks Y [N, Cin, Rh, Rw, kh, kw] placed at (i*sh, j*sw): [N, Cin, (kh-1)sh+Rh, (kw-1)sw+Rw].

    Out-of-place, so autograd stays cheap: block rows a = a1*sh + a0 land at (i + a1)*sh + a0, so
    each of the ceil(Rh/sh) * ceil(Rw/sw) values of (a1, b1) is one padded, interleaved copy.
    """
    N, Cin, Rh, Rw, kh, kw = Y.shape
    sh, sw = step
    mh, mw = -(-Rh // sh), -(-Rw // sw)
    Y = F.pad(Y, (0, 0, 0, 0, 0, mw * sw - Rw, 0, mh * sh - Rh)).reshape(N, Cin, mh, sh, mw, sw, kh, kw)
    # One interleaving copy for all (a1, b1); unbind (backward: stack) instead of slicing.
    blocks = Y.permute(2, 4, 0, 1, 6, 3, 7, 5).reshape(mh * mw, N, Cin, kh * sh, kw * sw).unbind(0)
    out = None
    for t, block in enumerate(blocks):
        a1, b1 = divmod(t, mw)
        block = F.pad(block, (b1 * sw, (mw - 1 - b1) * sw, a1 * sh, (mh - 1 - a1) * sh))
        out = block if out is None else out + block
    return out[:, :, :(kh - 1) * sh + Rh, :(kw - 1) * sw + Rw]


def _conv_patches(rep: Patches, weight: torch.Tensor, stride, padding, dilation, depthwise: bool) -> Patches:
    """Rows of a conv (weight [O, C, kh, kw], or [C, kh, kw] when depthwise) applied to patch rows."""
    P = rep.P
    Bp, C, H, W, Cin, Rh, Rw = P.shape
    kh, kw = weight.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Sh, Sw = rep.stride
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if Ho <= 0 or Wo <= 0:
        raise Unsupported("empty conv output")
    E = Cin * Rh * Rw
    X = P.reshape(Bp, C, H, W, E).permute(0, 1, 4, 2, 3).reshape(Bp, C * E, H, W)
    U = F.unfold(X, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    U = U.reshape(Bp, C, E, kh, kw, Ho * Wo)
    if depthwise:
        Y = torch.einsum("cij,bceijl->bcleij", weight, U)
    else:
        Y = torch.einsum("ocij,bceijl->boleij", weight, U)
    O = Y.shape[1]
    # The kh x kw shifted copies of the old patches overlap-add into the new, larger patch.
    out = _overlap_add(Y.reshape(Bp * O * Ho * Wo, Cin, Rh, Rw, kh, kw), (dh * Sh, dw * Sw))
    Rh2, Rw2 = out.shape[-2:]
    offset = (ph * Sh + rep.offset[0], pw * Sw + rep.offset[1])
    return Patches(out.reshape(Bp, O, Ho, Wo, Cin, Rh2, Rw2), (sh * Sh, sw * Sw), offset, rep.in_shape)


def _full_weight(conv: nn.Conv2d) -> torch.Tensor:
    """Conv weight [O, C, kh, kw] with groups expanded block-diagonally (exact and simple)."""
    w, g = conv.weight, conv.groups
    if g == 1:
        return w
    O, Cg = w.shape[:2]
    Og = O // g
    return torch.cat([F.pad(w[k * Og:(k + 1) * Og], (0, 0, 0, 0, k * Cg, (g - 1 - k) * Cg)) for k in range(g)])


def _conv_output_grid(grid, k, stride, padding, dilation):
    return tuple((n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, kk, s, p, d in zip(grid, k, stride, padding, dilation))


def _conv_kernel(rep: KernelPatches, w, stride, padding, dilation):
    """Conv applied to kernel rows: unmasked and from the raw image, the kernels compose into a new
    shared kernel; masked, each (sample, unit) row is a transposed conv of its masked weights with K."""
    k = tuple(w.shape[-2:])
    Sh, Sw = rep.stride
    grid = _conv_output_grid(rep.grid, k, stride, padding, dilation)
    if min(grid) <= 0:
        raise Unsupported("empty conv output")
    step = (dilation[0] * Sh, dilation[1] * Sw)
    new_stride = (stride[0] * Sh, stride[1] * Sw)
    offset = (padding[0] * Sh + rep.offset[0], padding[1] * Sw + rep.offset[1])
    if rep.mask is None:
        K = F.conv_transpose2d(w, rep.K, stride=step)
        return KernelPatches(K, grid, new_stride, offset, rep.in_shape, None, False)
    # Masked: row (b, o, l) = sum over taps z = (c, i, j) of mask[b, z, l] * G[o, z], where
    # G[o, (c, i, j)] = w[o, c, i, j] * (K[c] placed at (i, j) * step) is sample-independent, so the
    # whole layer is one GEMM [B*L, C*kh*kw] @ [C*kh*kw, O*E] with masks as the left factor.
    B, C = rep.mask.shape[:2]
    O, Cin = w.shape[0], rep.K.shape[1]
    L = grid[0] * grid[1]
    taps = k[0] * k[1]
    onehot = torch.eye(taps, dtype=w.dtype, device=w.device).reshape(taps, 1, k[0], k[1]).expand(taps, C, k[0], k[1])
    placed = F.conv_transpose2d(onehot, rep.K, stride=step, groups=C)  # [taps, C*Cin, R2h, R2w]
    R = tuple(placed.shape[-2:])
    E = Cin * R[0] * R[1]
    placed = placed.reshape(taps, C, E).transpose(0, 1)  # [C, taps, E]
    G = (w.reshape(O, C, taps, 1) * placed[None]).reshape(O, C * taps, E)
    m = F.unfold(rep.mask, k, dilation=dilation, padding=padding, stride=stride)  # [B, C*taps, L]
    rows = torch.matmul(m.transpose(1, 2).reshape(B * L, C * taps), G.permute(1, 0, 2).reshape(C * taps, O * E))
    inside = _window_inside(grid, R, new_stride, offset, rep.in_shape, rows)  # [H, W, R2h, R2w]
    P = rows.reshape(B, L, O, Cin, R[0] * R[1]).transpose(1, 2) * inside.reshape(1, 1, L, 1, R[0] * R[1])
    return Patches(P.reshape(B, O, grid[0], grid[1], Cin, R[0], R[1]), new_stride, offset, rep.in_shape)


def _conv(rep, conv: nn.Conv2d):
    if rep.flat:
        raise Unsupported("Conv2d on flat features")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise Unsupported("Conv2d padding mode")
    w = _full_weight(conv)
    args = (_pair(conv.stride), _pair(conv.padding), _pair(conv.dilation))
    if isinstance(rep, KernelPatches):
        if rep.mask is not None or (rep.K.shape[-2:] == (1, 1) and rep.stride == (1, 1)):
            return _conv_kernel(rep, w, *args)
        rep = rep.materialize()
    if not isinstance(rep, Patches):
        raise Unsupported("Conv2d on flat features")
    return _conv_patches(rep, w, *args, False)


def _avgpool(rep, pool: nn.AvgPool2d):
    if isinstance(rep, KernelPatches):
        rep = rep.materialize()
    if not isinstance(rep, Patches) or rep.flat or pool.ceil_mode:
        raise Unsupported("AvgPool2d layout or ceil_mode")
    k = _pair(pool.kernel_size)
    s = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    pad = _pair(pool.padding)
    C, H, W = rep.P.shape[1:4]
    ones = rep.P.new_ones((1, 1, H, W))
    # Per-position 1/divisor of the layer: its average of ones over the plain window sum of ones.
    mean = F.avg_pool2d(ones, k, s, pad, False, pool.count_include_pad, pool.divisor_override)
    total = F.avg_pool2d(ones, k, s, pad, False, True, 1)
    out = _conv_patches(rep, rep.P.new_ones((C,) + k), s, pad, (1, 1), True)
    inv_div = (mean / total).reshape(1, 1, *mean.shape[-2:], 1, 1, 1)
    return replace(out, P=out.P * inv_div)


def _flatten(rep, layer: nn.Flatten):
    if isinstance(rep, Dense):
        return rep
    if layer.start_dim != 1 or layer.end_dim != -1:
        raise Unsupported("partial Flatten")
    return replace(rep, flat=True)


def _linear(rep, layer: nn.Linear, trace: list):
    W = layer.weight
    if isinstance(rep, Dense):
        if rep.V is None and rep.mask is None:
            return Dense(W[None], rep.d)
        if rep.mask is not None and rep.V is not None:  # (W Σ) V: the mask scales W's columns
            return Dense(torch.matmul(W * rep.mask[:, None, :], rep.V), rep.d)
        return Dense(torch.matmul(W, rep.materialize().V), rep.d)
    if not rep.flat:
        raise Unsupported("Linear on unflattened feature maps")
    if isinstance(rep, KernelPatches):
        return _kernel_to_dense(rep, W)
    if PATCH_COST_WEIGHT * _patch_macs(rep, W.shape[0]) <= _reverse_macs(trace, W.shape[0]):
        return _patches_to_dense(rep, W)
    return _reverse_rows(W, trace, rep.in_shape)


# Per-MAC cost of the patch contraction + overlap-add relative to the transposed convolutions of
# the reverse order, measured on this project's CPU machines (memory traffic of the patches).
PATCH_COST_WEIGHT = 6.0


def _patch_macs(rep: Patches, O: int) -> float:
    C, H, W = rep.P.shape[1:4]
    return float(O * C * H * W * rep.P[0, 0, 0, 0].numel())


def _reverse_macs(trace: list, O: int) -> float:
    total = 0.0
    for entry in trace:
        if isinstance(entry, torch.Tensor):
            continue
        layer, in_shape, out_shape = entry
        n_out = math.prod(out_shape)
        if isinstance(layer, nn.Conv2d):
            total += n_out * layer.weight[0].numel()
        elif isinstance(layer, nn.Linear):
            total += layer.weight.numel()
        else:
            total += n_out * (math.prod(_pair(layer.kernel_size)) if isinstance(layer, nn.AvgPool2d) else 1)
    return O * total


def _transpose_layer(layer: nn.Module, rows: torch.Tensor, in_shape: Tuple[int, ...]) -> torch.Tensor:
    """The transposed linear part of one layer: rows [N, *out_shape] -> [N, *in_shape]."""
    N = rows.shape[0]
    if isinstance(layer, nn.Linear):
        return rows @ layer.weight
    if isinstance(layer, nn.Conv2d):
        k, s, p, d = (_pair(v) for v in (layer.kernel_size, layer.stride, layer.padding, layer.dilation))
        extra = tuple(n_in - ((n_out - 1) * si - 2 * pi + di * (ki - 1) + 1)
                      for n_in, n_out, ki, si, pi, di in zip(in_shape[1:], rows.shape[-2:], k, s, p, d))
        return F.conv_transpose2d(rows, layer.weight, None, s, p, extra, layer.groups, d)
    if isinstance(layer, nn.AvgPool2d):
        return torch.ops.aten.avg_pool2d_backward(
            rows, rows.new_empty((N,) + tuple(in_shape)), _pair(layer.kernel_size),
            _pair(layer.stride if layer.stride is not None else layer.kernel_size), _pair(layer.padding),
            layer.ceil_mode, layer.count_include_pad, layer.divisor_override)
    if isinstance(layer, nn.Flatten):
        return rows.reshape((N,) + tuple(in_shape))
    return linear_part(layer, rows)  # BatchNorm, Normalize: diagonal, their own transpose


def _reverse_rows(W: torch.Tensor, trace: list, in_shape) -> Dense:
    """Rows of W applied after the traced layers, by walking them backwards (vector-Jacobian order)."""
    rows = W[None]
    for entry in reversed(trace):
        Bp, O = rows.shape[:2]
        if isinstance(entry, torch.Tensor):  # Σ of an activation: per sample
            rows = rows * entry[:, None]
            continue
        layer, layer_in, _ = entry
        flat = _transpose_layer(layer, rows.reshape((Bp * O,) + tuple(rows.shape[2:])), layer_in)
        rows = flat.reshape((Bp, O) + tuple(layer_in))
    return Dense(rows.reshape(rows.shape[0], rows.shape[1], -1), math.prod(in_shape))


def _kernel_to_dense(rep: KernelPatches, W: torch.Tensor) -> Dense:
    """Rows of W [O, C*H*W] applied to (masked) kernel rows: one transposed conv per (sample, row)."""
    C = rep.K.shape[0]
    H, Wd = rep.grid
    O = W.shape[0]
    T = W.reshape(1, O, C, H, Wd)
    if rep.mask is not None:
        T = T * rep.mask[:, None]
    Bp = T.shape[0]
    if rep.K.shape[-2:] == (1, 1) and rep.stride == (1, 1):  # per-pixel channel map (e.g. the raw input)
        canvas = torch.einsum("bochw,ci->boihw", T, rep.K[:, :, 0, 0]).reshape(Bp * O, -1, H, Wd)
        return _crop_canvas(canvas, rep.offset, rep.in_shape, Bp, O)
    canvas = F.conv_transpose2d(T.reshape(Bp * O, C, H, Wd), rep.K, stride=rep.stride)
    return _crop_canvas(canvas, rep.offset, rep.in_shape, Bp, O)


def _crop_canvas(canvas: torch.Tensor, offset, in_shape, Bp: int, O: int) -> Dense:
    """Input-space rows from a canvas whose (0, 0) is input pixel (-Ph, -Pw)."""
    Cin, Hin, Win = in_shape
    Ph, Pw = offset
    Hc, Wc = canvas.shape[-2:]
    canvas = F.pad(canvas, (0, max(0, Pw + Win - Wc), 0, max(0, Ph + Hin - Hc)))
    dense = canvas[:, :, Ph:Ph + Hin, Pw:Pw + Win]
    return Dense(dense.reshape(Bp, O, Cin * Hin * Win), Cin * Hin * Win)


def _patches_to_dense(rep: Patches, W: torch.Tensor) -> Dense:
    """Rows of the map W [O, C*H*W] applied to patch rows: per-position contraction, then fold."""
    P = rep.P
    Bp, C, H, Wd, Cin, Rh, Rw = P.shape
    L, E = H * Wd, Cin * Rh * Rw
    O = W.shape[0]
    Y = torch.einsum("ocl,bcle->boel", W.reshape(O, C, L), P.reshape(Bp, C, L, E))
    canvas = _overlap_add(Y.reshape(Bp * O, Cin, Rh, Rw, H, Wd), rep.stride)
    return _crop_canvas(canvas, rep.offset, rep.in_shape, Bp, O)


def _apply_layer(rep, layer: nn.Module, trace: list):
    if isinstance(layer, nn.Linear):
        return _linear(rep, layer, trace)
    if isinstance(layer, nn.Conv2d):
        return _conv(rep, layer)
    if isinstance(layer, nn.AvgPool2d):
        return _avgpool(rep, layer)
    if isinstance(layer, nn.Flatten):
        return _flatten(rep, layer)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if isinstance(layer, nn.BatchNorm1d) and not isinstance(rep, Dense):
            raise Unsupported("BatchNorm1d on feature maps")
        return _scale_units(rep, batchnorm_scale_shift(layer)[0])
    if isinstance(layer, Normalize):
        return _scale_units(rep, 1.0 / layer.std)
    raise Unsupported(type(layer).__name__)


def _apply_block(rep, block: AffineBlock, g: torch.Tensor, trace: list):
    """Rows and outputs of one block; appends (layer, input shape, output shape) to the trace."""
    for layer in block.layers:
        rep = _apply_layer(rep, layer, trace)
        out = layer(g)
        trace.append((layer, tuple(g.shape[1:]), tuple(out.shape[1:])))
        g = out
    return rep, g


def _mask(rep, mask: torch.Tensor):
    """Rows of Σ(l) V(l): every row times its unit's activation slope (per sample)."""
    B = mask.shape[0]
    if isinstance(rep, KernelPatches):
        if rep.mask is None:
            return replace(rep, mask=mask)
        rep = rep.materialize()
    if isinstance(rep, Patches):
        return replace(rep, P=rep.P * mask.reshape(B, *rep.P.shape[1:4], 1, 1, 1))
    if rep.mask is None and rep.V is not None and rep.V.shape[0] == 1:
        return replace(rep, mask=mask.reshape(B, -1))  # shared rows: keep Σ aside for the next product
    return Dense(rep.materialize().V * mask.reshape(B, -1, 1), rep.d)


def _to_dense(rep) -> Dense:
    if isinstance(rep, Dense):
        return rep.materialize()
    if isinstance(rep, KernelPatches):
        rep = rep.materialize()
    C, H, W = rep.P.shape[1:4]
    eye = torch.eye(C * H * W, dtype=rep.P.dtype, device=rep.P.device)
    return _patches_to_dense(replace(rep, flat=True), eye)


def _fast_geometry(chain: Chain, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor]
                   ) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """(boundary, decision) for every dual exponent in qs, and the logits; rows are built once."""
    from .ops import row_distances

    B = x.shape[0]
    rep = _identity(x)
    g = x
    trace: list = []  # layers and masks so far, for rows computed in reverse order
    boundary: List[List[torch.Tensor]] = [[] for _ in qs]
    for block, slope in chain.hidden:
        rep, f = _apply_block(rep, block, g, trace)
        dist = row_distances(f.reshape(B, -1), rep.rows(), qs)[0]
        for parts, d in zip(boundary, dist):
            parts.append(d)
        mask = activation_mask(f.detach(), slope)
        g = f * mask
        rep = _mask(rep, mask)
        trace.append(mask)
    rep, logits = _apply_block(rep, chain.logits_block, g, trace)
    logits = logits.reshape(B, -1)
    check_labels(labels, B, logits.shape[1], x.device)
    V = _to_dense(rep).V
    V = V.expand(B, -1, -1) if V.shape[0] == 1 else V
    c, margin, diff = decision_geometry(logits, V.transpose(1, 2), labels)
    diff = diff.transpose(1, 2)
    decisions = row_distances(margin, diff, qs, is_signed=True)[0]
    out = []
    for parts, decision in zip(boundary, decisions):
        decision = decision.scatter(1, c[:, None], math.inf)
        out.append((torch.cat(parts, dim=1) if parts else logits.new_zeros((B, 0)), decision))
    return out, logits


def compute_geometry(model: nn.Module, x: torch.Tensor, ps: Sequence, labels: Optional[torch.Tensor] = None
                     ) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Validated (boundary, decision) per norm in ps and the logits, native when possible."""
    chain = parse_model(model)
    qs = [dual_exponent(p) for p in ps]
    check_input(model, x)
    if native_or_warn():
        try:
            return _fast_geometry(chain, x, qs, labels)
        except Unsupported:
            pass
    return reference_geometry(chain, x, qs, labels)


def region_distances(model: nn.Module, x: torch.Tensor, p, labels: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """lp-distances of each sample to its region's hyperplanes (MATH.md §2).

    Args:
        model: ``nn.Sequential`` of supported layers (see README).
        x: float32/float64 batch [B, ...] on the model's device.
        p: norm, any float >= 1 or ``float('inf')``.
        labels: optional int64 [B] reference classes (default: the predicted classes).

    Returns:
        boundary [B, N]: distance to each hidden unit's hyperplane, units ordered by layer then by
        the layer's flattening order; +inf for units whose row of V is zero.
        decision [B, K]: signed distance to the hyperplane between the reference class c and each
        class s (negative when x is misclassified w.r.t. c), +inf at s = c.

    Differentiable w.r.t. x and the model's parameters. Uses the native kernels; falls back to
    :func:`region_distances_reference` (same results) for layouts the fast path does not cover
    or when the compiled extension is missing.
    """
    return compute_geometry(model, x, (p,), labels)[0][0]
