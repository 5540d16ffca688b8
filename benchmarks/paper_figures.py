"""Reproduces Table 1 and Figure 2 of Croce & Hein (ICLR 2020), from mmr_ext.math (ball_radii, hull_radius).

Table 1: the l2 radius implied by the convex hull of the l1 and l∞ balls (Thm 3.1, eq. 6) for each
dataset's (e1, e∞), next to the e2 the paper evaluates at.
Figure 2: with e∞ = 1 and e1 in (1, d), the minimal l2 norm outside the hull (eq. 6), outside the
union (eq. 5) and the naive bound (eq. 4) (left), and the ratio hull / union (right), for d = 784
and d = 3072.

    python benchmarks/paper_figures.py [--out results/] [--points 20001] [--logx]

Writes figure2_d784.png, figure2_d3072.png and paper_figures.json under --out, prints the table
and the peak ratios (the paper: about 3.8 for d = 784 and 5.3 for d = 3072).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mmr_ext.math.ball_radii import naive_radius, union_radius  # noqa: E402
from mmr_ext.math.hull_radius import hull_radius  # noqa: E402

# dataset, input dimension, e1, e∞ (as written in the paper), e2 evaluated in the paper,
# e2 by (6) printed in the paper's Table 1
TABLE1 = [
    ("MNIST", 784, 1.0, (0.1, "0.1"), 0.3, 0.3162),
    ("F-MNIST", 784, 1.0, (0.1, "0.1"), 0.3, 0.3162),
    ("GTS", 3072, 3.0, (4 / 255, "4/255"), 0.2, 0.2170),
    ("CIFAR-10", 3072, 2.0, (2 / 255, "2/255"), 0.1, 0.1252),
]
FIGURE_DIMS = (784, 3072)
PAPER_PEAKS = {784: 3.8, 3072: 5.3}


def table1(p: float = 2.0):
    rows = []
    for name, d, e1, (e_inf, e_inf_txt), e2_paper, e2_by6_paper in TABLE1:
        rows.append({
            "dataset": name, "d": d, "e1": e1, "e_inf": e_inf, "e_inf_text": e_inf_txt,
            "e2_evaluated_in_paper": e2_paper, "e2_by_eq6_in_paper": e2_by6_paper,
            "hull": hull_radius(e1, e_inf, p, d),
            "union": union_radius(e1, e_inf, p, d),
            "naive": naive_radius(e1, e_inf, p, d),
            "sqrt_e1_einf": math.sqrt(e1 * e_inf),
        })
    return rows


def print_table1(rows):
    head = (f"{'dataset':<10}{'d':>6}{'e1':>6}{'e_inf':>8}{'e2 (paper)':>12}{'eq.6 (paper)':>14}"
            f"{'hull (6)':>10}{'union (5)':>11}{'naive (4)':>11}{'sqrt(e1 einf)':>15}")
    print("Table 1 (l2 radii, p = 2)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['dataset']:<10}{r['d']:>6}{r['e1']:>6g}{r['e_inf_text']:>8}"
              f"{r['e2_evaluated_in_paper']:>12g}{r['e2_by_eq6_in_paper']:>14.4f}{r['hull']:>10.4f}"
              f"{r['union']:>11.4f}{r['naive']:>11.4f}{r['sqrt_e1_einf']:>15.4f}")


def figure2_curves(d: int, points: int, p: float = 2.0):
    e1 = torch.linspace(1.0, float(d), points, dtype=torch.float64)
    curves = {
        "e1": e1,
        "hull": hull_radius(e1, 1.0, p, d),
        "union": union_radius(e1, 1.0, p, d),
        "naive": naive_radius(e1, 1.0, p, d),
    }
    curves["ratio"] = curves["hull"] / curves["union"]
    # refine the peak on a fine grid around the best grid point
    i = int(curves["ratio"].argmax())
    lo, hi = float(e1[max(i - 1, 0)]), float(e1[min(i + 1, points - 1)])
    fine = torch.linspace(lo, hi, 10001, dtype=torch.float64)
    fine_ratio = hull_radius(fine, 1.0, p, d) / union_radius(fine, 1.0, p, d)
    j = int(fine_ratio.argmax())
    peak = {"ratio": float(fine_ratio[j]), "e1": float(fine[j]), "sqrt_d": math.sqrt(d),
            "hull": hull_radius(float(fine[j]), 1.0, p, d), "union": union_radius(float(fine[j]), 1.0, p, d)}
    return curves, peak


def plot_figure2(d, curves, peak, path, logx):
    e1 = curves["e1"].numpy()
    fig, (ax_v, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    ax_v.plot(e1, curves["hull"].numpy(), color="tab:blue", label="outside conv(B1 ∪ B∞)  (6)")
    ax_v.plot(e1, curves["union"].numpy(), color="tab:red", label="outside B1 ∪ B∞  (5)")
    ax_v.plot(e1, curves["naive"].numpy(), color="tab:green", ls="--", label="naive bound  (4)")
    ax_v.set_xlabel("ε1  (ε∞ = 1)")
    ax_v.set_ylabel("minimal l2 norm")
    ax_v.set_title(f"d = {d}")
    ax_v.legend()
    ax_r.plot(e1, curves["ratio"].numpy(), color="tab:blue")
    ax_r.axvline(peak["e1"], color="gray", ls=":", lw=1)
    ax_r.annotate(f"max {peak['ratio']:.2f} at ε1 = {peak['e1']:.1f}", (peak["e1"], peak["ratio"]),
                  textcoords="offset points", xytext=(10, -15))
    ax_r.set_xlabel("ε1  (ε∞ = 1)")
    ax_r.set_ylabel("ratio  (6) / (5)")
    ax_r.set_title(f"d = {d}: hull / union")
    for ax in (ax_v, ax_r):
        ax.grid(alpha=0.3)
        if logx:
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="output directory (default: results/)")
    parser.add_argument("--points", type=int, default=20001,
                        help="grid points for e1 in [1, d] (default: 20001)")
    parser.add_argument("--json-points", type=int, default=1000,
                        help="grid points per curve written to the JSON (default: 1000)")
    parser.add_argument("--logx", action="store_true", help="logarithmic e1 axis")
    args = parser.parse_args(argv)
    if args.points < 3 or args.json_points < 2:
        parser.error("--points must be >= 3 and --json-points >= 2")

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    rows = table1()
    print_table1(rows)
    print()

    result = {"table1": rows, "figure2": {}}
    for d in FIGURE_DIMS:
        curves, peak = figure2_curves(d, args.points)
        path = os.path.join(args.out, f"figure2_d{d}.png")
        plot_figure2(d, curves, peak, path, args.logx)
        idx = torch.linspace(0, args.points - 1, min(args.json_points, args.points)).round().long()
        result["figure2"][str(d)] = {
            "e_inf": 1.0, "p": 2.0, "peak": peak, "paper_peak": PAPER_PEAKS[d],
            **{k: v[idx].tolist() for k, v in curves.items()},
        }
        print(f"Figure 2, d = {d}: peak hull/union ratio {peak['ratio']:.4f} at e1 = {peak['e1']:.3f} "
              f"(sqrt(d) = {math.sqrt(d):.3f}; hull {peak['hull']:.4f}, union {peak['union']:.4f}; "
              f"paper: about {PAPER_PEAKS[d]})  -> {path}")

    json_path = os.path.join(args.out, "paper_figures.json")
    with open(json_path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"numbers -> {json_path}  ({time.perf_counter() - start:.2f} s)")
    return result


if __name__ == "__main__":
    main()
