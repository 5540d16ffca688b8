"""MMR and MMR-Universal regularizers and training objectives (docs/MATH.md §6)."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_chunk_size
from .geometry import MemoryBudget, compute_geometry
from .math.topk_hinge import hinge, topk_hinge_mean_reference
from .native import native_or_warn

KSpec = Union[int, float, str]
SELECTIONS = ("per_norm", "union")


def resolve_k(k: KSpec, n: int, name: str) -> int:
    """An int k is a count in [1, n]; a float in (0, 1) is a fraction of n (at least 1); 'all' is n.

    A float 1.0 is refused: next to the count 1 it reads as "one hyperplane" but would mean all of
    them (docs/MATH.md §6)."""
    if isinstance(k, str) and k == "all":
        return n
    if isinstance(k, bool) or not isinstance(k, (Integral, Real)):
        raise TypeError(f"{name} must be an int count, a float fraction in (0, 1) or 'all', got {k!r}")
    if isinstance(k, Integral):
        if not 1 <= k <= n:
            raise ValueError(f"{name} must be in [1, {n}] (the number of candidate hyperplanes), got {k}")
        return int(k)
    if k == 1:
        raise ValueError(f"{name}=1.0 is ambiguous: pass {name}=1 for one hyperplane, {name}='all' for all "
                         f"{n}, or a fraction in (0, 1)")
    if not 0 < k < 1:
        raise ValueError(f"{name} as a fraction must be in (0, 1), got {k}")
    return max(1, min(n, int(round(k * n))))


def _positive(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not (v > 0) or math.isinf(v):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def _non_negative(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not (v >= 0) or math.isinf(v):
        raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
    return float(v)


def _pair(v, name: str) -> Tuple:
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise ValueError(f"{name} must be a pair (l1 value, l_inf value), got {v!r}")
    return tuple(v)


def topk_hinge_mean(dist: torch.Tensor, k: int, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (1/k) Σ_{i<=k} max(0, 1 - d^i/γ) over the k smallest entries (ties by index):
    the native op, or :func:`mmr_ext.math.topk_hinge.topk_hinge_mean_reference` without it."""
    if native_or_warn():
        from .native import topk_hinge
        return topk_hinge(dist, k, gamma)
    return topk_hinge_mean_reference(dist, k, gamma)


def _universal_terms(boundary1, decision1, boundary_inf, decision_inf, k: int, gamma, lam, selection: str):
    g1, ginf = gamma
    l1, linf = lam
    K = decision1.shape[1]
    if selection == "per_norm":
        b1 = topk_hinge_mean(boundary1, k, g1)[0]
        binf = topk_hinge_mean(boundary_inf, k, ginf)[0]
        boundary_term = l1 * b1 + linf * binf
    else:  # authors' code: both norms penalised on the union of the two top-k index sets
        idx1 = topk_hinge_mean(boundary1.detach(), k, g1)[1]
        idxinf = topk_hinge_mean(boundary_inf.detach(), k, ginf)[1]
        union = torch.zeros_like(boundary1, dtype=torch.bool)
        union.scatter_(1, idx1, True).scatter_(1, idxinf, True)
        h1 = torch.where(union, hinge(boundary1, g1), torch.zeros_like(boundary1))
        hinf = torch.where(union, hinge(boundary_inf, ginf), torch.zeros_like(boundary_inf))
        boundary_term = (l1 * h1 + linf * hinf).sum(dim=1) / k
    decision_term = (l1 * topk_hinge_mean(decision1, K - 1, g1)[0]
                     + linf * topk_hinge_mean(decision_inf, K - 1, ginf)[0])
    return boundary_term, decision_term


def _universal(model, x, y, k_boundary, gamma, lam, selection, chunk_size):
    gamma = tuple(_positive(v, f"gamma[{i}]") for i, v in enumerate(_pair(gamma, "gamma")))
    lam = tuple(_non_negative(v, f"lam[{i}]") for i, v in enumerate(_pair(lam, "lam")))
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    check_chunk_size(chunk_size)
    ((b1, d1), (binf, dinf)), logits = compute_geometry(model, x, (1, math.inf), y, MemoryBudget(chunk_size))
    k = resolve_k(k_boundary, b1.shape[1], "k_boundary")
    boundary_term, decision_term = _universal_terms(b1, d1, binf, dinf, k, gamma, lam, selection)
    return boundary_term, decision_term, logits


