"""Cost of the MMR-Universal step on graph networks (max pooling, residual blocks), side by side with
a plain cross-entropy step of the same model and batch, and with the papers' CNN (a chain, native
row engine) as context.

    python benchmarks/bench_graph.py                 # cnn_maxpool, resnet and cnn on MNIST shapes, batch 32 and 128
    python benchmarks/bench_graph.py --quick         # smoke run: batch 4, one repeat

Graph networks run through the exact pure-PyTorch reference along the graph (docs/MATH.md §11):
the native row engine covers chains only. Weights are random, inputs uniform noise. Each config
times ``universal_loss(...).backward()`` and ``F.cross_entropy(model(x), y).backward()``
alternately (medians of each, after one warm-up call), and records the peak memory of the loss
step (tensor allocations seen by the torch profiler). Writes ``bench_graph.json`` under --out and
prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_distances import KW, _ce_step, gemm_gflops, peak_memory, time_interleaved  # noqa: E402

import mmr_ext  # noqa: E402
from mmr_ext.nn.graph import Graph, parse_network  # noqa: E402
from mmr_ext.nn.zoo import build_model  # noqa: E402

CONFIGS = [("cnn_maxpool", (1, 28, 28)), ("resnet", (1, 28, 28)), ("cnn", (1, 28, 28))]


def loss_step(model, x, y):
    mmr_ext.universal_loss(model, x, y, **KW).backward()


def run(arch, shape, batch, repeats, budget, memory):
    torch.manual_seed(0)
    model = build_model(arch, shape, 10)
    x = torch.rand((batch,) + shape)
    y = torch.randint(0, 10, (batch,))
    times = time_interleaved({"loss": loss_step, "ce": _ce_step}, model, x, y, repeats, budget)
    result = {"model": arch, "in_shape": list(shape), "batch": batch,
              "graph": isinstance(parse_network(model), Graph),
              "loss_step_s": times["loss"][0], "ce_step_s": times["ce"][0], "repeats": times["loss"][1],
              "ratio_vs_ce": times["loss"][0] / times["ce"][0]}
    if memory:
        result["peak_memory_mib"] = peak_memory(loss_step, model, x, y) / 2 ** 20
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, one repeat")
    parser.add_argument("--out", default="results/bench", help="output folder for bench_graph.json")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 32,128)")
    parser.add_argument("--budget", type=float, default=60.0, help="max seconds of repeats per config")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([4] if args.quick else [32, 128])
    repeats = 1 if args.quick else 3
    warnings.filterwarnings("ignore", message="this model is a graph network")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    print(f"{'model':12s} {'batch':>5s} {'graph':>5s} {'step s':>8s} {'CE s':>8s} {'ratio':>7s} {'peak MiB':>9s}")
    for arch, shape in CONFIGS:
        for batch in batches:
            r = run(arch, shape, batch, repeats, args.budget, not args.no_memory)
            rows.append(r)
            print(f"{arch:12s} {batch:5d} {str(r['graph']):>5s} {r['loss_step_s']:8.3f} {r['ce_step_s']:8.4f} "
                  f"{r['ratio_vs_ce']:6.0f}x {r.get('peak_memory_mib', float('nan')):9.0f}", flush=True)
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
               "gemm_gflops": gemm_gflops(0.3 if args.quick else 1.0)}
    path = os.path.join(args.out, "bench_graph.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "results": rows}, f, indent=2)
    print(f"GEMM {machine['gemm_gflops']:.1f} GFLOP/s; written: {path}")
    return rows


if __name__ == "__main__":
    main()
