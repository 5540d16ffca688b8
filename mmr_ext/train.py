"""Training loop of the MMR papers: plain, MMR-lp, MMR-Universal, adversarial training, MMR+AT.

Use :func:`train` with a :class:`TrainConfig` (``mmr-ext train`` builds one from its options).

Modes
    ``plain``      cross-entropy.
    ``mmr``        MMR-lp of the MMR paper (Croce, Andriushchenko & Hein, AISTATS 2019): CE + λ kMMR-lp, p in {1, 2, inf}, k_D = K (all classes).
    ``universal``  MMR-Universal (Croce & Hein, ICLR 2020): CE + MMR-Universal (l1 and l∞ terms).
    ``at``         PGD adversarial training in l1, l2, l∞ (``at_norm``), or ``max``: per sample the
                   strongest of the three PGD examples (Tramèr & Boneh 2019, the AT-(l1, l2, l∞) of
                   the MMR-Universal paper). A single norm trains on 50% clean / 50% adversarial points
                   (MMR paper),
                   ``max`` on adversarial points only (Croce & Hein, ICLR 2020); see ``at_clean_fraction``.
    ``mmr+at``     MMR-lp objective evaluated on the AT batch (clean + adversarial points);
                   ``at_norm`` defaults to p (Croce & Hein, ICLR 2020, App. C.5 also mixes p != q).

Schedules (:mod:`mmr_ext.schedules`): k_B decreases linearly 20% → 5% of the hidden units
(universal) or 10% → 2% (mmr), λ warms up linearly from λ/10 to λ over the first 10% of the epochs
(the papers' 10 of 100), the learning rate is divided by 10 for the last 10% of the epochs. Adam,
batch 128, 100 epochs; per-dataset λ, γ, learning rates and target εp as in the papers
(:data:`DATASET_DEFAULTS`).

Presets: ``paper`` is the setting above; ``demo`` (the default on the bundled ``mnist5k``) is a
short run of the same recipe sized for a few CPU minutes (:data:`PRESETS`). Explicit options
override the preset.

Distributed: run the same command under ``torchrun --nproc_per_node N``. Each global batch of the
single-process run is split across the ranks (rank r takes samples r, r + N, ... of it: the
sharding of ``DistributedSampler`` without padding), every rank computes its share of the *global*
mean loss, and the gradients are summed by ``DistributedDataParallel``. Because the regularizers
read the model's layers directly rather than calling ``model.forward``, DDP wraps a small module
whose ``forward`` computes the whole objective: DDP's reducer is armed by that forward and
all-reduces every parameter gradient during ``backward`` as usual. The result equals single-process
training with the same global batch up to floating-point summation order. Evaluation,
certificates and checkpoints run on rank 0. PGD random starts are drawn per rank, so AT runs are
reproducible for a fixed number of processes but differ from single-process ones.

Reproducibility: everything random draws from seeded generators (model init from ``seed``, the
data order and augmentation from a loader generator, PGD starts from an attack generator), all of
which are saved in the per-epoch checkpoint; ``resume`` continues a run exactly (bit-identical
weights on CPU with the same thread count).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torch.utils.data import TensorDataset

from .checkpoint import (CheckpointError, build_from_checkpoint, config_differences, describe_differences,
                         load_checkpoint, save_checkpoint)
from .data import BatchLoader, dataset_info, load_dataset
from .nn.zoo import MODELS, build_model
from .schedules import SCHEDULE_UNITS, Schedule

__all__ = ["TrainConfig", "ConfigError", "TrainResult", "train", "resolve_config", "format_summary",
           "MODES", "AT_NORMS", "PRESETS", "DATASET_DEFAULTS", "parse_eps_triple"]

MODES = ("plain", "mmr", "universal", "at", "mmr+at")
AT_NORMS = ("1", "2", "inf", "max")
NORMS = ("1", "2", "inf")
NORM_VALUES = {"1": 1.0, "2": 2.0, "inf": math.inf}
CHECKPOINT_NAME = "checkpoint.pt"

_MNIST = dict(eps=(1.0, 0.3, 0.1), lam=(3.0, 12.0), gamma=(1.0, 0.15), lr=5e-4, at_steps=40,
              l1_sparsity=0.99, augment=False)
#: Per-dataset defaults from the papers. ``eps``: target (ε1, ε2, ε∞) of the MMR-Universal paper, Table 1.
#: ``lam``: (λ1, λ∞) of the MMR-Universal paper, App. C.3. ``gamma``: (γ1, γ∞); the authors' MNIST example is
#: (1.0, 0.15) and γp should lie between 1 and 2 times εp, so the others use (ε1, 1.5 ε∞).
#: ``lr``: Adam learning rate. ``at_steps``: PGD steps in training (40 MNIST/F-MNIST, 10 GTS/CIFAR).
#: ``l1_sparsity``: quantile of the l1 PGD step (1% / 10% of coordinates move, the MMR-Universal paper, App. C.3).
#: ``augment``: random crops and mirroring (CIFAR-10 only).
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "mnist5k": dict(_MNIST),
    "mnist": dict(_MNIST),
    "fmnist": dict(_MNIST, lam=(3.0, 40.0)),
    "gtsrb": dict(eps=(3.0, 0.2, 4 / 255), lam=(3.0, 12.0), gamma=(3.0, 1.5 * 4 / 255), lr=1e-3,
                  at_steps=10, l1_sparsity=0.9, augment=False),
    "cifar10": dict(eps=(2.0, 0.1, 2 / 255), lam=(1.0, 6.0), gamma=(2.0, 1.5 * 2 / 255), lr=1e-3,
                    at_steps=10, l1_sparsity=0.9, augment=True),
}

#: Presets: values used for options left unset. ``demo`` fits the bundled mnist5k run into about
#: ten minutes on two CPU cores (the schedules follow the steps so the short run still sees the
#: whole k_B decay, λ warm-up and final learning-rate drop); ``paper`` is the papers' setting.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": dict(epochs=100, batch_size=128, schedule_unit="epoch", cert_points=200,
                  final_cert_points=1000),
    "demo": dict(epochs=3, batch_size=64, lr=1e-3, schedule_unit="step", cert_points=100,
                 final_cert_points=500),
}

#: Options that may change when resuming (they do not affect the trained weights).
RUNTIME_FIELDS = ("data_dir", "device", "threads", "out_dir", "resume", "overwrite", "keep_checkpoints",
                  "progress", "plots", "cert_points", "cert_every", "final_cert_points", "test_subset",
                  "verbose")


class ConfigError(ValueError):
    """An invalid training option; ``argument`` is the option's name (e.g. ``"lam"``)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


