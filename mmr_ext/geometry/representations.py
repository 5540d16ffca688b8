"""Exact, compact representations of the rows of V(l) (docs/MATH.md §1, §13).

Rows are kept in the cheapest exact form and never densified needlessly:
- :class:`Dense` V [Bp, n, d]: rows over the whole input (after fully connected layers). The first
  layer's rows are sample-independent (Bp = 1), so their norms come from the weights.
- :class:`Patches` P [Bp, C, H, W, Cin, Rh, Rw]: a conv unit's row lives on its receptive field, an
  Rh x Rw window of the input starting at (y*Sh - Ph, x*Sw - Pw); entries outside the image are 0.
- :class:`KernelPatches`: rows of a conv applied to the raw image, one shared kernel per channel.
Representations built on demand live in :mod:`.conv_rows` and :mod:`.reverse_rows`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch

from ..native import patch_linear_rows


class Unsupported(Exception):
    """A layer/layout the compact representations do not cover (the reference handles it)."""


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
    #: how to rebuild the rows with autograd (all rows of some samples, or chosen pairs) when no
    #: layer keeps P for the backward (:class:`mmr_ext.geometry.conv_rows.KernelConvRows`)
    recipe: Optional[object] = None
    cache: dict = field(default_factory=dict)  # shared by copies; "kept": a layer differentiates through P

    def settled(self) -> "Patches":
        """The same rows with the pending mask multiplied in (only when a layer reads them)."""
        if self.mask is None:
            return self
        B = self.mask.shape[0]
        return replace(self, P=self.P * self.mask.reshape(B, *self.P.shape[1:4], 1, 1, 1), mask=None, recipe=None)

    def rows(self) -> torch.Tensor:
        P = self.settled().P
        Bp, C, H, W = P.shape[:4]
        return P.reshape(Bp, C * H * W, -1)

    def linear_rows(self, W: torch.Tensor, samples: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input-space rows [n, O, d] of the map W [O, C*H*W] applied to these rows (their pending
        mask included), in forward order by the native :func:`mmr_ext.native.patch_linear_rows`
        (units with a zero slope skipped); ``samples``: only those samples' rows."""
        P, mask = self.P, self.mask
        if samples is not None:
            P = P if P.shape[0] == 1 else take_samples(P, samples)
            mask = None if mask is None else take_samples(mask, samples)
        Bp, C, H, Wd, Cin, Rh, Rw = P.shape
        n = Bp if mask is None else mask.shape[0]
        patches = P.reshape(Bp, C, H * Wd, Cin * Rh * Rw).expand(n, -1, -1, -1)
        mask = None if mask is None else mask.reshape(n, C, H * Wd)
        return patch_linear_rows(patches, mask, W, (H, Wd), (Cin, Rh, Rw), self.stride, self.offset, self.in_shape)

    def linear_macs(self, O: int) -> float:
        """Multiply-adds of :meth:`linear_rows` for one sample (upper bound: every unit active)."""
        shape = self.P.shape if self.P is not None else self.recipe.empty_shape()
        return float(O * math.prod(shape[1:]))

    def without_values(self) -> "Patches":
        """The same rows for a backward that rebuilds them from their recipe: P is not held."""
        return replace(self, P=None) if self.recipe is not None else self


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
        inside = window_inside(self.grid, (Rh, Rw), self.stride, self.offset, self.in_shape, self.K)
        P = self.K[None, :, None, None] * inside[None, None, :, :, None]
        if self.mask is not None:
            P = P * self.mask[:, :, :, :, None, None, None]
        return Patches(P, self.stride, self.offset, self.in_shape, self.flat)

    def rows(self) -> torch.Tensor:
        return self.materialize().rows()


def take_samples(t: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """t[samples]: a view when the samples are consecutive (the chunks of a pass), else a copy."""
    n = samples.numel()
    if n > 0 and bool((samples.diff() == 1).all()):
        return t.narrow(0, int(samples[0]), n)
    return t[samples]


def window_inside(grid, size, stride, offset, in_shape, like: torch.Tensor) -> torch.Tensor:
    """[H, W, Rh, Rw] 0/1: whether each entry of each unit's input window lies inside the image."""
    rows = [(torch.arange(n)[:, None] * s - o + torch.arange(r)[None, :] >= 0)
            & (torch.arange(n)[:, None] * s - o + torch.arange(r)[None, :] < limit)
            for n, r, s, o, limit in zip(grid, size, stride, offset, in_shape[1:])]
    return (rows[0][:, None, :, None] & rows[1][None, :, None, :]).to(dtype=like.dtype, device=like.device)


def identity_rows(x: torch.Tensor):
    if x.dim() == 2:
        return Dense(None, x.shape[1])
    if x.dim() == 4:
        Cin, H, W = x.shape[1:]
        eye = torch.eye(Cin, dtype=x.dtype, device=x.device)[:, :, None, None]
        return KernelPatches(eye, (H, W), (1, 1), (0, 0), (Cin, H, W))
    raise Unsupported(f"input of rank {x.dim()}")
