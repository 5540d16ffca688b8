"""Geometry of a linear region given an explicit activation pattern (docs/MATH.md §1, §8).

A ReLU network is affine on every set of inputs that share an activation pattern. For a pattern P
(per hidden layer, which units are active) the *region* of P is

    Q_P = { z : f^P_j(z) >= 0 for active units j, f^P_j(z) <= 0 for inactive units j },

where ``f^P(z) = V_P z + a_P`` are the pre-activations of the network in which every activation
is replaced by the fixed slope P prescribes (1 if active, else the negative slope: 0 for ReLU).
On Q_P the network coincides with this affine network, so its logits are ``L^P(z) = W_P z + c_P``.
The pattern need not be the one of any given point: flipping units of a point's pattern gives the
neighbouring regions explored by :func:`mmr_ext.certify` (an empty Q_P is allowed).

:func:`region_geometry` returns, in float64, the hyperplanes ``{z : <V_P[j], z> + a_P[j] = 0}`` of
every hidden unit and the logits' affine map; :meth:`RegionGeometry.decision` gives the decision
hyperplanes ``(w_c - w_s, b_c - b_s)``. Rows are obtained by pushing the identity through the
blocks' linear parts (``AffineBlock.linear``) and offsets by evaluating the masked network at
z = 0, so no layer arithmetic is repeated here. This materialises ``[B, N, d]`` rows: meant for
one or a few points at a time (about 30 MB per point for d = 784 and 5k hidden units).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn.chain import Chain, parse_model
from ..checks import check_input, check_labels

__all__ = ["Pattern", "RegionGeometry", "activation_pattern", "region_geometry", "flip_units",
           "unit_location", "to_float64", "PointRows"]

Pattern = List[torch.Tensor]  # per hidden layer: bool [B, n_l], True = active (slope 1)


def to_float64(model: nn.Module) -> nn.Module:
    """``model`` itself when all its floating tensors are float64, else a float64 deep copy."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.dtype == torch.float64 for t in tensors if t.is_floating_point()):
        return model
    return copy.deepcopy(model).to(torch.float64)


def _masked_forward(chain: Chain, z: torch.Tensor, pattern: Optional[Pattern]):
    """Pre-activations [B, n_l] of every hidden layer and the logits [B, K].

    With ``pattern=None`` this is the network itself (masks from the signs); otherwise the
    activations use the pattern's fixed slopes (the affine extension f^P of the region).
    """
    B = z.shape[0]
    pre = []
    g = z
    for l, (block, slope) in enumerate(chain.hidden):
        f = block(g)
        active = f > 0 if pattern is None else pattern[l].reshape(f.shape)
        pre.append(f.reshape(B, -1))
        g = f * torch.where(active, torch.ones_like(f), torch.full_like(f, slope))
    return pre, chain.logits_block(g).reshape(B, -1)


@torch.no_grad()
def activation_pattern(model: nn.Module, x: torch.Tensor) -> Pattern:
    """The activation pattern of each point of ``x``: per hidden layer a bool [B, n_l] (f > 0).

    Units are flattened in each layer's own order ((C, H, W) for conv layers), as in
    :func:`mmr_ext.region_distances`. A unit with f = 0 exactly counts as inactive.
    """
    chain = parse_model(model)
    check_input(model, x)
    pre, _ = _masked_forward(chain, x, None)
    return [f > 0 for f in pre]


def unit_location(layer_sizes: Sequence[int], unit: int) -> Tuple[int, int]:
    """(layer, index within the layer) of a global unit index (units numbered layer by layer)."""
    if isinstance(unit, bool):
        raise TypeError(f"unit must be an integer, got {unit!r}")
    try:
        unit = operator.index(unit)
    except TypeError:
        raise TypeError(f"unit must be an integer, got {unit!r}") from None
    total = sum(layer_sizes)
    if not 0 <= unit < total:
        raise ValueError(f"unit {unit} out of range: the network has {total} hidden units")
    for layer, n in enumerate(layer_sizes):
        if unit < n:
            return layer, unit
        unit -= n
    raise AssertionError("unreachable")


def flip_units(pattern: Pattern, units: Sequence[int]) -> Pattern:
    """A copy of ``pattern`` with the given global units flipped (for every point of the batch)."""
    sizes = [m.shape[-1] for m in pattern]
    out = [m.clone() for m in pattern]
    for unit in units:
        layer, j = unit_location(sizes, unit)
        out[layer][..., j] = ~out[layer][..., j]
    return out