@dataclass
class TrainConfig:
    """Options of :func:`train` (``None``: the preset's, mode's or dataset's default).

    Model and data
        mode: one of :data:`MODES`. dataset: a name of :data:`mmr_ext.data.DATASETS`.
        data_dir: folder of a non-bundled dataset. model: ``fc1``, ``fc10``, ``cnn``, ``large``.
        train_subset / test_subset: use only the first N training / test points.
        augment: random crops and flips (default: CIFAR-10 only).
    Optimisation (Adam)
        preset: ``"auto"`` (``demo`` on mnist5k, else ``paper``), ``"demo"`` or ``"paper"``.
        epochs, batch_size (global), lr (base learning rate).
    Regularizer
        lam: (λ1, λ∞) for universal, (λ,) for mmr / mmr+at.
        gamma: (γ1, γ∞) for universal; (γ,) or (γB, γD) for mmr / mmr+at (default 1.5 εp).
        p: norm of MMR-lp, ``"1"``, ``"2"`` or ``"inf"`` (default inf).
        k_boundary: (start, end) fractions of the hidden units for the linear k_B decay.
        k_decision: k_D for mmr (default K, all classes). selection: ``per_norm`` or ``union``.
        warmup_epochs, lr_drop_epochs: lengths of the λ warm-up and of the final lr / 10 phase
            (default 10% of the epochs each). schedule_unit: ``epoch`` or ``step``.
    Adversarial training
        at_norm: ``"1"``, ``"2"``, ``"inf"`` or ``"max"``. at_eps: (ε1, ε2, ε∞) of the PGD balls
        (default: the dataset's target eps). at_steps, at_restarts: PGD iterations and restarts.
        at_clean_fraction: fraction of each batch kept clean (0.5 single norm, 0 for max).
    Evaluation
        eps: target (ε1, ε2, ε∞) of the certificates. cert_points: test points certified after
        every ``cert_every`` epochs (0: never). final_cert_points: points certified at the end.
    Run
        seed, dtype (``float32``/``float64``), device (``auto``, ``cpu``, ``cuda``, ``cuda:N``),
        threads (CPU threads), out_dir (default ``results/<dataset>-<mode>-<model>``),
        resume (``None``, ``"auto"``: the checkpoint in out_dir, or a path), overwrite (start
        afresh over an existing run), keep_checkpoints (also keep ``epoch_XXX.pt``), progress
        (tqdm bars), plots (PNG figures), verbose (per-epoch lines and summary on stdout).
    """

    mode: str = "universal"
    dataset: str = "mnist5k"
    data_dir: Optional[str] = None
    model: str = "cnn"
    preset: str = "auto"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lam: Optional[Sequence[float]] = None
    gamma: Optional[Sequence[float]] = None
    p: Optional[str] = None
    k_boundary: Optional[Sequence[float]] = None
    k_decision: Optional[int] = None
    selection: str = "per_norm"
    warmup_epochs: Optional[float] = None
    lr_drop_epochs: Optional[float] = None
    schedule_unit: Optional[str] = None
    at_norm: Optional[str] = None
    at_eps: Optional[Sequence[float]] = None
    at_steps: Optional[int] = None
    at_restarts: int = 1
    at_clean_fraction: Optional[float] = None
    augment: Optional[bool] = None
    eps: Optional[Sequence[float]] = None
    cert_points: Optional[int] = None
    cert_every: int = 1
    final_cert_points: Optional[int] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    threads: Optional[int] = None
    out_dir: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    keep_checkpoints: bool = False
    progress: bool = True
    plots: bool = True
    verbose: bool = True


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``summary`` is ``None`` off rank 0)."""

    model: nn.Module
    config: TrainConfig
    metrics: List[Dict[str, Any]]
    summary: Optional[Dict[str, Any]]
    out_dir: Path
    checkpoint: Path
    train_time_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

def parse_norm_name(v, argument: str, allowed: Sequence[str] = NORMS) -> str:
    """'1', '2', 'inf' (or 'max' where allowed) from 1, 2, inf, 'l1', 'linf', ..."""
    if isinstance(v, str):
        key = v.strip().lower().lstrip("l").replace("_", "")
        key = {"infinity": "inf", "∞": "inf"}.get(key, key)
    elif isinstance(v, Real) and not isinstance(v, bool):
        key = "inf" if math.isinf(v) else (str(int(v)) if float(v).is_integer() else str(v))
    else:
        key = None
    if key not in allowed:
        raise ConfigError(argument, f"must be one of {', '.join(allowed)}, got {v!r}")
    return key


def parse_number(v, argument: str) -> float:
    """A finite float from a number or a string such as ``0.3`` or ``2/255``."""
    if isinstance(v, str):
        s = v.strip()
        try:
            value = float(Fraction(s)) if "/" in s else float(s)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(argument, f"{v!r} is not a number (use e.g. 0.3 or 2/255)") from None
    elif isinstance(v, Real) and not isinstance(v, bool):
        value = float(v)
    else:
        raise ConfigError(argument, f"expected a number, got {v!r}")
    if not math.isfinite(value):
        raise ConfigError(argument, f"must be finite, got {v!r}")
    return value


def parse_eps_triple(v, argument: str = "eps") -> Tuple[float, float, float]:
    """(ε1, ε2, ε∞) from three positive numbers, or a dict keyed by norm."""
    if isinstance(v, dict):
        try:
            vals = {parse_norm_name(k, argument): x for k, x in v.items()}
        except ConfigError:
            raise ConfigError(argument, f"keys must be the norms 1, 2, inf, got {list(v)}") from None
        if set(vals) != set(NORMS):
            raise ConfigError(argument, f"needs a radius for each of l1, l2, linf, got {list(v)}")
        v = [vals[n] for n in NORMS]
    if isinstance(v, str) or not isinstance(v, (list, tuple)) or len(v) != 3:
        raise ConfigError(argument, f"needs three radii (eps_1 eps_2 eps_inf), got {v!r}")
    out = tuple(parse_number(x, argument) for x in v)
    if any(x <= 0 for x in out):
        raise ConfigError(argument, f"radii must be positive, got {list(out)}")
    return out  # type: ignore[return-value]


def _numbers(v, argument: str, lengths: Sequence[int], positive: bool) -> Tuple[float, ...]:
    if isinstance(v, (Real, str)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)) or len(v) not in lengths:
        raise ConfigError(argument, f"needs {' or '.join(map(str, lengths))} value(s), got {v!r}")
    out = tuple(parse_number(x, argument) for x in v)
    if positive and any(x <= 0 for x in out):
        raise ConfigError(argument, f"values must be positive, got {list(out)}")
    if not positive and any(x < 0 for x in out):
        raise ConfigError(argument, f"values must be >= 0, got {list(out)}")
    return out


def _int(v, argument: str, minimum: int, allow_none: bool = False) -> Optional[int]:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
        raise ConfigError(argument, f"must be an integer >= {minimum}, got {v!r}")
    return int(v)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` with every default filled in and every option validated.

    Raises :class:`ConfigError` naming the offending option.
    """
    c = replace(config)
    if c.mode not in MODES:
        raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {c.mode!r}")
    try:
        info = dataset_info(c.dataset)
    except (ValueError, TypeError) as exc:
        raise ConfigError("dataset", str(exc)) from None
    c.dataset = info.name
    if not info.bundled and c.data_dir is None:
        raise ConfigError("data_dir", f"dataset '{info.name}' is not bundled: pass the folder holding "
                                      f"its files (nothing is downloaded)")
    if c.data_dir is not None:
        c.data_dir = str(c.data_dir)
        if not info.bundled and not Path(c.data_dir).expanduser().is_dir():
            raise ConfigError("data_dir", f"'{c.data_dir}' is not a directory")
    if not isinstance(c.model, str) or c.model.strip().lower() not in MODELS:
        raise ConfigError("model", f"must be one of {', '.join(MODELS)}, got {c.model!r}")
    c.model = c.model.strip().lower()

    preset = c.preset if c.preset != "auto" else ("demo" if info.name == "mnist5k" else "paper")
    if preset not in PRESETS:
        raise ConfigError("preset", f"must be one of auto, {', '.join(PRESETS)}, got {c.preset!r}")
    c.preset = preset
    for key, value in PRESETS[preset].items():
        if getattr(c, key) is None:
            setattr(c, key, value)
    ds = DATASET_DEFAULTS[info.name]

    c.epochs = _int(c.epochs, "epochs", 1)
    c.batch_size = _int(c.batch_size, "batch_size", 1)
    c.seed = _int(c.seed, "seed", 0)
    c.at_restarts = _int(c.at_restarts, "at_restarts", 1)
    c.cert_every = _int(c.cert_every, "cert_every", 1)
    c.cert_points = _int(c.cert_points, "cert_points", 0)
    c.final_cert_points = _int(c.final_cert_points, "final_cert_points", 0)
    c.train_subset = _int(c.train_subset, "train_subset", 1, allow_none=True)
    c.test_subset = _int(c.test_subset, "test_subset", 1, allow_none=True)
    c.threads = _int(c.threads, "threads", 1, allow_none=True)

    mmr_like = c.mode in ("mmr", "mmr+at")
    c.p = parse_norm_name("inf" if c.p is None else c.p, "p") if mmr_like else None
    if c.lr is None:
        c.lr = ds["lr"]
        if mmr_like and info.name not in ("mnist5k", "mnist", "fmnist"):
            c.lr = 1e-3
        elif mmr_like:  # MMR paper: 1e-3, but l2 on MNIST/F-MNIST: 1e-4 (MMR), 5e-5 (MMR+AT)
            c.lr = (1e-4 if c.mode == "mmr" else 5e-5) if c.p == "2" else 1e-3
    c.lr = parse_number(c.lr, "lr")
    if c.lr <= 0:
        raise ConfigError("lr", f"must be positive, got {c.lr}")

    c.eps = parse_eps_triple(ds["eps"] if c.eps is None else c.eps, "eps")
    target = dict(zip(NORMS, c.eps))
    if c.mode == "universal":
        c.lam = _numbers(ds["lam"] if c.lam is None else c.lam, "lam", (2,), positive=False)
        c.gamma = _numbers(ds["gamma"] if c.gamma is None else c.gamma, "gamma", (2,), positive=True)
    elif mmr_like:
        c.lam = _numbers(1.0 if c.lam is None else c.lam, "lam", (1,), positive=False)
        g = _numbers(1.5 * target[c.p] if c.gamma is None else c.gamma, "gamma", (1, 2), positive=True)
        c.gamma = g * 2 if len(g) == 1 else g
    else:
        for name in ("lam", "gamma"):
            if getattr(c, name) is not None:
                raise ConfigError(name, f"is not used by mode '{c.mode}'")
    if c.mode in ("universal", "mmr", "mmr+at"):
        kdef = (0.2, 0.05) if c.mode == "universal" else (0.1, 0.02)
        k = _numbers(kdef if c.k_boundary is None else c.k_boundary, "k_boundary", (1, 2), positive=True)
        k = k * 2 if len(k) == 1 else k
        if any(x > 1 for x in k):
            raise ConfigError("k_boundary", f"fractions of the hidden units must be in (0, 1], got {list(k)}")
        c.k_boundary = k
    elif c.k_boundary is not None:
        raise ConfigError("k_boundary", f"is not used by mode '{c.mode}'")
    if c.k_decision is not None:
        if not mmr_like:
            raise ConfigError("k_decision", f"is only used by modes mmr and mmr+at, not '{c.mode}'")
        c.k_decision = _int(c.k_decision, "k_decision", 1)
        if c.k_decision > info.num_classes:
            raise ConfigError("k_decision", f"must be at most K = {info.num_classes}, got {c.k_decision}")
    if c.selection not in ("per_norm", "union"):
        raise ConfigError("selection", f"must be 'per_norm' or 'union', got {c.selection!r}")

    c.warmup_epochs = 0.1 * c.epochs if c.warmup_epochs is None else parse_number(c.warmup_epochs, "warmup_epochs")
    c.lr_drop_epochs = 0.1 * c.epochs if c.lr_drop_epochs is None else parse_number(c.lr_drop_epochs, "lr_drop_epochs")
    for name in ("warmup_epochs", "lr_drop_epochs"):
        if not 0 <= getattr(c, name) <= c.epochs:
            raise ConfigError(name, f"must be in [0, epochs={c.epochs}], got {getattr(c, name)}")
    if c.schedule_unit not in SCHEDULE_UNITS:
        raise ConfigError("schedule_unit", f"must be one of {', '.join(SCHEDULE_UNITS)}, got {c.schedule_unit!r}")

    if c.mode in ("at", "mmr+at"):
        c.at_norm = parse_norm_name(("max" if c.mode == "at" else c.p) if c.at_norm is None else c.at_norm,
                                    "at_norm", AT_NORMS)
        c.at_eps = parse_eps_triple(c.eps if c.at_eps is None else c.at_eps, "at_eps")
        c.at_steps = _int(ds["at_steps"] if c.at_steps is None else c.at_steps, "at_steps", 1)
        if c.at_clean_fraction is None:
            c.at_clean_fraction = 0.0 if c.at_norm == "max" else 0.5
        c.at_clean_fraction = parse_number(c.at_clean_fraction, "at_clean_fraction")
        if not 0 <= c.at_clean_fraction < 1:
            raise ConfigError("at_clean_fraction", f"must be in [0, 1), got {c.at_clean_fraction}")
    else:
        for name in ("at_norm", "at_eps", "at_steps", "at_clean_fraction"):
            if getattr(c, name) is not None:
                raise ConfigError(name, f"is only used by modes at and mmr+at, not '{c.mode}'")
    c.augment = ds["augment"] if c.augment is None else bool(c.augment)

    if c.dtype not in ("float32", "float64"):
        raise ConfigError("dtype", f"must be 'float32' or 'float64', got {c.dtype!r}")
    if not isinstance(c.device, str):
        raise ConfigError("device", f"must be a string such as 'auto', 'cpu' or 'cuda:0', got {c.device!r}")
    if c.device != "auto":
        try:
            dev = torch.device(c.device)
        except RuntimeError:
            raise ConfigError("device", f"{c.device!r} is not a device (use auto, cpu, cuda, cuda:N)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{c.device!r} requested but CUDA is not available")
    if c.out_dir is None:
        if c.resume not in (None, "auto"):
            c.out_dir = str(Path(c.resume).expanduser().parent)
        else:
            tag = c.mode + (f"-l{c.p}" if mmr_like else "") + (f"-at{c.at_norm}" if c.at_norm else "")
            c.out_dir = str(Path("results") / f"{info.name}-{tag}-{c.model}")
    c.out_dir = str(c.out_dir)
    if c.resume is not None and not isinstance(c.resume, str):
        c.resume = str(c.resume)
    return c


