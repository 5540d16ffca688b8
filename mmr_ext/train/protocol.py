"""The papers' evaluation protocol inside a training run: the certified fractions of the training
curves (region certificate + bound propagation) and the final evaluation (attacks for the lower
bounds, region certificate + bound propagation for the upper bounds, :func:`mmr_ext.evaluate`)
with its robustness curves."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..certify import certified_by_bounds
from ..curves import robustness_curves
from ..evaluation import evaluate
from ..evaluation_records import RecordsError, records_path
from ..math.norms import parse_norm
from .config import NORMS
from .reporting import certified_stats

__all__ = ["protocol_certified", "final_evaluation", "EVALUATION_NAME", "CURVES_NAME"]

EVALUATION_NAME = "evaluation.json"
CURVES_NAME = "robustness_curves"  # .json and .png


def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    return was


def protocol_certified(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: Sequence[float],
                       box=(0.0, 1.0), batch_size: int = 100,
                       on_batch: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Fractions of the points certified at the radii (ε1, ε2, ε∞) by the upper-bound side of the
    protocol: the region certificate (without the box: smaller, still sound) or bound propagation
    (with the box). Keys ``cert_l1``, ``cert_l2``, ``cert_linf``, ``cert_union`` (all three at once),
    ``cert_universal_l2`` / ``cert_union_universal`` (Thm 4.1 of the MMR-Universal paper from the
    l1 and l∞ region radii alone), ``median_radius_l1/l2/linf`` (region radii), ``cert_points``."""
    region = certified_stats(model, images, labels, eps)
    radii = region.pop("radii")
    p0 = next(model.parameters())
    lo, hi = box
    was = _eval_mode(model)
    certified = {}
    try:
        for n, e in zip(NORMS, eps):
            p = parse_norm(n)
            done = radii[n] > e
            for start in range(0, images.shape[0], batch_size):
                sl = slice(start, start + batch_size)
                todo = (~done[sl]).nonzero()[:, 0] + start
                if todo.numel():
                    x = images[todo].to(device=p0.device, dtype=p0.dtype)
                    y = labels[todo].to(p0.device)
                    done[todo] = certified_by_bounds(model, x, y, norm=p, eps=e, lo=lo, hi=hi).cpu()
                if on_batch is not None:
                    on_batch(min(batch_size, images.shape[0] - start))
            certified[n] = done
    finally:
        model.train(was)
    total = max(1, images.shape[0])
    out = dict(region)
    for n in NORMS:
        out[f"cert_l{n}"] = float(certified[n].sum()) / total
    out["cert_union"] = float(torch.stack([certified[n] for n in NORMS]).all(0).sum()) / total
    return out


def final_evaluation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: Sequence[float],
                     out_dir: Path, *, resume: bool, plots: bool, curves: bool, attack_steps: int = 100,
                     box=(0.0, 1.0),
                     on_eval_batch: Optional[Callable[[int], None]] = None,
                     on_curve_batch: Optional[Callable[[int], None]] = None,
                     scales: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """The evaluation protocol on the given test points, its robustness curves and the Thm 4.1 line.

    Writes ``evaluation.json`` (+ its per-point JSON lines: with ``resume`` an interrupted
    evaluation continues from them; records of other points or options are replaced) and, with ``curves``,
    ``robustness_curves.json`` (and ``.png`` with ``plots``) into ``out_dir``. Returns the summary
    entries: ``eval`` (the table: TE, LB / UB per norm and for the union, in percent),
    ``eval_points``, ``eval_time_s``, ``eval_timing``, ``cert_universal_l2`` (percent of the points
    certified in l2 by Thm 4.1 from the l1 and l∞ region radii) and the files written.
    """
    t0 = time.time()
    p0 = next(model.parameters())
    x = images.to(device=p0.device, dtype=p0.dtype)
    y = labels.to(p0.device)
    radii = {parse_norm(n): e for n, e in zip(NORMS, eps)}
    out = out_dir / EVALUATION_NAME
    records = records_path(out)

    def run(resume_records: bool):
        return evaluate(model, x, y, eps=radii, box=tuple(box), attack_steps=attack_steps,
                        fmn_steps=attack_steps, progress=False, records=records, resume=resume_records,
                        on_batch=on_eval_batch)
    try:
        result = run(resume and records.exists())
    except RecordsError:  # an evaluation of other points or options (e.g. a new --eval-points): redo it
        records.unlink()
        result = run(False)
    result.to_json(out)
    files = [str(out)]
    summary: Dict[str, Any] = {"eval": result.rows(), "eval_points": result.n, "eval_timing": result.timing}
    region = certified_stats(model, images, labels, eps)
    summary["cert_universal_l2"] = 100.0 * region["cert_universal_l2"]
    if curves:
        kw = {} if scales is None else {"scales": scales}
        c = robustness_curves(model, x, y, result, on_batch=on_curve_batch, **kw)
        files.append(str(c.to_json(out_dir / f"{CURVES_NAME}.json")))
        if plots:
            files.append(str(c.plot(out_dir / f"{CURVES_NAME}.png",
                                    title=f"first {result.n} test points; dashed: the papers' radii")))
        summary["curves"] = {k: v for k, v in c.to_dict()["curves"].items()}
    summary["eval_time_s"] = time.time() - t0
    summary["eval_files"] = files
    return summary
