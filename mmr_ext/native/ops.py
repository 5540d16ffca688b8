"""Autograd wrappers of the native kernels (``mmr_ext._C``)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import _C


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



def conv_transpose_fits(weight: torch.Tensor, in_shape: Sequence[int]) -> bool:
    """Whether :func:`conv_transpose_row_distances` handles a conv with this weight [C, Cin, kh, kw]
    on an input of shape in_shape (Cin, Hin, Win)."""
    if weight[0].numel() > _C.MAX_CONV_TAPS:  # taps per output position (csrc/conv_rows.h)
        return False
    # the CUDA kernel keeps one input-space row in a block's shared memory
    return not weight.is_cuda or math.prod(in_shape) * weight.element_size() <= _C.MAX_CUDA_CANVAS_BYTES


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
    return _C.conv_transpose_row_distances(f.contiguous(), maps, mask, weight, [int(v) for v in stride],
                                           [int(v) for v in padding], [int(v) for v in dilation],
                                           [int(v) for v in in_shape], [float(q) for q in qs])


class _LazyRowDistances(torch.autograd.Function):
    """Distances to rows that are never stored: the forward builds all rows without autograd,
    ``chunk`` samples at a time; the backward rebuilds, with autograd, only the rows whose distance
    received a nonzero gradient (after a top-k selection, a small subset)."""

    @staticmethod
    def forward(ctx, f, rows_fn, distances_fn, qs, chunk, *tensors):
        B = f.shape[0]
        parts = []
        with torch.no_grad():
            for start in range(0, B, chunk):
                samples = torch.arange(start, min(B, start + chunk), device=f.device)
                f_chunk = f[start:start + chunk].contiguous()
                parts.append(distances_fn(samples, f_chunk, qs, tensors))
        ctx.save_for_backward(f, *tensors)
        ctx.rows_fn, ctx.qs, ctx.chunk = rows_fn, qs, chunk
        return torch.cat(parts, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dist):
        f, *tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[5:]
        grads = [None] * len(tensors)
        grad_f = torch.zeros_like(f)
        pairs = (grad_dist != 0).any(dim=0).nonzero()  # [S, 2]: (sample, unit) with a gradient
        # rebuilt with autograd, a pair keeps about four row-sized intermediates alive: a quarter of
        # the forward's rows per pass keeps the backward's peak near the forward's
        step = max(1, ctx.chunk * f.shape[1] // 4)
        for start in range(0, pairs.shape[0], step):
            b, u = pairs[start:start + step].unbind(1)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, need)]
                rows = ctx.rows_fn(b, u, leaves)  # [S, D]
            f_sub = f[b, u][None].contiguous()
            rows_sub = rows.detach()[None].contiguous()
            dist, norm = _C.row_distances(f_sub, rows_sub, ctx.qs, False)
            g_f, g_rows = _C.row_distances_backward(grad_dist[:, b, u][:, None].contiguous(), f_sub, rows_sub,
                                                    dist, norm, ctx.qs, False)
            grad_f[b, u] = g_f[0]
            if any(need):
                wanted = [i for i, n in enumerate(need) if n]
                got = torch.autograd.grad(rows, [leaves[i] for i in wanted], g_rows[0], allow_unused=True)
                for i, g in zip(wanted, got):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
        return (grad_f, None, None, None, None, *grads)


def lazy_row_distances(f: torch.Tensor, rows_fn: Callable, distances_fn: Callable, tensors: Sequence[torch.Tensor],
                       qs: Sequence[float], chunk: int) -> torch.Tensor:
    """Unsigned distances ``|f| / ||row||_q`` [Q, B, R] to rows that are built on demand.

    The forward calls ``distances_fn(samples, f_chunk, qs, tensors)`` for the distances [Q, n, R]
    of all rows of ``chunk`` samples at a time, without autograd; the backward calls
    ``rows_fn(samples, units, tensors)`` for the rows [S, D] of the (sample, unit) pairs whose
    distance got a gradient, with autograd. Both compute from ``tensors`` only, so that gradients
    reach them. Peak memory: the rows of ``chunk`` samples. Differentiable once, in f and tensors.
    """
    return _LazyRowDistances.apply(f.contiguous(), rows_fn, distances_fn, [float(q) for q in qs], int(chunk),
                                   *tensors)
