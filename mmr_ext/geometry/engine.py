"""The row engine: one pass over the network builds every hidden layer's rows in the cheapest
representation, as planned from the shapes and the last backward's gradient sparsity, and reduces
them to dual-norm distances with the native kernels (docs/MATH.md §1-2, §13); explicit rows over
the memory budget are built in chunks of samples. Layers or layouts outside the representations
make :func:`compute_geometry` use the reference.
"""
from __future__ import annotations

import functools
import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checks import check_chunk_size, check_input, check_labels
from ..math.norms import dual_exponent
from ..native import lazy_row_distances, native_or_warn, recomputing, row_distances
from ..nn.chain import Chain, activation_mask
from ..nn.graph import Graph, parse_network
from .memory import MemoryBudget
from .graph_reference import graph_geometry
from .reference import concatenate, decision_geometry, reference_geometry
from .representations import Dense, Patches, Unsupported, identity_rows, take_samples
from .sparsity import RECORD
from .steps import ON_DEMAND, RowPass, apply_block, mask_rows, to_dense

Geometry = Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def _walk(chain: Chain, x: torch.Tensor, state: RowPass, on_hidden: Callable) -> Tuple[list, Dense, torch.Tensor]:
    """Builds the rows layer by layer: ``on_hidden(index, f_flat, rep)`` of every hidden layer (in
    order; a pair with the block's key layer), the explicit rows of the logits and the logits [B, K]."""
    B = x.shape[0]
    rep = identity_rows(x)
    g = x
    layers = []
    key = chain.logits_block.key_layer()
    state.logits_rows = getattr(key, "out_features", None) or getattr(key, "out_channels", 1)
    for index, (block, slope) in enumerate(chain.hidden):
        state.index = index
        rep, f = apply_block(rep, block, g, state)
        layers.append((block.key_layer(), on_hidden(index, f.reshape(B, -1), rep)))
        mask = activation_mask(f.detach(), slope)
        g = f * mask
        rep = mask_rows(rep, mask)
        # channels-last like the feature-map rows of the reverse walk: gathers keep the layout
        state.trace.append(mask.contiguous(memory_format=torch.channels_last) if mask.dim() == 4 else mask)
    state.index = len(layers)
    rep, logits = apply_block(rep, chain.logits_block, g, state)
    return layers, to_dense(rep, state), logits.reshape(B, -1)


@dataclass(frozen=True)
class PassPlan:
    """How a pass builds its rows, fixed before it runs: the gradient densities it plans from
    (:mod:`.sparsity`), and, measured by a pass over two samples that builds no distances (these
    depend on the shapes and the densities only), the elements per sample of its largest explicit
    intermediates that the backward keeps and of those alive during the pass only, and per hidden
    layer whether a later layer keeps its patch rows (else they are transient; not measured: all
    explicit)."""

    sparsity: Optional[dict] = None
    kept_elements: int = 0
    transient_elements: int = 0
    kept_rows: Tuple[bool, ...] = ()

    @staticmethod
    def measure(chain: Chain, x: torch.Tensor, sparsity: Optional[dict]) -> "PassPlan":
        state = RowPass(sparsity=sparsity)
        with torch.no_grad():
            layers = _walk(chain, x[:2], state, lambda index, f, rep: rep)[0]
        kept = tuple(isinstance(rep, Patches) and bool(rep.cache.get("kept")) for _, rep in layers)
        return PassPlan(sparsity, state.ledger.per_sample, state.ledger.transient, kept)


def fast_geometry(chain: Chain, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor],
                  budget: MemoryBudget, plan: PassPlan) -> Geometry:
    """(boundary, decision) for every dual exponent in qs, and the logits; rows are built once,
    as ``plan`` says (its gradient densities the backward updates in the record)."""
    B = x.shape[0]

    def hidden_distances(index, f_flat, rep):
        if isinstance(rep, ON_DEMAND):  # waits until it is known whether a later layer forces them
            return f_flat, rep
        if isinstance(rep, Patches) and rep.recipe is not None and plan.kept_rows and not plan.kept_rows[index]:
            return transient_distances(f_flat, rep, qs, budget)
        return row_distances(f_flat, rep.rows(), qs)[0]

    layers, rows, logits = _walk(chain, x, RowPass(sparsity=plan.sparsity, kept_rows=plan.kept_rows), hidden_distances)
    check_labels(labels, B, logits.shape[1], x.device)
    V = rows.V.expand(B, -1, -1) if rows.V.shape[0] == 1 else rows.V
    c, margin, diff = decision_geometry(logits, V.transpose(1, 2), labels)
    decisions = row_distances(margin, diff.transpose(1, 2), qs, is_signed=True)[0]
    boundary = []
    for layer, entry in layers:
        if isinstance(entry, tuple):
            entry = on_demand_distances(*entry, qs, budget)
        if isinstance(layer, nn.Linear):  # the layers whose density a plan reads (:func:`.steps.linear_step`)
            RECORD.watch(layer, entry)
        boundary.append(entry)
    out = []
    for i, decision in enumerate(decisions):
        decision = decision.scatter(1, c[:, None], math.inf)
        out.append((torch.cat([d[i] for d in boundary], dim=1) if boundary else logits.new_zeros((B, 0)), decision))
    return out, logits


