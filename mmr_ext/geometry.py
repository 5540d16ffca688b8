"""Fast linear-region geometry (docs/MATH.md §1-2): compact V(l) representations and native distances.

Rows of V(l) are kept in the cheapest exact form and never densified needlessly:
- ``Dense``   V [Bp, n, d]: rows over the whole input (after fully connected layers). The first
  layer's rows are sample-independent (Bp = 1), so their norms come from the weights.
- ``Patches`` P [Bp, C, H, W, Cin, Rh, Rw]: a conv unit's row lives on its receptive field, an
  Rh x Rw window of the input starting at (y*Sh - Ph, x*Sw - Pw); entries outside the image are 0.
  Conv layers extend patches (no multiplication by the zeros outside the receptive field), a
  Linear layer after Flatten contracts each position's patches and overlap-adds them (fold).

All products are ordinary differentiable torch ops, so gradients w.r.t. the parameters follow;
the dual norms, distances and their gradients come from the native kernel (``torch.ops.mmr_ext.row_distances``).
Layers or layouts outside this scheme make :func:`region_distances` use the reference.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .nn.chain import AffineBlock, Chain, activation_mask, batchnorm_scale_shift, parse_model
from .checks import check_chunk_size, check_input, check_labels
from .math.norms import dual_exponent
from .nn.layers import Normalize
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
    mask: Optional[torch.Tensor] = None  # [B, C, H, W] per-unit scales not yet multiplied into P

    def settled(self) -> "Patches":
        """The same rows with the pending mask multiplied in (only when a layer reads them)."""
        if self.mask is None:
            return self
        B = self.mask.shape[0]
        return replace(self, P=self.P * self.mask.reshape(B, *self.P.shape[1:4], 1, 1, 1), mask=None)

    def rows(self) -> torch.Tensor:
        P = self.settled().P
        Bp, C, H, W = P.shape[:4]
        return P.reshape(Bp, C * H * W, -1)


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


@dataclass
class ReverseRows:
    """Rows of a Linear layer after the traced layers, kept as (weights, trace) and built on demand
    by walking the layers backwards (vector-Jacobian order): all units of some samples, or chosen
    (sample, unit) pairs. Distances to them never store them (:func:`mmr_ext.native.lazy_row_distances`);
    a layer that needs them explicitly forces them once (``cache`` is shared by copies)."""

    weight: torch.Tensor  # [O, n] of the Linear layer
    trace: list  # the layers (layer, in_shape, out_shape) and masks before it
    weights: list  # per trace entry, the tensor its transpose uses (None: masks, pooling, flatten)
    in_shape: Tuple[int, ...]
    mask: Optional[torch.Tensor] = None  # [B, O] Σ of the following activation, not yet applied
    cache: dict = field(default_factory=dict)

    @staticmethod
    def of(layer: nn.Linear, trace: list, in_shape) -> "ReverseRows":
        weights = [None if isinstance(e, torch.Tensor) else _transpose_weight(e[0]) for e in trace]
        return ReverseRows(layer.weight, list(trace), weights, tuple(in_shape))

    def tensors(self) -> List[torch.Tensor]:
        """The tensors the rows depend on, in the order :meth:`rows_of` takes them."""
        return [self.weight] + [w for w in self.weights if w is not None]

    def _unpack(self, tensors: Optional[Sequence[torch.Tensor]]):
        if tensors is None:
            return self.weight, self.weights
        rest = iter(tensors[1:])
        return tensors[0], [None if w is None else next(rest) for w in self.weights]

    def rows_of(self, samples: Optional[torch.Tensor], units: Optional[torch.Tensor],
                tensors: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """All rows [len(samples) or 1, O, d] (samples None: the whole batch), or with ``units``
        the rows [S, d] of the pairs (samples[i], units[i]); ``tensors`` replace :meth:`tensors`."""
        W, weights = self._unpack(tensors)
        out = _reverse(W[None] if units is None else W[units][:, None], self.trace, weights, samples)
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return out if units is None else out[:, 0]

    def distances_of(self, samples: torch.Tensor, f: torch.Tensor, qs: Sequence[float],
                     tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Distances [Q, len(samples), O] to all rows of ``samples`` (f: their pre-activations), no
        autograd. When the walk ends with a conv on the input, that step runs fused with the dual
        norms and the conv's activation mask (:func:`mmr_ext.native.conv_transpose_row_distances`): the masked
        maps and the input-space rows are never stored."""
        from .native import conv_transpose_row_distances, row_distances

        W, weights = self._unpack(tensors)
        fused = _fusable_first_conv(self.trace, weights)
        if fused is None:
            return row_distances(f, self.rows_of(samples, None, tensors), qs)[0]
        at, weight = fused
        rest = at + 1
        mask = None
        if rest < len(self.trace) and isinstance(self.trace[rest], torch.Tensor):  # the conv's activation:
            mask, rest = self.trace[rest][samples], rest + 1  # applied inside the fused step
        maps = _reverse(W[None], self.trace[rest:], weights[rest:], samples)
        maps = maps.expand((f.shape[0],) + tuple(maps.shape[1:]))
        conv, conv_in, _ = self.trace[at]
        return conv_transpose_row_distances(f, maps, mask, weight, _pair(conv.stride), _pair(conv.padding),
                                            _pair(conv.dilation), conv_in, qs)

    def elements_per_sample(self) -> int:
        """Elements of the largest intermediate per sample when building all rows."""
        widest = max([math.prod(e[1]) for e in self.trace if not isinstance(e, torch.Tensor)] + [self.weight.shape[1]])
        return self.weight.shape[0] * widest

    def forced_rows(self) -> Optional[torch.Tensor]:
        return self.cache["dense"].V if "dense" in self.cache else None

    def force(self) -> Dense:
        """The rows as an explicit, differentiable Dense representation."""
        if "dense" not in self.cache:
            V = self.rows_of(None, None)
            self.cache["dense"] = Dense(V, V.shape[-1])
        return replace(self.cache["dense"], mask=self.mask)


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
        rep = rep.settled()
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
    rep = rep.settled()
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
    _spend(Bp, Bp * (weight.shape[0] if not depthwise else C) * Ho * Wo * E * kh * kw)
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
    shared kernel; masked, the rows are :class:`MaskedKernelRows`, built on demand."""
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
    m = F.unfold(rep.mask, k, dilation=dilation, padding=padding, stride=stride)  # [B, C*taps, L]
    return MaskedKernelRows(w, rep.K, m, k, step, grid, new_stride, offset, rep.in_shape)


@dataclass
class MaskedKernelRows:
    """Rows of a conv applied to masked kernel rows (the second conv of a network).

    Row (b, o, l) = Σ over taps z = (c, i, j) of m[b, z, l] G[o, z], where
    G[o, (c, i, j)] = w[o, c, i, j] (K[c] placed at (i, j) * step) is sample-independent: all rows
    of some samples are one GEMM [n*L, C*taps] @ [C*taps, O*E] with the unfolded masks m as the
    left factor; chosen (sample, unit) pairs are one small GEMM per output channel. Built on
    demand like :class:`ReverseRows`; ``force`` gives the explicit :class:`Patches`."""

    w: torch.Tensor  # [O, C, kh, kw]
    K: torch.Tensor  # [C, Cin, Rh, Rw] kernel rows of the previous layer
    m: torch.Tensor  # [B, C*taps, L] unfolded masks of the previous layer
    kernel: Tuple[int, int]
    step: Tuple[int, int]
    grid: Tuple[int, int]
    stride: Tuple[int, int]
    offset: Tuple[int, int]
    in_shape: Tuple[int, int, int]
    flat: bool = False
    mask: Optional[torch.Tensor] = None  # Σ of the following activation, not yet applied
    cache: dict = field(default_factory=dict)

    def window(self) -> Tuple[int, int]:
        return tuple((kk - 1) * st + r for kk, st, r in zip(self.kernel, self.step, self.K.shape[-2:]))

    def patch_shape(self) -> Tuple[int, ...]:
        return (self.m.shape[0], self.w.shape[0], *self.grid, self.K.shape[1], *self.window())

    def tensors(self) -> List[torch.Tensor]:
        return [self.w, self.K]

    def _G(self, w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """[O, C*taps, E]: every tap's weight times the previous kernel placed at the tap."""
        O, C = w.shape[:2]
        taps = self.kernel[0] * self.kernel[1]
        onehot = torch.eye(taps, dtype=w.dtype, device=w.device).reshape(taps, 1, *self.kernel)
        placed = F.conv_transpose2d(onehot.expand(taps, C, *self.kernel), K, stride=self.step, groups=C)
        placed = placed.reshape(taps, C, -1).transpose(0, 1)  # [C, taps, E]
        return (w.reshape(O, C, taps, 1) * placed[None]).reshape(O, C * taps, -1)

    def rows_of(self, samples: Optional[torch.Tensor], units: Optional[torch.Tensor],
                tensors: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """All rows [n, O*L, E] of ``samples`` (None: all), or the rows [S, E] of the pairs."""
        w, K = self.tensors() if tensors is None else tensors
        G = self._G(w, K)
        O, Z, E = G.shape
        L = self.m.shape[2]
        R = self.window()
        inside = self._inside(G)
        Cin = K.shape[1]
        if units is None:
            rows = self._position_major_rows(samples, G, inside)  # [n, L, O, E]
            return rows.transpose(1, 2).reshape(rows.shape[0], O * L, E)
        # pairs sorted by output channel: one GEMM per channel on a contiguous slice, then unsorted
        order = torch.argsort(units // L, stable=True)
        samples, units = samples[order], units[order]
        o, l = units // L, units % L
        mv = self.m[samples, :, l]  # [S, Z]
        counts = torch.bincount(o, minlength=O).tolist()
        out = torch.cat([part @ G[c] for c, part in enumerate(mv.split(counts)) if counts[c]])
        out = (out.reshape(-1, Cin, R[0] * R[1]) * inside[l]).reshape(-1, E)
        return out[torch.argsort(order)]

    def _inside(self, G: torch.Tensor) -> torch.Tensor:
        """[L, 1, Rh*Rw]: which entries of each position's window lie inside the image."""
        R = self.window()
        return _window_inside(self.grid, R, self.stride, self.offset, self.in_shape, G).reshape(-1, 1, R[0] * R[1])

    def _position_major_rows(self, samples: Optional[torch.Tensor], G: torch.Tensor, inside: torch.Tensor
                             ) -> torch.Tensor:
        """All rows of ``samples`` as [n, L, O, E], the layout of the one GEMM that builds them."""
        m = self.m if samples is None else self.m[samples]
        n, Z, L = m.shape
        O, _, E = G.shape
        rows = torch.matmul(m.transpose(1, 2).reshape(n * L, Z), G.permute(1, 0, 2).reshape(Z, O * E))
        return (rows.reshape(n, L, O, -1, inside.shape[-1]) * inside[None, :, None]).reshape(n, L, O, E)

    def distances_of(self, samples: torch.Tensor, f: torch.Tensor, qs: Sequence[float],
                     tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Distances [Q, len(samples), O*L] to all rows of ``samples`` (f: their pre-activations),
        computed on the GEMM's position-major layout (no transposing copy of the rows)."""
        from .native import row_distances

        G = self._G(*tensors)
        rows = self._position_major_rows(samples, G, self._inside(G))
        n, L, O, E = rows.shape
        f_pm = f.reshape(n, O, L).transpose(1, 2).reshape(n * L, O)
        dist = row_distances(f_pm, rows.reshape(n * L, O, E), qs)[0]  # [Q, n*L, O]
        return dist.reshape(-1, n, L, O).transpose(2, 3).reshape(-1, n, O * L)

    def elements_per_sample(self) -> int:
        """Elements of the largest intermediate per sample when building all rows."""
        return math.prod(self.patch_shape()[1:])

    def forced_rows(self) -> Optional[torch.Tensor]:
        return self.cache["patches"].rows() if "patches" in self.cache else None

    def force(self) -> "Patches":
        """The rows as explicit, differentiable :class:`Patches`."""
        if "patches" not in self.cache:
            B, O, H, W, Cin, Rh, Rw = self.patch_shape()
            P = self.rows_of(None, None).reshape(B, O, H, W, Cin, Rh, Rw)
            self.cache["patches"] = Patches(P, self.stride, self.offset, self.in_shape)
        return replace(self.cache["patches"], flat=self.flat, mask=self.mask)


#: Representations whose rows are built on demand (see :func:`mmr_ext.native.lazy_row_distances`).
ON_DEMAND = (ReverseRows, MaskedKernelRows)


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
    rep = rep.settled()
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
    if isinstance(rep, (Dense, ReverseRows)):
        return rep
    if layer.start_dim != 1 or layer.end_dim != -1:
        raise Unsupported("partial Flatten")
    return replace(rep, flat=True)


def _linear(rep, layer: nn.Linear, trace: list):
    W = layer.weight
    if isinstance(rep, ReverseRows):  # stay in reverse order: the rows of W need no rows of rep
        return ReverseRows.of(layer, trace, rep.in_shape)
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
        return _patches_to_dense(rep.force() if isinstance(rep, MaskedKernelRows) else rep, W)
    return ReverseRows.of(layer, trace, rep.in_shape)


# Per-MAC cost of the patch contraction + overlap-add relative to the transposed convolutions of
# the reverse order, measured on this project's CPU machines (memory traffic of the patches).
PATCH_COST_WEIGHT = 6.0


def _patch_macs(rep, O: int) -> float:
    shape = rep.patch_shape() if isinstance(rep, MaskedKernelRows) else rep.P.shape
    return float(O * math.prod(shape[1:]))


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


#: Transposed convolutions onto at most this many channels run as GEMM + fold (measured 2.7x faster
#: than torch's transposed convolution for 1 channel, slower for 16, on this project's CPUs).
FOLD_MAX_CHANNELS = 3


def _transpose_weight(layer: nn.Module) -> Optional[torch.Tensor]:
    """The tensor the transposed linear part of a layer uses (None for pooling and flattening)."""
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return layer.weight
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return batchnorm_scale_shift(layer)[0]
    if isinstance(layer, Normalize):
        return 1.0 / layer.std
    return None


def _transpose_layer(layer: nn.Module, rows: torch.Tensor, in_shape: Tuple[int, ...],
                     weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The transposed linear part of one layer: rows [N, *out_shape] -> [N, *in_shape]; ``weight``
    is :func:`_transpose_weight` of the layer."""
    N = rows.shape[0]
    if isinstance(layer, nn.Linear):
        return rows @ weight
    if isinstance(layer, nn.Conv2d):
        k, s, p, d = (_pair(v) for v in (layer.kernel_size, layer.stride, layer.padding, layer.dilation))
        if layer.groups == 1 and layer.in_channels <= FOLD_MAX_CHANNELS:
            # few input channels: one GEMM and a col2im (fold) beat the generic transposed conv
            Wt = weight.reshape(weight.shape[0], -1).t()
            cols = torch.bmm(Wt.expand(N, -1, -1), rows.reshape(N, rows.shape[1], -1))  # no transposing copies
            return F.fold(cols, tuple(in_shape[1:]), k, dilation=d, padding=p, stride=s)
        extra = tuple(n_in - ((n_out - 1) * si - 2 * pi + di * (ki - 1) + 1)
                      for n_in, n_out, ki, si, pi, di in zip(in_shape[1:], rows.shape[-2:], k, s, p, d))
        # oneDNN's transposed convolution is about twice as fast on channels-last rows (measured)
        rows = rows.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(rows, weight, None, s, p, extra, layer.groups, d)
    if isinstance(layer, nn.AvgPool2d):
        return torch.ops.aten.avg_pool2d_backward(
            rows, rows.new_empty((N,) + tuple(in_shape)), _pair(layer.kernel_size),
            _pair(layer.stride if layer.stride is not None else layer.kernel_size), _pair(layer.padding),
            layer.ceil_mode, layer.count_include_pad, layer.divisor_override)
    if isinstance(layer, nn.Flatten):  # feature maps channels-last, the layout of the fast transposed conv
        out = rows.reshape((N,) + tuple(in_shape))
        return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out
    # BatchNorm, Normalize: a per-channel (or scalar) scale, its own transpose
    scale = weight.reshape(()) if weight.numel() == 1 else weight.reshape((1, -1) + (1,) * (rows.dim() - 2))
    return rows * scale


def _reverse(rows: torch.Tensor, trace: list, weights: list, samples: Optional[torch.Tensor]) -> torch.Tensor:
    """rows [N, O, *out] of the map after the traced layers, walked back to the traced layers'
    input: [N', O, *in].

    ``weights``: per trace entry, :func:`_transpose_weight` of its layer. Masks are taken at
    ``samples`` (one per row group; None: the whole batch, broadcasting N = 1).
    """
    for entry, weight in zip(reversed(trace), reversed(weights)):
        Bp, O = rows.shape[:2]
        if isinstance(entry, torch.Tensor):  # Σ of an activation: per sample
            # feature-map masks are stored channels-last (see _fast_geometry): the layout of the rows
            rows = rows * (entry if samples is None else entry[samples])[:, None]
            continue
        layer, layer_in, _ = entry
        flat = _transpose_layer(layer, rows.reshape((Bp * O,) + tuple(rows.shape[2:])), layer_in, weight)
        rows = flat.reshape((Bp, O) + tuple(layer_in))
    return rows


def _fusable_first_conv(trace: list, weights: list) -> Optional[Tuple[int, torch.Tensor]]:
    """(index, weight) of the trace's first layer when it is a conv that the fused native step
    handles, after any per-channel input scalings (Normalize, BatchNorm2d), whose scales are folded
    into the returned conv weight; None otherwise."""
    from .native import conv_transpose_fits

    scale = None
    for at, (entry, weight) in enumerate(zip(trace, weights)):
        if isinstance(entry, torch.Tensor):
            return None
        layer, layer_in, _ = entry
        if isinstance(layer, (Normalize, nn.BatchNorm2d)):
            scale = weight.reshape(-1) if scale is None else scale * weight.reshape(-1)
            continue
        if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
            return None
        if scale is not None:
            weight = weight * scale.reshape(1, -1, 1, 1)
        return (at, weight) if conv_transpose_fits(weight, layer_in) else None
    return None


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
    rep = rep.settled()
    P = rep.P
    Bp, C, H, Wd, Cin, Rh, Rw = P.shape
    L, E = H * Wd, Cin * Rh * Rw
    O = W.shape[0]
    _spend(Bp, Bp * O * E * L)
    Y = torch.einsum("ocl,bcle->boel", W.reshape(O, C, L), P.reshape(Bp, C, L, E))
    canvas = _overlap_add(Y.reshape(Bp * O, Cin, Rh, Rw, H, Wd), rep.stride)
    return _crop_canvas(canvas, rep.offset, rep.in_shape, Bp, O)


def _apply_layer(rep, layer: nn.Module, trace: list):
    if isinstance(rep, ON_DEMAND) and not isinstance(layer, (nn.Linear, nn.Flatten)):
        rep = rep.force()
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
    if isinstance(rep, ON_DEMAND):
        return replace(rep, mask=mask.reshape(B, -1) if isinstance(rep, ReverseRows) else mask)
    if isinstance(rep, KernelPatches):
        if rep.mask is None:
            return replace(rep, mask=mask)
        rep = rep.materialize()
    if isinstance(rep, Patches):  # kept aside: a next Linear in reverse order never reads the rows
        return replace(rep.settled(), mask=mask.reshape(B, *rep.P.shape[1:4]))
    if rep.V is not None:  # keep Σ aside: the next product scales its weight's columns instead
        return replace(rep, mask=mask.reshape(B, -1) if rep.mask is None else rep.mask * mask.reshape(B, -1))
    return Dense(rep.materialize().V * mask.reshape(B, -1, 1), rep.d)


def _to_dense(rep) -> Dense:
    if isinstance(rep, ON_DEMAND):
        rep = rep.force()
    if isinstance(rep, Dense):
        return rep.materialize()
    if isinstance(rep, KernelPatches):
        rep = rep.materialize()
    C, H, W = rep.P.shape[1:4]
    eye = torch.eye(C * H * W, dtype=rep.P.dtype, device=rep.P.device)
    return _patches_to_dense(replace(rep, flat=True), eye)


#: Default bound on the elements of the largest intermediate of rows built on demand (and of
#: explicit patch rows of a whole batch): 64 MiB in float64, 32 MiB in float32. Smaller chunks
#: were also faster on this project's CPUs (MNIST CNN loss, batch 128: 2^23 elements 0.98 s,
#: 2^25 1.23 s; cache effects).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def _chunk(rep, chunk_size: Optional[int], batch: int) -> int:
    """Samples per pass over rows built on demand: chunk_size, else from DEFAULT_CHUNK_ELEMENTS."""
    if chunk_size is not None:
        return chunk_size
    return max(1, min(batch, DEFAULT_CHUNK_ELEMENTS // rep.elements_per_sample()))


def _fast_geometry(chain: Chain, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor],
                   chunk_size: Optional[int] = None
                   ) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """(boundary, decision) for every dual exponent in qs, and the logits; rows are built once."""
    from .native import lazy_row_distances, row_distances

    B = x.shape[0]
    rep = _identity(x)
    g = x
    trace: list = []  # layers and masks so far, for rows computed in reverse order
    layers: list = []  # per hidden layer: its distances [Q, B, n], or (f, on-demand rows) until the end
    for block, slope in chain.hidden:
        rep, f = _apply_block(rep, block, g, trace)
        f_flat = f.reshape(B, -1)
        # Rows built on demand wait until it is known whether a later layer forces them.
        layers.append((f_flat, rep) if isinstance(rep, ON_DEMAND) else row_distances(f_flat, rep.rows(), qs)[0])
        mask = activation_mask(f.detach(), slope)
        g = f * mask
        rep = _mask(rep, mask)
        # channels-last like the feature-map rows of the reverse walk: gathers keep the layout
        trace.append(mask.contiguous(memory_format=torch.channels_last) if mask.dim() == 4 else mask)
    rep, logits = _apply_block(rep, chain.logits_block, g, trace)
    logits = logits.reshape(B, -1)
    check_labels(labels, B, logits.shape[1], x.device)
    V = _to_dense(rep).V
    V = V.expand(B, -1, -1) if V.shape[0] == 1 else V
    c, margin, diff = decision_geometry(logits, V.transpose(1, 2), labels)
    diff = diff.transpose(1, 2)
    decisions = row_distances(margin, diff, qs, is_signed=True)[0]
    boundary = []
    for entry in layers:
        if isinstance(entry, tuple):
            f_flat, lazy = entry
            forced = lazy.forced_rows()
            if forced is not None:  # a later layer needed the rows explicitly
                entry = row_distances(f_flat, forced, qs)[0]
            else:
                entry = lazy_row_distances(f_flat, lazy.rows_of, lazy.distances_of, lazy.tensors(), qs,
                                           _chunk(lazy, chunk_size, B))
        boundary.append(entry)
    out = []
    for i, decision in enumerate(decisions):
        decision = decision.scatter(1, c[:, None], math.inf)
        out.append((torch.cat([d[i] for d in boundary], dim=1) if boundary else logits.new_zeros((B, 0)), decision))
    return out, logits


class _OverBudget(Exception):
    """An explicit per-sample intermediate of the whole batch exceeds the memory budget."""

    def __init__(self, per_sample: int):
        super().__init__(per_sample)
        self.per_sample = per_sample


_budget = threading.local()  # .chunk_size: the budget of the current whole-batch pass (unset: none)


def _spend(Bp: int, elements: int) -> None:
    """Raises :class:`_OverBudget` when an explicit per-sample intermediate of ``elements``
    elements (Bp samples) breaks the budget of the current whole-batch pass: more than
    ``chunk_size`` samples, or (chunk_size None) more than DEFAULT_CHUNK_ELEMENTS elements."""
    if not hasattr(_budget, "chunk_size") or Bp <= 1:
        return
    if (Bp > _budget.chunk_size) if _budget.chunk_size is not None else elements > DEFAULT_CHUNK_ELEMENTS:
        raise _OverBudget(max(1, elements // Bp))


@torch.compiler.disable  # torch.compile cannot trace deleting a thread-local attribute (a graph break here)
def _end_budget() -> None:
    del _budget.chunk_size


def _budgeted_geometry(chain: Chain, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor],
                       chunk_size: Optional[int]):
    """:func:`_fast_geometry` of the whole batch, or, when explicit rows (deep conv patches) break
    the memory budget, of chunks of samples, each checkpointed under autograd (its rows are
    rebuilt in the backward), so that one chunk's rows are alive at a time."""
    _budget.chunk_size = chunk_size
    try:
        return _fast_geometry(chain, x, qs, labels, chunk_size)
    except _OverBudget as over:
        n = chunk_size if chunk_size is not None else max(1, DEFAULT_CHUNK_ELEMENTS // over.per_sample)
    finally:
        _end_budget()
    parts = []
    for start in range(0, x.shape[0], n):
        args = (chain, x[start:start + n], qs, None if labels is None else labels[start:start + n], chunk_size)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_fast_geometry, *args, use_reentrant=False))
        else:
            parts.append(_fast_geometry(*args))
    per_norm = [(torch.cat([part[0][i][0] for part in parts]), torch.cat([part[0][i][1] for part in parts]))
                for i in range(len(qs))]
    return per_norm, torch.cat([part[1] for part in parts])


def compute_geometry(model: nn.Module, x: torch.Tensor, ps: Sequence, labels: Optional[torch.Tensor] = None,
                     chunk_size: Optional[int] = None
                     ) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Validated (boundary, decision) per norm in ps and the logits, native when possible."""
    chain = parse_model(model)
    qs = [dual_exponent(p) for p in ps]
    check_chunk_size(chunk_size)
    check_input(model, x)
    if native_or_warn():
        try:
            return _budgeted_geometry(chain, x, qs, labels, chunk_size)
        except Unsupported:
            pass
    return reference_geometry(chain, x, qs, labels)


def region_distances(model: nn.Module, x: torch.Tensor, p, labels: Optional[torch.Tensor] = None, *,
                     chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """lp-distances of each sample to its region's hyperplanes (docs/MATH.md §2).

    Args:
        model: ``nn.Sequential`` of supported layers (see README).
        x: float32/float64 batch [B, ...] on the model's device.
        p: norm, any float >= 1 or ``float('inf')``.
        labels: optional int64 [B] reference classes (default: the predicted classes).
        chunk_size: memory budget, in samples: rows that are built on demand (the second conv
            layer, fully connected layers after convolutions) are built for at most this many
            samples at a time and never stored; the backward rebuilds only the rows it needs.
            Explicit rows of deeper convolutions (patches) are built for at most this many
            samples at a time too, each chunk checkpointed (rebuilt in the backward). Default: as
            many samples as keep the largest such intermediate under ``DEFAULT_CHUNK_ELEMENTS``
            elements. Only speed and memory depend on it.

    Returns:
        boundary [B, N]: distance to each hidden unit's hyperplane, units ordered by layer then by
        the layer's flattening order; +inf for units whose row of V is zero.
        decision [B, K]: signed distance to the hyperplane between the reference class c and each
        class s (negative when x is misclassified w.r.t. c), +inf at s = c.

    Differentiable w.r.t. x and the model's parameters. Uses the native kernels; falls back to
    :func:`region_distances_reference` (same results) for layouts the fast path does not cover
    or when the compiled extension is missing.
    """
    return compute_geometry(model, x, (p,), labels, chunk_size)[0][0]
