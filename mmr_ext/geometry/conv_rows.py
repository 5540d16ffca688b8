"""Rows of convolutions on patch and kernel rows (docs/MATH.md §1, §13).

A conv applied to explicit patch rows, or to the masked shared kernel rows of the first conv, builds
each unit's row on its receptive field from the previous units' rows (:func:`conv_rows`, native: no
multiplication by the zeros outside the receptive fields, nothing for units with a zero slope);
applied to the raw input's kernel rows it composes the kernels (:func:`conv_kernel`). The window
sums of average pooling extend patches with :func:`pool_patches`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..native import conv_patch_rows, is_recomputing
from .memory import ExplicitRows
from .representations import KernelPatches, Patches, Unsupported, take_samples, window_inside


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


def pool_patches(rep: Patches, kernel: Tuple[int, int], stride, padding, ledger: ExplicitRows) -> Patches:
    """Rows of the window sums of a pooling layer (every channel on its own) applied to patch rows:
    the kh x kw shifted copies of each channel's patches overlap-add into the new, larger patch;
    the size of the explicit intermediate goes to ``ledger``."""
    ledger.keep(rep)
    rep = rep.settled()
    P = rep.P
    Bp, C, H, W, Cin, Rh, Rw = P.shape
    kh, kw = kernel
    Ho, Wo = conv_output_grid((H, W), kernel, stride, padding, (1, 1))
    if Ho <= 0 or Wo <= 0:
        raise Unsupported("empty pooling output")
    E = Cin * Rh * Rw
    ledger.record(Bp, Bp * C * Ho * Wo * E * kh * kw)
    X = P.reshape(Bp, C, H, W, E).permute(0, 1, 4, 2, 3).reshape(Bp, C * E, H, W)
    U = F.unfold(X, kernel, padding=padding, stride=stride).reshape(Bp, C, E, kh, kw, Ho * Wo)
    Y = U.permute(0, 1, 5, 2, 3, 4)  # [Bp, C, L, E, kh, kw]
    out = overlap_add(Y.reshape(Bp * C * Ho * Wo, Cin, Rh, Rw, kh, kw), rep.stride)
    Rh2, Rw2 = out.shape[-2:]
    return Patches(out.reshape(Bp, C, Ho, Wo, Cin, Rh2, Rw2), *windows_after(rep, stride, padding), rep.in_shape)


def windows_after(rep, stride, padding) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(cumulative stride, offset) in the input of the windows of a layer with this stride and
    padding applied to rows on windows (docs/MATH.md §1.4: S_l = s_l S_{l-1}, P_l = p_l S_{l-1} + P_{l-1})."""
    return ((stride[0] * rep.stride[0], stride[1] * rep.stride[1]),
            (padding[0] * rep.stride[0] + rep.offset[0], padding[1] * rep.stride[1] + rep.offset[1]))


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


def conv_kernel(rep: KernelPatches, w, stride, padding, dilation) -> KernelPatches:
    """Conv applied to the raw input's kernel rows (a per-pixel channel map, no grid padding to
    respect): the kernels compose into a new shared kernel."""
    k = tuple(w.shape[-2:])
    Sh, Sw = rep.stride
    grid = conv_output_grid(rep.grid, k, stride, padding, dilation)
    if min(grid) <= 0:
        raise Unsupported("empty conv output")
    K = F.conv_transpose2d(w, rep.K, stride=(dilation[0] * Sh, dilation[1] * Sw))
    return KernelPatches(K, grid, *windows_after(rep, stride, padding), rep.in_shape, None, False)


def conv_rows(rep, w: torch.Tensor, stride, padding, dilation, ledger: ExplicitRows, transient: bool = False) -> Patches:
    """Rows of a conv (weight [O, C, kh, kw]) applied to patch or masked kernel rows, built on their
    receptive fields by the native :func:`mmr_ext.native.conv_patch_rows` (the pending mask of
    ``rep`` included); the size of the result goes to ``ledger``. On kernel rows the result carries
    a :class:`KernelConvRows` recipe: until a layer differentiates through the rows, they are
    transient (the backward rebuilds what it needs from the recipe). ``transient``: the pass's plan
    says no layer will keep them: they are built without autograd, and left uninitialised in a
    checkpoint's recomputation, which reads no values of transient rows."""
    if isinstance(rep, KernelPatches):
        recipe = KernelConvRows(rep, w, tuple(stride), tuple(padding), tuple(dilation))
        if transient:
            with torch.no_grad():
                P = recipe.empty() if is_recomputing() else recipe.rows(None, recipe.tensors())
        else:
            P = recipe.rows(None, recipe.tensors())
        ledger.record(P.shape[0], P.numel(), kept=False)
        return Patches(P, *windows_after(rep, stride, padding), rep.in_shape, recipe=recipe)
    ledger.keep(rep)
    P = patch_conv(rep.P, rep.mask, w, stride, padding, dilation, rep)
    ledger.record(P.shape[0], P.numel())
    return Patches(P, *windows_after(rep, stride, padding), rep.in_shape)


