"""Validation of the arguments of the public API: clear errors at the boundary."""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import nn


def dual_exponent(p) -> float:
    """Validates the norm exponent p >= 1 (inf allowed) and returns its dual q (1/p + 1/q = 1)."""
    if isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(f"p must be a real number >= 1 or float('inf'), got {p!r}")
    p = float(p)
    if math.isnan(p) or p < 1:
        raise ValueError(f"p must be >= 1 (or float('inf')), got {p}")
    if p == 1:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


def check_batch(x: torch.Tensor, name: str = "x", finite: bool = True) -> None:
    """x must be a float32/float64 tensor batch [B, ...] with B >= 1 (and finite, unless told not)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if finite and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")


def check_input(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    """x must be a finite float32/float64 batch on the model's device and in the model's dtype."""
    check_batch(x, name, finite=False)  # devices first: a finiteness test cannot run across devices
    for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if t.device != x.device:
            raise ValueError(f"model tensor '{pname}' is on {t.device} but {name} is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"model tensor '{pname}' is {t.dtype} but {name} is {x.dtype}; "
                            "convert one of them (e.g. model.double())")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    with torch.no_grad():
        try:
            out = model(x[:1])
        except RuntimeError as error:
            raise ValueError(f"{name} of shape {tuple(x.shape)} does not fit the model: {error}") from None
    if out.dim() != 2:
        raise ValueError(f"the model must output logits [B, K], got shape {tuple(out.shape)} for "
                         f"{name} of shape {tuple(x.shape)}")


def check_chunk_size(chunk_size, unit: str = "samples per pass") -> None:
    """chunk_size must be None or a positive int (counted in ``unit``)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer ({unit}) or None, got {chunk_size!r}")


def check_labels(labels: Optional[torch.Tensor], batch: int, num_classes: int, device: torch.device,
                 name: str = "labels") -> None:
    """labels (if given) must be an integer tensor [B] with values in [0, K)."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but x is on {device}")
    if batch and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