def config_dict(c: TrainConfig) -> Dict[str, Any]:
    """The configuration as plain JSON-able values."""
    return {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(c) for v in [getattr(c, f.name)]}


# ---------------------------------------------------------------------------------------------
# distributed context
# ---------------------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (moved to the device for NCCL), returned on t's device."""
        import torch.distributed as dist
        work = t.to(self.device)
        dist.all_reduce(work)
        return work.to(t.device)


def _setup(c: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if c.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(c.device)
    if world <= 1:
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        return _Dist(device=device)

    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    threads = c.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError("torch.distributed is initialised with a different rank/world size than "
                           "the RANK/WORLD_SIZE environment variables")
    return _Dist(rank, world, local_rank, device, owns)


# ---------------------------------------------------------------------------------------------
# objective
# ---------------------------------------------------------------------------------------------

class _Objective(nn.Module):
    """The training objective as a module, so that DDP can wrap it (see the module docstring).

    ``forward(x, y, k_boundary, lam_scale, weight)`` returns ``(weight * loss, terms)`` with
    ``terms`` a dict of floats; ``x`` already holds the adversarial points in AT modes.
    """

    def __init__(self, model: nn.Module, c: TrainConfig, num_classes: int):
        super().__init__()
        self.model = model
        self.mode, self.p, self.selection = c.mode, c.p, c.selection
        # k_D = K (the paper's "all classes") unless given
        self.lam, self.gamma = c.lam, c.gamma
        self.k_decision = num_classes if c.k_decision is None else c.k_decision

    def forward(self, x, y, k_boundary: float, lam_scale: float, weight: float):
        from . import losses

        if x.shape[0] == 0:  # an empty shard still takes part in the gradient all-reduce
            zero = sum(p.sum() for p in self.model.parameters()) * 0.0
            return zero, {}
        if self.mode == "universal":
            lam = (self.lam[0] * lam_scale, self.lam[1] * lam_scale)
            loss, terms = losses.universal_loss(self.model, x, y, k_boundary=k_boundary, gamma=self.gamma,
                                                lam=lam, selection=self.selection, return_terms=True)
            terms["regularizer"] = terms["boundary"] + terms["decision"]
        elif self.mode in ("mmr", "mmr+at"):
            loss, terms = losses.mmr_loss(self.model, x, y, p=NORM_VALUES[self.p], k_boundary=k_boundary,
                                          k_decision=self.k_decision, gamma_boundary=self.gamma[0],
                                          gamma_decision=self.gamma[1], lam=self.lam[0] * lam_scale,
                                          return_terms=True)
        else:  # plain, at
            loss = F.cross_entropy(self.model(x), y)
            terms = {"cross_entropy": float(loss.detach())}
        terms["loss"] = float(loss.detach())
        return loss * weight, terms


def _adversarial_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: TrainConfig,
                       generator: torch.Generator) -> torch.Tensor:
    """The AT batch: the first ``at_clean_fraction`` of the points clean, the rest replaced by PGD
    examples (``at_norm``, or the per-sample strongest of l1/l2/l∞ for ``max``)."""
    from . import attacks

    n_clean = int(round(c.at_clean_fraction * x.shape[0]))
    if n_clean >= x.shape[0]:
        return x
    xa, ya = x[n_clean:], y[n_clean:]
    eps = dict(zip(NORMS, c.at_eps))
    if c.at_norm == "max":
        adv = attacks.pgd_max(model, xa, ya, eps={NORM_VALUES[n]: e for n, e in eps.items()}, steps=c.at_steps,
                              restarts=c.at_restarts, l1_sparsity=DATASET_DEFAULTS[c.dataset]["l1_sparsity"],
                              generator=generator)
    else:
        adv = attacks.pgd(model, xa, ya, norm=NORM_VALUES[c.at_norm], eps=eps[c.at_norm], steps=c.at_steps,
                          restarts=c.at_restarts, l1_sparsity=DATASET_DEFAULTS[c.dataset]["l1_sparsity"],
                          generator=generator)
    return torch.cat([x[:n_clean], adv.detach()])


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

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
    from .certificates import certify

    p0 = next(model.parameters())
    target = {NORM_VALUES[n]: e for n, e in zip(NORMS, eps)}
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
                radii[n].append(cert.radius[NORM_VALUES[n]].detach().double().cpu())
                counts[f"cert_l{n}"] += frac["radius"][NORM_VALUES[n]] * x.shape[0]
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


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

