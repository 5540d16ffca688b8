"""The result type of :func:`mmr_ext.certify` (docs/MATH.md §3, §5)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..math.norms import exponent
from ..math.rounding import round_down
from ..math.universal_radius import universal_radius


@dataclass(frozen=True)
class Certificate:
    """Result of :func:`certify` for a batch of B points.

    Attributes:
        radius: ``{p: [B]}`` certified lp radius per requested norm (keys are floats: 1.0, 2.0,
            inf, ...): no perturbation of lp-norm < radius (within the box, if given) changes the
            decision; 0 for misclassified points.
        exact: ``{p: [B]}`` bool, True where the radius is the minimal adversarial lp-norm (also
            True for misclassified points, whose minimal adversarial norm is 0).
        correct: [B] bool, the prediction (argmax, ties to the first class) equals the label.
        rho1, rho_inf: [B] float64 plain region certificates in l1 and l∞ (no box, no neighbouring
            regions), the inputs of :meth:`universal`.
        input_dim: d, the number of input entries per point.
        dtype: the dtype of the returned radii (the dtype of x).
        box: the (lo, hi) bounds used, as float64 [d] tensors, or None.
        neighbors: the number of neighbouring regions explored at most per point and norm.
    """

    radius: Dict[float, torch.Tensor]
    exact: Dict[float, torch.Tensor]
    correct: torch.Tensor
    rho1: torch.Tensor = field(repr=False)
    rho_inf: torch.Tensor = field(repr=False)
    input_dim: int = 0
    dtype: torch.dtype = torch.float64
    box: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)
    neighbors: int = 0

    @property
    def norms(self) -> Tuple[float, ...]:
        """The norms certified individually (the keys of ``radius``)."""
        return tuple(self.radius)

    def universal(self, p) -> torch.Tensor:
        """Universal lp radius [B] from the l1 and l∞ region certificates (Croce & Hein, ICLR 2020, Thm 4.1).

        ``hull_radius(ρ1, ρ∞, p, d)``: valid for every p >= 1 at once, 0 for misclassified
        points. It ignores the box and the neighbouring regions (see the module docstring), so for
        a p in ``norms`` it never exceeds ``radius[p]`` computed without them.
        """
        p = exponent(p)
        if self.input_dim == 1:  # every lp-norm is |.| in one dimension
            value = torch.maximum(self.rho1, self.rho_inf)
        else:
            value = universal_radius(self.rho1, self.rho_inf, p, self.input_dim)
        return round_down(value, self.dtype)

    def fraction_certified(self, eps: Mapping) -> Dict[str, object]:
        """Fractions of points certified at the radii ``eps = {p: ε_p}``.

        A point is certified at ε_p when it is correctly classified and its radius exceeds ε_p
        strictly (at radius exactly ε a perturbation of norm ε may reach a tie). Returns::

            {"radius":    {p: fraction with radius[p] > ε_p},      # each norm's own certificate
             "union":     fraction certified for every p in eps at once by the per-norm radii,
             "universal": {p: fraction with universal(p) > ε_p},   # Thm 4.1 from l1 and l∞ only
             "union_universal": fraction certified for every p in eps by Thm 4.1 alone}

        "radius"/"union" use the strongest certificate computed for each norm (box, neighbouring
        regions); "radius" covers the p of eps among ``norms`` and "union" is None unless all of
        them are. "universal"/"union_universal" (any p) show
        what one l1 + l∞ computation guarantees for all norms (the MMR-Universal certificate of
        Croce & Hein, ICLR 2020); for the union l1 + l2 + l∞ it is the fraction with ρ1 > ε1, ρ∞ > ε∞ and
        hull(ρ1, ρ∞) > ε2. Both are fractions of all B points (misclassified ones count as not
        certified).
        """
        if not isinstance(eps, Mapping) or not eps:
            raise TypeError("eps must be a non-empty dict {p: epsilon}")
        parsed = {}
        for p, e in eps.items():
            key = exponent(p)
            if isinstance(e, bool) or not isinstance(e, Real) or math.isnan(float(e)) or float(e) < 0:
                raise ValueError(f"eps[{p}] must be a number >= 0, got {e!r}")
            parsed[key] = float(e)
        union_r = torch.ones_like(self.correct)
        union_u = torch.ones_like(self.correct)
        out: Dict[str, object] = {"radius": {}, "union": None, "universal": {}, "union_universal": 0.0}
        for p, e in parsed.items():
            cert_u = self.correct & (self.universal(p) > e)
            out["universal"][p] = cert_u.double().mean().item()
            union_u &= cert_u
            if p in self.radius:
                cert_r = self.correct & (self.radius[p] > e)
                out["radius"][p] = cert_r.double().mean().item()
                union_r &= cert_r
        if all(p in self.radius for p in parsed):
            out["union"] = union_r.double().mean().item()
        out["union_universal"] = union_u.double().mean().item()
        return out