def transient_distances(f_flat: torch.Tensor, rep: Patches, qs: Sequence[float], budget: MemoryBudget) -> torch.Tensor:
    """Distances [Q, B, n] to patch rows that no layer keeps: from the explicit rows, but the
    backward rebuilds the pairs it needs from the rows' recipe (:func:`mmr_ext.native.lazy_row_distances`)."""
    recipe, P = rep.recipe, rep.P.detach()

    def distances_of(samples, f, qs, tensors):
        rows = take_samples(P, samples)
        return row_distances(f, rows.reshape(rows.shape[0], f.shape[1], -1), qs)[0]
    chunk = budget.lazy_chunk(f_flat.shape[1] * recipe.pair_elements(), f_flat.shape[0])
    return lazy_row_distances(f_flat, recipe.pair_rows, distances_of, recipe.tensors(), qs, chunk)


def on_demand_distances(f_flat: torch.Tensor, rep, qs: Sequence[float], budget: MemoryBudget) -> torch.Tensor:
    """Distances [Q, B, n] to rows built on demand: explicit when a later layer forced them."""
    forced = rep.forced_distances(f_flat, qs)
    if forced is not None:
        return forced
    rebuild = rep.for_backward()
    return lazy_row_distances(f_flat, rebuild.rows_of, rep.distances_of, rep.tensors(), qs,
                              budget.lazy_chunk(rep.elements_per_sample(), f_flat.shape[0]), rebuild.forward_pays)


def budgeted_geometry(chain: Chain, x: torch.Tensor, qs: Sequence[float], labels: Optional[torch.Tensor],
                      budget: MemoryBudget, sparsity: Optional[dict] = None) -> Geometry:
    """:func:`fast_geometry` of the whole batch, or, when its explicit rows would break the budget,
    of chunks of samples, so that one chunk's rows are alive at a time: checkpointed under autograd
    when rows the backward keeps break it (recomputed in the backward, except what only distances
    read), plain chunks when only transient rows do."""
    B = x.shape[0]
    plan = PassPlan.measure(chain, x, sparsity) if B > 1 else PassPlan(sparsity)
    n = budget.samples_per_pass(max(plan.kept_elements, plan.transient_elements), B) if B > 1 else B
    if n >= B:
        return fast_geometry(chain, x, qs, labels, budget, plan)
    checkpointed = budget.samples_per_pass(plan.kept_elements, B) < B  # else only transient rows break it
    parts = []
    for start in range(0, B, n):
        args = (chain, x[start:start + n], qs, None if labels is None else labels[start:start + n], budget, plan)
        if torch.is_grad_enabled() and checkpointed:
            parts.append(checkpoint(fast_geometry, *args, use_reentrant=False,
                                    context_fn=lambda: (nullcontext(), recomputing())))
        else:
            parts.append(fast_geometry(*args))
    return concatenate(parts)


@functools.lru_cache(maxsize=None)
def warn_reference_path() -> None:
    """One warning per process: the rows of a graph network come from the pure-PyTorch reference."""
    warnings.warn("this model is a graph network (max pooling or a sum of branches): the native row engine "
                  "covers chains of affine layers and activations, so its geometry is computed by the exact "
                  "pure-PyTorch reference along the graph (same results, slower, more memory)", stacklevel=3)


def compute_geometry(model: nn.Module, x: torch.Tensor, ps: Sequence, labels: Optional[torch.Tensor] = None,
                     budget: MemoryBudget = MemoryBudget()) -> Geometry:
    """Validated (boundary, decision) per norm in ps and the logits, native when possible; graph
    networks (max pooling, sums of branches) by the reference along their graph, with a warning."""
    network = parse_network(model)
    qs = [dual_exponent(p) for p in ps]
    check_input(model, x)
    if isinstance(network, Graph):
        warn_reference_path()
        return graph_geometry(network, x, qs, labels, budget)
    chain = network
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