def _write_metrics(history: List[Dict[str, Any]], out_dir: Path) -> None:
    """``metrics.json`` (list of per-epoch dicts) and ``metrics.csv`` (one row per epoch)."""
    import io

    _atomic_text(out_dir / "metrics.json", json.dumps(history, indent=1))
    keys: List[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in keys})
    _atomic_text(out_dir / "metrics.csv", buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    axes[2].set_title("certified fraction of test points")
    axes[2].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def format_summary(s: Dict[str, Any]) -> str:
    """Human-readable summary printed at the end of training."""
    mode = {"universal": "MMR-Universal", "mmr": f"MMR-l{s.get('p')}", "plain": "plain",
            "at": f"AT-{s.get('at_norm')}", "mmr+at": f"MMR-l{s.get('p')}+AT-{s.get('at_norm')}"}[s["mode"]]
    wall = f", {s['wall_time_s']:.0f} s wall time in this invocation" if "wall_time_s" in s else ""
    lines = [f"{mode} {s['model']} on {s['dataset']}: {s['epochs']} epochs, training time {s['train_time_s']:.0f} s"
             + wall,
             f"test error: {100 * s['test_error']:.2f}% ({s['test_points']} test points)"]
    if s.get("cert_points"):
        lines.append(f"region certificates of the first {s['cert_points']} test points ({s['cert_time_s']:.0f} s); "
                     f"certified = correct and radius > eps:")
        lines.append(f"  {'norm':<7}{'eps':>8}{'median radius':>15}{'certified':>11}{'robust err UB':>15}")
        names = {"1": "l1", "2": "l2", "inf": "linf"}

        def row(name, e, med, frac):
            return f"  {name:<7}{e:>8}{med:>15}{100 * frac:>10.1f}%{100 * (1 - frac):>14.1f}%"

        for n, e in zip(NORMS, s["eps"]):
            lines.append(row(names[n], f"{e:.4g}", f"{s[f'median_radius_l{n}']:.4f}", s[f"cert_l{n}"]))
        lines.append(row("union", "all", "", s["cert_union"]))
        lines.append("  Thm 4.1 (l1 and linf certificates only):")
        lines.append(row("l2", f"{s['eps'][1]:.4g}", "", s["cert_universal_l2"]))
        lines.append(row("union", "all", "", s["cert_union_universal"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def _rng_state(loader_gen, attack_gen, d: _Dist) -> Dict[str, Any]:
    attack = attack_gen.get_state()
    if d.world > 1:
        import torch.distributed as dist
        gathered: List[Any] = [None] * d.world
        dist.all_gather_object(gathered, attack.cpu())
        attack_states = gathered
    else:
        attack_states = [attack.cpu()]
    state = {"torch": torch.get_rng_state(), "loader": loader_gen.get_state(), "attack": attack_states}
    if torch.cuda.is_available() and d.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(d.device).cpu()
    return state


def _restore_rng(state: Dict[str, Any], loader_gen, attack_gen, d: _Dist, path) -> None:
    try:
        torch.set_rng_state(state["torch"])
        loader_gen.set_state(state["loader"])
        attack = state["attack"]
        if len(attack) == d.world:
            attack_gen.set_state(attack[d.rank].to(attack_gen.get_state().device))
        if "cuda" in state and d.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], d.device)
    except (KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"checkpoint '{path}': invalid RNG state ({exc})") from exc


def _prepare_resume(c: TrainConfig, d: _Dist, out_dir: Path) -> Optional[Tuple[Dict[str, Any], Path]]:
    ckpt_path = out_dir / CHECKPOINT_NAME
    if c.resume is None:
        if ckpt_path.exists() and not c.overwrite:
            raise ConfigError("out_dir", f"'{out_dir}' already holds a checkpoint of a run; pass --resume to "
                                         f"continue it or --overwrite to start a new run there")
        return None
    path = ckpt_path if c.resume == "auto" else Path(c.resume).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at '{path}' (run without --resume to start a new run)")
    ckpt = load_checkpoint(path, map_location="cpu", require_training_state=True)
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"checkpoint '{path}': config is not a dict")
    diff = config_differences(ckpt["config"], config_dict(c), ignore=RUNTIME_FIELDS)
    if diff:
        raise CheckpointError(f"--resume: checkpoint '{path}' was written by a run with a different "
                              f"configuration ({describe_differences(diff)}); resume with the original "
                              f"options or start a new run in another --out-dir")
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != d.world and c.mode in ("at", "mmr+at"):
        raise CheckpointError(f"--resume: checkpoint '{path}' was written by {saved_world} process(es) "
                              f"but this run has {d.world}; adversarial training resumes exactly only "
                              f"with the same number of processes")
    epoch = ckpt["epoch"]
    if not isinstance(epoch, int) or not 1 <= epoch <= c.epochs:
        raise CheckpointError(f"checkpoint '{path}': epoch {epoch!r} is outside 1..{c.epochs}")
    return ckpt, path


def train(config: TrainConfig) -> TrainResult:
    """Train a model as configured; returns the model, per-epoch metrics and final summary.

    Writes to ``out_dir``: ``checkpoint.pt`` (every epoch, atomically), ``metrics.json``,
    ``metrics.csv``, ``training_curves.png`` and ``summary.json``. Under ``torchrun`` the
    processes train one model together (see the module docstring).
    """
    c = resolve_config(config)
    d = _setup(c)
    try:
        return _train(c, d)
    finally:
        if d.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(c: TrainConfig, d: _Dist) -> TrainResult:
    start_time = time.time()
    out_dir = Path(c.out_dir).expanduser()
    resume = _prepare_resume(c, d, out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:  # --overwrite: nothing of the previous run may be resumed by mistake later
            for old in [out_dir / CHECKPOINT_NAME, *out_dir.glob("epoch_[0-9][0-9][0-9].pt"),
                        *(out_dir / n for n in ("metrics.json", "metrics.csv", "summary.json",
                                                "training_curves.png"))]:
                old.unlink(missing_ok=True)
    d.barrier()
    dtype = torch.float64 if c.dtype == "float64" else torch.float32
    say = print if (c.verbose and d.main) else (lambda *a, **k: None)

    train_set = load_dataset(c.dataset, c.data_dir, split="train")
    test_set = load_dataset(c.dataset, c.data_dir, split="test")
    info = train_set.info
    x_train, y_train = train_set.images, train_set.labels
    if c.train_subset is not None:
        x_train, y_train = x_train[:c.train_subset], y_train[:c.train_subset]
    x_test, y_test = test_set.images, test_set.labels
    if c.test_subset is not None:
        x_test, y_test = x_test[:c.test_subset], y_test[:c.test_subset]
    torch.manual_seed(c.seed)
    model = build_model(c.model, info.in_shape, info.num_classes).to(device=d.device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
    schedule = Schedule(epochs=c.epochs, k_start=c.k_boundary[0] if c.k_boundary else 0.2,
                        k_end=c.k_boundary[1] if c.k_boundary else 0.05, warmup_epochs=c.warmup_epochs,
                        lr_drop_epochs=c.lr_drop_epochs, unit=c.schedule_unit)
    loader_gen = torch.Generator().manual_seed(c.seed + 1)
    attack_gen = torch.Generator(device=d.device).manual_seed(c.seed + 2 + 1000 * d.rank)
    loader = BatchLoader(TensorDataset(x_train, y_train), c.batch_size, shuffle=True, augment=c.augment,
                         generator=loader_gen)
    steps = len(loader)

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT_NAME
    if resume is not None:
        ckpt, path = resume
        if (ckpt["model_name"], tuple(ckpt["in_shape"]), int(ckpt["num_classes"])) != \
                (c.model, tuple(info.in_shape), info.num_classes):
            raise CheckpointError(f"--resume: checkpoint '{path}' holds model {ckpt['model_name']!r} for "
                                  f"{tuple(ckpt['in_shape'])} inputs and {ckpt['num_classes']} classes, not "
                                  f"{c.model!r} for {tuple(info.in_shape)} and {info.num_classes}")
        model.load_state_dict(build_from_checkpoint(ckpt, path).state_dict())
        try:
            optimizer.load_state_dict(ckpt["optimizer_state"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint '{path}': optimizer state does not fit ({exc})") from exc
        if ckpt["schedule_state"] != schedule.state_dict():
            raise CheckpointError(f"checkpoint '{path}': schedule {ckpt['schedule_state']} differs from "
                                  f"the requested {schedule.state_dict()}")
        _restore_rng(ckpt["rng"], loader_gen, attack_gen, d, path)
        history = list(ckpt["metrics"])
        start_epoch = ckpt["epoch"]
        say(f"resuming from '{path}' after epoch {start_epoch}/{c.epochs}")

    objective = _Objective(model, c, info.num_classes)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        runner = DistributedDataParallel(objective, device_ids=[d.device] if d.device.type == "cuda" else None)
    else:
        runner = objective

    cert_x, cert_y = x_test[:c.cert_points], y_test[:c.cert_points]
    from tqdm.auto import tqdm

    train_time = sum(r.get("time_s", 0.0) for r in history)
    if start_epoch == 0:
        say(f"training {c.mode} {c.model} on {c.dataset} ({x_train.shape[0]} train / {x_test.shape[0]} test "
            f"points, preset {c.preset}) for {c.epochs} epochs of {steps} steps, batch {c.batch_size}"
            + (f" over {d.world} processes" if d.world > 1 else "") + f" on {d.device}; output in '{out_dir}'")
    for epoch in range(start_epoch, c.epochs):
        t0 = time.time()
        model.train()
        sums = torch.zeros(7, dtype=torch.float64)  # points, errors, then the term_keys weighted by points
        term_keys = ("loss", "cross_entropy", "boundary", "decision", "regularizer")
        seen_terms = set()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{c.epochs}", disable=not (c.progress and d.main),
                   leave=False, dynamic_ncols=True)
        values = schedule.values(epoch, 0, steps)
        for i, (xb, yb) in enumerate(loader):
            values = schedule.values(epoch, i, steps)
            for group in optimizer.param_groups:
                group["lr"] = c.lr * values["lr_scale"]
            n_global = xb.shape[0]
            x = xb[d.rank::d.world].to(device=d.device, dtype=dtype)
            y = yb[d.rank::d.world].to(d.device)
            n = x.shape[0]
            if n:
                with torch.no_grad():
                    wrong = int((model(x).argmax(1) != y).sum())
                if c.mode in ("at", "mmr+at"):
                    x = _adversarial_batch(model, x, y, c, attack_gen)
            else:
                wrong = 0
            optimizer.zero_grad(set_to_none=True)
            loss, terms = runner(x, y, values["k_boundary"], values["lam_scale"], n * d.world / n_global)
            loss.backward()
            optimizer.step()
            sums[0] += n
            sums[1] += wrong
            for j, key in enumerate(term_keys):
                if key in terms:
                    sums[2 + j] += terms[key] * n
                    seen_terms.add(key)
            if d.main:  # running means over this rank's points of the epoch
                m = max(1.0, float(sums[0]))
                post = {"loss": f"{sums[2] / m:.3f}", "ce": f"{sums[3] / m:.3f}"}
                if "boundary" in seen_terms:
                    post["bnd"] = f"{sums[4] / m:.3f}"
                    post["dec"] = f"{sums[5] / m:.3f}"
                elif "regularizer" in seen_terms:
                    post["reg"] = f"{sums[6] / m:.3f}"
                post["err"] = f"{100 * sums[1] / m:.1f}%"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        bar.close()
        if d.world > 1:
            sums = d.all_reduce(sums)
        total = max(1.0, float(sums[0]))
        row: Dict[str, Any] = {"epoch": epoch + 1, "lr": c.lr * values["lr_scale"],
                               "k_boundary": values["k_boundary"] if c.k_boundary else None,
                               "lam_scale": values["lam_scale"] if c.lam else None,
                               "train_error": float(sums[1]) / total}
        for j, key in enumerate(term_keys):
            row[f"train_{key}"] = float(sums[2 + j]) / total if key in seen_terms else None
        row["time_s"] = time.time() - t0
        train_time += row["time_s"]
        if d.main:
            t1 = time.time()
            row["test_error"] = clean_error(model, x_test, y_test)
            if c.cert_points and ((epoch + 1) % c.cert_every == 0 or epoch + 1 == c.epochs):
                stats = certified_stats(model, cert_x, cert_y, c.eps)
                stats.pop("radii")
                row.update(stats)
            row["eval_time_s"] = time.time() - t1
            history.append(row)
            msg = (f"epoch {epoch + 1}/{c.epochs}: loss {row['train_loss']:.4f}"
                   + (f" (ce {row['train_cross_entropy']:.4f}, reg {row['train_regularizer']:.4f})"
                      if row.get("train_regularizer") is not None else "")
                   + f", train err {100 * row['train_error']:.2f}%, test err {100 * row['test_error']:.2f}%")
            if "cert_union" in row:
                msg += (f", certified l1 {100 * row['cert_l1']:.1f}% l2 {100 * row['cert_l2']:.1f}% "
                        f"linf {100 * row['cert_linf']:.1f}% union {100 * row['cert_union']:.1f}%")
            say(msg + f" [{row['time_s']:.0f} s train, {row['eval_time_s']:.0f} s eval]")
        else:
            history.append(row)
        rng = _rng_state(loader_gen, attack_gen, d)
        if d.main:
            state = {"model_name": c.model, "in_shape": list(info.in_shape), "num_classes": info.num_classes,
                     "dtype": c.dtype, "model_state": model.state_dict(), "epoch": epoch + 1,
                     "optimizer_state": optimizer.state_dict(), "schedule_state": schedule.state_dict(),
                     "rng": rng, "metrics": history, "config": config_dict(c), "world_size": d.world}
            save_checkpoint(ckpt_path, state)
            if c.keep_checkpoints:
                save_checkpoint(out_dir / f"epoch_{epoch + 1:03d}.pt", state)
            _write_metrics(history, out_dir)
            if c.plots:
                plot_metrics(history, out_dir / "training_curves.png", c.eps)
        d.barrier()

    summary = None
    if d.main:
        summary = {"mode": c.mode, "p": c.p, "at_norm": c.at_norm, "model": c.model, "dataset": c.dataset,
                   "epochs": c.epochs, "train_time_s": train_time, "eps": list(c.eps),
                   "test_error": clean_error(model, x_test, y_test), "test_points": int(x_test.shape[0])}
        if c.final_cert_points:
            t1 = time.time()
            stats = certified_stats(model, x_test[:c.final_cert_points], y_test[:c.final_cert_points], c.eps)
            stats.pop("radii")
            summary.update(stats)
            summary["cert_time_s"] = time.time() - t1
        summary["wall_time_s"] = time.time() - start_time
        _atomic_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    d.barrier()
    return TrainResult(model=model, config=c, metrics=history, summary=summary, out_dir=out_dir,
                       checkpoint=ckpt_path, train_time_s=train_time)
