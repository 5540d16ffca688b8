"""Command line: ``mmr-ext train ...`` and ``mmr-ext evaluate ...`` (also ``python -m mmr_ext``).

``mmr-ext train`` with no options trains the demo MMR-Universal CNN on the bundled mnist5k split,
then evaluates it with the papers' protocol (attacks; region certificate + bound propagation) and
prints the TE / LB / UB table per norm and for the union, with robustness curves; see ``mmr-ext
train --help``. ``mmr-ext evaluate CHECKPOINT`` prints the test error and the robust-error bounds
of :func:`mmr_ext.evaluate` (first 1000 test points, the papers' ε per data set of
:data:`mmr_ext.train.PAPER_EPS`), ``--curves`` draws the curves. All argparse of the package lives
here.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from dataclasses import fields
from fractions import Fraction
from pathlib import Path
from typing import List, Optional

import torch

from .allocator import retain_freed_memory
from .math.norms import parse_norm

__all__ = ["main", "build_parser", "add_evaluate_arguments", "run_evaluate"]


_TRAIN_EPILOG = """\
examples:
  mmr-ext train                                   # demo: MMR-Universal CNN on bundled mnist5k
  mmr-ext train --dataset mnist --data-dir ~/data/mnist --epochs 100   # the papers' MNIST run
  mmr-ext train --mode mmr --p inf --lam 1 --gamma 0.15                # MMR-l∞ (Croce, Andriushchenko & Hein, AISTATS 2019)
  mmr-ext train --mode at --at-norm max --epochs 10                    # AT-(l1, l2, l∞)
  mmr-ext train --out-dir results/run1 --resume   # continue an interrupted run exactly
  torchrun --nproc_per_node 2 -m mmr_ext train    # the same run on 2 processes (DDP)

