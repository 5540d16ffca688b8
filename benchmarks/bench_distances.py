"""Speed and memory of the region geometry and of universal_loss: native vs baselines, side by side.

    python benchmarks/bench_distances.py               # FC1, FC10, CNN (MNIST, trained), CNN (CIFAR), large
    python benchmarks/bench_distances.py --quick       # CI smoke run: tiny shapes, one repeat, random weights
    python benchmarks/bench_distances.py --floor-only  # the MAC floor of every config, layer by layer; no timing

Methods (all in this process, interleaved): ``native`` (mmr_ext, compact rows + C++ kernels),
``reference`` (mmr_ext's pure-PyTorch oracle), ``dense`` (the authors' identity-propagation
algorithm rendered in PyTorch, benchmarks/baselines.py) and ``jacrev`` (torch.func vmap+jacrev).
Tasks: ``distances`` (l1 and l∞ boundary+decision distances, forward without autograd) and ``loss`` (universal_loss
forward+backward). Reports median time, ratio of each baseline to native, peak memory (tensor
allocations recorded by the torch profiler) and GFLOP/s of the native path's products against
this machine's measured GEMM rate. Writes JSON (and prints a table).

Two yardsticks for the native loss step (its median time is divided by each):

- CE step: ``F.cross_entropy(model(x), y).backward()`` on the same model, batch and dtype, timed
  alternately with the native loss step (loss, CE, loss, CE, ...; medians of each): the cost of
  a step of plain training. JSON (native entry): ``ce_step_s``, ``ratio_vs_ce``.
- floor: the fewest multiply-adds (MACs) that build every row of V(l) of one sample exactly
  (:func:`floor_macs`, from the layer shapes only), times 3 for a step (the backward through a
  product costs two products of the same size: one per factor), times the batch; its time at
  this machine's GEMM rate is ``floor_s = 2 * floor_step_macs / (GEMM GFLOP/s * 1e9)``. JSON (loss
  result): ``floor_forward_macs_per_sample``, ``floor_step_macs`` (the whole batch), ``floor_s``;
  native entry: ``ratio_vs_floor``.

Allocator: the process first calls :func:`mmr_ext.retain_freed_memory` (glibc keeps freed memory
for reuse), as ``mmr-ext train`` does; ``--system-allocator`` leaves the allocator as it starts.
JSON: ``machine.retain_freed_memory``.

Weights: the ``cnn-mnist`` configs use the MNIST CNN trained by mmr-ext's own demo recipe
(``mmr-ext train``: MMR-Universal on the bundled mnist5k) for ``--train-epochs`` epochs (default
3, 0 with --quick), cached in ``<--out>/cnn-mnist5k/`` and reused while its settings match, on mnist5k
training images (label ``cnn-mnist-trained``), or the weights of ``--checkpoint``; every other
config uses random weights on uniform noise.
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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

import mmr_ext  # noqa: E402
from mmr_ext.nn.layers import Normalize  # noqa: E402
from mmr_ext.nn.zoo import build_model  # noqa: E402

KW = dict(k_boundary=0.2, gamma=(1.0, 0.15), lam=(3.0, 12.0))
#: (model name, input shape) that --train-epochs trains on mnist5k.
TRAINED = ("cnn", (1, 28, 28))


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


def _ce_step(model, x, y):
    F.cross_entropy(model(x), y).backward()


METHODS = {
    "distances": {"native": _distances_native, "reference": _distances_reference, "dense": _distances_dense,
                  "jacrev": _distances_jacrev},
    "loss": {"native": _loss_native, "reference": _loss_reference, "dense": _loss_dense, "jacrev": _loss_jacrev},
}


# ---------------------------------------------------------------------------------------------
# the MAC floor of V(l)
# ---------------------------------------------------------------------------------------------

#: Layers that cost nothing in the floor: masks and scalings of the rows.
FREE_LAYERS = (nn.ReLU, nn.LeakyReLU, nn.Flatten, Normalize, nn.BatchNorm1d, nn.BatchNorm2d)


def _taps(n_in, kernel, stride, padding, dilation):
    """Along one axis of a Conv2d on n_in positions: for every output position, the input
    positions that its in-bounds kernel taps read (taps on the zero padding are left out)."""
    n_out = (n_in + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return [[q for q in range(o * stride - padding, o * stride - padding + kernel * dilation, dilation)
             if 0 <= q < n_in] for o in range(n_out)]


def _width(window):
    return window[1] - window[0] + 1


def floor_macs(model, in_shape):
    """Fewest multiply-adds that build all rows of V(l) of one sample exactly, layer by layer.

    V(l) holds the Jacobian rows w.r.t. the input x (d = prod(in_shape) entries) of every hidden
    pre-activation and the K-1 decision rows (logit differences to the true class). Row u of a
    layer is sum_v W[u, v] * mask_v * (row v of the previous layer): one MAC per stored entry
    (its support) of every previous row it takes. Per layer of the ``nn.Sequential``:

    - the first Linear or Conv2d (on the raw input): its rows are its weights: 0 MACs.
    - Conv2d after convs: for every output unit and every in-bounds tap (c, i, j) of its kernel
      (taps on the zero padding cost nothing), the support of the row it reads. A conv row's
      support is its receptive field clipped to the image (the bounding window with dilation >
      1) times the input channels. The window depends only on the position and factors into one
      interval per axis, so the sums are products of per-axis sums times channel counts: exact.
    - Linear after Linear: the previous rows are dense: n_l * n_{l-1} * d.
    - Linear after convs: the cheaper exact order. Forward: n_l * (sum of the supports of the
      n_{l-1} previous rows). Reverse: each of the n_l weight rows walked back to the input,
      n_l * (n_{l-1} + the MACs of one transposed conv on one map per conv, Cout * Cin * the
      in-bounds taps of all output positions).
    - the logits layer: only its K-1 decision rows, each costing one row by the rule above.

    ReLU, LeakyReLU, Flatten, Normalize and BatchNorm are free (masks and scalings of rows).
    Returns one dict per Linear/Conv2d: ``layer``, ``rows``, ``order`` (weights, forward or
    reverse), ``macs``, and ``forward`` and ``reverse`` where the order was a choice.
    """
    c0, d = in_shape[0], math.prod(in_shape)
    axes = [[(i, i) for i in range(n)] for n in in_shape[1:]]  # per axis and position: the row's window
    channels, units = c0, d
    support = None  # sum of the supports of the previous layer's rows; None: the previous is the raw input
    transposed = 0  # MACs of walking one map back through the convs so far; None after a Linear
    last = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    layers = []
    for m in model:
        if isinstance(m, FREE_LAYERS):
            continue
        if isinstance(m, nn.Conv2d) and transposed is not None and m.groups == 1 and \
                not isinstance(m.padding, str):
            taps = [_taps(len(w), *spec) for w, *spec in zip(axes, m.kernel_size, m.stride, m.padding, m.dilation)]
            macs = 0 if support is None else m.out_channels * channels * c0 * math.prod(
                sum(_width(w[q]) for t in tp for q in t) for w, tp in zip(axes, taps))
            transposed += m.out_channels * channels * math.prod(sum(map(len, tp)) for tp in taps)
            axes = [[(min((w[q][0] for q in t), default=0), max((w[q][1] for q in t), default=-1)) for t in tp]
                    for w, tp in zip(axes, taps)]
            channels, units = m.out_channels, m.out_channels * math.prod(map(len, axes))
            layers.append({"layer": f"conv {m.in_channels}->{m.out_channels} k{'x'.join(map(str, m.kernel_size))} "
                                    f"s{m.stride[0]} p{m.padding[0]}", "rows": units,
                           "order": "weights" if support is None else "forward", "macs": macs})
            support = c0 * channels * math.prod(sum(map(_width, w)) for w in axes)
        elif isinstance(m, nn.Linear):
            rows = m.out_features - 1 if m is last else m.out_features
            name = f"{'decision' if m is last else 'fc'} {m.in_features}->{m.out_features}"
            entry = {"layer": name, "rows": rows, "order": "weights", "macs": 0}
            if support is not None:
                forward = rows * support
                entry.update(order="forward", macs=forward)
                if transposed is not None:
                    reverse = rows * (units + transposed)
                    entry.update(forward=forward, reverse=reverse, macs=min(forward, reverse),
                                 order="forward" if forward <= reverse else "reverse")
            layers.append(entry)
            support, transposed, units = m.out_features * d, None, m.out_features
        else:
            raise ValueError(f"floor_macs: no MAC model for layer {m!r} here")
    return layers


def print_floor(label, layers):
    print(f"MAC floor of V(l) for {label}, one sample:")
    for e in layers:
        choice = f" (forward {e['forward'] / 1e6:.2f} M, reverse {e['reverse'] / 1e6:.2f} M)" if "reverse" in e else ""
        print(f"  {e['layer']:<22} {e['rows']:>6} rows {e['macs'] / 1e6:9.2f} M MACs  {e['order']}{choice}")
    total = sum(e["macs"] for e in layers)
    print(f"  forward floor {total / 1e6:.2f} M MACs; step floor (x3) {3 * total / 1e6:.2f} M MACs per sample",
          flush=True)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

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


def time_interleaved(fns, model, x, y, repeats: int, budget: float):
    """{name: (median seconds, repeats)} of the functions in fns, called in turn (a, b, a, b, ...)
    after one warm-up call each, with the gradients cleared before every call; stops early
    once the calls took more than budget seconds."""
    for fn in fns.values():
        fn(model, x, y)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn(model, x, y)
            times[name].append(time.perf_counter() - t0)
        if sum(map(sum, times.values())) > budget:
            break
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


def _hidden_units(model, x) -> int:
    hidden, _ = baselines._preactivations(model, x[:1])
    return sum(h.shape[1] for h in hidden)


def run_task(task, model, x, y, args, repeats):
    """The timed (and memory-profiled) entries of every method of --methods on one task, and the
    baselines skipped by --max-dense-gib. On the loss task the native step alternates with the
    CE step."""
    dense_gib = 2 * 4 * x.shape[0] * x[0].numel() * _hidden_units(model, x) / 2**30
    entries, skipped = {}, []
    for name in args.methods.split(","):
        if name != "native" and dense_gib * (3 if name == "jacrev" else 1) > args.max_dense_gib:
            skipped.append(f"{name} (needs about {dense_gib:.0f} GiB)")
            continue
        fns = {name: METHODS[task][name]}
        if task == "loss" and name == "native":
            fns["ce"] = _ce_step
        timed = time_interleaved(fns, model, x, y, repeats, args.budget)
        entry = {"median_s": timed[name][0], "repeats": timed[name][1]}
        if "ce" in timed:
            entry["ce_step_s"] = timed["ce"][0]
            entry["ratio_vs_ce"] = entry["median_s"] / entry["ce_step_s"]
        if not args.no_memory:
            entry["peak_bytes"] = peak_memory(METHODS[task][name], model, x, y)
        entries[name] = entry
    return entries, skipped


def add_yardsticks(result, model, x, floor_forward, gemm):
    """Ratios to native; on the loss task also native's GFLOP/s and the MAC floor (see the
    module docstring)."""
    native = result["methods"].get("native")
    if not native:
        return
    for entry in result["methods"].values():
        entry["time_ratio_vs_native"] = entry["median_s"] / native["median_s"]
        if "peak_bytes" in entry and native.get("peak_bytes"):
            entry["memory_ratio_vs_native"] = entry["peak_bytes"] / native["peak_bytes"]
    if result["task"] == "loss":
        native["gflops"] = native_flops(model, x) / native["median_s"] / 1e9
        native["fraction_of_gemm_rate"] = native["gflops"] / gemm
        result["floor_forward_macs_per_sample"] = floor_forward
        result["floor_step_macs"] = 3 * floor_forward * x.shape[0]
        result["floor_s"] = 2 * result["floor_step_macs"] / (gemm * 1e9)
        native["ratio_vs_floor"] = native["median_s"] / result["floor_s"]


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------

def trained_checkpoint(folder, epochs):
    """Checkpoint of `mmr-ext train`'s demo run (MMR-Universal CNN on mnist5k) after `epochs` epochs,
    without certification: the one in `folder` if it is complete and has the same settings,
    else trained there afresh."""
    from mmr_ext.train import CheckpointError, TrainConfig, config_dict, load_checkpoint, resolve_config, train
    from mmr_ext.train.checkpoint import config_differences
    from mmr_ext.train.config import RUNTIME_FIELDS
    from mmr_ext.train.loop import CHECKPOINT_NAME

    config = TrainConfig(model=TRAINED[0], dataset="mnist5k", epochs=epochs, cert_points=0, eval_points=0,
                         device="cpu", out_dir=folder, overwrite=True, progress=False, plots=False)
    path = os.path.join(folder, CHECKPOINT_NAME)
    try:
        ckpt = load_checkpoint(path, require_training_state=True)
        if ckpt["epoch"] == epochs and not config_differences(ckpt["config"], config_dict(resolve_config(config)),
                                                              ignore=RUNTIME_FIELDS):
            print(f"reusing the trained {TRAINED[0]} of {path}")
            return path
    except CheckpointError:
        pass  # none there yet, or unreadable: train afresh
    train(config)
    return path


def _load_trained(path):
    """(model, name, in_shape, mnist5k training data) from a checkpoint of `mmr-ext train`."""
    from mmr_ext.train import load_dataset, load_model

    model, ckpt = load_model(path)
    return model.float(), ckpt["model_name"], tuple(ckpt["in_shape"]), load_dataset("mnist5k", split="train")


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def configs(quick: bool):
    if quick:
        return [("cnn-mnist", "cnn", (1, 28, 28), [8])], 1
    return [("fc1-mnist", "fc1", (1, 28, 28), [32, 128]), ("fc10-mnist", "fc10", (1, 28, 28), [32, 128]),
            ("cnn-mnist", "cnn", (1, 28, 28), [32, 128]), ("cnn-cifar", "cnn", (3, 32, 32), [32, 128]),
            ("large-mnist", "large", (1, 28, 28), [32])], 3


def selected_configs(args):
    """The configs of the run left by --configs and --batches, and the repeats per measurement."""
    cfgs, repeats = configs(args.quick)
    labels = args.configs.split(",") if args.configs else None
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    cfgs = [(label, arch, shape, [b for b in bs if batches is None or b in batches])
            for label, arch, shape, bs in cfgs if labels is None or label in labels]
    return [cfg for cfg in cfgs if cfg[3]], repeats


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    parser.add_argument("--out", default="results/bench", help="output folder for bench_distances.json")
    parser.add_argument("--methods", default="native,reference,dense,jacrev")
    parser.add_argument("--configs", default=None, help="comma-separated labels, e.g. cnn-mnist,fc1-mnist")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes, e.g. 128")
    parser.add_argument("--tasks", default="distances,loss")
    parser.add_argument("--budget", type=float, default=30.0, help="max seconds of repeats per measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--floor-only", action="store_true",
                        help="print the MAC floor of every config layer by layer and exit (no timing)")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="a checkpoint of `mmr-ext train` on mnist/mnist5k: its trained weights and "
                             "mnist5k images replace the random ones in the configs with the same model")
    parser.add_argument("--system-allocator", action="store_true",
                        help="leave the C allocator as the process starts (default: mmr_ext.retain_freed_memory(), "
                             "as mmr-ext train applies it)")
    parser.add_argument("--train-epochs", type=int, metavar="N",
                        help="without --checkpoint: train the MNIST CNN for N epochs of the demo recipe on "
                             "mnist5k (cached under --out) for the cnn-mnist configs; 0: random weights "
                             "(default 3, 0 with --quick)")
    parser.add_argument("--max-dense-gib", type=float, default=6.0,
                        help="skip the dense/jacrev/reference baselines where their B x d x units tensor "
                             "(x2 for autograd) would exceed this many GiB")
    args = parser.parse_args(argv)
    if args.train_epochs is None:
        args.train_epochs = 0 if args.quick else 3
    if args.train_epochs < 0:
        parser.error(f"argument --train-epochs: must be >= 0, got {args.train_epochs}")
    return args


def main(argv=None):
    args = parse_args(argv)
    retained = False if args.system_allocator else mmr_ext.retain_freed_memory()
    cfgs, repeats = selected_configs(args)
    if args.floor_only:
        for label, arch, in_shape, _ in cfgs:
            print_floor(label, floor_macs(build_model(arch, in_shape, 10), in_shape))
        return None
    tasks = args.tasks.split(",")
    os.makedirs(args.out, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None and args.train_epochs and any((a, s) == TRAINED for _, a, s, _ in cfgs):
        checkpoint = trained_checkpoint(os.path.join(args.out, f"{TRAINED[0]}-mnist5k"), args.train_epochs)
    trained = _load_trained(checkpoint) if checkpoint else None
    torch.manual_seed(0)
    gemm = gemm_gflops(0.3 if args.quick else 1.0)
    rows = []
    for label, arch, in_shape, batches in cfgs:
        model = build_model(arch, in_shape, 10)
        floor = floor_macs(model, in_shape)
        if "loss" in tasks:
            print_floor(label, floor)
        data = None
        if trained is not None and (trained[1], trained[2]) == (arch, in_shape):
            model, data = trained[0], trained[3]
            label += "-trained"
        for B in batches:
            if data is not None:
                x, y = data.images[:B].clone(), data.labels[:B].clone()
            else:
                x = torch.rand((B,) + in_shape)
                y = torch.randint(0, 10, (B,))
            for task in tasks:
                entries, skipped = run_task(task, model, x, y, args, repeats)
                result = {"config": label, "batch": B, "task": task, "methods": entries, "skipped": skipped}
                add_yardsticks(result, model, x, sum(e["macs"] for e in floor), gemm)
                rows.append(result)
                _print_row(result)
    report = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "gemm_gflops": gemm, "retain_freed_memory": retained},
              "kw": {k: list(v) if isinstance(v, tuple) else v for k, v in KW.items()},
              "checkpoint": checkpoint, "train_epochs": None if args.checkpoint else args.train_epochs,
              "results": rows}
    path = os.path.join(args.out, "bench_distances.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    allocator = "freed memory retained" if retained else "system allocator settings"
    print(f"\nGEMM rate of this machine: {gemm:.1f} GFLOP/s ({torch.get_num_threads()} threads, {allocator}); "
          f"wrote {path}")
    return report


def _print_row(result):
    parts = [f"{result['config']:<17} B={result['batch']:<4} {result['task']:<9}"]
    for name, e in result["methods"].items():
        mem = f" {e['peak_bytes'] / 2**20:7.1f}MiB" if "peak_bytes" in e else ""
        parts.append(f"{name} {e['median_s'] * 1e3:9.1f}ms x{e.get('time_ratio_vs_native', 1):6.1f}{mem}")
    native = result["methods"].get("native", {})
    if "ce_step_s" in native:
        parts.append(f"CE step {native['ce_step_s'] * 1e3:7.2f}ms native/CE x{native['ratio_vs_ce']:6.1f}")
    if "ratio_vs_floor" in native:
        parts.append(f"floor {result['floor_s'] * 1e3:7.2f}ms native/floor x{native['ratio_vs_floor']:6.1f}")
    parts += [f"skipped {s}" for s in result["skipped"]]
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
