"""Rows of a Linear layer after convolutions, built on demand (docs/MATH.md §1, §13.2): in reverse
(vector-Jacobian) order, the Linear layer's weight rows walked back through the traced layers and
activation masks onto the input, for all units of some samples or for chosen (sample, unit) pairs
(the last step onto the input fused with the dual norms when it is a conv); or, with a basis (the
patch rows of the layer's input), all rows of some samples in forward order from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..native import conv_transpose_fits, conv_transpose_row_distances, row_distances
from ..nn.adapters import adapter_of, pair
from .representations import Dense, Patches, take_samples


@dataclass
class ReverseRows:
    """Rows of a Linear layer after the traced layers, kept as (weights, trace) and built on demand
    by walking the layers backwards (vector-Jacobian order): all units of some samples, or chosen
    (sample, unit) pairs. Distances to them never store them (:func:`mmr_ext.native.lazy_row_distances`);
    a layer that needs them explicitly forces them once (``cache`` is shared by copies)."""

    weight: torch.Tensor  # [O, n] of the Linear layer
    trace: list  # the layers (layer, in_shape, out_shape) and masks before it
    weights: list  # per trace entry, the tensor its transpose uses (None: masks, pooling, flatten)
    in_shape: Tuple[int, ...]
    mask: Optional[torch.Tensor] = None  # [B, O] Σ of the following activation, not yet applied
    cache: dict = field(default_factory=dict)
    #: the patch rows of the layer's input, when the forward order is cheaper: all rows of a sample
    #: (the forward's distances, forcing) are then built in forward order from them; the pairs of
    #: the backward in whichever order costs fewer multiply-adds for them (:meth:`rows_of`)
    basis: Optional[Patches] = None

    @staticmethod
    def of(layer: nn.Linear, trace: list, in_shape, basis: Optional[Patches] = None) -> "ReverseRows":
        weights = [None if isinstance(e, torch.Tensor) else adapter_of(e[0]).transpose_weight(e[0]) for e in trace]
        return ReverseRows(layer.weight, list(trace), weights, tuple(in_shape), basis=basis)

    @property
    def d(self) -> int:
        return math.prod(self.in_shape)

    def tensors(self) -> List[torch.Tensor]:
        """The tensors the rows depend on, in the order :meth:`rows_of` takes them."""
        return [self.weight] + [w for w in self.weights if w is not None] + self._basis_tensors()

    def _basis_tensors(self) -> List[torch.Tensor]:
        if self.basis is None:
            return []
        return [self.basis.P] if self.basis.recipe is None else self.basis.recipe.tensors()

    def _unpack(self, tensors: Optional[Sequence[torch.Tensor]]):
        """(W, the trace's weights, the basis's tensors) from :meth:`tensors`' list."""
        if tensors is None:
            return self.weight, self.weights, self._basis_tensors()
        rest = iter(tensors[1:])
        weights = [None if w is None else next(rest) for w in self.weights]
        return tensors[0], weights, list(rest)

    def _basis_of(self, samples: torch.Tensor, tensors: Sequence[torch.Tensor]) -> Patches:
        """The basis's rows of ``samples``, differentiable in its tensors (rebuilt from its recipe
        when the pass did not keep them)."""
        basis = self.basis
        mask = None if basis.mask is None else take_samples(basis.mask, samples)
        if basis.recipe is not None:
            return replace(basis, P=basis.recipe.rows(samples, tensors), mask=mask, recipe=None)
        P = tensors[0]
        return replace(basis, P=P if P.shape[0] == 1 else take_samples(P, samples), mask=mask)

    def forward_pays(self, samples: torch.Tensor, units: torch.Tensor) -> bool:
        """Whether building all rows of the distinct samples in forward order from the basis costs
        fewer multiply-adds than walking the pairs' rows back one by one."""
        return self.basis is not None and self.forward_cheaper(torch.unique(samples).numel(), units.numel())

    def forward_cheaper(self, distinct: int, pairs: int) -> bool:
        """Whether all rows of ``distinct`` samples from the basis cost fewer multiply-adds than
        ``pairs`` rows walked back."""
        return distinct * self.basis.linear_macs(self.weight.shape[0]) < pairs * reverse_macs(self.trace, 1)

    def rows_of(self, samples: Optional[torch.Tensor], units: Optional[torch.Tensor],
                tensors: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """All rows [len(samples) or 1, O, d] (samples None: the whole batch), or with ``units``
        the rows [S, d] of the pairs (samples[i], units[i]); ``tensors`` replace :meth:`tensors`."""
        W, weights, basis_tensors = self._unpack(tensors)
        if self.basis is not None and units is None:
            return self.basis.linear_rows(W, samples)
        if self.basis is not None:  # pairs: from the basis when that is cheaper
            distinct, inverse = torch.unique(samples, return_inverse=True)
            if self.forward_cheaper(distinct.numel(), units.numel()):
                return self._basis_of(distinct, basis_tensors).linear_rows(W)[inverse, units]
        out = reverse_walk(W[None] if units is None else W[units][:, None], self.trace, weights, samples)
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return out if units is None else out[:, 0]

    def distances_of(self, samples: torch.Tensor, f: torch.Tensor, qs: Sequence[float],
                     tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Distances [Q, len(samples), O] to all rows of ``samples`` (f: their pre-activations), no
        autograd. When the walk ends with a conv on the input, that step runs fused with the dual
        norms and the conv's activation mask (:func:`mmr_ext.native.conv_transpose_row_distances`): the masked
        maps and the input-space rows are never stored."""
        W, weights, _ = self._unpack(tensors)
        fused = None if self.basis is not None else fusable_first_conv(self.trace, weights)
        if fused is None:
            return row_distances(f, self.rows_of(samples, None, tensors), qs)[0]
        at, weight = fused
        rest = at + 1
        mask = None
        if rest < len(self.trace) and isinstance(self.trace[rest], torch.Tensor):  # the conv's activation:
            mask, rest = take_samples(self.trace[rest], samples), rest + 1  # applied inside the fused step
        maps = reverse_walk(W[None], self.trace[rest:], weights[rest:], samples)
        maps = maps.expand((f.shape[0],) + tuple(maps.shape[1:]))
        conv, conv_in, _ = self.trace[at]
        return conv_transpose_row_distances(f, maps, mask, weight, pair(conv.stride), pair(conv.padding),
                                            pair(conv.dilation), conv_in, qs)

    def elements_per_sample(self) -> int:
        """Elements of the largest intermediate per sample when building all rows (in reverse order,
        as the backward may, even when the forward builds them from the basis)."""
        widest = max([math.prod(e[1]) for e in self.trace if not isinstance(e, torch.Tensor)] + [self.weight.shape[1]])
        return self.weight.shape[0] * widest

    def walk_elements(self) -> int:
        """Elements per sample of the intermediates that walking all rows back keeps for autograd."""
        sizes = [math.prod(e[1]) + math.prod(e[2]) for e in self.trace if not isinstance(e, torch.Tensor)]
        return self.weight.shape[0] * sum(sizes)

    def forced_distances(self, f: torch.Tensor, qs: Sequence[float]) -> Optional[torch.Tensor]:
        """Distances [Q, B, O] to the explicit rows once a later layer forced them (else None)."""
        return row_distances(f, self.cache["dense"].V, qs)[0] if "dense" in self.cache else None

    def for_backward(self) -> "ReverseRows":
        """The same rows without the basis's values (rebuilt from its recipe when needed), so that
        the backward's closures do not keep them alive."""
        return self if self.basis is None else replace(self, basis=self.basis.without_values())

    def forced_macs(self) -> float:
        """Multiply-adds per sample of :meth:`force` (the forward order from the basis)."""
        return self.basis.linear_macs(self.weight.shape[0])

    def force(self) -> Dense:
        """The rows as an explicit, differentiable Dense representation."""
        if "dense" not in self.cache:
            V = self.rows_of(None, None)
            self.cache["dense"] = Dense(V, V.shape[-1])
        return replace(self.cache["dense"], mask=self.mask)


def reverse_macs(trace: list, O: int) -> float:
    """Multiply-adds of walking O rows back through the traced layers (masks are free)."""
    total = sum(adapter_of(e[0]).row_cost(*e) for e in trace if not isinstance(e, torch.Tensor))
    return O * total


def reverse_walk(rows: torch.Tensor, trace: list, weights: list, samples: Optional[torch.Tensor]) -> torch.Tensor:
    """rows [N, O, *out] of the map after the traced layers, walked back to the traced layers'
    input: [N', O, *in].

    ``weights``: per trace entry, the tensor its layer's transpose reads (``transpose_weight``). Masks are taken at
    ``samples`` (one per row group; None: the whole batch, broadcasting N = 1).
    """
    for entry, weight in zip(reversed(trace), reversed(weights)):
        Bp, O = rows.shape[:2]
        if isinstance(entry, torch.Tensor):  # Σ of an activation: per sample
            # feature-map masks are stored channels-last (see _fast_geometry): the layout of the rows
            rows = rows * (entry if samples is None else take_samples(entry, samples))[:, None]
            continue
        layer, layer_in, _ = entry
        flat = adapter_of(layer).transpose(layer, rows.reshape((Bp * O,) + tuple(rows.shape[2:])), layer_in, weight)
        rows = flat.reshape((Bp, O) + tuple(layer_in))
    return rows


def fusable_first_conv(trace: list, weights: list) -> Optional[Tuple[int, torch.Tensor]]:
    """(index, weight) of the trace's first layer when it is a conv that the fused native step
    handles, after any per-channel input scalings (Normalize, BatchNorm2d), whose scales are folded
    into the returned conv weight; None otherwise."""
    scale = None
    for at, (entry, weight) in enumerate(zip(trace, weights)):
        if isinstance(entry, torch.Tensor):
            return None
        layer, layer_in, _ = entry
        kind = adapter_of(layer).kind
        if kind == "scale":
            scale = weight.reshape(-1) if scale is None else scale * weight.reshape(-1)
            continue
        if kind != "conv" or layer.groups != 1:
            return None
        if scale is not None:
            weight = weight * scale.reshape(1, -1, 1, 1)
        return (at, weight) if conv_transpose_fits(weight, layer_in) else None
    return None
