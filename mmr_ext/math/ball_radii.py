"""lp radii implied by l1 and l∞ balls (docs/MATH.md §4): shared argument handling, the naive bound and the union.

For B1 = {||x||_1 <= e1} and B∞ = {||x||_∞ <= e∞} in R^d every function here returns the
smallest lp-norm of a point outside some set built from the two balls:

- :func:`naive_radius` (here): the classical lower bound ``max(e∞, e1 d^{-1/q})`` for the union;
- :func:`union_radius` (here): the exact value for the union B1 ∪ B∞ (Croce & Hein, ICLR 2020, Prop. 3.1);
- :func:`mmr_ext.math.hull_radius.hull_radius`: the exact value for the convex hull conv(B1 ∪ B∞)
  (Croce & Hein, ICLR 2020, Thm. 3.1);
- :func:`mmr_ext.math.universal_radius.universal_radius`: the Thm. 4.1 certificate (docs/MATH.md §5),
  the hull value of the l1 and l∞ certified radii of a point.

All four accept python numbers or tensors (broadcast against each other). Python numbers give a
python float; a tensor gives a tensor on its device in its floating dtype (the promoted dtype of
the tensor arguments; integer tensors give the default dtype). The arithmetic is float64; a
narrower output dtype is rounded toward zero, so a radius never grows by the cast (certificates
stay sound). The results carry no gradient.

Conventions for the degenerate cases (all NaN-free): radii may be 0 or +inf. A ball of radius
+inf is R^d, so any set containing it has no outside and the value is +inf. ``e1 <= e∞`` means
B1 ⊂ B∞ (value e∞ for union and hull); ``e1 >= d e∞`` means B∞ ⊂ B1 (value ``e1 d^{-1/q}``).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Tuple, Union

import torch

from .norms import dual_exponent, exponent
from .rounding import round_down

Radius = Union[float, torch.Tensor]

__all__ = ["naive_radius", "union_radius", "prepare_radii", "finish_radius", "ball_regimes", "outside_l1"]


# ---------------------------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------------------------

def _check_dim(d) -> int:
    if isinstance(d, torch.Tensor):
        if d.numel() != 1 or d.is_floating_point() and not float(d).is_integer():
            raise ValueError(f"d must be an integer >= 2 (the input dimension), got {d!r}")
        d = d.item()
    if isinstance(d, bool) or not isinstance(d, Real):
        raise TypeError(f"d must be an integer >= 2 (the input dimension), got {d!r}")
    if not isinstance(d, Integral):
        if not (math.isfinite(float(d)) and float(d).is_integer()):
            raise ValueError(f"d must be an integer >= 2 (the input dimension), got {d!r}")
    d = int(d)
    if d < 2:
        raise ValueError(f"d must be an integer >= 2 (the input dimension), got {d}")
    return d


def _as_radius(value, name: str) -> torch.Tensor:
    """A non-negative radius (python number or tensor) as a float64 tensor; inf is allowed."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
        t = value.detach().to(torch.float64)
    elif isinstance(value, Real) and not isinstance(value, bool):
        t = torch.tensor(float(value), dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a real number or a tensor, got {type(value).__name__}")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0 (a radius), got a minimum of {t.min().item()}")
    return t


def _output_spec(args: Tuple, names: Tuple[str, ...]):
    """(None, None) for python numbers only, else the (dtype, device) of the tensor arguments."""
    tensors = [(a, n) for a, n in zip(args, names) if isinstance(a, torch.Tensor)]
    if not tensors:
        return None, None
    device = tensors[0][0].device
    for a, n in tensors[1:]:
        if a.device != device:
            raise ValueError(f"{n} is on {a.device} but {tensors[0][1]} is on {device}")
    floating = [a.dtype for a, _ in tensors if a.is_floating_point()]
    if not floating:
        return torch.get_default_dtype(), device
    dtype = floating[0]
    for dt in floating[1:]:
        dtype = torch.promote_types(dtype, dt)
    return dtype, device


def finish_radius(value64: torch.Tensor, spec) -> Radius:
    """The float64 result as a python float, or rounded toward zero into the output dtype and device."""
    dtype, device = spec
    if dtype is None:
        return float(value64.item())
    return round_down(value64, dtype).to(device)


