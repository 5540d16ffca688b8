"""Parsing of an ``nn.Sequential`` into a chain of affine blocks and ReLU-type activations.

docs/MATH.md §1: a network is ``f(l) = A_l(g(l-1))``, ``g(l) = act(f(l))`` for hidden layers l = 1..L and
logits ``f(L+1) = A_{L+1}(g(L))``. Consecutive affine layers fold into one block, so they add no
hyperplanes. Each block can apply itself (with biases) and its linear part (without biases).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from torch import nn

from .adapters import ADAPTERS, adapter_for, adapter_of

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
            z = adapter_of(layer).linear(layer, z)
        return z

    def key_layer(self) -> nn.Module:
        """The block's fully connected or conv layer (its first layer when it has none)."""
        return next((layer for layer in self.layers if adapter_of(layer).kind in ("linear", "conv")), self.layers[0])


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


def _check_forward(path: str, module: nn.Module, kinds: Tuple[type, ...]) -> None:
    """Refuses a module whose class overrides the forward of the supported type it derives from:
    what is analysed must be the function the model computes (docs/MATH.md §12)."""
    base = next((k for k in type(module).__mro__ if k in kinds), None)
    if base is not None and type(module).forward is not base.forward:
        where = "the model" if not path else f"layer '{path}'"
        raise NotImplementedError(
            f"{where} ({type(module).__name__}) subclasses {base.__name__} but overrides forward: mmr_ext "
            f"would analyse the plain {base.__name__} instead of what your forward computes; use the "
            "plain layer types (a traced analysis of custom forwards is not supported yet)")


def _leaves(module: nn.Module, prefix: str) -> Iterator[Tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            _check_forward(path, child, (nn.Sequential,))
            yield from _leaves(child, path)
        else:
            _check_forward(path, child, _SKIPPED + _ACTIVATIONS + tuple(ADAPTERS))
            yield path, child


def _check_layer(path: str, layer: nn.Module) -> None:
    where = f"layer '{path}' ({type(layer).__name__})"
    if isinstance(layer, nn.Dropout) and layer.training and layer.p > 0:
        raise ValueError(f"{where} is in training mode with p={layer.p}: random masks make the "
                         "geometry undefined; call model.eval() or use p=0")
    adapter = adapter_for(layer)
    if adapter is not None:
        adapter.check(where, layer)


def parse_model(model: nn.Module) -> Chain:
    """Turns a supported ``nn.Sequential`` (nested Sequentials allowed) into a :class:`Chain`.

    Raises ``NotImplementedError`` naming the layer and its position for unsupported layers
    (MaxPool, Sigmoid, ..., and subclasses of supported types that override ``forward``) and ``ValueError`` for unusable configurations (not a Sequential,
    train-mode BatchNorm/Dropout, a network that does not end with an affine layer).
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be a torch.nn.Sequential of supported layers, got "
                         f"{type(model).__name__}")
    _check_forward("", model, (nn.Sequential,))
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
        if adapter_for(layer) is None:
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
