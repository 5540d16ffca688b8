"""Robustness curves: certified and attacked robust accuracy against the radius (docs/MATH.md §9.5).

From one :func:`mmr_ext.evaluate` run at the radii ε_p and the scales t of a grid, per norm p at
the radius t ε_p and for the union along the ray t (ε1, ε2, ε∞):

- **certified** (a lower bound on the robust accuracy, 100 - UB): the point is correctly
  classified and its region radius exceeds t ε_p, or bound propagation proves it at t ε_p, or
  (t <= 1) it was certified at ε_p by any certifier of the evaluation (a proof for the ball of
  radius ε_p holds for every smaller ball);
- **attacked** accuracy (an upper bound on the robust accuracy, 100 - LB): the point is correctly
  classified and neither the minimum-norm attack found an adversarial example of norm <= t ε_p nor
  (t >= 1) was it attacked at ε_p.

The region-certificate and minimum-norm curves come for free from the evaluation; bound
propagation runs once per norm and scale, on the points where it can change the answer: below
t = 1 the points neither certified at the next larger scale nor attacked, above t = 1 the points
certified at the next smaller scale (the others are left uncertified: certifying less is always
sound). The union is certified where every norm is, attacked where some norm is.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import nn

from .certify import certified_by_bounds
from .evaluation import EvaluationResult
from .math.norms import norm_name
from .outputs import atomic_write_png, atomic_write_text

__all__ = ["RobustnessCurves", "robustness_curves", "DEFAULT_SCALES", "KINDS"]

#: The verdicts per point and scale that :class:`RobustnessCurves` holds.
KINDS = ("certified", "attacked", "region", "min_norm")

#: Scales t of the radii ε_p at which the curves are evaluated by default.
DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass
class RobustnessCurves:
    """Curves of :func:`robustness_curves`: per-point verdicts and robust accuracies per scale.

    Attributes:
        scales: the scales t (ascending, with 0 and 1). eps: the radii ε_p at t = 1, keyed by
            1.0, 2.0, inf.
        masks: ``{kind: {p: bool [T, N]}}`` per point and scale, for the kinds ``certified`` (all
            certifiers), ``attacked`` (misclassified or an adversarial example found), ``region``
            (certified by the region certificate alone) and ``min_norm`` (attacked by the
            minimum-norm attack alone, or misclassified).
    """

    scales: tuple
    eps: Dict[float, float]
    masks: Dict[str, Dict[float, torch.Tensor]]

    @property
    def n(self) -> int:
        return int(next(iter(self.masks["certified"].values())).shape[1])

    def mask(self, kind: str, key) -> torch.Tensor:
        """bool [T, N] of ``kind`` for a norm, or for ``'union'`` (certified in every norm,
        attacked in some norm)."""
        if key != "union":
            return self.masks[kind][key]
        stacked = torch.stack([self.masks[kind][p] for p in self.eps])
        return stacked.all(0) if kind in ("certified", "region") else stacked.any(0)

    def accuracy(self, kind: str, key) -> list:
        """Robust accuracy in percent per scale: certified (``certified``, ``region``) or not
        attacked (``attacked``, ``min_norm``)."""
        m = self.mask(kind, key)
        if kind in ("attacked", "min_norm"):
            m = ~m
        return [100.0 * v for v in m.double().mean(1).tolist()] if m.shape[1] else [0.0] * m.shape[0]

    def to_dict(self) -> dict:
        """Plain JSON: ``{'scales', 'n', 'curves': {'l1': {'eps', 'certified', ...}, ..., 'union'}}``."""
        curves = {}
        for key in list(self.eps) + ["union"]:
            name = "union" if key == "union" else norm_name(key)
            entry = {"eps": ([round(self.eps[key] * t, 12) for t in self.scales] if key != "union"
                             else {norm_name(p): [round(e * t, 12) for t in self.scales] for p, e in self.eps.items()})}
            for kind in KINDS:
                entry[kind] = self.accuracy(kind, key)
            curves[name] = entry
        return {"n": self.n, "scales": list(self.scales), "eps": {norm_name(p): e for p, e in self.eps.items()},
                "unit": "robust accuracy in % of the points", "curves": curves}

    def to_json(self, path: Union[str, os.PathLike]) -> Path:
        """Writes :meth:`to_dict` atomically; :class:`mmr_ext.outputs.OutputError` names a failing path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n", what="curves file")

    def plot(self, path: Union[str, os.PathLike], title: Optional[str] = None) -> Path:
        """PNG with one panel per norm and one for the union (matplotlib)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = list(self.eps) + ["union"]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            xs = list(self.scales) if key == "union" else [self.eps[key] * t for t in self.scales]
            certified, attacked = self.accuracy("certified", key), self.accuracy("attacked", key)
            ax.plot(xs, attacked, "o-", color="tab:red", label="under attack (1 - LB)")
            ax.plot(xs, certified, "s-", color="tab:green", label="certified (1 - UB)")
            ax.plot(xs, self.accuracy("region", key), ":", color="tab:gray", label="region certificate alone")
            ax.fill_between(xs, certified, attacked, color="tab:orange", alpha=0.15)
            ax.axvline(1.0 if key == "union" else self.eps[key], color="black", lw=0.8, ls="--")
            if key == "union":
                ax.set_title("union l1 + l2 + l∞")
                ax.set_xlabel("t  (radii t·(" + ", ".join(f"{e:.3g}" for e in self.eps.values()) + "))")
            else:
                ax.set_title(norm_name(key).replace("linf", "l∞"))
                ax.set_xlabel("ε")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"robust accuracy, % of {self.n} points")
        axes[0][0].legend(fontsize=8, loc="lower left")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return atomic_write_png(path, fig)


def _check_scales(scales) -> tuple:
    try:
        values = sorted({float(t) for t in scales})
    except (TypeError, ValueError):
        raise TypeError(f"scales must be a sequence of numbers, got {scales!r}") from None
    if not values or any(not math.isfinite(t) or t < 0 for t in values):
        raise ValueError(f"scales must be finite numbers >= 0, got {scales!r}")
    return tuple(values)


@torch.no_grad()
def robustness_curves(model: nn.Module, x: torch.Tensor, y: torch.Tensor, result: EvaluationResult, *,
                      scales: Sequence[float] = DEFAULT_SCALES, use_bounds: bool = True,
                      alpha_steps: int = 0, batch_size: int = 100,
                      on_batch: Optional[Callable[[int], None]] = None) -> RobustnessCurves:
    """Certified and attacked robust accuracy against the radius (see the module docstring).

    Args:
        model, x, y: the model and the points of ``result`` (the same ones, in the same order).
        result: the :class:`~mmr_ext.evaluation.EvaluationResult` at the radii ε_p.
        scales: the scales t of the radii (any numbers >= 0; sorted, 0 and 1 are always added).
        use_bounds: run bound propagation at the scales t != 1 (else region certificate only).
        alpha_steps: α-optimisation steps of bound propagation. batch_size: points per call.
        on_batch: called with the number of points of each bound-propagation call (progress).
    """
    if not isinstance(result, EvaluationResult):
        raise TypeError(f"result must be an EvaluationResult, got {type(result).__name__}")
    if x.shape[0] != result.n or y.shape[0] != result.n:
        raise ValueError(f"x and y must hold the {result.n} points of result, got {x.shape[0]} and {y.shape[0]}")
    if not torch.equal(y.detach().cpu().long(), result.labels.long()):
        raise ValueError("y differs from the labels of result: pass the points that were evaluated")
    grid = _check_scales(tuple(scales) + (0.0, 1.0))
    lo, hi = result.box
    correct = result.correct
    norms = result.norms
    cert: Dict[float, Dict[float, torch.Tensor]] = {p: {} for p in norms}
    att: Dict[float, Dict[float, torch.Tensor]] = {p: {} for p in norms}
    region: Dict[float, Dict[float, torch.Tensor]] = {p: {} for p in norms}
    fmn: Dict[float, Dict[float, torch.Tensor]] = {p: {} for p in norms}

    def bounds(p: float, t: float, todo: torch.Tensor) -> torch.Tensor:
        proved = torch.zeros_like(todo)
        idx = todo.nonzero()[:, 0]
        for start in range(0, idx.numel(), batch_size):
            sel = idx[start:start + batch_size]
            xs = x[sel.to(x.device)]
            proved[sel] = certified_by_bounds(model, xs, y[sel.to(y.device)], norm=p, eps=t * result.eps[p],
                                              lo=lo, hi=hi, alpha_steps=alpha_steps).cpu()
            if on_batch is not None:
                on_batch(int(sel.numel()))
        return proved

    for p in norms:
        e = result.eps[p]
        for t in grid:
            region[p][t] = correct & (result.radius[p] > t * e)
            fmn[p][t] = ~correct | (result.min_norm[p] <= t * e)
            att[p][t] = fmn[p][t] | (result.attacked[p] if t >= 1.0 else torch.zeros_like(correct))
        cert[p][1.0] = result.certified[p] | region[p][1.0]
        for t in reversed([t for t in grid if t < 1.0]):  # descending: certified at t' > t holds at t
            if t == 0:  # the clean accuracy
                cert[p][t] = correct.clone()
                continue
            c = correct & (cert[p][min(s for s in grid if s > t)] | region[p][t])
            if use_bounds:
                c = c | bounds(p, t, correct & ~c & ~att[p][t])
            cert[p][t] = c
        for t in [t for t in grid if t > 1.0]:  # ascending: only points certified at the smaller scale
            smaller = cert[p][max(s for s in grid if s < t)]
            c = region[p][t].clone()
            if use_bounds:
                c = c | bounds(p, t, smaller & ~c & ~att[p][t])
            cert[p][t] = c
        for t in grid:
            both = cert[p][t] & att[p][t]
            if both.any():
                i = int(both.nonzero()[0])
                raise RuntimeError(f"INCONSISTENT CURVES: point {i} is both certified and attacked at "
                                   f"{norm_name(p)} eps={t * e:g}; an attack or a certifier is wrong, "
                                   f"please report this")

    def stack(verdicts):
        return {p: torch.stack([verdicts[p][t] for t in grid]) for p in norms}

    return RobustnessCurves(scales=grid, eps=dict(result.eps),
                            masks={"certified": stack(cert), "attacked": stack(att), "region": stack(region),
                                   "min_norm": stack(fmn)})
