"""The training objective of every mode as a module (so that DDP can wrap it), and the adversarial
batch of the AT modes (docs/MATH.md §6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import pgd, pgd_max
from ..losses import mmr_loss, universal_loss
from ..math.norms import parse_norm
from .config import DATASET_DEFAULTS, NORMS, TrainConfig

__all__ = ["Objective", "adversarial_batch"]


class Objective(nn.Module):
    """The training objective as a module, so that DDP can wrap it (see :mod:`mmr_ext.train`).

    ``forward(x, y, k_boundary, lam_scale, weight)`` returns ``(weight * loss, terms)`` with
    ``terms`` a dict of floats; ``x`` already holds the adversarial points in AT modes.
    """

    def __init__(self, model: nn.Module, c: TrainConfig, num_classes: int):
        super().__init__()
        self.model = model
        self.mode, self.p, self.selection = c.mode, c.p, c.selection
        # k_D = K (the paper's "all classes") unless given
        self.lam, self.gamma = c.lam, c.gamma
        self.k_decision = num_classes if c.k_decision is None else c.k_decision

    def forward(self, x, y, k_boundary: float, lam_scale: float, weight: float):
        if k_boundary is not None and k_boundary >= 1.0:  # the config's fraction 1.0: all hidden units
            k_boundary = "all"
        if x.shape[0] == 0:  # an empty shard still takes part in the gradient all-reduce
            zero = sum(p.sum() for p in self.model.parameters()) * 0.0
            return zero, {}
        if self.mode == "universal":
            lam = (self.lam[0] * lam_scale, self.lam[1] * lam_scale)
            loss, terms = universal_loss(self.model, x, y, k_boundary=k_boundary, gamma=self.gamma,
                                         lam=lam, selection=self.selection, return_terms=True)
            terms["regularizer"] = terms["boundary"] + terms["decision"]
        elif self.mode in ("mmr", "mmr+at"):
            loss, terms = mmr_loss(self.model, x, y, p=parse_norm(self.p), k_boundary=k_boundary,
                                   k_decision=self.k_decision, gamma_boundary=self.gamma[0],
                                   gamma_decision=self.gamma[1], lam=self.lam[0] * lam_scale,
                                   return_terms=True)
        else:  # plain, at
            loss = F.cross_entropy(self.model(x), y)
            terms = {"cross_entropy": float(loss.detach())}
        terms["loss"] = float(loss.detach())
        return loss * weight, terms



def adversarial_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: TrainConfig,
                      generator: torch.Generator) -> torch.Tensor:
    """The AT batch: the first ``at_clean_fraction`` of the points clean, the rest replaced by PGD
    examples (``at_norm``, or the per-sample strongest of l1/l2/l∞ for ``max``)."""
    n_clean = int(round(c.at_clean_fraction * x.shape[0]))
    if n_clean >= x.shape[0]:
        return x
    xa, ya = x[n_clean:], y[n_clean:]
    eps = dict(zip(NORMS, c.at_eps))
    l1_sparsity = DATASET_DEFAULTS[c.dataset]["l1_sparsity"]
    if c.at_norm == "max":
        adv = pgd_max(model, xa, ya, eps={parse_norm(n): e for n, e in eps.items()}, steps=c.at_steps,
                      restarts=c.at_restarts, l1_sparsity=l1_sparsity, generator=generator)
    else:
        adv = pgd(model, xa, ya, norm=parse_norm(c.at_norm), eps=eps[c.at_norm], steps=c.at_steps,
                  restarts=c.at_restarts, l1_sparsity=l1_sparsity, generator=generator)
    return torch.cat([x[:n_clean], adv.detach()])
