"""Parsing of an ``nn.Sequential`` into a chain of affine blocks and ReLU-type activations.

docs/MATH.md §1: a network is ``f(l) = A_l(g(l-1))``, ``g(l) = act(f(l))`` for hidden layers l = 1..L and
logits ``f(L+1) = A_{L+1}(g(L))``. Consecutive affine layers fold into one block, so they add no
hyperplanes. Each block can apply itself (with biases) and its linear part (without biases).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Normalize

_AFFINE = (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten, Normalize)
_SKIPPED = (nn.Identity, nn.Dropout)
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)


@dataclass(frozen=True)
class AffineBlock:
    """Consecutive affine layers acting as one affine map A(z) = W z + b."""

    layers: Tuple[nn.Module, ...]
    names: Tuple[str, ...]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z)
        return z

    def linear(self, z: torch.Tensor) -> torch.Tensor:
        """The linear part W z (biases dropped), differentiable w.r.t. the layers' parameters."""
        for layer in self.layers:
            z = linear_part(layer, z)
        return z


@dataclass(frozen=True)
class Chain:
    """``blocks[0], act, blocks[1], act, ..., blocks[L]``: L hidden layers, then the logits block."""

    blocks: Tuple[AffineBlock, ...]
    slopes: Tuple[float, ...]  # negative-side slope of each hidden activation (0 for ReLU)

    @property
    def hidden(self) -> Iterator[Tuple[AffineBlock, float]]:
        return zip(self.blocks[:-1], self.slopes)

    @property
    def logits_block(self) -> AffineBlock:
        return self.blocks[-1]


def activation_mask(f: torch.Tensor, slope: float) -> torch.Tensor:
    """Diagonal of Σ(l): 1 where f > 0, else the negative-side slope (0 for ReLU)."""
    return torch.where(f > 0, torch.ones_like(f), torch.full_like(f, slope))


def batchnorm_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm: y = scale * x + shift."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight * inv_std
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _per_channel(v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (z.dim() - 2))


def linear_part(layer: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Applies the linear part (no bias) of one supported affine layer to z."""
    if isinstance(layer, nn.Linear):
        return F.linear(z, layer.weight)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(z, layer.weight, None)
    if isinstance(layer, (nn.AvgPool2d, nn.Flatten)):
        return layer(z)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, _ = batchnorm_scale_shift(layer)
        return z * _per_channel(scale, z)
    if isinstance(layer, Normalize):
        std = layer.std.reshape(()) if layer.std.numel() == 1 else _per_channel(layer.std, z)
        return z / std
    raise NotImplementedError(f"no linear part for {type(layer).__name__}")


def _leaves(module: nn.Module, prefix: str) -> Iterator[Tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, path)
        else:
            yield path, child


def _check_layer(path: str, layer: nn.Module) -> None:
    where = f"layer '{path}' ({type(layer).__name__})"
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if layer.training:
            raise ValueError(f"{where} is in training mode: its output depends on the whole batch, "
                             "so the network is not piecewise affine per sample; call model.eval() "
                             "or put the BatchNorm layers in eval mode")
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError(f"{where} has track_running_stats=False: it always normalises with batch "
                             "statistics, which is not a per-sample affine map")
    if isinstance(layer, nn.Dropout) and layer.training and layer.p > 0:
        raise ValueError(f"{where} is in training mode with p={layer.p}: random masks make the "
                         "geometry undefined; call model.eval() or use p=0")
    if isinstance(layer, nn.AvgPool2d) and layer.divisor_override is not None and layer.divisor_override <= 0:
        raise ValueError(f"{where} has a non-positive divisor_override")


def parse_model(model: nn.Module) -> Chain:
    """Turns a supported ``nn.Sequential`` (nested Sequentials allowed) into a :class:`Chain`.

    Raises ``NotImplementedError`` naming the layer and its position for unsupported layers
    (MaxPool, Sigmoid, ...) and ``ValueError`` for unusable configurations (not a Sequential,
    train-mode BatchNorm/Dropout, a network that does not end with an affine layer).
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be a torch.nn.Sequential of supported layers, got "
                         f"{type(model).__name__}")
    blocks: List[AffineBlock] = []
    slopes: List[float] = []
    layers: List[nn.Module] = []
    names: List[str] = []
    last_activation = None
    for path, layer in _leaves(model, ""):
        if isinstance(layer, _SKIPPED):
            _check_layer(path, layer)
            continue
        if isinstance(layer, _ACTIVATIONS):
            if not layers and last_activation is not None:
                raise ValueError(f"layer '{path}' ({type(layer).__name__}) directly follows the "
                                 f"activation '{last_activation}': two activations in a row are not "
                                 "supported")
            blocks.append(AffineBlock(tuple(layers), tuple(names)))
            slopes.append(float(layer.negative_slope) if isinstance(layer, nn.LeakyReLU) else 0.0)
            layers, names, last_activation = [], [], path
            continue
        if not isinstance(layer, _AFFINE):
            raise NotImplementedError(
                f"layer '{path}' ({type(layer).__name__}) is not supported: mmr_ext handles "
                "Linear, Conv2d, AvgPool2d, eval-mode BatchNorm1d/2d, Flatten, Identity, "
                "eval-mode Dropout, mmr_ext.Normalize, ReLU and LeakyReLU")
        _check_layer(path, layer)
        layers.append(layer)
        names.append(path)
    if not layers:
        if last_activation is None:
            raise ValueError("model has no affine layers")
        raise ValueError(f"model ends with the activation '{last_activation}': the logits must be an "
                         "affine function of the last hidden layer")
    blocks.append(AffineBlock(tuple(layers), tuple(names)))
    return Chain(tuple(blocks), tuple(slopes))
