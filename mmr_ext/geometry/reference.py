"""Pure-PyTorch reference of the linear-region geometry (docs/MATH.md §1-2).

Pushes the identity matrix through the masked linear parts of the network (the authors'
algorithm): simple and exact, but it materialises V(l) for every sample and is therefore slow and
memory hungry. It is the oracle of the tests and the fallback when the native path is unavailable.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn.chain import Chain, activation_mask, parse_model
from ..checks import check_input, check_labels
from ..math.distances import row_norms, safe_distance
from ..math.norms import dual_exponent


Plane = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # value [B, n], rows [B, d, n], kept mask


def decision_geometry(logits: torch.Tensor, V_logits: torch.Tensor, labels: Optional[torch.Tensor]):
    """Reference class c, margins f_c - f_s [B, K] and difference rows V_c - V_s [B, d, K]."""
    c = logits.argmax(dim=1) if labels is None else labels
    margin = logits.gather(1, c[:, None]) - logits
    Vc = V_logits.gather(2, c[:, None, None].expand(-1, V_logits.shape[1], 1))
    return c, margin, Vc - V_logits


def _hidden_and_logits(chain: Chain, x: torch.Tensor):
    """Pre-activations f(l) [B, n_l] and V(l) [B, d, n_l] of every hidden layer, and the logits."""
    B = x.shape[0]
    d = x[0].numel()
    tangents = torch.eye(d, dtype=x.dtype, device=x.device).reshape((d,) + tuple(x.shape[1:]))
    tangents = tangents.unsqueeze(0).expand((B,) + tangents.shape).reshape((B * d,) + tuple(x.shape[1:]))
    g = x
    hidden: List[Tuple[torch.Tensor, torch.Tensor]] = []
    for block, slope in chain.hidden:
        f = block(g)
        Vt = block.linear(tangents)
        hidden.append((f.reshape(B, -1), Vt.reshape(B, d, -1)))
        mask = activation_mask(f.detach(), slope)
        g = f * mask
        tangents = (Vt.reshape((B, d) + tuple(f.shape[1:])) * mask.unsqueeze(1)).reshape(Vt.shape)
    logits = chain.logits_block(g)
    V_logits = chain.logits_block.linear(tangents).reshape(B, d, -1)
    return hidden, logits.reshape(B, -1), V_logits


def plane_distances(planes: Sequence[Plane], qs: Sequence[float]) -> List[torch.Tensor]:
    """Per dual exponent in qs, the distances [B, N] to the hyperplanes of every group of ``planes``
    (docs/MATH.md §2.2): a group is (value [B, n], rows [B, d, n], kept) where ``kept`` is None
    or a bool mask [B, n] with the same count per sample (the listed hyperplanes; the others are
    computed and dropped)."""
    out: List[List[torch.Tensor]] = [[] for _ in qs]
    for v, V, kept in planes:
        dist = torch.stack([safe_distance(v.abs(), row_norms(V, q, dim=1)) for q in qs])
        if kept is not None:
            dist = dist[:, kept].reshape(len(qs), v.shape[0], -1)
        for i in range(len(qs)):
            out[i].append(dist[i])
    return out


def distances_of(planes: Sequence[Plane], logits: torch.Tensor, V_logits: torch.Tensor, qs: Sequence[float],
                 labels: Optional[torch.Tensor]):
    """(boundary, decision) for every dual exponent in qs from the region's hyperplanes
    (:func:`plane_distances`) and the logits [B, K] with their rows [B, d, K] (docs/MATH.md §2)."""
    B = logits.shape[0]
    check_labels(labels, B, logits.shape[1], logits.device)
    c, margin, diff = decision_geometry(logits, V_logits, labels)
    out = []
    for q, groups in zip(qs, plane_distances(planes, qs)):
        boundary = torch.cat(groups, dim=1) if groups else logits.new_zeros((B, 0))
        decision = safe_distance(margin, row_norms(diff, q, dim=1)).scatter(1, c[:, None], math.inf)
        out.append((boundary, decision))
    return out


def concatenate(parts: Sequence) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One geometry (per norm (boundary, decision), logits) from those of consecutive sample chunks."""
    per_norm = [(torch.cat([part[0][i][0] for part in parts]), torch.cat([part[0][i][1] for part in parts]))
                for i in range(len(parts[0][0]))]
    return per_norm, torch.cat([part[1] for part in parts])


def reference_geometry(chain: Chain, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor]
                       ) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """(boundary, decision) for every dual exponent in qs, and the logits, by identity propagation."""
    hidden, logits, V_logits = _hidden_and_logits(chain, x)
    return distances_of([(f, V, None) for f, V in hidden], logits, V_logits, qs, labels), logits


def region_distances_reference(model: nn.Module, x: torch.Tensor, p, labels: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation of :func:`mmr_ext.region_distances` (same contract, pure PyTorch)."""
    chain = parse_model(model)
    q = dual_exponent(p)
    check_input(model, x)
    return reference_geometry(chain, x, (q,), labels)[0][0]
