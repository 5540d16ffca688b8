"""Training options: :class:`TrainConfig`, its validation (:func:`resolve_config`), the presets and
the one per-data-set table (:data:`DATASET_DEFAULTS`) that training and ``mmr-ext evaluate`` share."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..math.norms import norm_key, parse_norm
from ..nn.zoo import resolve_model_name, short_model_name
from ..outputs import OutputError, check_output_dir
from .data import dataset_info
from .schedules import SCHEDULE_UNITS

__all__ = ["TrainConfig", "ConfigError", "resolve_config", "config_dict", "parse_norm_option", "parse_number",
           "parse_eps_triple", "MODES", "AT_NORMS", "NORMS", "PRESETS", "DATASET_DEFAULTS", "PAPER_EPS",
           "RUNTIME_FIELDS"]

MODES = ("plain", "mmr", "universal", "at", "mmr+at")
AT_NORMS = ("1", "2", "inf", "max")
#: The norms of the certificates and of the eps triples, in the order (ε1, ε2, ε∞).
NORMS = ("1", "2", "inf")

_MNIST = dict(eps=(1.0, 0.3, 0.1), lam=(3.0, 12.0), gamma=(1.0, 0.15), lr=5e-4, mmr_lr=1e-3,
              mmr_lr_l2=(1e-4, 5e-5), at_steps=40, l1_sparsity=0.99, augment=False, preset="paper")
#: Everything per data set that training and evaluation need, from the papers: the one table
#: (:data:`PAPER_EPS` is a view of its ``eps``). ``eps``: target (ε1, ε2, ε∞) of the MMR-Universal
#: paper, Table 1 (Table 4 evaluates at the same radii). ``lam``: (λ1, λ∞) of the MMR-Universal paper,
#: App. C.3. ``gamma``: (γ1, γ∞); the authors' MNIST example is (1.0, 0.15) and γp should lie between
#: 1 and 2 times εp, so the others use (ε1, 1.5 ε∞). ``lr``: Adam learning rate. ``mmr_lr``: the MMR
#: paper's learning rate of MMR-lp, and ``mmr_lr_l2`` its (MMR, MMR+AT) learning rates for p = 2
#: (lower on MNIST / F-MNIST). ``at_steps``: PGD steps in training (40 MNIST/F-MNIST, 10 GTS/CIFAR).
#: ``l1_sparsity``: quantile of the l1 PGD step (1% / 10% of coordinates move, the MMR-Universal
#: paper, App. C.3). ``augment``: random crops and mirroring (CIFAR-10 only). ``preset``: the preset
#: that ``preset="auto"`` picks (:data:`PRESETS`).
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "mnist5k": dict(_MNIST, preset="demo"),
    "mnist": dict(_MNIST),
    "fmnist": dict(_MNIST, lam=(3.0, 40.0)),
    "gtsrb": dict(eps=(3.0, 0.2, 4 / 255), lam=(3.0, 12.0), gamma=(3.0, 1.5 * 4 / 255), lr=1e-3, mmr_lr=1e-3,
                  mmr_lr_l2=(1e-3, 1e-3), at_steps=10, l1_sparsity=0.9, augment=False, preset="paper"),
    "cifar10": dict(eps=(2.0, 0.1, 2 / 255), lam=(1.0, 6.0), gamma=(2.0, 1.5 * 2 / 255), lr=1e-3, mmr_lr=1e-3,
                    mmr_lr_l2=(1e-3, 1e-3), at_steps=10, l1_sparsity=0.9, augment=True, preset="paper"),
}

#: The papers' ε per data set keyed by norm (1.0, 2.0, inf), the default of ``mmr-ext evaluate``
#: (Croce & Hein, ICLR 2020, Table 1 / Table 4): a view of the ``eps`` of :data:`DATASET_DEFAULTS`.
PAPER_EPS: Dict[str, Dict[float, float]] = {
    name: {parse_norm(n): e for n, e in zip(NORMS, d["eps"])} for name, d in DATASET_DEFAULTS.items()}

#: Presets: values used for options left unset. ``demo`` fits training and the evaluation protocol
#: of the bundled mnist5k run into about six minutes on two CPU cores (the schedules follow the
#: steps so the short run still sees the whole k_B decay, λ warm-up and final learning-rate drop;
#: batch 32 certifies more than 64 after the same number of epochs); ``paper`` is the papers' setting.
PRESETS: Dict[str, Dict[str, Any]] = {
    "paper": dict(epochs=100, batch_size=128, schedule_unit="epoch", cert_points=200, cert_every=1,
                  eval_points=1000, eval_attack_steps=100),
    "demo": dict(epochs=14, batch_size=32, lr=1e-3, schedule_unit="step", cert_points=100, cert_every=7,
                 eval_points=500, eval_attack_steps=50),
}

#: Options that may change when resuming (they do not affect the trained weights).
RUNTIME_FIELDS = ("data_dir", "device", "threads", "out_dir", "resume", "overwrite", "keep_checkpoints",
                  "progress", "plots", "cert_points", "cert_every", "eval_points", "eval_attack_steps", "curves",
                  "test_subset",
                  "verbose")


class ConfigError(ValueError):
    """An invalid training option; ``argument`` is the option's name (e.g. ``"lam"``)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


