"""Autograd wrappers of the native kernels (``mmr_ext._C``)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .native import _C


class _RowDistances(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, rows, qs, is_signed):
        dist, norm = _C.row_distances(f, rows, qs, is_signed)
        ctx.save_for_backward(f, rows, dist, norm)
        ctx.qs, ctx.is_signed = qs, is_signed
        ctx.mark_non_differentiable(norm)
        return dist, norm

    @staticmethod
    def backward(ctx, grad_dist, _grad_norm):
        f, rows, dist, norm = ctx.saved_tensors
        grad_f, grad_rows = _C.row_distances_backward(grad_dist.contiguous(), f, rows, dist, norm, ctx.qs,
                                                      ctx.is_signed)
        return grad_f, grad_rows, None, None


def row_distances(f: torch.Tensor, rows: torch.Tensor, qs: Sequence[float], is_signed: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Native ``|f| / ||rows||_q`` (signed: ``f / ||rows||_q``) for every dual exponent q in qs.

    f [B, R]; rows [B, R, D] or [1, R, D] (shared by the batch). Returns (dist [Q, B, R],
    norm [Q, Br, R]); +inf for zero rows. All norms come from one pass over each row.
    Differentiable in f and rows; the backward touches only rows with a nonzero incoming gradient.
    """
    return _RowDistances.apply(f.contiguous(), rows.contiguous(), [float(q) for q in qs], bool(is_signed))


class _TopkHinge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dist, k, gamma):
        value, index = _C.topk_hinge(dist, k, gamma)
        ctx.save_for_backward(dist, index)
        ctx.gamma = gamma
        ctx.mark_non_differentiable(index)
        return value, index

    @staticmethod
    def backward(ctx, grad_value, _grad_index):
        dist, index = ctx.saved_tensors
        return _C.topk_hinge_backward(grad_value.contiguous(), dist, index, ctx.gamma), None, None


def topk_hinge(dist: torch.Tensor, k: int, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(1/k) Σ_{i<=k} max(0, 1 - d^i / gamma)`` over the k smallest entries of dist [B, N].

    Ties are broken by index. Returns (value [B], index [B, k]) with indices in ascending order of
    distance; gradients reach only the selected entries with an active hinge.
    """
    return _TopkHinge.apply(dist.contiguous(), int(k), float(gamma))
