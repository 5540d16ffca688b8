"""Rows of convolutions on patch and kernel rows (docs/MATH.md §1, §13).

A conv applied to explicit patch rows extends each patch by its kernel (:func:`conv_patches`, no
multiplication by the zeros outside the receptive field); applied to the shared kernel rows of the
first conv it composes kernels (unmasked) or gives :class:`MaskedKernelRows` (masked), rows of the
second conv built on demand from one sample-independent GEMM factor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..native import row_distances
from .memory import ExplicitRows
from .representations import KernelPatches, Patches, Unsupported, window_inside


def overlap_add(Y: torch.Tensor, step: Tuple[int, int]) -> torch.Tensor:
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


def conv_patches(rep: Patches, weight: torch.Tensor, stride, padding, dilation, depthwise: bool,
                 ledger: ExplicitRows) -> Patches:
    """Rows of a conv (weight [O, C, kh, kw], or [C, kh, kw] when depthwise) applied to patch rows;
    the size of the explicit intermediate goes to ``ledger``."""
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
    ledger.record(Bp, Bp * (weight.shape[0] if not depthwise else C) * Ho * Wo * E * kh * kw)
    X = P.reshape(Bp, C, H, W, E).permute(0, 1, 4, 2, 3).reshape(Bp, C * E, H, W)
    U = F.unfold(X, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    U = U.reshape(Bp, C, E, kh, kw, Ho * Wo)
    if depthwise:
        Y = torch.einsum("cij,bceijl->bcleij", weight, U)
    else:
        Y = torch.einsum("ocij,bceijl->boleij", weight, U)
    O = Y.shape[1]
    # The kh x kw shifted copies of the old patches overlap-add into the new, larger patch.
    out = overlap_add(Y.reshape(Bp * O * Ho * Wo, Cin, Rh, Rw, kh, kw), (dh * Sh, dw * Sw))
    Rh2, Rw2 = out.shape[-2:]
    offset = (ph * Sh + rep.offset[0], pw * Sw + rep.offset[1])
    return Patches(out.reshape(Bp, O, Ho, Wo, Cin, Rh2, Rw2), (sh * Sh, sw * Sw), offset, rep.in_shape)


def full_weight(conv: nn.Conv2d) -> torch.Tensor:
    """Conv weight [O, C, kh, kw] with groups expanded block-diagonally (exact and simple)."""
    w, g = conv.weight, conv.groups
    if g == 1:
        return w
    O, Cg = w.shape[:2]
    Og = O // g
    return torch.cat([F.pad(w[k * Og:(k + 1) * Og], (0, 0, 0, 0, k * Cg, (g - 1 - k) * Cg)) for k in range(g)])


def conv_output_grid(grid, k, stride, padding, dilation):
    return tuple((n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, kk, s, p, d in zip(grid, k, stride, padding, dilation))


def conv_kernel(rep: KernelPatches, w, stride, padding, dilation):
    """Conv applied to kernel rows: unmasked and from the raw image, the kernels compose into a new
    shared kernel; masked, the rows are :class:`MaskedKernelRows`, built on demand."""
    k = tuple(w.shape[-2:])
    Sh, Sw = rep.stride
    grid = conv_output_grid(rep.grid, k, stride, padding, dilation)
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

    def placed_weights(self, w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
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
        G = self.placed_weights(w, K)
        O, Z, E = G.shape
        L = self.m.shape[2]
        R = self.window()
        inside = self.inside(G)
        Cin = K.shape[1]
        if units is None:
            rows = self.position_major_rows(samples, G, inside)  # [n, L, O, E]
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

    def inside(self, G: torch.Tensor) -> torch.Tensor:
        """[L, 1, Rh*Rw]: which entries of each position's window lie inside the image."""
        R = self.window()
        return window_inside(self.grid, R, self.stride, self.offset, self.in_shape, G).reshape(-1, 1, R[0] * R[1])

    def position_major_rows(self, samples: Optional[torch.Tensor], G: torch.Tensor, inside: torch.Tensor
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
        G = self.placed_weights(*tensors)
        rows = self.position_major_rows(samples, G, self.inside(G))
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
