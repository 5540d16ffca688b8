"""One adapter per supported affine layer type: what every analysis needs of that layer.

An adapter tells, for its layer type, the ``kind`` of linear map it is (``"linear"``, ``"conv"``,
``"avgpool"``, ``"flatten"`` or ``"scale"``: a per-channel diagonal map), and computes its linear
part W z (biases dropped), |W| z, the transpose W^T g, the tensor the transpose reads (so that
rows built on demand can be differentiated through it) and the multiply-adds of one transposed
row. The geometry, bound propagation and MIP code ask :func:`adapter_for` instead of testing
layer types themselves (docs/MATH.md §1).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FlattenTo, Normalize, Scale

Shape = Tuple[int, ...]

#: Transposed convolutions onto at most this many channels run as GEMM + fold (measured 2.7x faster
#: than torch's transposed convolution for 1 channel, slower for 16, on this project's CPUs).
FOLD_MAX_CHANNELS = 3


def pair(v) -> Tuple[int, int]:
    """(v, v) for an int, else the first two entries of v as ints."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def per_channel(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A per-channel (or scalar) vector shaped to broadcast over z [N, C, ...]."""
    return v.reshape(()) if v.numel() == 1 else v.reshape((1, -1) + (1,) * (z.dim() - 2))


def batchnorm_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm: y = scale * x + shift."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight * inv_std
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


