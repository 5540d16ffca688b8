"""Parsing of a model into a chain of affine blocks and ReLU-type activations.

docs/MATH.md §1: a network is ``f(l) = A_l(g(l-1))``, ``g(l) = act(f(l))`` for hidden layers l = 1..L and
logits ``f(L+1) = A_{L+1}(g(L))``. Consecutive affine layers fold into one block, so they add no
hyperplanes. Each block can apply itself (with biases) and its linear part (without biases).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from torch import nn

from .adapters import adapter_for, adapter_of
from .trace import ACTIVATIONS, LAYERS, POOLS, SKIPPED, TracedOp, needs_tracing, traced_ops



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

    def as_sequential(self) -> nn.Sequential:
        """The plain ``nn.Sequential`` of the chain's layers (the same modules): computes what the
        parsed model computes, and pickles without the model's class (e.g. for worker processes)."""
        layers: List[nn.Module] = []
        for block, slope in self.hidden:
            layers += list(block.layers) + [nn.ReLU() if slope == 0 else nn.LeakyReLU(slope)]
        return nn.Sequential(*layers, *self.logits_block.layers)


def activation_mask(f: torch.Tensor, slope: float) -> torch.Tensor:
    """Diagonal of Σ(l): 1 where f > 0, else the negative-side slope (0 for ReLU)."""
    return torch.where(f > 0, torch.ones_like(f), torch.full_like(f, slope))


def _leaves(module: nn.Sequential, prefix: str) -> Iterator[Tuple[str, nn.Module]]:
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, path)
        else:
            yield path, child


def check_layer(path: str, layer: nn.Module) -> None:
    """Raises ValueError when the layer at ``path`` is not a fixed map (train-mode Dropout, a
    configuration its adapter refuses)."""
    where = f"layer '{path}' ({type(layer).__name__})"
    if isinstance(layer, nn.Dropout) and layer.training and layer.p > 0:
        raise ValueError(f"{where} is in training mode with p={layer.p}: random masks make the "
                         "geometry undefined; call model.eval() or use p=0")
    if isinstance(layer, POOLS) and (layer.ceil_mode or layer.return_indices):
        raise NotImplementedError(f"{where} uses ceil_mode or return_indices: mmr_ext supports max pooling "
                                  "with kernel_size, stride, padding and dilation")
    adapter = adapter_for(layer)
    if adapter is not None:
        adapter.check(where, layer)


def model_ops(model: nn.Module) -> List[TracedOp]:
    """The operations the model computes: an ``nn.Sequential`` of plain layers (nested
    Sequentials allowed) by its layers, any other module by its traced forward."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Sequential) and not needs_tracing(model):
        return [TracedOp(path, layer, (i - 1,)) for i, (path, layer) in enumerate(_leaves(model, ""))]
    return traced_ops(model)


def is_chain(ops: List[TracedOp]) -> bool:
    """Whether the operations form a chain of affine layers and activations (no max pooling, no
    sum of branches)."""
    return all(op.inputs == (i - 1,) and op.layer is not None and not isinstance(op.layer, POOLS)
               for i, op in enumerate(ops))


def chain_of(ops: List[TracedOp]) -> Chain:
    """The :class:`Chain` of operations for which :func:`is_chain` holds."""
    blocks: List[AffineBlock] = []
    slopes: List[float] = []
    layers: List[nn.Module] = []
    names: List[str] = []
    last_activation = None
    for op in ops:
        path, layer = op.name, op.layer
        if isinstance(layer, SKIPPED):
            check_layer(path, layer)
            continue
        if isinstance(layer, ACTIVATIONS):
            if not layers and last_activation is not None:
                raise ValueError(f"layer '{path}' ({type(layer).__name__}) directly follows the "
                                 f"activation '{last_activation}': two activations in a row are not "
                                 "supported")
            blocks.append(AffineBlock(tuple(layers), tuple(names)))
            slopes.append(activation_slope(layer))
            layers, names, last_activation = [], [], path
            continue
        check_affine(path, layer)
        layers.append(layer)
        names.append(path)
    if not layers:
        if last_activation is None:
            raise ValueError("model has no affine layers")
        raise ValueError(f"model ends with the activation '{last_activation}': the logits must be an "
                         "affine function of the last hidden layer")
    blocks.append(AffineBlock(tuple(layers), tuple(names)))
    return Chain(tuple(blocks), tuple(slopes))


def activation_slope(layer: nn.Module) -> float:
    """The negative-side slope of a ReLU-type activation (0 for ReLU)."""
    return float(layer.negative_slope) if isinstance(layer, nn.LeakyReLU) else 0.0


def check_affine(path: str, layer: nn.Module) -> None:
    """Raises for a layer that is neither an activation nor a supported affine layer."""
    if adapter_for(layer) is None:
        raise NotImplementedError(
            f"layer '{path}' ({type(layer).__name__}) is not supported: mmr_ext handles {LAYERS}")
    check_layer(path, layer)


def parse_model(model: nn.Module) -> Chain:
    """Turns a model that computes a chain (affine layers and ReLU-type activations, one after the
    other) into a :class:`Chain`: an ``nn.Sequential`` of plain layers by its layers, any other
    module by the chain its traced forward computes (:func:`mmr_ext.nn.trace.traced_ops`).

    Raises ``NotImplementedError`` naming the layer (or the graph node and source line) of
    unsupported operations (Sigmoid, ...) and for graph networks (max pooling, residual additions:
    :func:`mmr_ext.nn.graph.parse_network` parses those), and ``ValueError`` for unusable
    configurations (not a module, train-mode BatchNorm/Dropout, a network that does not end with an
    affine layer).
    """
    ops = model_ops(model)
    if not is_chain(ops):
        kind = next(("max pooling" if isinstance(op.layer, POOLS) else "a sum of two branches")
                    for i, op in enumerate(ops) if op.inputs != (i - 1,) or op.layer is None
                    or isinstance(op.layer, POOLS))
        raise NotImplementedError(f"this operation supports chains of affine layers and activations only; the "
                                  f"model computes {kind} (a graph network)")
    return chain_of(ops)
