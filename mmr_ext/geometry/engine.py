"""The row engine: one pass over the network builds every hidden layer's rows in the cheapest
representation and reduces them to dual-norm distances with the native kernels (docs/MATH.md
§1-2, §13); explicit rows over the memory budget are built in checkpointed chunks of samples.
Layers or layouts outside the representations make :func:`compute_geometry` use the reference.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checks import check_chunk_size, check_input, check_labels
from ..math.norms import dual_exponent
from ..native import lazy_row_distances, native_or_warn, recomputing, row_distances
from ..nn.chain import Chain, activation_mask, parse_model
from .memory import MemoryBudget
from .reference import decision_geometry, reference_geometry
from .representations import Dense, Patches, Unsupported, identity_rows, take_samples
from .sparsity import RECORD
from .steps import ON_DEMAND, RowPass, apply_block, mask_rows, to_dense

Geometry = Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def _walk(chain: Chain, x: torch.Tensor, state: RowPass, on_hidden: Callable) -> Tuple[list, Dense, torch.Tensor]:
    """Builds the rows layer by layer: ``on_hidden(f_flat, rep)`` of every hidden layer (in
    order; a pair with the block's key layer), the explicit rows of the logits and the logits [B, K]."""
    B = x.shape[0]
    rep = identity_rows(x)
    g = x
    layers = []
    for block, slope in chain.hidden:
        rep, f = apply_block(rep, block, g, state)
        layers.append((block.key_layer(), on_hidden(f.reshape(B, -1), rep)))
        mask = activation_mask(f.detach(), slope)
        g = f * mask
        rep = mask_rows(rep, mask)
        # channels-last like the feature-map rows of the reverse walk: gathers keep the layout
        state.trace.append(mask.contiguous(memory_format=torch.channels_last) if mask.dim() == 4 else mask)
    rep, logits = apply_block(rep, chain.logits_block, g, state)
    return layers, to_dense(rep, state), logits.reshape(B, -1)


def explicit_elements_per_sample(chain: Chain, x: torch.Tensor, sparsity: Optional[dict]) -> Tuple[int, int]:
    """Elements per sample of the largest explicit intermediates of a pass that the backward keeps,
    and of those alive during the pass only (0: none). These sizes depend on the shapes and the
    plan only, so a pass over two samples that builds no distances measures them."""
    state = RowPass(sparsity=sparsity)
    with torch.no_grad():
        _walk(chain, x[:2], state, lambda f, rep: None)
    return state.ledger.per_sample, state.ledger.transient


def fast_geometry(chain: Chain, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor],
                  budget: MemoryBudget, sparsity: Optional[dict] = None) -> Geometry:
    """(boundary, decision) for every dual exponent in qs, and the logits; rows are built once,
    as planned from ``sparsity`` (:mod:`.sparsity`), whose record the backward updates."""
    B = x.shape[0]

    def hidden_distances(f_flat, rep):
        # rows built on demand, and transient patch rows, wait until it is known whether a later
        # layer forces them (or keeps them for the backward)
        transient = isinstance(rep, Patches) and rep.recipe is not None
        return (f_flat, rep) if isinstance(rep, ON_DEMAND) or transient else row_distances(f_flat, rep.rows(), qs)[0]

    layers, rows, logits = _walk(chain, x, RowPass(sparsity=sparsity), hidden_distances)
    check_labels(labels, B, logits.shape[1], x.device)
    V = rows.V.expand(B, -1, -1) if rows.V.shape[0] == 1 else rows.V
    c, margin, diff = decision_geometry(logits, V.transpose(1, 2), labels)
    decisions = row_distances(margin, diff.transpose(1, 2), qs, is_signed=True)[0]
    boundary = []
    for layer, entry in layers:
        if isinstance(entry, tuple):
            entry = deferred_distances(*entry, qs, budget)
        RECORD.watch(layer, entry)
        boundary.append(entry)
    out = []
    for i, decision in enumerate(decisions):
        decision = decision.scatter(1, c[:, None], math.inf)
        out.append((torch.cat([d[i] for d in boundary], dim=1) if boundary else logits.new_zeros((B, 0)), decision))
    return out, logits