presets (options left unset): demo = 14 epochs, batch 32, lr 1e-3, schedules per step, 100 test
points certified after epoch 7, then the evaluation protocol on the first 500 test points (PGD and
minimum-norm attacks of 50 steps; region certificate + bound propagation) with robustness curves;
paper = 100 epochs, batch 128, per-epoch schedules, 200 points certified every epoch, evaluation of
1000 points with 100-step attacks. 'auto' is demo on mnist5k, else paper.
Schedules: k_B linear 20%->5% of the hidden units (universal) or 10%->2% (mmr); lambda from
lambda/10 to lambda over the first 10% of the epochs; lr/10 for the last 10% of the epochs.
Outputs in --out-dir: checkpoint.pt (every epoch), metrics.json, metrics.csv,
training_curves.png, summary.json, evaluation.json (+ evaluation.points.jsonl),
robustness_curves.json and robustness_curves.png.
"""


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .train import AT_NORMS, MODES

    g = p.add_argument_group("model and data")
    g.add_argument("--mode", choices=MODES, default="universal",
                   help="training scheme (default: universal = MMR-Universal)")
    g.add_argument("--dataset", default="mnist5k",
                   help="mnist5k (bundled, default), mnist, fmnist, gtsrb, cifar10")
    g.add_argument("--data-dir", metavar="DIR", help="folder with the dataset files (all but mnist5k)")
    g.add_argument("--model", default="cnn",
                   help="fc1, fc10, cnn (default), large, or your own network's builder "
                        "'package.module:function' or 'path/to/file.py:function', called as "
                        "function(in_shape, num_classes) and recorded in the checkpoint")
    g.add_argument("--train-subset", type=int, metavar="N", help="train on the first N training points")
    g.add_argument("--test-subset", type=int, metavar="N", help="evaluate on the first N test points")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crops and flips (default: on for cifar10 only)")

    g = p.add_argument_group("optimisation (Adam)")
    g.add_argument("--preset", choices=("auto", "demo", "paper"), default="auto",
                   help="defaults for the options below (default auto: demo on mnist5k, else paper)")
    g.add_argument("--epochs", type=int, metavar="N")
    g.add_argument("--batch-size", type=int, metavar="N", help="global batch size (all processes)")
    g.add_argument("--lr", metavar="LR", help="base learning rate (default: the papers' per dataset)")
    g.add_argument("--warmup-epochs", metavar="W", help="λ warm-up length (default: 10%% of the epochs)")
    g.add_argument("--lr-drop-epochs", metavar="D", help="final lr/10 phase (default: 10%% of the epochs)")
    g.add_argument("--schedule-unit", choices=("epoch", "step"),
                   help="update the schedules per epoch (papers) or per step")

    g = p.add_argument_group("regularizer (mmr, universal, mmr+at)")
    g.add_argument("--lam", nargs="+", metavar="L",
                   help="universal: λ1 λ∞ (default per dataset, e.g. 3 12 on MNIST); mmr: λ (default 1)")
    g.add_argument("--gamma", nargs="+", metavar="G",
                   help="universal: γ1 γ∞ (MNIST 1 0.15); mmr: γ or γB γD (default 1.5 εp)")
    g.add_argument("--p", metavar="P", help="norm of MMR-lp: 1, 2 or inf (default inf)")
    g.add_argument("--k-boundary", nargs="+", metavar="K",
                   help="k_B start [end] as fractions of the hidden units (0.2 0.05 universal, 0.1 0.02 mmr)")
    g.add_argument("--k-decision", type=int, metavar="K", help="k_D for mmr (default K, all classes)")
    g.add_argument("--selection", choices=("per_norm", "union"), default="per_norm",
                   help="universal top-k_B sets: per norm (paper) or their union (authors' code)")

    g = p.add_argument_group("adversarial training (at, mmr+at)")
    g.add_argument("--at-norm", choices=AT_NORMS, help="PGD norm, or max over l1, l2, l∞ (default: max for at, p for mmr+at)")
    g.add_argument("--at-eps", nargs=3, metavar=("E1", "E2", "EINF"), help="PGD radii (default: --eps)")
    g.add_argument("--at-steps", type=int, metavar="N", help="PGD steps (default 40 MNIST/F-MNIST, 10 else)")
    g.add_argument("--at-restarts", type=int, default=1, metavar="N")
    g.add_argument("--at-clean-fraction", metavar="F",
                   help="clean share of each batch (default 0.5, 0 for --at-norm max)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eps", nargs=3, metavar=("E1", "E2", "EINF"),
                   help="target radii of the certificates (default: MNIST 1 0.3 0.1, GTS 3 0.2 4/255, CIFAR-10 2 0.1 2/255)")
    g.add_argument("--cert-points", type=int, metavar="N", help="test points certified during training (0: none)")
    g.add_argument("--cert-every", type=int, metavar="N", help="certify every N epochs (and after the last; "
                   "default: the preset's)")
    g.add_argument("--eval-points", type=int, metavar="N",
                   help="test points evaluated at the end: attacks (LB), region certificate + bound "
                        "propagation (UB), as mmr-ext evaluate (0: none)")
    g.add_argument("--eval-attack-steps", type=int, metavar="N",
                   help="steps of the PGD and minimum-norm attacks of that evaluation (default: the preset's)")
    g.add_argument("--no-curves", dest="curves", action="store_false",
                   help="skip the robustness curves of the final evaluation")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads per process")
    g.add_argument("--out-dir", metavar="DIR", help="output folder (default results/<dataset>-<mode>-<model>)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue the run in --out-dir (or from CHECKPOINT) exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a run")
    g.add_argument("--keep-checkpoints", action="store_true", help="also keep epoch_XXX.pt for every epoch")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="no PNG figures")
    g.add_argument("--quiet", dest="verbose", action="store_false", help="print only the final summary")
    g.add_argument("--json", action="store_true",
                   help="print only the final summary, as JSON (no progress bar, no other output)")


# ---------------------------------------------------------------------------------------------
# mmr-ext evaluate
# ---------------------------------------------------------------------------------------------

def _number(text: str) -> float:
    """A float, also written as a fraction such as 4/255."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mmr-ext evaluate``."""
    from .evaluation import ATTACKS

    parser.add_argument("checkpoint", help="checkpoint written by mmr-ext train (checkpoint.pt)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", help="data set (default: the checkpoint's, else mnist5k)")
    g.add_argument("--data-dir", metavar="DIR", help="folder with the data set files (all but mnist5k)")
    g.add_argument("--n-points", type=int, default=1000, metavar="N",
                   help="evaluate the first N test points (default 1000, as in the papers)")
    g = parser.add_argument_group("threat model")
    g.add_argument("--eps", nargs=3, type=_number, metavar=("E1", "E2", "EINF"),
                   help="radii (fractions like 4/255 allowed; default per data set: MNIST/F-MNIST "
                        "1 0.3 0.1, GTSRB 3 0.2 4/255, CIFAR-10 2 0.1 2/255)")
    g.add_argument("--norms", nargs="+", default=["1", "2", "inf"], metavar="P",
                   help="norms to evaluate (default: 1 2 inf)")
    g = parser.add_argument_group("attacks (lower bounds)")
    g.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS,
                   help="pgd and/or fmn (minimum-norm attack); default both")
    g.add_argument("--attack-steps", type=int, default=100, metavar="N", help="PGD steps (default 100)")
    g.add_argument("--attack-restarts", type=int, default=1, metavar="N", help="PGD restarts (default 1)")
    g.add_argument("--fmn-steps", type=int, default=100, metavar="N",
                   help="minimum-norm attack steps (default 100)")
    g = parser.add_argument_group("certificates (upper bounds)")
    g.add_argument("--no-bounds", dest="use_bounds", action="store_false",
                   help="skip linear bound propagation")
    g.add_argument("--alpha-steps", type=int, default=0, metavar="N",
                   help="α-optimisation steps of bound propagation (default 0)")
    g.add_argument("--neighbors", type=int, default=0, metavar="N",
                   help="neighbouring linear regions explored by the region certificate (paper: 5)")
    g.add_argument("--mip", action="store_true", help="exact MIP verification (l1, l∞) of undecided points")
    g.add_argument("--mip-time-limit", type=float, default=120.0, metavar="S",
                   help="MIP seconds per point and norm (default 120)")
    g.add_argument("--workers", type=int, default=1, metavar="N", help="processes for the MIP (default 1)")
    g = parser.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=100, metavar="N")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", metavar="JSON", help="write the per-point results and the table to this file; "
                   "per-point results are also appended to <JSON minus .json>.points.jsonl as they finish")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from the .points.jsonl next to --out (same "
                        "checkpoint, data and options); the result equals an uninterrupted run")
    g.add_argument("--overwrite", action="store_true",
                   help="discard the .points.jsonl of an earlier evaluation next to --out and start afresh")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--json", action="store_true",
                   help="print only the table, settings and timing as JSON (no progress bar, no other output)")
    g.add_argument("--curves", nargs="?", const="auto", metavar="PNG",
                   help="also draw the robustness curves (certified and attacked robust accuracy against "
                        "the radius, per norm and for the union) to PNG, with the same name .json beside it "
                        "(default: <--out minus .json>_curves.png, or robustness_curves.png)")


