"""Speed and memory of the region geometry and of universal_loss: native vs baselines, side by side.

    python benchmarks/bench_distances.py            # FC1, FC10, CNN (MNIST), CNN (CIFAR); batch 32, 128
    python benchmarks/bench_distances.py --quick    # CI smoke run: tiny shapes, one repeat

Methods (all in this process, interleaved): ``native`` (mmr_ext, compact rows + C++ kernels),
``reference`` (mmr_ext's pure-PyTorch oracle), ``dense`` (the authors' identity-propagation
algorithm rendered in PyTorch, benchmarks/baselines.py) and ``jacrev`` (torch.func vmap+jacrev).
Tasks: ``distances`` (l1 and l∞ boundary+decision distances, forward without autograd) and ``loss`` (universal_loss
forward+backward). Reports median time, ratio of each baseline to native, peak memory (tensor
allocations recorded by the torch profiler) and GFLOP/s of the native path's products against
this machine's measured GEMM rate. Writes JSON (and prints a table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

import mmr_ext  # noqa: E402
from mmr_ext.nn.zoo import build_model  # noqa: E402

KW = dict(k_boundary=0.2, gamma=(1.0, 0.15), lam=(3.0, 12.0))


def _distances_native(model, x, y):
    with torch.no_grad():  # like the baselines' distance task
        return mmr_ext.geometry.compute_geometry(model, x, (1, math.inf), y)


def _distances_reference(model, x, y):
    chain = mmr_ext.nn.chain.parse_model(model)
    with torch.no_grad():
        return mmr_ext.geometry.reference.reference_geometry(chain, x, (math.inf, 1.0), y)


def _loss_native(model, x, y):
    mmr_ext.universal_loss(model, x, y, **KW).backward()


def _loss_reference(model, x, y):
    import unittest.mock as mock
    with mock.patch.object(mmr_ext.geometry.engine, "native_or_warn", lambda: False):
        mmr_ext.universal_loss(model, x, y, **KW).backward()


def _loss_dense(model, x, y):
    baselines.dense_universal(model, x, y, **KW).backward()


def _loss_jacrev(model, x, y):
    baselines.jacobian_universal(model, x, y, **KW).backward()


def _distances_dense(model, x, y):
    with torch.no_grad():
        baselines.dense_universal(model, x, y, **KW)


def _distances_jacrev(model, x, y):
    with torch.no_grad():
        baselines.jacobian_universal(model, x, y, **KW)


METHODS = {
    "distances": {"native": _distances_native, "reference": _distances_reference, "dense": _distances_dense,
                  "jacrev": _distances_jacrev},
    "loss": {"native": _loss_native, "reference": _loss_reference, "dense": _loss_dense, "jacrev": _loss_jacrev},
}


def gemm_gflops(seconds: float = 1.0) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t0) / 1e9


def native_flops(model, x) -> float:
    """FLOPs of the native path's products (matmul/einsum/conv), counted by the torch profiler."""
    with torch.profiler.profile(with_flops=True) as prof:
        _loss_native(model, x, torch.zeros(x.shape[0], dtype=torch.long))
    return float(sum(e.flops for e in prof.key_averages() if e.flops))


