"""The hinge of the MMR regularizers and the pure-PyTorch top-k hinge mean (docs/MATH.md §6).

``h(d, γ) = max(0, 1 - d/γ)``; the kMMR terms average it over the k smallest distances of each
sample. The compiled op ``mmr_ext._C.topk_hinge`` computes the same (and its gradient);
:func:`topk_hinge_mean_reference` is what runs when the extension is missing.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["hinge", "topk_hinge_mean_reference"]


def hinge(dist: torch.Tensor, gamma: float) -> torch.Tensor:
    """max(0, 1 - d/γ) elementwise; the gradient is zero where the hinge is inactive."""
    return torch.relu(1 - dist / gamma)


def topk_hinge_mean_reference(dist: torch.Tensor, k: int, gamma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (1/k) Σ_{i<=k} h(d^i, γ) over the k smallest entries of dist [B, N] (ties by index).

    Returns (value [B], index [B, k]) like the native op: indices in ascending order of distance,
    gradients only through the selected entries.
    """
    order = torch.sort(dist.detach(), dim=1, stable=True).indices[:, :k]
    return hinge(dist.gather(1, order), gamma).mean(dim=1), order
