"""Validation of the arguments of the public API: clear errors at the boundary."""
from __future__ import annotations

import math
from numbers import Real
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .math.norms import parse_norm


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
    if out.shape[1] < 2:
        raise ValueError(f"the model must have at least 2 classes, got {out.shape[1]}: a one-class model "
                         "has no decision boundary to be robust against")


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


def check_box(lo, hi) -> Tuple[float, float]:
    for name, v in (("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, Real) or math.isnan(float(v)):
            raise ValueError(f"{name} must be a real number, got {v!r}")
    lo, hi = float(lo), float(hi)
    if not lo < hi:
        raise ValueError(f"the box needs lo < hi, got lo={lo}, hi={hi}")
    return lo, hi


def check_in_box(x: torch.Tensor, lo: float, hi: float, name: str = "x") -> None:
    if (x < lo).any() or (x > hi).any():
        raise ValueError(f"{name} must lie in the box [lo, hi] = [{lo}, {hi}], got values in "
                         f"[{x.min().item():.6g}, {x.max().item():.6g}]")


def check_y(y, x: torch.Tensor, name: str = "y") -> None:
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class indices")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but x is on {x.device}")


def check_eps(eps, x: torch.Tensor, name: str = "eps") -> torch.Tensor:
    """eps as a float64 [B] tensor of finite values >= 0."""
    if isinstance(eps, torch.Tensor):
        e = eps.detach().to(device=x.device, dtype=torch.float64)
        if e.dim() == 0:
            e = e.expand(x.shape[0])
        if e.shape != (x.shape[0],):
            raise ValueError(f"{name} must be a number or a [B] tensor, got shape {tuple(e.shape)}")
    elif isinstance(eps, Real) and not isinstance(eps, bool):
        e = torch.full((x.shape[0],), float(eps), dtype=torch.float64, device=x.device)
    else:
        raise TypeError(f"{name} must be a number or a tensor, got {type(eps).__name__}")
    if not torch.isfinite(e).all() or (e < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {eps!r}")
    return e


def positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def parse_eps_dict(eps, name: str = "eps") -> Dict[float, float]:
    if not isinstance(eps, dict) or not eps:
        raise TypeError(f"{name} must be a non-empty dict {{norm: radius}}, e.g. {{1: 1.0, 2: 0.3, "
                        f"'inf': 0.1}}, got {eps!r}")
    out: Dict[float, float] = {}
    for k, v in eps.items():
        p = parse_norm(k, f"{name} key")
        if p in out:
            raise ValueError(f"{name} names the norm {k!r} twice")
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)) or v < 0:
            raise ValueError(f"{name}[{k!r}] must be a finite number >= 0, got {v!r}")
        out[p] = float(v)
    return out