def patch_conv(prev: torch.Tensor, mask, w: torch.Tensor, stride, padding, dilation, rep) -> torch.Tensor:
    grid = conv_output_grid(prev.shape[2:4], tuple(w.shape[-2:]), stride, padding, dilation)
    if min(grid) <= 0:
        raise Unsupported("empty conv output")
    return conv_patch_rows(prev, mask, w, stride, padding, dilation, rep.stride, rep.offset, rep.in_shape)


@dataclass
class KernelConvRows:
    """Rows of a conv (weight [O, C, kh, kw]) applied to masked kernel rows (the second conv of a
    network), rebuilt with autograd from the weight and the kernels: all rows of some samples by the
    native op, or chosen (sample, unit) pairs directly, each from its in-grid taps: the conv's
    weights of the unit times the taps' slopes, times the taps' kernels placed in the unit's window
    (C*kh*kw*(1 + E) multiply-adds per pair, E = the window's entries; docs/MATH.md §13.2)."""

    prev: KernelPatches
    weight: torch.Tensor
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]

    def tensors(self) -> List[torch.Tensor]:
        return [self.weight, self.prev.K]

    def rows(self, samples: Optional[torch.Tensor], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """All rows [n, O, H, W, Cin, Rh, Rw] of ``samples`` (None: the whole batch)."""
        w, K = tensors
        prev = K[None, :, None, None].expand(1, -1, *self.prev.grid, -1, -1, -1)  # stride 0 over the grid
        mask = self.prev.mask
        if mask is not None and samples is not None:
            mask = take_samples(mask, samples)
        return patch_conv(prev, mask, w, self.stride, self.padding, self.dilation, self.prev)

    def grid(self) -> Tuple[int, int]:
        """The conv's output grid."""
        return conv_output_grid(self.prev.grid, tuple(self.weight.shape[-2:]), self.stride, self.padding, self.dilation)

    def empty_shape(self) -> Tuple[int, ...]:
        """The shape of :meth:`rows` of the whole batch."""
        n = 1 if self.prev.mask is None else self.prev.mask.shape[0]
        return (n, self.weight.shape[0]) + tuple(self.grid()) + (self.prev.K.shape[1],) + self.window()

    def empty(self) -> torch.Tensor:
        """An uninitialised tensor of the shape of :meth:`rows` of the whole batch."""
        return self.prev.K.new_empty(self.empty_shape())

    def pair_elements(self) -> int:
        """Elements of the intermediates of one pair's rebuild."""
        C, Cin = self.prev.K.shape[:2]
        kh, kw = self.weight.shape[-2:]
        Rh, Rw = self.window()
        return C * kh * kw + Cin * Rh * Rw

    def window(self) -> Tuple[int, int]:
        kh, kw = self.weight.shape[-2:]
        Rh, Rw = self.prev.K.shape[-2:]
        return ((kh - 1) * self.dilation[0] * self.prev.stride[0] + Rh,
                (kw - 1) * self.dilation[1] * self.prev.stride[1] + Rw)

    def pair_rows(self, samples: torch.Tensor, units: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The rows [S, Cin*Rh*Rw] (on the units' windows) of the pairs (samples[i], units[i])."""
        w, K = tensors
        C, Cin, Rh, Rw = K.shape
        O, _, kh, kw = w.shape
        R2h, R2w = self.window()
        sy, sx = (self.dilation[0] * self.prev.stride[0], self.dilation[1] * self.prev.stride[1])
        placed = torch.stack([F.pad(K, (j * sx, R2w - Rw - j * sx, i * sy, R2h - Rh - i * sy))
                              for i in range(kh) for j in range(kw)], dim=1)  # [C, kh*kw, Cin, R2h, R2w]
        grid = self.grid()
        L = grid[0] * grid[1]
        mask = self.prev.mask
        if mask is None:
            mask = K.new_ones((1, C) + tuple(self.prev.grid))
        taps = F.unfold(mask, (kh, kw), dilation=self.dilation, padding=self.padding, stride=self.stride)
        o, pos = units // L, units % L
        slopes = taps[samples if mask.shape[0] > 1 else torch.zeros_like(samples), :, pos]  # [S, C*kh*kw]
        rows = (w.reshape(O, -1)[o] * slopes) @ placed.reshape(C * kh * kw, -1)
        stride, offset = windows_after(self.prev, self.stride, self.padding)
        inside = window_inside(grid, (R2h, R2w), stride, offset, self.prev.in_shape, rows).reshape(L, 1, R2h * R2w)
        return (rows.reshape(-1, Cin, R2h * R2w) * inside[pos]).reshape(rows.shape[0], -1)
