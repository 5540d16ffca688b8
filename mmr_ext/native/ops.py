"""The native ops as Python functions: ``torch.ops.mmr_ext.*`` with normalised arguments
(docs/MATH.md §2 distances, §6 top-k hinge, §13 the fused conv step).

Differentiable through the autograd formulas in :mod:`mmr_ext.native.registration`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from . import library


def row_distances(f: torch.Tensor, rows: torch.Tensor, qs: Sequence[float], is_signed: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Native ``|f| / ||rows||_q`` (signed: ``f / ||rows||_q``) for every dual exponent q in qs.

    f [B, R]; rows [B, R, D] or [1, R, D] (shared by the batch). Returns (dist [Q, B, R],
    norm [Q, Br, R]); +inf for zero rows. All norms come from one pass over each row.
    Differentiable in f and rows (not through norm); the backward touches only rows with a nonzero
    incoming gradient.
    """
    return torch.ops.mmr_ext.row_distances(f.contiguous(), rows.contiguous(), [float(q) for q in qs],
                                           bool(is_signed))


def topk_hinge(dist: torch.Tensor, k: int, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(1/k) Σ_{i<=k} max(0, 1 - d^i / gamma)`` over the k smallest entries of dist [B, N].

    Ties are broken by index. Returns (value [B], index [B, k]) with indices in ascending order of
    distance; gradients reach only the selected entries with an active hinge.
    """
    return torch.ops.mmr_ext.topk_hinge(dist.contiguous(), int(k), float(gamma))


def conv_transpose_fits(weight: torch.Tensor, in_shape: Sequence[int]) -> bool:
    """Whether :func:`conv_transpose_row_distances` handles a conv with this weight [C, Cin, kh, kw]
    on an input of shape in_shape (Cin, Hin, Win)."""
    if weight[0].numel() > library.MAX_CONV_TAPS:  # taps per output position (csrc/conv_rows.h)
        return False
    # the CUDA kernel keeps one input-space row in a block's shared memory
    return not weight.is_cuda or math.prod(in_shape) * weight.element_size() <= library.MAX_CUDA_CANVAS_BYTES


def conv_transpose_row_distances(f: torch.Tensor, maps: torch.Tensor, mask: Optional[torch.Tensor],
                                 weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int], in_shape: Sequence[int], qs: Sequence[float]) -> torch.Tensor:
    """Native, fused last step of rows walked back in reverse order (no autograd).

    maps [n, R, C, Ho, Wo] (any strides) are rows on the output grid of a conv layer with weight
    [C, Cin, kh, kw], stride, padding, dilation and input shape in_shape (Cin, Hin, Win); mask
    [n, C, Ho, Wo] (any strides, or None) is the activation mask of that grid. Each row, times the
    mask, is walked back through the transposed conv onto the input and reduced to its dual norms
    in one pass, without being stored. Returns ``|f| / ||row||_q`` [Q, n, R] (+inf for zero rows).
    """
    return torch.ops.mmr_ext.conv_transpose_row_distances(
        f.contiguous(), maps, mask, weight, [int(v) for v in stride], [int(v) for v in padding],
        [int(v) for v in dilation], [int(v) for v in in_shape], [float(q) for q in qs])


def patch_linear_rows(patches: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                      grid: Sequence[int], window: Sequence[int], stride: Sequence[int], offset: Sequence[int],
                      in_shape: Sequence[int]) -> torch.Tensor:
    """Native rows of a Linear layer (weight [K, O*L]) after a layer whose rows live on receptive fields.

    patches [n, O, L, E] (any strides; unit o at grid position l of the grid (H, W), its window
    (Cin, Rh, Rw) of the input starting at (y*Sh - Ph, x*Sw - Pw), entries outside the input zero),
    mask [n, O, L] the activation slopes of those units (or None). Returns the input-space rows
    [n, K, Cin*Hin*Win]: ``sum_{o,l} weight[k, o*L + l] mask[b, o, l] patches[b, o, l]`` placed on
    the input. Units with a zero slope are skipped. Differentiable in patches and weight.
    """
    ints = [[int(v) for v in arg] for arg in (grid, window, stride, offset, in_shape)]
    return torch.ops.mmr_ext.patch_linear_rows(patches, mask, weight, *ints)


def conv_patch_rows(prev: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], prev_stride: Sequence[int],
                    prev_offset: Sequence[int], in_shape: Sequence[int]) -> torch.Tensor:
    """Native rows of a conv layer on their receptive fields, from the previous layer's rows.

    prev [Bp, C, Hp, Wp, Cin, Rph, Rpw] (any strides; Bp = 1: shared by the samples) are rows on
    windows of the input with cumulative stride prev_stride and offset prev_offset; mask
    [n, C, Hp, Wp] their activation slopes (or None). weight [O, C, kh, kw] with stride, padding and
    dilation is the conv. Returns the rows [n, O, Ho, Wo, Cin, Rh, Rw], Rh = (kh-1)*dilation*
    prev_stride + Rph, zero outside in_shape; taps on the conv's zero padding and units with a zero
    slope cost nothing. Differentiable in prev and weight.
    """
    ints = [[int(v) for v in arg] for arg in (stride, padding, dilation, prev_stride, prev_offset, in_shape)]
    return torch.ops.mmr_ext.conv_patch_rows(prev, mask, weight.contiguous(), *ints)
