"""One step of the row engine per affine layer kind, on every row representation (docs/MATH.md
§1, §13): scalings, convolutions, average pooling, flattening and fully connected layers (with the
cost model that picks forward or reverse order), the activation masks, and densification.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.adapters import adapter_of, pair
from ..nn.chain import AffineBlock
from .conv_rows import conv_kernel, conv_rows, full_weight, pool_patches
from .memory import ExplicitRows
from .representations import Dense, KernelPatches, Patches, Unsupported
from .reverse_rows import ReverseRows, reverse_macs


@dataclass
class RowPass:
    """State of one pass of the row engine: the layers and masks so far (for rows built in
    reverse order) and the ledger of explicit intermediates (for the memory plan)."""

    trace: List = field(default_factory=list)
    ledger: ExplicitRows = field(default_factory=ExplicitRows)
    sparsity: Optional[dict] = None  # the gradient densities the pass plans from (:mod:`.sparsity`)
    kept_rows: Tuple[bool, ...] = ()  # per hidden layer, whether a later layer keeps its patch rows
    index: int = 0  # the hidden layer being built
    logits_rows: int = 0  # rows of the logits (walked back when the last hidden rows are on demand)


#: Representations whose rows are built on demand (see :func:`ops.lazy_row_distances`).
ON_DEMAND = (ReverseRows,)


def scale_units(rep, scale: torch.Tensor):
    """Multiplies every row by the per-channel scale of its unit (BatchNorm, Normalize)."""
    if isinstance(rep, KernelPatches):
        if rep.mask is not None or scale.numel() not in (1, rep.K.shape[0]):
            return scale_units(rep.materialize(), scale)
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


def conv_step(rep, conv: nn.Conv2d, state: "RowPass"):
    if rep.flat:
        raise Unsupported("Conv2d on flat features")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise Unsupported("Conv2d padding mode")
    w = full_weight(conv)
    args = (pair(conv.stride), pair(conv.padding), pair(conv.dilation))
    if isinstance(rep, KernelPatches) and rep.mask is None and rep.K.shape[-2:] == (1, 1) and rep.stride == (1, 1):
        return conv_kernel(rep, w, *args)  # on the raw input (per-pixel channel map): composed kernels
    if not isinstance(rep, (KernelPatches, Patches)):
        raise Unsupported("Conv2d on flat features")
    transient = state.index < len(state.kept_rows) and not state.kept_rows[state.index]
    return conv_rows(rep, w, *args, state.ledger, transient)


def avgpool_step(rep, pool: nn.AvgPool2d, state: "RowPass"):
    if isinstance(rep, KernelPatches):
        rep = rep.materialize()
    if not isinstance(rep, Patches) or rep.flat or pool.ceil_mode:
        raise Unsupported("AvgPool2d layout or ceil_mode")
    rep = rep.settled()
    k = pair(pool.kernel_size)
    s = pair(pool.stride if pool.stride is not None else pool.kernel_size)
    pad = pair(pool.padding)
    C, H, W = rep.P.shape[1:4]
    ones = rep.P.new_ones((1, 1, H, W))
    # Per-position 1/divisor of the layer: its average of ones over the plain window sum of ones.
    mean = F.avg_pool2d(ones, k, s, pad, False, pool.count_include_pad, pool.divisor_override)
    total = F.avg_pool2d(ones, k, s, pad, False, True, 1)
    out = pool_patches(rep, k, s, pad, state.ledger)
    inv_div = (mean / total).reshape(1, 1, *mean.shape[-2:], 1, 1, 1)
    return replace(out, P=out.P * inv_div)


def flatten_step(rep, layer: nn.Flatten, state: "RowPass"):
    if isinstance(rep, (Dense, ReverseRows)):
        return rep
    if layer.start_dim != 1 or layer.end_dim != -1:
        raise Unsupported("partial Flatten")
    return replace(rep, flat=True)


def linear_step(rep, layer: nn.Linear, state: "RowPass"):
    trace = state.trace
    W = layer.weight
    O = W.shape[0]
    if isinstance(rep, ReverseRows):
        if rep.basis is not None and rep.forced_macs() + O * rep.weight.shape[0] * rep.d <= reverse_macs(trace, O):
            return linear_step(force(rep, state), layer, state)  # cheaper from the explicit rows
        return ReverseRows.of(layer, trace, rep.in_shape)  # stay in reverse order: needs no rows of rep
    if isinstance(rep, Dense):
        if rep.V is None and rep.mask is None:
            return Dense(W[None], rep.d)
        if rep.mask is not None and rep.V is not None:  # (W Σ) V: the mask scales W's columns
            return Dense(torch.matmul(W * rep.mask[:, None, :], rep.V), rep.d)
        return Dense(torch.matmul(W, rep.materialize().V), rep.d)
    if not rep.flat:
        raise Unsupported("Linear on unflattened feature maps")
    if isinstance(rep, KernelPatches):
        return kernel_to_dense(rep, W)
    if PATCH_COST_WEIGHT * rep.linear_macs(O) > reverse_macs(trace, O):
        return ReverseRows.of(layer, trace, rep.in_shape)
    density = state.sparsity.get(layer) if state.sparsity else None
    if on_demand_pays(density, rep, trace, O, state.logits_rows):
        return ReverseRows.of(layer, trace, rep.in_shape, basis=rep)  # values in forward order
    return patches_to_dense(rep, W, state.ledger)


def on_demand_pays(density: Optional[float], rep: Patches, trace: list, O: int, logits: int) -> bool:
    """Whether the rows of a Linear layer after convolutions (forward order cheaper) are kept on
    demand, given the fraction ρ of their (sample, unit) pairs whose distance got a gradient last
    time. Both plans build the values in forward order; explicit rows then cost a dense backward
    (two products of the forward's size: the decision rows give every row a gradient), on-demand
    rows a rebuild of the ρ·O pairs and the walk back of the ``logits`` rows, each a walk back with
    its backward (three times its multiply-adds; docs/MATH.md §13.2). Never measured: explicit."""
    if density is None:
        return False
    return 3 * (density * O + logits) * reverse_macs(trace, 1) < 2 * PATCH_COST_WEIGHT * rep.linear_macs(O)


#: Per-MAC cost of the forward order (native patch_linear_rows) relative to the reverse order's
#: transposed convolutions: 1, a plain multiply-add comparison (docs/MATH.md §13.2).
PATCH_COST_WEIGHT = 1.0


def kernel_to_dense(rep: KernelPatches, W: torch.Tensor) -> Dense:
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
        return crop_canvas(canvas, rep.offset, rep.in_shape, Bp, O)
    canvas = F.conv_transpose2d(T.reshape(Bp * O, C, H, Wd), rep.K, stride=rep.stride)
    return crop_canvas(canvas, rep.offset, rep.in_shape, Bp, O)


def crop_canvas(canvas: torch.Tensor, offset, in_shape, Bp: int, O: int) -> Dense:
    """Input-space rows from a canvas whose (0, 0) is input pixel (-Ph, -Pw)."""
    Cin, Hin, Win = in_shape
    Ph, Pw = offset
    Hc, Wc = canvas.shape[-2:]
    canvas = F.pad(canvas, (0, max(0, Pw + Win - Wc), 0, max(0, Ph + Hin - Hc)))
    dense = canvas[:, :, Ph:Ph + Hin, Pw:Pw + Win]
    return Dense(dense.reshape(Bp, O, Cin * Hin * Win), Cin * Hin * Win)


def patches_to_dense(rep: Patches, W: torch.Tensor, ledger: ExplicitRows) -> Dense:
    """Explicit rows of the map W [O, C*H*W] applied to patch rows (:meth:`Patches.linear_rows`)."""
    ledger.keep(rep)
    n = rep.P.shape[0] if rep.mask is None else rep.mask.shape[0]
    d = math.prod(rep.in_shape)
    ledger.record(n, n * W.shape[0] * d)
    return Dense(rep.linear_rows(W), d)


def scale_step(rep, layer: nn.Module, state: "RowPass"):
    if isinstance(layer, nn.BatchNorm1d) and not isinstance(rep, Dense):
        raise Unsupported("BatchNorm1d on feature maps")
    if isinstance(rep, Patches):
        state.ledger.keep(rep)
    return scale_units(rep, adapter_of(layer).transpose_weight(layer))


STEPS = {"linear": linear_step, "conv": conv_step, "avgpool": avgpool_step, "flatten": flatten_step,
         "scale": scale_step}


def apply_layer(rep, layer: nn.Module, state: "RowPass"):
    """Rows after one affine layer, by the layer's kind (:mod:`mmr_ext.nn.adapters`)."""
    kind = adapter_of(layer).kind
    if isinstance(rep, ON_DEMAND) and kind not in ("linear", "flatten"):
        rep = force(rep, state)
    return STEPS[kind](rep, layer, state)


def apply_block(rep, block: AffineBlock, g: torch.Tensor, state: "RowPass"):
    """Rows and outputs of one block; appends (layer, input shape, output shape) to the trace."""
    for layer in block.layers:
        rep = apply_layer(rep, layer, state)
        out = layer(g)
        state.trace.append((layer, tuple(g.shape[1:]), tuple(out.shape[1:])))
        g = out
    return rep, g


def mask_rows(rep, mask: torch.Tensor):
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


def force(rep, state: "RowPass") -> Dense:
    """The explicit rows of a representation built on demand: its basis, or the intermediates of
    its walk back, are then kept for the backward."""
    if rep.basis is not None:
        state.ledger.keep(rep.basis)
    else:
        B = next((e.shape[0] for e in rep.trace if isinstance(e, torch.Tensor)), 1)
        state.ledger.record(B, B * rep.walk_elements())
    return rep.force()


def to_dense(rep, state: "RowPass") -> Dense:
    ledger = state.ledger
    if isinstance(rep, ON_DEMAND):
        rep = force(rep, state)
    if isinstance(rep, Dense):
        return rep.materialize()
    if isinstance(rep, KernelPatches):
        rep = rep.materialize()
    C, H, W = rep.P.shape[1:4]
    eye = torch.eye(C * H * W, dtype=rep.P.dtype, device=rep.P.device)
    return patches_to_dense(replace(rep, flat=True), eye, ledger)