def _fail(message: str, code: int = 1) -> int:
    print(f"mmr-ext evaluate: error: {message}", file=sys.stderr)
    return code


def _check_device(text: str) -> torch.device:
    """``--device`` as a torch.device; ValueError if it names no device or an unusable GPU."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text} requested but torch.cuda.is_available() is False (no usable GPU, or "
                             f"torch was built without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _check_outputs(args: argparse.Namespace):
    """The ``--out`` file and its per-point results file, checked before any work (None, None
    without --out); OutputError or ValueError with the problem."""
    from .evaluation_records import records_path
    from .outputs import check_output_file

    if args.out is None:
        if args.resume or args.overwrite:
            raise ValueError(f"{'--resume' if args.resume else '--overwrite'} needs --out (the per-point "
                             f"results live next to it)")
        return None, None
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    out = check_output_file(args.out, "results file")
    records = check_output_file(records_path(out), "per-point results file")
    if records.exists() and records.stat().st_size and not (args.resume or args.overwrite):
        raise ValueError(f"'{records}' holds per-point results of an earlier evaluation: pass --resume to "
                         f"continue it (same checkpoint, data and options) or --overwrite to start afresh")
    return out, records


def _curves_path(option: Optional[str], out: Optional[Path]) -> Optional[Path]:
    """The PNG of ``--curves`` (None without it), checked writable with its .json before any work."""
    from .outputs import check_output_file

    if option is None:
        return None
    if option == "auto":
        path = out.with_name(out.stem + "_curves.png") if out is not None else Path("robustness_curves.png")
    else:
        path = Path(option)
        if path.suffix.lower() != ".png":
            raise ValueError(f"expected a .png file name, got '{option}'")
    check_output_file(path.with_suffix(".json"), "curves file")
    return check_output_file(path, "figure")


def run_evaluate(args: argparse.Namespace) -> int:
    """Runs ``mmr-ext evaluate`` for parsed arguments; returns the exit status (2: bad options or
    unwritable outputs, found before any work; 1: a problem found on the way; 130: interrupted)."""
    from .evaluation import evaluate
    from .evaluation_records import RecordsError
    from .outputs import OutputError
    from .train import PAPER_EPS, CheckpointError, dataset_info, load_dataset, load_model

    for name in ("n_points", "attack_steps", "attack_restarts", "fmn_steps", "workers", "batch_size"):
        if getattr(args, name) < 1:
            return _fail(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    for name in ("alpha_steps", "neighbors"):
        if getattr(args, name) < 0:
            return _fail(f"argument --{name.replace('_', '-')}: must be >= 0, got {getattr(args, name)}")
    if not args.mip_time_limit > 0:
        return _fail(f"argument --mip-time-limit: must be > 0, got {args.mip_time_limit}")
    try:
        norms = [parse_norm(p, "--norms") for p in args.norms]
    except ValueError as exc:
        return _fail(f"argument --norms: {exc}")
    try:
        device = _check_device(args.device)
    except ValueError as exc:
        return _fail(f"argument --device: {exc}", 2)
    try:
        out, records = _check_outputs(args)
    except (OutputError, ValueError) as exc:
        return _fail(f"argument --out: {exc}", 2)
    try:
        curves_png = _curves_path(args.curves, out)
    except (OutputError, ValueError) as exc:
        return _fail(f"argument --curves: {exc}", 2)
    if args.json:
        args.progress = False
    try:
        model, ckpt = load_model(args.checkpoint, map_location=device)
    except CheckpointError as exc:
        return _fail(str(exc))
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    dataset = args.dataset or config.get("dataset") or "mnist5k"
    try:
        info = dataset_info(dataset, "test")
    except (ValueError, TypeError) as exc:
        return _fail(f"argument --dataset: {exc}")
    if tuple(ckpt["in_shape"]) != tuple(info.in_shape) or int(ckpt["num_classes"]) != info.num_classes:
        return _fail(f"the checkpoint's model takes {tuple(ckpt['in_shape'])} inputs with "
                     f"{ckpt['num_classes']} classes, but data set '{info.name}' has "
                     f"{info.in_shape} inputs and {info.num_classes} classes")
    data_dir = args.data_dir or config.get("data_dir")
    try:
        data = load_dataset(info.name, data_dir=data_dir, split="test")
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    n = min(args.n_points, len(data))
    dtype = next(model.parameters()).dtype
    x = data.images[:n].to(device=device, dtype=dtype)
    y = data.labels[:n].to(device)
    defaults = PAPER_EPS.get(info.name, PAPER_EPS["mnist"])
    radii = dict(zip((1.0, 2.0, math.inf), args.eps)) if args.eps else defaults
    eps = {p: radii[p] for p in norms}
    if records is not None and args.overwrite:
        records.unlink(missing_ok=True)
    start = time.monotonic()
    try:
        result = evaluate(model, x, y, eps=eps, box=(0.0, 1.0), attacks=tuple(args.attacks),
                          attack_steps=args.attack_steps, attack_restarts=args.attack_restarts,
                          fmn_steps=args.fmn_steps, use_bounds=args.use_bounds,
                          bound_alpha_steps=args.alpha_steps, use_mip=args.mip,
                          mip_time_limit=args.mip_time_limit, neighbors=args.neighbors,
                          workers=args.workers, batch_size=args.batch_size, seed=args.seed,
                          progress=args.progress, records=records, resume=args.resume)
    except RecordsError as exc:
        return _fail(str(exc))
    except OutputError as exc:
        return _fail(f"{exc}; the points finished so far are kept in '{records}': continue with the same "
                     f"options plus --resume once it can be written")
    except KeyboardInterrupt:
        hint = (f"; the points finished so far are kept in '{records}': continue with the same options "
                f"plus --resume") if records is not None else " (pass --out to keep per-point results)"
        print(f"\nmmr-ext evaluate: interrupted{hint}", file=sys.stderr)
        return 130
    result.settings.update({"checkpoint": str(args.checkpoint), "dataset": info.name,
                            "model": ckpt.get("model_name"), "n_points": n})
    result.timing["total"] = time.monotonic() - start
    title = f"{ckpt.get('model_name')} on {info.name} (first {n} test points): {args.checkpoint}"
    say = (lambda *a, **k: None) if args.json else print
    say(result.table(title), flush=True)
    if out is not None:
        try:
            path = result.to_json(out)
        except OutputError as exc:
            return _fail(f"{exc}; the per-point results are kept in '{records}': rerun with the same "
                         f"options plus --resume to write the table without recomputing")
        say(f"results written to {path} (per-point results in {records})")
    if curves_png is not None:
        from tqdm.auto import tqdm

        from .curves import robustness_curves
        with tqdm(desc="curves: bound propagation", unit="point", disable=not args.progress, leave=False) as bar:
            curves = robustness_curves(model, x, y, result, use_bounds=args.use_bounds,
                                       alpha_steps=args.alpha_steps, batch_size=args.batch_size,
                                       on_batch=bar.update)
        try:
            files = [curves.to_json(curves_png.with_suffix(".json")), curves.plot(curves_png, title=title)]
        except OutputError as exc:
            return _fail(str(exc))
        say(f"robustness curves written to {files[1]} and {files[0]}")
    if args.json:
        summary = {k: v for k, v in result.to_dict().items() if k != "points"}
        if curves_png is not None:
            summary["curves"] = curves.to_dict()
        print(json.dumps(summary, indent=1, allow_nan=False))
    return 0


# ---------------------------------------------------------------------------------------------
# parser and entry point
# ---------------------------------------------------------------------------------------------

def build_parser(with_evaluate: bool = True) -> argparse.ArgumentParser:
    """The ``mmr-ext`` argument parser with its ``train`` and ``evaluate`` subcommands.

    ``with_evaluate=False`` leaves the options of ``evaluate`` out (``train`` does not need to
    import :mod:`mmr_ext.evaluation`).
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mmr-ext", description="Train and certify ReLU networks provably robust in every lp-norm "
                                    "(MMR, MMR-Universal).")
    parser.add_argument("--version", action="version", version=f"mmr_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate}")
    sub.required = True
    tp = sub.add_parser("train", help="train a model (plain, mmr, universal, at, mmr+at)",
                        description="Train a ReLU network with MMR, MMR-Universal, adversarial training, "
                                    "or plainly; checkpoints every epoch, then reports test error and "
                                    "certified radii.",
                        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_arguments(tp)
    tp.set_defaults(train_parser=tp)  # for usage errors found after parsing
    help_text = "test error and robust-error bounds of a trained model"
    if with_evaluate:
        evaluation = importlib.import_module(f"{__package__}.evaluation")
        ep = sub.add_parser("evaluate", help=help_text,
                            description=(evaluation.__doc__ or "").strip().split("\n\n")[0] or None)
        add_evaluate_arguments(ep)
    else:
        sub.add_parser("evaluate", help=help_text, add_help=False)
    return parser


def _train_main(args: argparse.Namespace) -> int:
    from .outputs import OutputError
    from .train import CheckpointError, ConfigError, TrainConfig, format_summary, resolve_config, train

    names = {f.name for f in fields(TrainConfig)}
    if args.json:
        args.verbose = args.progress = False
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    sub = args.train_parser
    try:
        resolved = resolve_config(cfg)  # includes --out-dir: an unwritable folder stops here, before any work
    except ConfigError as exc:
        sub.error(f"argument --{exc.argument.replace('_', '-')}: {exc.message}")
    try:
        result = train(cfg)
    except ConfigError as exc:
        sub.error(f"argument --{exc.argument.replace('_', '-')}: {exc.message}")
    except CheckpointError as exc:
        print(f"mmr-ext train: error: {exc}", file=sys.stderr)
        return 1
    except OutputError as exc:  # disk full, permissions changed mid-run
        ckpt = Path(resolved.out_dir).expanduser() / "checkpoint.pt"
        hint = (f"; the last complete checkpoint '{ckpt}' is intact: continue with the same options plus "
                f"--resume once the folder can be written") if ckpt.is_file() else ""
        print(f"mmr-ext train: error: {exc}{hint}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:  # unreadable or corrupt data files
        print(f"mmr-ext train: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # any other I/O failure: the message, not a traceback
        print(f"mmr-ext train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmmr-ext train: interrupted; continue from the last checkpoint with the same options "
              "plus --resume", file=sys.stderr)
        return 130
    if result.summary is not None:
        print(json.dumps(result.summary, indent=1) if args.json else format_summary(result.summary), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``mmr-ext``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(with_evaluate=command != "train")
    args = parser.parse_args(argv)
    retain_freed_memory()  # the engine's large tensors reuse mapped pages (speed only)
    if args.command == "train":
        return _train_main(args)
    status = run_evaluate(args)
    return int(status) if isinstance(status, int) else 0
