"""Layers that mmr_ext adds to the ones torch provides: input normalisation (docs/MATH.md §1) and
the layers a traced forward's functional calls become (:mod:`mmr_ext.nn.trace`)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

Number = Union[float, Sequence[float], torch.Tensor]


class Normalize(nn.Module):
    """Input normalisation ``(x - mean) / std`` with per-channel constants.

    An affine layer that the geometry code folds into the following layer, so it adds no
    hyperplanes. ``mean`` and ``std`` are scalars or one value per channel (dimension 1 of x).
    """

    def __init__(self, mean: Number, std: Number):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.get_default_dtype()).flatten()
        std_t = torch.as_tensor(std, dtype=torch.get_default_dtype()).flatten()
        if mean_t.numel() == 0 or std_t.numel() == 0:
            raise ValueError("Normalize: mean and std must not be empty")
        if not torch.isfinite(mean_t).all() or not torch.isfinite(std_t).all():
            raise ValueError("Normalize: mean and std must be finite")
        if (std_t <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def _shaped(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        if x.dim() < 2 or x.shape[1] != t.numel():
            raise ValueError(
                f"Normalize: {t.numel()} per-channel constants but input has shape {tuple(x.shape)}")
        return t.reshape((1, -1) + (1,) * (x.dim() - 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._shaped(self.mean, x)) / self._shaped(self.std, x)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Scale(nn.Module):
    """Multiplication by a constant number (``c * x``, ``x / c``, ``-x`` in a traced forward): an
    affine layer folded into its neighbours like :class:`Normalize`."""

    def __init__(self, factor: float, dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if not math.isfinite(factor):
            raise ValueError(f"Scale: the factor must be finite, got {factor}")
        self.register_buffer("factor", torch.tensor(float(factor), dtype=dtype or torch.get_default_dtype(),
                                                    device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor.item()}"


class FlattenTo(nn.Flatten):
    """``x.view(-1, n)`` in a traced forward: ``flatten(1)``, checked to give n features per sample
    (any other n would mix samples)."""

    def __init__(self, features: int):
        super().__init__()
        self.features = int(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if out.shape[1] != self.features:
            raise ValueError(f"the model views its {out.shape[1]} features per sample as rows of {self.features}: "
                             "that mixes samples, and mmr_ext analyses per-sample networks only")
        return out

    def extra_repr(self) -> str:
        return f"features={self.features}"
