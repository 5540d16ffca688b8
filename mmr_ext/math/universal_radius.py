"""The universal lp certificate from l1 and l∞ certified radii (docs/MATH.md §5; Croce & Hein, ICLR 2020, Thm. 4.1).

Argument handling and output conventions are those of :mod:`mmr_ext.math.ball_radii`.
"""
from __future__ import annotations

import torch

from .ball_radii import Radius, finish_radius, prepare_radii
from .hull_radius import hull_value64

__all__ = ["universal_radius"]


def universal_radius(rho1: Radius, rho_inf: Radius, p: float, d: int) -> Radius:
    """Certified lp radius from certified l1 and l∞ radii (Thm. 4.1, docs/MATH.md §5), for any p >= 1.

    ``rho1``, ``rho_inf`` are per-point certified radii (``min(dB, |dD|)`` in each norm, 0 for a
    misclassified point). If the decision is constant on B1(rho1) and on B∞(rho_inf) and both lie
    in one convex set on which it is constant (the linear region intersected with the correct side
    of the decision hyperplanes), it is constant on their convex hull, so the returned
    :func:`~mmr_ext.math.hull_radius.hull_radius` value is a sound lp radius. It is
    ``max(rho1, rho_inf)`` at p = 1 and ``max(rho_inf, rho1/d)`` at p = inf, the limits of the formula.

    A zero in either radius marks an uncertified point and gives 0 (conservative; real region
    certificates have rho1 = 0 exactly when rho_inf = 0). Both infinite give inf (no hyperplane
    at all); one infinite and the other positive also gives inf, since that ball is all of R^d.
    """
    rho1, rho_inf, p, q, d, spec = prepare_radii(rho1, rho_inf, ("rho1", "rho_inf"), p, d)
    value = hull_value64(rho1, rho_inf, p, q, d)
    value = torch.where((rho1 == 0) | (rho_inf == 0), torch.zeros_like(value), value)
    return finish_radius(value, spec)