@dataclass(frozen=True)
class RegionGeometry:
    """Hyperplanes of the linear region of an activation pattern, for a batch of B patterns.

    Attributes (float64):
        weight: [B, N, d] rows V_P of all hidden units, layer by layer (d = input numel).
        bias: [B, N] offsets a_P: unit j's hyperplane is {z : <weight[j], z> + bias[j] = 0}.
        logit_weight: [B, K, d] and logit_bias: [B, K]: the logits L^P(z) on the region.
        pattern: [B, N] bool, the pattern (True = active) the geometry was computed for.
        layer_sizes: units per hidden layer.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    logit_weight: torch.Tensor
    logit_bias: torch.Tensor
    pattern: torch.Tensor
    layer_sizes: Tuple[int, ...]

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        B, d = self.weight.shape[0], self.weight.shape[2]
        z = z.to(torch.float64).reshape(z.shape[0], -1)
        if z.shape[1] != d or z.shape[0] not in (1, B):
            raise ValueError(f"z must be a batch of {B} points of {d} entries, got shape {tuple(z.shape)}")
        return z

    def preactivations(self, z: torch.Tensor) -> torch.Tensor:
        """The region's affine pre-activations f^P(z) [B, N] (equal to the network's on Q_P)."""
        return torch.einsum("bnd,bd->bn", self.weight, self._flat(z)) + self.bias

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The region's affine logits L^P(z) [B, K] (equal to the network's on Q_P)."""
        return torch.einsum("bkd,bd->bk", self.logit_weight, self._flat(z)) + self.logit_bias

    def violated(self, z: torch.Tensor) -> torch.Tensor:
        """bool [B, N]: units whose sign at z contradicts the pattern (z ∉ Q_P iff any is True)."""
        f = self.preactivations(z)
        return torch.where(self.pattern, f < 0, f > 0)

    def decision(self, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decision hyperplanes (w_c - w_s [B, K, d], b_c - b_s [B, K]) for reference classes c.

        Positive on the side where class c beats class s; the row s = c is zero.
        """
        B, K = self.logit_bias.shape
        check_labels(labels, B, K, self.logit_bias.device)
        c = labels.long()
        wc = self.logit_weight[torch.arange(B, device=c.device), c]
        bc = self.logit_bias.gather(1, c[:, None])
        return wc[:, None, :] - self.logit_weight, bc - self.logit_bias


def _check_pattern(pattern, sizes: Sequence[int], B: int, device) -> Pattern:
    if not isinstance(pattern, (list, tuple)):
        raise TypeError(f"pattern must be a list of bool masks, one per hidden layer, got "
                        f"{type(pattern).__name__}")
    if len(pattern) != len(sizes):
        raise ValueError(f"pattern has {len(pattern)} masks but the network has {len(sizes)} hidden layers")
    out = []
    for l, (m, n) in enumerate(zip(pattern, sizes)):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"pattern[{l}] must be a bool tensor (True = active)")
        if m.device != device:
            raise ValueError(f"pattern[{l}] is on {m.device} but x is on {device}")
        if m.dim() == 1:
            m = m.unsqueeze(0)
        if m.dim() != 2 or m.shape[1] != n or m.shape[0] not in (1, B):
            raise ValueError(f"pattern[{l}] must have shape ({B}, {n}) or ({n},), got {tuple(m.shape)}")
        out.append(m.expand(B, n))
    return out


@torch.no_grad()
def region_geometry(model: nn.Module, x: torch.Tensor, pattern: Optional[Pattern] = None) -> RegionGeometry:
    """Hyperplanes (float64) of the linear region of ``pattern`` (default: each point's own region).

    Args:
        model: ``nn.Sequential`` of supported layers; a float64 copy is used if it is not float64.
        x: batch [B, ...] of inputs: defines the input shape, and the default pattern.
        pattern: per hidden layer a bool mask [B, n_l] or [n_l] (shared), True = active; e.g. from
            :func:`activation_pattern`, possibly with units flipped by :func:`flip_units`.

    Returns:
        :class:`RegionGeometry` with the rows and offsets of every hidden unit and of the logits.
    """
    parse_model(model)  # clear errors before the model runs (e.g. BatchNorm in train mode)
    check_input(model, x)
    model64 = to_float64(model)
    chain = parse_model(model64)
    x64 = x.detach().to(torch.float64)
    B = x64.shape[0]
    d = x64[0].numel()
    in_shape = tuple(x64.shape[1:])
    if pattern is None:
        pattern = [f > 0 for f in _masked_forward(chain, x64, None)[0]]
    # layer sizes from a plain forward of one point (cheap), then validate the pattern
    sizes = [f.shape[1] for f in _masked_forward(chain, x64[:1], None)[0]]
    masks = _check_pattern(pattern, sizes, B, x64.device)

    eye = torch.eye(d, dtype=torch.float64, device=x64.device)
    tangents = eye.reshape((1, d) + in_shape).expand((B, d) + in_shape).reshape((B * d,) + in_shape)
    offset = torch.zeros_like(x64)  # the masked network evaluated at z = 0 gives the offsets
    rows, biases = [], []
    for (block, slope), active in zip(chain.hidden, masks):
        f0 = block(offset)
        Vt = block.linear(tangents)
        shape = tuple(f0.shape[1:])
        n = f0[0].numel()
        rows.append(Vt.reshape(B, d, n))
        biases.append(f0.reshape(B, n))
        ones = torch.ones(active.shape, dtype=torch.float64, device=x64.device)
        mask = torch.where(active, ones, torch.full_like(ones, float(slope))).reshape((B,) + shape)
        offset = f0 * mask
        tangents = (Vt.reshape((B, d) + shape) * mask.unsqueeze(1)).reshape(Vt.shape)
    logit_bias = chain.logits_block(offset).reshape(B, -1)
    logit_weight = chain.logits_block.linear(tangents).reshape(B, d, -1).transpose(1, 2).contiguous()
    if rows:
        weight = torch.cat(rows, dim=2).transpose(1, 2).contiguous()
        bias = torch.cat(biases, dim=1)
        flat = torch.cat(masks, dim=1)
    else:
        weight = x64.new_zeros((B, 0, d))
        bias = x64.new_zeros((B, 0))
        flat = torch.zeros((B, 0), dtype=torch.bool, device=x64.device)
    return RegionGeometry(weight, bias, logit_weight, logit_bias, flat, tuple(sizes))


class PointRows:
    """Hyperplanes of the linear region of one point, row by row on demand (float64).

    :func:`region_geometry` materialises all N rows (d forward tangents); this computes only the
    requested ones, by reverse mode through the network with the point's activation pattern fixed
    (one backward pass per row, batched), for searches that need a few rows of many points. The
    offsets and logits come from the masked network at z = 0 (as in :func:`region_geometry`).
    """

    def __init__(self, model64: nn.Module, x: torch.Tensor):
        self.chain = parse_model(model64)
        self.x = x.detach().to(torch.float64)[:1]
        with torch.no_grad():
            pre, _ = _masked_forward(self.chain, self.x, None)
            self.pattern = [f > 0 for f in pre]
            zero_pre, zero_logits = _masked_forward(self.chain, torch.zeros_like(self.x), self.pattern)
        self.bias = torch.cat(zero_pre, dim=1)[0] if zero_pre else self.x.new_zeros(0)  # [N]
        self.logit_bias = zero_logits[0]  # [K]

    def _rows(self, pick) -> torch.Tensor:
        R = pick.shape[0]
        z = self.x.expand((R,) + tuple(self.x.shape[1:])).clone().requires_grad_(True)
        with torch.enable_grad():
            pre, logits = _masked_forward(self.chain, z, [m.expand(R, -1) for m in self.pattern])
            values = torch.cat(pre + [logits], dim=1).gather(1, pick[:, None]).sum()
            grad, = torch.autograd.grad(values, z)
        return grad.reshape(R, -1)

    def units(self, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows [R, d] and offsets [R] of the hidden units with these global indices."""
        if index.numel() == 0:
            return self.x.new_zeros((0, self.x[0].numel())), self.x.new_zeros(0)
        return self._rows(index), self.bias[index]

    def logits(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The region's logits as an affine map: rows [K, d] and offsets [K]."""
        K = self.logit_bias.shape[0]
        return self._rows(self.bias.shape[0] + torch.arange(K, device=self.x.device)), self.logit_bias
