"""Receptive-field back-substitution through the leading convolution blocks of a network.

A unit of a convolution block depends only on a window of the block's input; relaxed and pushed
back through the convolution below, its rows live on a larger window of that block's input, and
so on down to a patch of the network input. When blocks 0..k are each one zero-padded Conv2d
(with optional per-channel scales before or after it: Normalize, eval-mode BatchNorm2d, folded
into the kernel), :class:`PatchBacksub` back-substitutes the rows of the units of hidden layer
k on these patches only: the relaxation slopes, intercepts and block biases are gathered on the
patch of each unit, rows move between patches by a fixed linear map (a small GEMM, or a
transposed convolution without padding), and the support function is taken over the patch's
in-image input coordinates (coordinates with coefficient 0 add nothing to min <a, z> over the
ball ∩ box). Patch cells outside a map are its zero padding: relaxation, bias and input
coefficient 0 there. The result is the dense back-substitution of :mod:`.bounds`, summed in
another order (equal up to float64 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..math.box_support import support_min
from ..nn.adapters import adapter_of, pair

__all__ = ["ConvStep", "conv_step", "PatchPlan", "patch_plan", "PatchBacksub"]

#: A patch-to-patch transpose runs as one GEMM when its matrix has at most this many entries.
GEMM_MAX_ELEMENTS = 1 << 20

Size = Tuple[int, int]


@dataclass(frozen=True)
class ConvStep:
    """A block's linear part as one zero-padded convolution (scales folded into ``weight``)."""

    weight: torch.Tensor  # [C_out, C_in / groups, kh, kw]
    stride: Size
    padding: Size
    dilation: Size
    groups: int

    def span(self, size: Size) -> Size:
        """The input window of an output window of this size."""
        return tuple((n - 1) * s + d * (k - 1) + 1 for n, s, d, k in
                     zip(size, self.stride, self.dilation, self.weight.shape[2:]))

    def transpose(self, g: torch.Tensor) -> torch.Tensor:
        """W^T on windows: g [N, C_out, h, w] -> [N, C_in, *span((h, w))]."""
        return F.conv_transpose2d(g, self.weight, None, self.stride, 0, 0, self.groups, self.dilation)


