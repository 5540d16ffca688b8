"""Norm names and exponents: parsing, printing and the dual exponent (docs/MATH.md §2)."""
from __future__ import annotations

import math
from numbers import Real


def exponent(p) -> float:
    """The norm exponent p >= 1 as a float, from a number (inf allowed) or a name: 'l1', 'l2',
    'linf' (also 'inf', 'l∞', ...) or 'l<p>' such as 'l1.5'."""
    given = p
    if isinstance(p, str):
        key = p.strip().lower()
        if key in NORM_NAMES:
            return NORM_NAMES[key]
        try:
            p = float(key[1:] if key.startswith("l") else key)
        except ValueError:
            raise ValueError(f"p must be a number >= 1, float('inf') or a name such as 'l1', 'l2', 'linf', "
                             f"got {given!r}") from None
    elif isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(f"p must be a real number >= 1, float('inf') or a name such as 'l2', got {p!r}")
    p = float(p)
    if math.isnan(p) or p < 1:
        raise ValueError(f"p must be >= 1 (or float('inf')), got {given!r}")
    return p


def dual_exponent(p) -> float:
    """Validates the norm exponent p (see :func:`exponent`) and returns its dual q (1/p + 1/q = 1)."""
    p = exponent(p)
    if p == 1:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


NORM_NAMES = {"1": 1.0, "l1": 1.0, "2": 2.0, "l2": 2.0, "inf": math.inf, "linf": math.inf,
               "l_inf": math.inf, "infinity": math.inf, "∞": math.inf, "l∞": math.inf}


def parse_norm(norm, name: str = "norm") -> float:
    """Returns 1.0, 2.0 or inf for ``norm`` given as 1, 2, inf or 'l1', 'l2', 'linf', 'inf'."""
    if isinstance(norm, str):
        key = norm.strip().lower()
        if key in NORM_NAMES:
            return NORM_NAMES[key]
    elif isinstance(norm, Real) and not isinstance(norm, bool):
        value = float(norm)
        if value in (1.0, 2.0, math.inf):
            return value
    raise ValueError(f"{name} must be 1, 2 or inf (or 'l1', 'l2', 'linf'), got {norm!r}")


def norm_name(p: float) -> str:
    """'l1', 'l2', 'linf' (or 'l<p>')."""
    return "linf" if math.isinf(p) else f"l{p:g}"


def norm_key(norm, name: str = "norm") -> str:
    """'1', '2' or 'inf' for a norm that :func:`parse_norm` accepts (the spelling of option values)."""
    p = parse_norm(norm, name)
    return "inf" if math.isinf(p) else f"{p:g}"