def mmr_universal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, k_boundary: KSpec,
                  gamma: Sequence[float], lam: Sequence[float] = (1.0, 1.0),
                  selection: str = "per_norm", chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-sample MMR-Universal regularizer [B] (Croce & Hein, ICLR 2020, eq. 9, docs/MATH.md §6).

    ``(1/kB) Σ_{i<=kB} [λ1 h(dB1^i, γ1) + λ∞ h(dB∞^i, γ∞)] + (1/(K-1)) Σ_{i<=K-1} [λ1 h(dD1^i, γ1) + λ∞ h(dD∞^i, γ∞)]``
    with h(d, γ) = max(0, 1 - d/γ), distances to the true class y.

    Args:
        k_boundary: int count in [1, N] or float fraction in (0, 1] of the N hidden units.
        gamma: (γ1, γ∞) > 0. lam: (λ1, λ∞) >= 0.
        selection: ``"per_norm"`` (paper: top-kB taken separately per norm) or ``"union"`` (the
            authors' code: both norms penalised on the union of the two top-kB index sets, / kB).
        chunk_size: memory budget in samples (see :func:`mmr_ext.region_distances`).
    """
    boundary_term, decision_term, _ = _universal(model, x, y, k_boundary, gamma, lam, selection, chunk_size)
    return boundary_term + decision_term


def universal_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, k_boundary: KSpec,
                   gamma: Sequence[float], lam: Sequence[float] = (1.0, 1.0), selection: str = "per_norm",
                   return_terms: bool = False, chunk_size: Optional[int] = None):
    """Training objective: mean cross-entropy + mean MMR-Universal (see :func:`mmr_universal`).

    Returns a scalar, or ``(scalar, terms)`` with ``terms`` a dict of detached floats
    (``cross_entropy``, ``boundary``, ``decision``) when ``return_terms`` is true.
    """
    boundary_term, decision_term, logits = _universal(model, x, y, k_boundary, gamma, lam, selection, chunk_size)
    ce = F.cross_entropy(logits, y.long())
    loss = ce + boundary_term.mean() + decision_term.mean()
    if not return_terms:
        return loss
    return loss, {"cross_entropy": float(ce.detach()), "boundary": float(boundary_term.mean().detach()),
                  "decision": float(decision_term.mean().detach())}


def _kmmr(model, x, y, p, k_boundary, k_decision, gamma_boundary, gamma_decision, chunk_size):
    gamma_boundary = _positive(gamma_boundary, "gamma_boundary")
    gamma_decision = _positive(gamma_decision, "gamma_decision")
    check_chunk_size(chunk_size)
    ((boundary, decision),), logits = compute_geometry(model, x, (p,), y, MemoryBudget(chunk_size))
    K = logits.shape[1]
    kb = resolve_k(k_boundary, boundary.shape[1], "k_boundary")
    if isinstance(k_decision, Integral) and not isinstance(k_decision, bool) and k_decision == K:
        k_decision = K - 1  # the paper's kD = K counts the (infinitely far) true class itself
    kd = resolve_k(k_decision, K - 1, "k_decision")
    reg = (topk_hinge_mean(boundary, kb, gamma_boundary)[0]
           + topk_hinge_mean(decision, kd, gamma_decision)[0])
    return reg, logits


def mmr_regularizer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, p, k_boundary: KSpec,
                    k_decision: KSpec, gamma_boundary: float, gamma_decision: float,
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-sample kMMR-lp regularizer [B] (Croce, Andriushchenko & Hein, AISTATS 2019, eq. 6, docs/MATH.md §6).

    k_decision counts decision hyperplanes among the K-1 other classes (kD = K is accepted as the
    paper's "all classes" and means K-1). chunk_size: see :func:`mmr_ext.region_distances`.
    """
    return _kmmr(model, x, y, p, k_boundary, k_decision, gamma_boundary, gamma_decision, chunk_size)[0]


def mmr_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, p, k_boundary: KSpec, k_decision: KSpec,
             gamma_boundary: float, gamma_decision: float, lam: float, return_terms: bool = False,
             chunk_size: Optional[int] = None):
    """MMR-lp objective of the MMR paper (Croce, Andriushchenko & Hein, AISTATS 2019): mean cross-entropy + λ · mean kMMR-lp."""
    lam = _non_negative(lam, "lam")
    reg, logits = _kmmr(model, x, y, p, k_boundary, k_decision, gamma_boundary, gamma_decision, chunk_size)
    ce = F.cross_entropy(logits, y.long())
    loss = ce + lam * reg.mean()
    if not return_terms:
        return loss
    return loss, {"cross_entropy": float(ce.detach()), "regularizer": float(reg.mean().detach())}


class UniversalLoss(nn.Module):
    """:func:`universal_loss` with its hyperparameters as attributes (change them to schedule)."""

    def __init__(self, k_boundary: KSpec, gamma: Sequence[float], lam: Sequence[float] = (1.0, 1.0),
                 selection: str = "per_norm", chunk_size: Optional[int] = None):
        super().__init__()
        self.k_boundary, self.gamma, self.lam, self.selection = k_boundary, tuple(gamma), tuple(lam), selection
        self.chunk_size = chunk_size

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, return_terms: bool = False):
        return universal_loss(model, x, y, k_boundary=self.k_boundary, gamma=self.gamma, lam=self.lam,
                              selection=self.selection, return_terms=return_terms, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"k_boundary={self.k_boundary}, gamma={self.gamma}, lam={self.lam}, selection={self.selection!r}, "
                f"chunk_size={self.chunk_size}")


class MMRLoss(nn.Module):
    """:func:`mmr_loss` with its hyperparameters as attributes (change them to schedule)."""

    def __init__(self, p, k_boundary: KSpec, k_decision: KSpec, gamma_boundary: float, gamma_decision: float,
                 lam: float, chunk_size: Optional[int] = None):
        super().__init__()
        self.p, self.k_boundary, self.k_decision = p, k_boundary, k_decision
        self.gamma_boundary, self.gamma_decision, self.lam = gamma_boundary, gamma_decision, lam
        self.chunk_size = chunk_size

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, return_terms: bool = False):
        return mmr_loss(model, x, y, p=self.p, k_boundary=self.k_boundary, k_decision=self.k_decision,
                        gamma_boundary=self.gamma_boundary, gamma_decision=self.gamma_decision, lam=self.lam,
                        return_terms=return_terms, chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return (f"p={self.p}, k_boundary={self.k_boundary}, k_decision={self.k_decision}, "
                f"gamma_boundary={self.gamma_boundary}, gamma_decision={self.gamma_decision}, lam={self.lam}, "
                f"chunk_size={self.chunk_size}")