class LayerAdapter:
    """The protocol; the default methods suit parameter-free maps applied as themselves."""

    kind = ""

    def check(self, where: str, layer: nn.Module) -> None:
        """Raises ValueError when this configuration of the layer is not a fixed affine map."""

    def linear(self, layer: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """W z, differentiable w.r.t. the layer's parameters."""
        return layer(z)

    def abs_linear(self, layer: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """|W| z (elementwise absolute value of W)."""
        return layer(z)

    def transpose_weight(self, layer: nn.Module) -> Optional[torch.Tensor]:
        """The tensor :meth:`transpose` reads (None for maps without parameters)."""
        return None

    def transpose(self, layer: nn.Module, g: torch.Tensor, in_shape: Shape,
                  weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """W^T g: g [N, *out] -> [N, *in_shape]; ``weight`` replaces :meth:`transpose_weight`."""
        raise NotImplementedError

    def row_cost(self, layer: nn.Module, in_shape: Shape, out_shape: Shape) -> float:
        """Multiply-adds of :meth:`transpose` for one row."""
        return float(math.prod(out_shape))


class LinearAdapter(LayerAdapter):
    kind = "linear"

    def linear(self, layer, z):
        return F.linear(z, layer.weight)

    def abs_linear(self, layer, z):
        return F.linear(z, layer.weight.abs())

    def transpose_weight(self, layer):
        return layer.weight

    def transpose(self, layer, g, in_shape, weight=None):
        return g @ (layer.weight if weight is None else weight)

    def row_cost(self, layer, in_shape, out_shape):
        return float(layer.weight.numel())


class ConvAdapter(LayerAdapter):
    kind = "conv"

    def linear(self, layer, z):
        return layer._conv_forward(z, layer.weight, None)

    def abs_linear(self, layer, z):
        return layer._conv_forward(z, layer.weight.abs(), None)

    def transpose_weight(self, layer):
        return layer.weight

    def transpose(self, layer, g, in_shape, weight=None):
        weight = layer.weight if weight is None else weight
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return vjp_transpose(self, layer, g, in_shape)
        N = g.shape[0]
        k, s, p, d = (pair(v) for v in (layer.kernel_size, layer.stride, layer.padding, layer.dilation))
        if layer.groups == 1 and layer.in_channels <= FOLD_MAX_CHANNELS:
            # few input channels: one GEMM and a col2im (fold) beat the generic transposed conv
            Wt = weight.reshape(weight.shape[0], -1).t()
            cols = torch.bmm(Wt.expand(N, -1, -1), g.reshape(N, g.shape[1], -1))  # no transposing copies
            return F.fold(cols, tuple(in_shape[1:]), k, dilation=d, padding=p, stride=s)
        # output_padding recovers the rows/columns that the forward's floor division dropped
        extra = tuple(n_in - ((n_out - 1) * si - 2 * pi + di * (ki - 1) + 1)
                      for n_in, n_out, ki, si, pi, di in zip(in_shape[1:], g.shape[-2:], k, s, p, d))
        # oneDNN's transposed convolution is about twice as fast on channels-last rows (measured)
        g = g.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(g, weight, None, s, p, extra, layer.groups, d)

    def row_cost(self, layer, in_shape, out_shape):
        return float(math.prod(out_shape) * layer.weight[0].numel())


class AvgPoolAdapter(LayerAdapter):
    kind = "avgpool"

    def check(self, where, layer):
        if layer.divisor_override is not None and layer.divisor_override <= 0:
            raise ValueError(f"{where} has a non-positive divisor_override")

    def transpose(self, layer, g, in_shape, weight=None):
        return torch.ops.aten.avg_pool2d_backward(
            g, g.new_empty((g.shape[0],) + tuple(in_shape)), pair(layer.kernel_size),
            pair(layer.stride if layer.stride is not None else layer.kernel_size), pair(layer.padding),
            layer.ceil_mode, layer.count_include_pad, layer.divisor_override)

    def row_cost(self, layer, in_shape, out_shape):
        return float(math.prod(out_shape) * math.prod(pair(layer.kernel_size)))


class FlattenAdapter(LayerAdapter):
    kind = "flatten"

    def transpose(self, layer, g, in_shape, weight=None):
        # feature maps channels-last, the layout of the fast transposed conv
        out = g.reshape((g.shape[0],) + tuple(in_shape))
        return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out


class ScaleAdapter(LayerAdapter):
    """A per-channel (or scalar) diagonal linear part, its own transpose."""

    kind = "scale"

    def __init__(self, scale: Callable[[nn.Module], torch.Tensor]):
        self.scale = scale

    def linear(self, layer, z):
        return z * per_channel(self.scale(layer), z)

    def abs_linear(self, layer, z):
        return z * per_channel(self.scale(layer).abs(), z)

    def transpose_weight(self, layer):
        return self.scale(layer)

    def transpose(self, layer, g, in_shape, weight=None):
        return g * per_channel(self.scale(layer) if weight is None else weight, g)


class BatchNormAdapter(ScaleAdapter):
    def __init__(self):
        super().__init__(lambda bn: batchnorm_scale_shift(bn)[0])

    def check(self, where, layer):
        if layer.training:
            raise ValueError(f"{where} is in training mode: its output depends on the whole batch, "
                             "so the network is not piecewise affine per sample; call model.eval() "
                             "or put the BatchNorm layers in eval mode")
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError(f"{where} has track_running_stats=False: it always normalises with batch "
                             "statistics, which is not a per-sample affine map")


def vjp_transpose(adapter: LayerAdapter, layer: nn.Module, g: torch.Tensor, in_shape: Shape) -> torch.Tensor:
    """W^T g by autograd through :meth:`LayerAdapter.linear` (for layouts without a closed form)."""
    with torch.enable_grad():
        z = torch.zeros((g.shape[0],) + tuple(in_shape), dtype=g.dtype, device=g.device, requires_grad=True)
        grad, = torch.autograd.grad(adapter.linear(layer, z), z, g, create_graph=g.requires_grad)
    return grad


#: The registry: layer type -> adapter (subclasses use their base type's adapter).
ADAPTERS: Dict[Type[nn.Module], LayerAdapter] = {
    nn.Linear: LinearAdapter(),
    nn.Conv2d: ConvAdapter(),
    nn.AvgPool2d: AvgPoolAdapter(),
    nn.Flatten: FlattenAdapter(),
    nn.BatchNorm1d: BatchNormAdapter(),
    nn.BatchNorm2d: BatchNormAdapter(),
    Normalize: ScaleAdapter(lambda layer: 1.0 / layer.std),
    Scale: ScaleAdapter(lambda layer: layer.factor),
    FlattenTo: FlattenAdapter(),
}


def adapter_for(layer: nn.Module) -> Optional[LayerAdapter]:
    """The adapter of ``layer``'s type (or of its nearest registered base type), None if none."""
    for cls in type(layer).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls]
    return None


def adapter_of(layer: nn.Module) -> LayerAdapter:
    """Like :func:`adapter_for`, but raises NotImplementedError for an unsupported layer."""
    adapter = adapter_for(layer)
    if adapter is None:
        raise NotImplementedError(f"no affine adapter for {type(layer).__name__}")
    return adapter