def peak_memory(fn, model, x, y) -> float:
    """Peak bytes of live tensor allocations during fn, from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(model, x, y)
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0 or e.name == "[memory]"),
                    key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return float(peak)


def _load_trained(path):
    """(model, name, in_shape, mnist5k training data) from a checkpoint of `mmr-ext train`."""
    from mmr_ext.train import load_dataset, load_model

    model, ckpt = load_model(path)
    return model.float(), ckpt["model_name"], tuple(ckpt["in_shape"]), load_dataset("mnist5k", split="train")


def _hidden_units(model, x) -> int:
    hidden, _ = baselines._preactivations(model, x[:1])
    return sum(h.shape[1] for h in hidden)


def time_method(fn, model, x, y, repeats: int, budget: float):
    fn(model, x, y)  # warm-up
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        fn(model, x, y)
        times.append(time.perf_counter() - t0)
        if sum(times) > budget:
            break
    return statistics.median(times), len(times)


def configs(quick: bool):
    if quick:
        return [("cnn-mnist", "cnn", (1, 28, 28), [8])], 1
    return [("fc1-mnist", "fc1", (1, 28, 28), [32, 128]), ("fc10-mnist", "fc10", (1, 28, 28), [32, 128]),
            ("cnn-mnist", "cnn", (1, 28, 28), [32, 128]), ("cnn-cifar", "cnn", (3, 32, 32), [32, 128])], 3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    parser.add_argument("--out", default="results/bench", help="output folder for bench_distances.json")
    parser.add_argument("--methods", default="native,reference,dense,jacrev")
    parser.add_argument("--configs", default=None, help="comma-separated labels, e.g. cnn-mnist,fc1-mnist")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes, e.g. 128")
    parser.add_argument("--tasks", default="distances,loss")
    parser.add_argument("--budget", type=float, default=30.0, help="max seconds of repeats per measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="a checkpoint of `mmr-ext train` on mnist/mnist5k: its trained weights and "
                             "mnist5k images replace the random ones in the configs with the same model")
    parser.add_argument("--max-dense-gib", type=float, default=6.0,
                        help="skip the dense/jacrev/reference baselines where their B x d x units tensor "
                             "(x2 for autograd) would exceed this many GiB")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    tasks = args.tasks.split(",")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    gemm = gemm_gflops(0.3 if args.quick else 1.0)
    cfgs, repeats = configs(args.quick)
    rows = []
    trained = _load_trained(args.checkpoint) if args.checkpoint else None
    for label, arch, in_shape, batches in cfgs:
        if args.configs and label not in args.configs.split(","):
            continue
        model = build_model(arch, in_shape, 10)
        data = None
        if trained is not None and (trained[1], trained[2]) == (arch, in_shape):
            model, data = trained[0], trained[3]
            label += "-trained"
        for B in batches:
            if args.batches and str(B) not in args.batches.split(","):
                continue
            if data is not None:
                x, y = data.images[:B].clone(), data.labels[:B].clone()
            else:
                x = torch.rand((B,) + in_shape)
                y = torch.randint(0, 10, (B,))
            flops = native_flops(model, x)
            dense_gib = 2 * 4 * B * x[0].numel() * _hidden_units(model, x) / 2**30
            for task in tasks:
                result = {"config": label, "batch": B, "task": task, "methods": {}, "skipped": []}
                for name in methods:
                    if name != "native" and dense_gib * (3 if name == "jacrev" else 1) > args.max_dense_gib:
                        result["skipped"].append(f"{name} (needs about {dense_gib:.0f} GiB)")
                        continue
                    seconds, n = time_method(METHODS[task][name], model, x, y, repeats, args.budget)
                    entry = {"median_s": seconds, "repeats": n}
                    if not args.no_memory:
                        entry["peak_bytes"] = peak_memory(METHODS[task][name], model, x, y)
                    result["methods"][name] = entry
                native = result["methods"].get("native")
                if native:
                    for name, entry in result["methods"].items():
                        entry["time_ratio_vs_native"] = entry["median_s"] / native["median_s"]
                        if "peak_bytes" in entry and native.get("peak_bytes"):
                            entry["memory_ratio_vs_native"] = entry["peak_bytes"] / native["peak_bytes"]
                    if task == "loss":
                        native["gflops"] = flops / native["median_s"] / 1e9
                        native["fraction_of_gemm_rate"] = native["gflops"] / gemm
                rows.append(result)
                _print_row(result)
    report = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "gemm_gflops": gemm},
              "kw": {k: list(v) if isinstance(v, tuple) else v for k, v in KW.items()},
              "checkpoint": args.checkpoint, "results": rows}
    path = os.path.join(args.out, "bench_distances.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"\nGEMM rate of this machine: {gemm:.1f} GFLOP/s ({torch.get_num_threads()} threads); wrote {path}")
    return report


def _print_row(result):
    parts = [f"{result['config']:<11} B={result['batch']:<4} {result['task']:<9}"]
    for name, e in result["methods"].items():
        mem = f" {e['peak_bytes'] / 2**20:7.1f}MiB" if "peak_bytes" in e else ""
        parts.append(f"{name} {e['median_s'] * 1e3:9.1f}ms x{e.get('time_ratio_vs_native', 1):6.1f}{mem}")
    parts += [f"skipped {s}" for s in result["skipped"]]
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
