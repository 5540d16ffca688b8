"""Reproduces the MNIST rows of Table 4 of the MMR-Universal paper (Croce & Hein, ICLR 2020) on the bundled mnist5k split.

Trains plain, AT-l∞, MMR-l∞ and MMR-Universal CNNs (the papers' MNIST CNN) on the 4000 mnist5k
training images, then evaluates each with :func:`mmr_ext.evaluate` at the papers' MNIST radii
(ε1 = 1, ε2 = 0.3, ε∞ = 0.1) on the 1000 mnist5k test images: test error, lower bounds (PGD and
the minimum-norm attack) and upper bounds (region certificates, bound propagation; MIP optional)
on the robust test error per norm and for the union l1 + l2 + l∞.

    python benchmarks/reproduce_mnist5k.py [--out results/reproduce] [--epochs 30] [--mip]

Every stage is resumable: a finished training run (summary.json) or evaluation (evaluation.json)
is reused, an interrupted training run continues from its checkpoint. Writes, under --out,
one folder per scheme (checkpoint, training curves, evaluation.json), and ``table.md``,
``reproduction.json`` and ``reproduction.png`` with the paper's full-MNIST numbers alongside.
``--quick`` is a smoke run (one epoch on 256 images, 20 test points).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mmr_ext.evaluation import evaluate  # noqa: E402
from mmr_ext.train import PAPER_EPS, TrainConfig, load_dataset, load_model, train  # noqa: E402

#: The schemes and their training options (everything else: the papers' MNIST defaults).
SCHEMES: Dict[str, Dict[str, object]] = {
    "plain": dict(mode="plain"),
    "AT-linf": dict(mode="at", at_norm="inf"),
    "MMR-linf": dict(mode="mmr", p="inf"),
    "MMR-Universal": dict(mode="universal"),
}
COLUMNS = ("l1", "l2", "linf", "union")
#: Table 4 of the MMR-Universal paper, MNIST (full training set, first 1000 test points): TE, then (LB, UB) per column.
PAPER_TABLE4 = {
    "plain": (0.85, {"l1": (2.3, 100), "l2": (3.1, 100), "linf": (88.5, 100), "union": (88.5, 100)}),
    "AT-linf": (0.82, {"l1": (1.8, 100), "l2": (1.7, 100), "linf": (4.7, 100), "union": (4.7, 100)}),
    "MMR-linf": (1.65, {"l1": (10.0, 100), "l2": (5.2, 100), "linf": (6.0, 6.0), "union": (10.4, 100)}),
    "MMR-Universal": (3.04, {"l1": (6.4, 20.8), "l2": (6.2, 10.4), "linf": (12.4, 12.4),
                             "union": (12.4, 20.8)}),
}


def train_scheme(name: str, out: Path, args: argparse.Namespace) -> Path:
    """Trains one scheme (or reuses / resumes its run) and returns its checkpoint."""
    run_dir = out / name
    ckpt = run_dir / "checkpoint.pt"
    if (run_dir / "summary.json").exists():
        print(f"[{name}] training done earlier: {ckpt}", flush=True)
        return ckpt
    config = TrainConfig(**SCHEMES[name], dataset="mnist5k", model="cnn", preset="paper",
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         cert_points=0, eval_points=0, seed=args.seed, out_dir=str(run_dir),
                         resume="auto" if ckpt.exists() else None, train_subset=args.train_subset,
                         progress=args.progress, threads=args.threads)
    train(config)
    return ckpt


def evaluate_scheme(name: str, ckpt: Path, args: argparse.Namespace) -> dict:
    """Evaluates one trained scheme (or reuses its evaluation.json)."""
    path = ckpt.parent / "evaluation.json"
    if path.exists():
        print(f"[{name}] evaluation done earlier: {path}", flush=True)
        return json.loads(path.read_text())
    model, _ = load_model(ckpt)
    data = load_dataset("mnist5k", split="test")
    n = min(args.n_points, len(data))
    x = data.images[:n].to(next(model.parameters()).dtype)
    start = time.monotonic()
    result = evaluate(model, x, data.labels[:n], eps=PAPER_EPS["mnist5k"], attack_restarts=args.restarts,
                      neighbors=args.neighbors, use_mip=args.mip, mip_time_limit=args.mip_time_limit,
                      workers=args.workers, progress=args.progress)
    result.timing["total"] = time.monotonic() - start
    result.settings.update({"checkpoint": str(ckpt), "scheme": name, "n_points": n})
    print(result.table(f"{name} (mnist5k, first {n} test points)"), flush=True)
    result.to_json(path)
    return json.loads(path.read_text())


def _cell(lb: float, ub: float) -> str:
    return f"{lb:.1f} / {ub:.1f}"


def table_markdown(rows: Dict[str, dict]) -> str:
    """Ours next to the paper's: TE, then LB / UB per norm and for the union (percent)."""
    head = "| scheme | data | TE | l1 (ε=1) LB / UB | l2 (ε=0.3) LB / UB | l∞ (ε=0.1) LB / UB | l1+l2+l∞ LB / UB |"
    lines = [head, "|" + "---|" * 7]
    for name, ours in rows.items():
        te, paper = PAPER_TABLE4[name]
        cells = [_cell(ours["table"][c]["LB"], ours["table"][c]["UB"]) for c in COLUMNS]
        lines.append(f"| {name} | mnist5k (ours) | {ours['table']['TE']:.2f} | " + " | ".join(cells) + " |")
        cells = [_cell(*paper[c]) for c in COLUMNS]
        lines.append(f"| {name} | full MNIST (paper) | {te:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Dict[str, dict], path: Path) -> None:
    """Upper (bars) and lower (ticks) bounds on the robust test error, ours and the paper's."""
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.6), sharey=True)
    names = list(rows)
    xs = range(len(names))
    for ax, col in zip(axes, COLUMNS):
        ours_ub = [rows[n]["table"][col]["UB"] for n in names]
        ours_lb = [rows[n]["table"][col]["LB"] for n in names]
        paper_ub = [PAPER_TABLE4[n][1][col][1] for n in names]
        ax.bar([i - 0.2 for i in xs], ours_ub, width=0.4, color="tab:blue", label="UB mnist5k (ours)")
        ax.bar([i + 0.2 for i in xs], paper_ub, width=0.4, color="tab:gray", alpha=0.6, label="UB full MNIST (paper)")
        ax.scatter([i - 0.2 for i in xs], ours_lb, marker="_", s=300, color="k", zorder=3, label="LB (ours)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=25, ha="right")
        ax.set_title({"l1": "l1, ε=1", "l2": "l2, ε=0.3", "linf": "l∞, ε=0.1", "union": "l1+l2+l∞"}[col])
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("robust test error (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/reproduce", help="output folder (default results/reproduce)")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--epochs", type=int, default=30, help="training epochs per scheme (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--train-subset", type=int, help="train on the first N training images")
    p.add_argument("--n-points", type=int, default=1000, help="test points evaluated (default 1000)")
    p.add_argument("--restarts", type=int, default=1, help="PGD restarts in the evaluation (default 1)")
    p.add_argument("--neighbors", type=int, default=0, help="neighbouring regions of the certificate")
    p.add_argument("--mip", action="store_true", help="MIP verification (l1, l∞) of undecided points")
    p.add_argument("--mip-time-limit", type=float, default=120.0, help="seconds per MIP (default 120)")
    p.add_argument("--workers", type=int, default=1, help="processes for the MIP (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch on 256 images, 20 test points")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.epochs, args.train_subset, args.n_points = 1, 256, 20
    if args.epochs < 1 or args.n_points < 1:
        raise SystemExit("--epochs and --n-points must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: Dict[str, dict] = {}
    for name in args.schemes:
        ckpt = train_scheme(name, out, args)
        rows[name] = evaluate_scheme(name, ckpt, args)
        rows[name]["training"] = json.loads((ckpt.parent / "summary.json").read_text())
    text = table_markdown(rows)
    (out / "table.md").write_text(text)
    summary = {"settings": vars(args),
               "schemes": {n: {"table": r["table"], "timing": r.get("timing"),
                               "train_time_s": r["training"]["train_time_s"]} for n, r in rows.items()},
               "paper_table4_mnist": {n: {"TE": te, **{c: dict(zip(("LB", "UB"), v)) for c, v in cols.items()}}
                                      for n, (te, cols) in PAPER_TABLE4.items()}}
    (out / "reproduction.json").write_text(json.dumps(summary, indent=1))
    plot(rows, out / "reproduction.png")
    print(text)
    print(f"written: {out / 'table.md'}, {out / 'reproduction.json'}, {out / 'reproduction.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