def prepare_radii(a, b, names, p, d):
    """Validated float64 radii (broadcast), p, its dual q, d and the output spec of a radius function."""
    p = exponent(p)
    q = dual_exponent(p)
    d = _check_dim(d)
    spec = _output_spec((a, b), names)
    ta, tb = _as_radius(a, names[0]), _as_radius(b, names[1])
    if spec[1] is not None:
        ta, tb = ta.to(spec[1]), tb.to(spec[1])
    try:
        ta, tb = torch.broadcast_tensors(ta, tb)
    except RuntimeError:
        raise ValueError(f"{names[0]} of shape {tuple(ta.shape)} and {names[1]} of shape "
                         f"{tuple(tb.shape)} do not broadcast") from None
    return ta, tb, p, q, d, spec


# ---------------------------------------------------------------------------------------------
# float64 kernels (broadcast tensors in, float64 tensor out)
# ---------------------------------------------------------------------------------------------

def _inv_q(q: float) -> float:
    """1/q, i.e. 1 - 1/p (0 for p = 1, 1 for p = inf)."""
    return 0.0 if math.isinf(q) else 1.0 / q


def outside_l1(e1: torch.Tensor, q: float, d: int) -> torch.Tensor:
    """min_{x ∉ B1} ||x||_p = e1 d^{-1/q} (all coordinates equal)."""
    return e1 * d ** (-_inv_q(q))


def ball_regimes(e1, e_inf, d):
    """Masks of e1 <= e∞ (B1 ⊂ B∞), e1 >= d e∞ (B∞ ⊂ B1) and the proper case in between."""
    small = e1 <= e_inf
    large = ~small & (e1 >= d * e_inf)
    mid = ~(small | large)  # then 0 < e∞ < e1 < d e∞, all finite
    return small, large, mid


def _naive64(e1, e_inf, p, q, d):
    return torch.maximum(e_inf, outside_l1(e1, q, d))


def _union64(e1, e_inf, p, q, d):
    small, large, mid = ball_regimes(e1, e_inf, d)
    # safe stand-ins outside the proper case keep the unused branch finite
    ei = torch.where(mid, e_inf, torch.ones_like(e_inf))
    u = (torch.where(mid, e1, torch.full_like(e1, 2.0)) - ei) / (d - 1) / ei  # in (0, 1)
    if math.isinf(p):
        value = ei
    else:
        # (e∞^p + (e1 - e∞)^p / (d-1)^{p-1})^{1/p}, factored by e∞ so that nothing overflows
        value = ei * torch.pow(1.0 + (d - 1) * torch.pow(u, p), 1.0 / p)
    return torch.where(small, e_inf, torch.where(large, outside_l1(e1, q, d), value))


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def naive_radius(e1: Radius, e_inf: Radius, p: float, d: int) -> Radius:
    """Naive lower bound on ``min_{x ∉ B1 ∪ B∞} ||x||_p``: ``max(e∞, e1 d^{(1-p)/p})`` (eq. 4, docs/MATH.md §4).

    Each term alone is exact for one ball (e∞ for B∞, ``e1 d^{-1/q}`` for B1).
    """
    e1, e_inf, p, q, d, spec = prepare_radii(e1, e_inf, ("e1", "e_inf"), p, d)
    return finish_radius(_naive64(e1, e_inf, p, q, d), spec)


def union_radius(e1: Radius, e_inf: Radius, p: float, d: int) -> Radius:
    """Exact ``min_{x ∉ B1 ∪ B∞} ||x||_p`` (Prop. 3.1, docs/MATH.md §4).

    For ``e∞ < e1 < d e∞``: ``(e∞^p + (e1 - e∞)^p / (d-1)^{p-1})^{1/p}`` (one coordinate at e∞, the
    rest of the l1 budget spread evenly); e1 at p = 1 and e∞ at p = inf. Outside that range one ball
    contains the other and the value is that ball's (e∞ if ``e1 <= e∞``, ``e1 d^{-1/q}`` if
    ``e1 >= d e∞``), which is also the continuous extension of the formula.
    """
    e1, e_inf, p, q, d, spec = prepare_radii(e1, e_inf, ("e1", "e_inf"), p, d)
    return finish_radius(_union64(e1, e_inf, p, q, d), spec)