def deferred_distances(f_flat: torch.Tensor, rep, qs: Sequence[float], budget: MemoryBudget) -> torch.Tensor:
    """Distances [Q, B, n] to rows whose distances waited for the end of the pass: explicit when a
    later layer forced (or kept) them, else built on demand (:func:`mmr_ext.native.lazy_row_distances`)."""
    B = f_flat.shape[0]
    if isinstance(rep, Patches):
        if rep.cache.get("kept"):
            return row_distances(f_flat, rep.rows(), qs)[0]
        recipe, P = rep.recipe, rep.P.detach()

        def distances_of(samples, f, qs, tensors):
            rows = take_samples(P, samples)
            return row_distances(f, rows.reshape(rows.shape[0], f.shape[1], -1), qs)[0]
        chunk = budget.lazy_chunk(f_flat.shape[1] * recipe.pair_elements(), B)
        return lazy_row_distances(f_flat, recipe.pair_rows, distances_of, recipe.tensors(), qs, chunk)
    forced = rep.forced_distances(f_flat, qs)  # a later layer needed the rows explicitly
    if forced is not None:
        return forced
    return lazy_row_distances(f_flat, rep.rows_of, rep.distances_of, rep.tensors(), qs,
                              budget.lazy_chunk(rep.elements_per_sample(), B), rep.forward_pays)


def budgeted_geometry(chain: Chain, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor],
                      budget: MemoryBudget, sparsity: Optional[dict] = None) -> Geometry:
    """:func:`fast_geometry` of the whole batch, or, when its explicit rows (deep conv patches)
    would break the budget, of chunks of samples, each checkpointed under autograd (its rows are
    rebuilt in the backward, distances to rows built on demand are not), so that one chunk's rows
    are alive at a time."""
    B = x.shape[0]
    kept, transient = explicit_elements_per_sample(chain, x, sparsity) if B > 1 else (0, 0)
    n = budget.samples_per_pass(max(kept, transient), B) if B > 1 else B
    if n >= B:
        return fast_geometry(chain, x, qs, labels, budget, sparsity)
    checkpointed = budget.samples_per_pass(kept, B) < B  # else only transient rows break the budget
    parts = []
    for start in range(0, B, n):
        args = (chain, x[start:start + n], qs, None if labels is None else labels[start:start + n], budget, sparsity)
        if torch.is_grad_enabled() and checkpointed:
            parts.append(checkpoint(fast_geometry, *args, use_reentrant=False,
                                    context_fn=lambda: (nullcontext(), recomputing())))
        else:
            parts.append(fast_geometry(*args))
    per_norm = [(torch.cat([part[0][i][0] for part in parts]), torch.cat([part[0][i][1] for part in parts]))
                for i in range(len(qs))]
    return per_norm, torch.cat([part[1] for part in parts])


def compute_geometry(model: nn.Module, x: torch.Tensor, ps: Sequence, labels: Optional[torch.Tensor] = None,
                     budget: MemoryBudget = MemoryBudget()) -> Geometry:
    """Validated (boundary, decision) per norm in ps and the logits, native when possible."""
    chain = parse_model(model)
    qs = [dual_exponent(p) for p in ps]
    check_input(model, x)
    if native_or_warn():
        try:
            return budgeted_geometry(chain, x, qs, labels, budget, RECORD.snapshot())
        except Unsupported:
            pass
    return reference_geometry(chain, x, qs, labels)


def region_distances(model: nn.Module, x: torch.Tensor, p, labels: Optional[torch.Tensor] = None, *,
                     chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """lp-distances of each sample to its region's hyperplanes (docs/MATH.md §2).

    Args:
        model: ``nn.Sequential`` of supported layers (see README).
        x: float32/float64 batch [B, ...] on the model's device.
        p: norm, any float >= 1 or ``float('inf')``.
        labels: optional int64 [B] reference classes (default: the predicted classes).
        chunk_size: memory budget, in samples: rows that are built on demand (the second conv
            layer, fully connected layers after convolutions) are built for at most this many
            samples at a time and never stored; the backward rebuilds only the rows it needs.
            Explicit rows of deeper convolutions (patches) are built for at most this many
            samples at a time too, each chunk checkpointed (rebuilt in the backward). Default: as
            many samples as keep the largest such intermediate under
            :data:`mmr_ext.geometry.memory.DEFAULT_CHUNK_ELEMENTS`
            elements. Only speed and memory depend on it.

    Returns:
        boundary [B, N]: distance to each hidden unit's hyperplane, units ordered by layer then by
        the layer's flattening order; +inf for units whose row of V is zero.
        decision [B, K]: signed distance to the hyperplane between the reference class c and each
        class s (negative when x is misclassified w.r.t. c), +inf at s = c.

    Differentiable w.r.t. x and the model's parameters. Uses the native kernels; falls back to
    :func:`region_distances_reference` (same results) for layouts the fast path does not cover
    or when the compiled extension is missing.
    """
    check_chunk_size(chunk_size)
    return compute_geometry(model, x, (p,), labels, MemoryBudget(chunk_size))[0][0]