def conv_step(layers: Sequence[torch.nn.Module], in_channels: int) -> Optional[ConvStep]:
    """The linear part of a block of ``layers`` as a :class:`ConvStep`, or None when it is not
    one zero-padded Conv2d with only per-channel (or scalar) scales before and after it."""
    kinds = [adapter_of(layer).kind for layer in layers]
    if kinds.count("conv") != 1 or set(kinds) - {"conv", "scale"}:
        return None
    i = kinds.index("conv")
    conv = layers[i]
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    w, g = conv.weight, conv.groups
    c_out, c_in = w.shape[0], in_channels

    def scale(layer, n):
        return adapter_of(layer).transpose_weight(layer).reshape(-1).expand(n)

    for layer in layers[:i]:  # input channel of weight[o, i]: (o // (c_out / g)) * (c_in / g) + i
        s = scale(layer, c_in).reshape(g, 1, c_in // g).expand(g, c_out // g, c_in // g)
        w = w * s.reshape(c_out, c_in // g, 1, 1)
    for layer in layers[i + 1:]:
        w = w * scale(layer, c_out).reshape(c_out, 1, 1, 1)
    return ConvStep(w, pair(conv.stride), pair(conv.padding), pair(conv.dilation), g)


@dataclass(frozen=True)
class Level:
    """The patches of hidden layer k's units on the input of block j (a [C, H, W] map): the
    patch of output unit (h, w) has this ``size`` and starts at (h, w) * stride - offset."""

    shape: Tuple[int, int, int]
    size: Size
    stride: Size
    offset: Size
    gemm: Optional[torch.Tensor]  # the map from the level above as a matrix, or None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.size[0] * self.size[1]

    @property
    def padded(self) -> Size:
        """The map's size with room for every patch (the patch origins shifted by ``offset``)."""
        return self.shape[1] + self.offset[0], self.shape[2] + self.offset[1]


class PatchPlan:
    """Patch geometry of hidden layer k: ``levels[j]`` on the input of block j, j = 0..k, the
    blocks' :class:`ConvStep`, and the rows of the units on their patch of level k."""

    def __init__(self, steps: Sequence[ConvStep], shapes: Sequence[Tuple[int, ...]],
                 out_shape: Tuple[int, ...]):
        self.steps, self.out_shape = list(steps), tuple(out_shape)
        H, W = self.out_shape[1:]
        size, stride, offset = (1, 1), (1, 1), (0, 0)
        levels: List[Level] = []
        n_above, c_above = out_shape[0], out_shape[0]
        for step, shape in zip(reversed(self.steps), reversed(shapes)):
            above = size
            size = step.span(size)
            offset = tuple(o * s + p for o, s, p in zip(offset, step.stride, step.padding))
            stride = tuple(t * s for t, s in zip(stride, step.stride))
            n = shape[0] * size[0] * size[1]
            gemm = None
            if n_above * n <= GEMM_MAX_ELEMENTS or not levels:  # the rows of level k always
                eye = torch.eye(n_above, dtype=step.weight.dtype, device=step.weight.device)
                gemm = step.transpose(eye.reshape(n_above, c_above, *above)).reshape(n_above, n)
            levels.append(Level(tuple(shape), size, stride, offset, gemm))
            n_above, c_above = n, shape[0]
        self.levels = levels[::-1]
        # padded map sizes: room for the offsets and for the last patch, (H - 1) * stride + size
        self.extent = [tuple(max(p, (m - 1) * s + z) for p, m, s, z in
                             zip(lv.padded, (H, W), lv.stride, lv.size)) for lv in self.levels]

    @property
    def rows(self) -> torch.Tensor:
        """[C_out of block k, levels[k].numel]: unit c's row on its patch of block k's input."""
        return self.levels[-1].gemm

    @property
    def width(self) -> int:
        return max(lv.numel for lv in self.levels)

    def push(self, j: int, lam: torch.Tensor) -> torch.Tensor:
        """Rows [P, R, levels[j + 1].numel] -> [P, R, levels[j].numel] through block j."""
        gemm = self.levels[j].gemm
        if gemm is not None:
            return lam @ gemm
        P, R, _ = lam.shape
        up = self.levels[j + 1]
        g = lam.reshape((P * R, up.shape[0]) + up.size)
        return self.steps[j].transpose(g).reshape(P, R, -1)


def patch_plan(blocks) -> Optional[PatchPlan]:
    """The plan of the last of ``blocks`` (objects with ``block``, ``in_shape``, ``out_shape``,
    ``n_in``), or None when a block is no :class:`ConvStep` or patches save nothing."""
    steps = []
    for blk in blocks:
        if len(blk.in_shape) != 3:
            return None
        step = conv_step(blk.block.layers, blk.in_shape[0])
        if step is None:
            return None
        steps.append(step)
    plan = PatchPlan(steps, [b.in_shape for b in blocks], blocks[-1].out_shape)
    if sum(lv.numel for lv in plan.levels) >= sum(b.n_in for b in blocks):
        return None
    return plan


class PatchBacksub:
    """Lower bounds of +- the units of hidden layer k by back-substitution on their patches.

    ``rels[j]`` are the relaxations (lower slope, upper slope, upper intercept, unstable) of
    hidden layer j < k as [B, n_j], ``biases[j]`` the bias [n_out] of block j <= k, x [B, d] the
    inputs. The relaxations and biases of every level (and x with its in-image indicator at the
    input) are zero-padded once, then gathered per (sample, position) of the pairs.
    """

    def __init__(self, plan: PatchPlan, rels, biases: Sequence[torch.Tensor], x: torch.Tensor):
        self.plan, self.bias = plan, biases[-1]
        B = x.shape[0]
        stacks = [torch.stack([x, torch.ones_like(x)], 1)]
        for (low, up, icpt, _), bias in zip(rels, biases):
            stacks.append(torch.stack([low, up, icpt, bias.expand_as(low)], 1))
        self.maps, self.patterns = [], []
        for stack, lv, (Hp, Wp) in zip(stacks, plan.levels, plan.extent):
            C, H, W = lv.shape
            m = stack.reshape((B, -1, C, H, W))
            pads = (lv.offset[1], Wp - W - lv.offset[1], lv.offset[0], Hp - H - lv.offset[0])
            self.maps.append(F.pad(m, pads).reshape(-1))
            idx = torch.arange(m.shape[1] * C, device=x.device)[:, None, None] * (Hp * Wp)
            idx = idx + torch.arange(lv.size[0], device=x.device)[:, None] * Wp
            self.patterns.append((idx + torch.arange(lv.size[1], device=x.device)).reshape(-1))

    def _gather(self, j: int, b: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """[P, M, levels[j].numel]: the M stacked maps of level j on the pairs' patches."""
        lv, (Hp, Wp) = self.plan.levels[j], self.plan.extent[j]
        M = self.patterns[j].numel() // lv.numel
        base = b * (M * lv.shape[0] * Hp * Wp) + h * (lv.stride[0] * Wp) + w * lv.stride[1]
        idx = base[:, None] + self.patterns[j]
        return self.maps[j].take(idx).reshape(b.shape[0], M, lv.numel)

    def lower(self, b: torch.Tensor, units: torch.Tensor, p: float, eps: torch.Tensor, lo: float,
              hi: float) -> torch.Tensor:
        """[P, 2]: lower bounds of +unit and -unit of pairs (b, units) (flat unit indices)."""
        plan = self.plan
        _, H, W = plan.out_shape
        # the channels of a position share its patches: gather once per (sample, position)
        at, pair_at = torch.unique(b * (H * W) + units % (H * W), return_inverse=True)
        b_at, h_at, w_at = at // (H * W), (at // W) % H, at % W
        rows = plan.rows[units // (H * W)]
        lam = torch.stack([rows, -rows], 1)
        const = torch.stack([self.bias[units], -self.bias[units]], 1)
        for j in range(len(plan.levels) - 1, 0, -1):
            low, up, icpt, bias = self._gather(j, b_at, h_at, w_at)[pair_at].unbind(1)
            const = const + torch.matmul(lam.clamp_max(0), icpt[:, :, None])[..., 0]
            lam = torch.where(lam >= 0, low[:, None], up[:, None]).mul_(lam)
            const = const + torch.matmul(lam, bias[:, :, None])[..., 0]
            lam = plan.push(j - 1, lam)
        xp, inside = self._gather(0, b_at, h_at, w_at)[pair_at].unbind(1)
        return support_min(lam.mul_(inside[:, None]), xp, p, eps[b], lo, hi) + const
