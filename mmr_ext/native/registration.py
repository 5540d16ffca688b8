"""Fake kernels (shapes for torch.compile and meta tensors) and autograd formulas of
``torch.ops.mmr_ext``; imported once the library is loaded. Argument checks run in the kernels."""
from __future__ import annotations

import torch


@torch.library.register_fake("mmr_ext::row_distances")
def row_distances_fake(f, rows, qs, is_signed):
    return f.new_empty((len(qs), f.shape[0], f.shape[1])), f.new_empty((len(qs), rows.shape[0], rows.shape[1]))


@torch.library.register_fake("mmr_ext::row_distances_backward")
def row_distances_backward_fake(grad, f, rows, dist, norm, qs, is_signed):
    contiguous = torch.contiguous_format
    return torch.empty_like(f, memory_format=contiguous), torch.empty_like(rows, memory_format=contiguous)


@torch.library.register_fake("mmr_ext::topk_hinge")
def topk_hinge_fake(dist, k, gamma):
    return dist.new_empty((dist.shape[0],)), dist.new_empty((dist.shape[0], k), dtype=torch.long)


@torch.library.register_fake("mmr_ext::topk_hinge_backward")
def topk_hinge_backward_fake(grad, dist, index, gamma):
    return torch.empty_like(dist, memory_format=torch.contiguous_format)


@torch.library.register_fake("mmr_ext::conv_transpose_row_distances")
def conv_transpose_row_distances_fake(f, maps, mask, weight, stride, padding, dilation, in_shape, qs):
    return f.new_empty((len(qs), maps.shape[0], maps.shape[1]))


@torch.library.register_fake("mmr_ext::patch_linear_rows")
def patch_linear_rows_fake(patches, mask, weight, grid, window, stride, offset, in_shape):
    return patches.new_empty((patches.shape[0], weight.shape[0], in_shape[0] * in_shape[1] * in_shape[2]))


@torch.library.register_fake("mmr_ext::patch_linear_rows_backward")
def patch_linear_rows_backward_fake(grad, patches, mask, weight, grid, window, stride, offset, in_shape):
    return patches.new_empty(patches.shape), torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("mmr_ext::conv_patch_rows")
def conv_patch_rows_fake(prev, mask, weight, stride, padding, dilation, prev_stride, prev_offset, in_shape):
    n = prev.shape[0] if mask is None else mask.shape[0]
    grid = [(size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(prev.shape[2:4], weight.shape[2:], stride, padding, dilation)]
    window = [(k - 1) * d * ps + r for k, d, ps, r in zip(weight.shape[2:], dilation, prev_stride, prev.shape[5:])]
    return prev.new_empty((n, weight.shape[0], *grid, prev.shape[4], *window))


@torch.library.register_fake("mmr_ext::conv_patch_rows_backward")
def conv_patch_rows_backward_fake(grad, prev, mask, weight, stride, padding, dilation, prev_stride, prev_offset,
                                  in_shape):
    return prev.new_empty(prev.shape), torch.empty_like(weight, memory_format=torch.contiguous_format)


def _row_distances_setup(ctx, inputs, output):
    f, rows, qs, is_signed = inputs
    dist, norm = output
    ctx.save_for_backward(f, rows, dist, norm)
    ctx.qs, ctx.is_signed = qs, is_signed
    ctx.mark_non_differentiable(norm)


def _row_distances_backward(ctx, grad_dist, _grad_norm):
    f, rows, dist, norm = ctx.saved_tensors
    grad_f, grad_rows = torch.ops.mmr_ext.row_distances_backward(grad_dist.contiguous(), f, rows, dist, norm, ctx.qs,
                                                                 ctx.is_signed)
    return grad_f, grad_rows, None, None


def _topk_hinge_setup(ctx, inputs, output):
    dist, _k, gamma = inputs
    _value, index = output
    ctx.save_for_backward(dist, index)
    ctx.gamma = gamma
    ctx.mark_non_differentiable(index)


def _topk_hinge_backward(ctx, grad_value, _grad_index):
    dist, index = ctx.saved_tensors
    return torch.ops.mmr_ext.topk_hinge_backward(grad_value.contiguous(), dist, index, ctx.gamma), None, None


def _receptive_field_rows_setup(ctx, inputs, output):
    """conv_patch_rows and patch_linear_rows: (rows on receptive fields, mask, weight, *geometry)."""
    rows, mask, weight, *geometry = inputs
    ctx.save_for_backward(rows, mask, weight)
    ctx.geometry = geometry


def _receptive_field_rows_backward(backward_op):
    """The autograd formula of such an op: its backward op gives the rows' and the weight's
    gradients; the mask and the geometry get none."""
    def backward(ctx, grad_out):
        rows, mask, weight = ctx.saved_tensors
        grad_rows, grad_weight = backward_op(grad_out, rows, mask, weight, *ctx.geometry)
        return (grad_rows, None, grad_weight) + (None,) * len(ctx.geometry)
    return backward


torch.library.register_autograd("mmr_ext::row_distances", _row_distances_backward, setup_context=_row_distances_setup)
torch.library.register_autograd("mmr_ext::topk_hinge", _topk_hinge_backward, setup_context=_topk_hinge_setup)
for _name in ("patch_linear_rows", "conv_patch_rows"):
    torch.library.register_autograd(f"mmr_ext::{_name}",
                                    _receptive_field_rows_backward(getattr(torch.ops.mmr_ext, f"{_name}_backward")),
                                    setup_context=_receptive_field_rows_setup)


def _no_derivative(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"torch.ops.mmr_ext.{name} has no derivative (the backward ops have no double "
                           "backward; the fused conv step is forward-only)")
    return backward


for _name in ("row_distances_backward", "topk_hinge_backward", "conv_transpose_row_distances",
              "patch_linear_rows_backward", "conv_patch_rows_backward"):
    torch.library.register_autograd(f"mmr_ext::{_name}", _no_derivative(_name))
