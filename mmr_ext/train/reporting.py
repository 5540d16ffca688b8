"""What a training run reports: clean error and region certificates of test points, the
per-epoch metrics (``metrics.json``, ``metrics.csv``), the training curves (PNG) and the summary
printed at the end."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from ..math.norms import norm_name, parse_norm
from ..nn.zoo import short_model_name
from ..outputs import atomic_write_png, atomic_write_text
from .config import NORMS

__all__ = ["clean_error", "certified_stats", "write_metrics", "plot_metrics", "format_summary"]


@torch.no_grad()
def clean_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of misclassified points."""
    wrong = 0
    p0 = next(model.parameters())
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device=p0.device, dtype=p0.dtype)
        y = labels[i:i + batch_size].to(p0.device)
        wrong += int((model(x).argmax(1) != y).sum())
    return wrong / max(1, images.shape[0])


def certified_stats(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    eps: Sequence[float], batch_size: int = 256) -> Dict[str, Any]:
    """Region certificates (:func:`mmr_ext.certify`, docs/MATH.md §3, §5) of the given points.

    Returns the fractions of the points that are certified at the target (ε1, ε2, ε∞), i.e.
    correctly classified with radius > εp: ``cert_l1``, ``cert_l2``, ``cert_linf`` and
    ``cert_union`` (all three at once); ``cert_universal_l2`` and ``cert_union_universal``, the
    same from the l1 and l∞ certificates alone via Thm 4.1 (Croce & Hein, ICLR 2020); the median radii
    ``median_radius_l1/l2/linf`` (0 for misclassified points) and ``radii`` (the per-point
    radii as float64 tensors).
    """
    from .. import certify  # the top-level function (mmr_ext.certify)

    p0 = next(model.parameters())
    target = {parse_norm(n): e for n, e in zip(NORMS, eps)}
    radii: Dict[str, List[torch.Tensor]] = {n: [] for n in NORMS}
    counts = {k: 0.0 for k in ("cert_l1", "cert_l2", "cert_linf", "cert_union", "cert_universal_l2",
                               "cert_union_universal")}
    was_training = model.training
    model.eval()
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device=p0.device, dtype=p0.dtype)
            y = labels[i:i + batch_size].to(p0.device)
            cert = certify(model, x, y, norms=(1, 2, math.inf))
            frac = cert.fraction_certified(target)
            for n in NORMS:
                radii[n].append(cert.radius[parse_norm(n)].detach().double().cpu())
                counts[f"cert_l{n}"] += frac["radius"][parse_norm(n)] * x.shape[0]
            counts["cert_union"] += frac["union"] * x.shape[0]
            counts["cert_universal_l2"] += frac["universal"][2.0] * x.shape[0]
            counts["cert_union_universal"] += frac["union_universal"] * x.shape[0]
    finally:
        model.train(was_training)
    total = images.shape[0]
    out: Dict[str, Any] = {"cert_points": int(total)}
    out.update({k: (v / total if total else float("nan")) for k, v in counts.items()})
    cat = {n: torch.cat(radii[n]) if radii[n] else torch.zeros(0, dtype=torch.float64) for n in NORMS}
    for n in NORMS:
        out[f"median_radius_l{n}"] = float(cat[n].median()) if total else float("nan")
    out["radii"] = cat
    return out


def write_metrics(history: List[Dict[str, Any]], out_dir: Path) -> None:
    """``metrics.json`` (list of per-epoch dicts) and ``metrics.csv`` (one row per epoch)."""
    atomic_write_text(out_dir / "metrics.json", json.dumps(history, indent=1))
    keys: List[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue())


def plot_metrics(history: List[Dict[str, Any]], path: Path, eps: Sequence[float]) -> None:
    """PNG with three panels: clean error, loss terms, certified fraction at the target εp."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    def series(ax, key, label, **kw):
        pts = [(e, r[key]) for e, r in zip(ep, history) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label, **kw)

    series(axes[0], "train_error", "train", color="orange")
    series(axes[0], "test_error", "test", color="red")
    axes[0].set_title("clean error")
    for key in ("loss", "cross_entropy", "regularizer", "boundary", "decision"):
        series(axes[1], f"train_{key}", key.replace("_", " "))
    axes[1].set_title("training loss terms (epoch means)")
    names = {"1": "l1", "2": "l2", "inf": "l∞"}
    colors = {"1": "black", "2": "tab:cyan", "inf": "tab:blue"}  # as in the MMR-Universal paper, Fig. 3
    for n, e in zip(NORMS, eps):
        series(axes[2], f"cert_l{n}", f"{names[n]}, ε={e:.4g}", color=colors[n])
    series(axes[2], "cert_union", "union", color="green", linewidth=2)
    axes[2].set_title("certified (region + bound propagation)")
    axes[2].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(path, fig)


def format_summary(s: Dict[str, Any]) -> str:
    """Human-readable summary printed at the end of training: the evaluation table (TE, LB / UB of
    the robust test error per norm and for the union, as Table 4 of the MMR-Universal paper), the
    Thm 4.1 line and a one-line headline."""
    mode = {"universal": "MMR-Universal", "mmr": f"MMR-l{s.get('p')}", "plain": "plain",
            "at": f"AT-{s.get('at_norm')}", "mmr+at": f"MMR-l{s.get('p')}+AT-{s.get('at_norm')}"}[s["mode"]]
    wall = f", {s['wall_time_s']:.0f} s wall time in this invocation" if "wall_time_s" in s else ""
    lines = [f"{mode} {short_model_name(s['model'])} on {s['dataset']}: {s['epochs']} epochs, training time {s['train_time_s']:.0f} s"
             + wall,
             f"test error: {100 * s['test_error']:.2f}% ({s['test_points']} test points)"]
    table = s.get("eval")
    if table:
        n = s["eval_points"]
        eps = dict(zip(NORMS, s["eps"]))
        cols = [(f"{norm_name(parse_norm(k))} eps={eps[k]:.4g}", f"l{k}") for k in NORMS] + [("union", "union")]
        lines.append(f"evaluation of the first {n} test points ({s['eval_time_s']:.0f} s): robust test error in %, "
                     f"LB = attacked (PGD, minimum-norm attack), UB = not certified (region certificate, bound "
                     f"propagation)")
        lines.append(f"  {'TE':>6}" + "".join(f"{name:>18}" for name, _ in cols))
        lines.append(f"  {'':>6}" + "".join(f"{'LB':>9}{'UB':>9}" for _ in cols))
        lines.append(f"  {table['TE']:>6.1f}" + "".join(
            f"{table[key]['LB']:>9.1f}{table[key]['UB']:>9.1f}" for _, key in cols))
        lines.append(f"  Thm 4.1 (l2 from the l1 and linf region radii alone): {s['cert_universal_l2']:.1f}% of the "
                     f"points certified at l2 eps={eps['2']:.4g}")
        lines.append(f"{100 - table['union']['UB']:.1f}% of the test points are certified against every l1, l2 and "
                     f"linf perturbation of radii {', '.join(f'{e:.4g}' for e in s['eps'])} at once "
                     f"(union UB {table['union']['UB']:.1f}%); an attack breaks {table['union']['LB']:.1f}% (union LB)")
        files = s.get("eval_files", [])
        if files:
            lines.append("written: " + ", ".join(files))
    return "\n".join(lines)