@dataclass
class TrainConfig:
    """Options of :func:`mmr_ext.train.train` (``None``: the preset's, mode's or dataset's default).

    Model and data
        mode: one of :data:`MODES`. dataset: a name of :data:`mmr_ext.train.data.DATASETS`.
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
        eps: target (ε1, ε2, ε∞) of the certificates. cert_points: test points certified (region
        certificate + bound propagation) after every ``cert_every`` epochs (0: never).
        eval_points: test points evaluated at the end with the papers' protocol
        (:func:`mmr_ext.evaluate`: attacks, region certificate, bound propagation; 0: none).
        eval_attack_steps: steps of its PGD and minimum-norm attacks (1 restart).
        curves: also the robustness curves of that evaluation (:mod:`mmr_ext.curves`).
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
    cert_every: Optional[int] = None
    eval_points: Optional[int] = None
    eval_attack_steps: Optional[int] = None
    curves: bool = True
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


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------

def parse_norm_option(v, argument: str, allowed: Sequence[str] = NORMS) -> str:
    """'1', '2', 'inf' (or 'max' where allowed) from 1, 2, inf, 'l1', 'linf', ...
    (:func:`mmr_ext.math.norms.parse_norm`)."""
    if isinstance(v, str) and v.strip().lower() == "max":
        key = "max"
    else:
        try:
            key = norm_key(v)
        except ValueError:
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
            vals = {parse_norm_option(k, argument): x for k, x in v.items()}
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
    try:
        c.model = resolve_model_name(c.model)
    except ValueError as exc:
        raise ConfigError("model", str(exc)) from None

    ds = DATASET_DEFAULTS[info.name]
    preset = c.preset if c.preset != "auto" else ds["preset"]
    if preset not in PRESETS:
        raise ConfigError("preset", f"must be one of auto, {', '.join(PRESETS)}, got {c.preset!r}")
    c.preset = preset
    for key, value in PRESETS[preset].items():
        if getattr(c, key) is None:
            setattr(c, key, value)

    c.epochs = _int(c.epochs, "epochs", 1)
    c.batch_size = _int(c.batch_size, "batch_size", 1)
    c.seed = _int(c.seed, "seed", 0)
    c.at_restarts = _int(c.at_restarts, "at_restarts", 1)
    c.cert_every = _int(c.cert_every, "cert_every", 1)
    c.cert_points = _int(c.cert_points, "cert_points", 0)
    c.eval_points = _int(c.eval_points, "eval_points", 0)
    c.eval_attack_steps = _int(c.eval_attack_steps, "eval_attack_steps", 1)
    c.train_subset = _int(c.train_subset, "train_subset", 1, allow_none=True)
    c.test_subset = _int(c.test_subset, "test_subset", 1, allow_none=True)
    c.threads = _int(c.threads, "threads", 1, allow_none=True)

    mmr_like = c.mode in ("mmr", "mmr+at")
    c.p = parse_norm_option("inf" if c.p is None else c.p, "p") if mmr_like else None
    if c.lr is None and mmr_like:  # the MMR paper's rates: mmr_lr, but mmr_lr_l2 = (MMR, MMR+AT) for p = 2
        c.lr = ds["mmr_lr_l2"][c.mode == "mmr+at"] if c.p == "2" else ds["mmr_lr"]
    elif c.lr is None:
        c.lr = ds["lr"]
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
        c.at_norm = parse_norm_option(("max" if c.mode == "at" else c.p) if c.at_norm is None else c.at_norm,
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
            c.out_dir = str(Path("results") / f"{info.name}-{tag}-{short_model_name(c.model)}")
    c.out_dir = str(c.out_dir)
    try:  # before any work: a folder that exists or can be created, and is writable
        check_output_dir(c.out_dir)
    except OutputError as exc:
        raise ConfigError("out_dir", str(exc)) from None
    if c.resume is not None and not isinstance(c.resume, str):
        c.resume = str(c.resume)
    return c


def config_dict(c: TrainConfig) -> Dict[str, Any]:
    """The configuration as plain JSON-able values."""
    return {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(c) for v in [getattr(c, f.name)]}
