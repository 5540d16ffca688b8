"""Distances to rows built on demand: an autograd.Function over callables that build the rows,
with the native row-distance ops inside (docs/MATH.md §13)."""
from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

_RECOMPUTING = threading.local()


class recomputing:
    """Marks a checkpoint's recomputation (``torch.utils.checkpoint``'s ``context_fn``; reusable,
    as each backward recomputes): it only restores what the backward saved, so distances to rows
    built on demand, which save nothing they compute, are not computed again (their recomputed
    values are never read)."""

    def __enter__(self):
        self.previous = getattr(_RECOMPUTING, "active", False)
        _RECOMPUTING.active = True

    def __exit__(self, *exc):
        _RECOMPUTING.active = self.previous


def is_recomputing() -> bool:
    """Whether a checkpoint's recomputation (:class:`recomputing`) is running."""
    return getattr(_RECOMPUTING, "active", False)


class _LazyRowDistances(torch.autograd.Function):
    """Distances to rows that are never stored: the forward builds all rows without autograd,
    ``chunk`` samples at a time; the backward rebuilds, with autograd, only the rows whose distance
    received a nonzero gradient (after a top-k selection, a small subset)."""

    @staticmethod
    def forward(ctx, f, rows_fn, distances_fn, whole_fn, qs, chunk, *tensors):
        B = f.shape[0]
        ctx.save_for_backward(f, *tensors)
        ctx.rows_fn, ctx.whole_fn, ctx.qs, ctx.chunk = rows_fn, whole_fn, qs, chunk
        if is_recomputing():
            return f.new_zeros((len(qs),) + tuple(f.shape))
        parts = []
        with torch.no_grad():
            for start in range(0, B, chunk):
                samples = torch.arange(start, min(B, start + chunk), device=f.device)
                f_chunk = f[start:start + chunk].contiguous()
                parts.append(distances_fn(samples, f_chunk, qs, tensors))
        return torch.cat(parts, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dist):
        f, *tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[6:]
        grads = [None] * len(tensors)
        grad_f = torch.zeros_like(f)
        pairs = (grad_dist != 0).any(dim=0).nonzero()  # [S, 2]: (sample, unit) with a gradient
        # rebuilt with autograd, a pair keeps about four row-sized intermediates alive: a quarter of
        # the forward's rows per pass keeps the backward's peak near the forward's
        step = max(1, ctx.chunk * f.shape[1] // 4)
        if ctx.whole_fn is not None and pairs.shape[0] > step and ctx.whole_fn(*pairs.unbind(1)):
            step = pairs.shape[0]
        for start in range(0, pairs.shape[0], step):
            b, u = pairs[start:start + step].unbind(1)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, need)]
                rows = ctx.rows_fn(b, u, leaves)  # [S, D]
            f_sub = f[b, u][None].contiguous()
            rows_sub = rows.detach()[None].contiguous()
            dist, norm = torch.ops.mmr_ext.row_distances(f_sub, rows_sub, ctx.qs, False)
            g_f, g_rows = torch.ops.mmr_ext.row_distances_backward(grad_dist[:, b, u][:, None].contiguous(), f_sub,
                                                                   rows_sub, dist, norm, ctx.qs, False)
            grad_f[b, u] = g_f[0]
            if any(need):
                wanted = [i for i, n in enumerate(need) if n]
                got = torch.autograd.grad(rows, [leaves[i] for i in wanted], g_rows[0], allow_unused=True)
                for i, g in zip(wanted, got):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i] + g
        return (grad_f, None, None, None, None, None, *grads)


def lazy_row_distances(f: torch.Tensor, rows_fn: Callable, distances_fn: Callable, tensors: Sequence[torch.Tensor],
                       qs: Sequence[float], chunk: int, whole_fn: Optional[Callable] = None) -> torch.Tensor:
    """Unsigned distances ``|f| / ||row||_q`` [Q, B, R] to rows that are built on demand.

    The forward calls ``distances_fn(samples, f_chunk, qs, tensors)`` for the distances [Q, n, R]
    of all rows of ``chunk`` samples at a time, without autograd; the backward calls
    ``rows_fn(samples, units, tensors)`` for the rows [S, D] of the (sample, unit) pairs whose
    distance got a gradient, with autograd, a quarter of ``chunk`` samples' rows at a time, or all
    at once when ``whole_fn(samples, units)`` of all those pairs says so (rows whose rebuild costs
    per sample rather than per pair). Both compute from ``tensors`` only, so that gradients reach
    them. Peak memory: the rows of ``chunk`` samples (``whole_fn``: of the samples with a pair).
    Differentiable once, in f and tensors.
    """
    return _LazyRowDistances.apply(f.contiguous(), rows_fn, distances_fn, whole_fn, [float(q) for q in qs],
                                   int(chunk), *tensors)
