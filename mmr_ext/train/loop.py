"""The training loop: :func:`train` runs a resolved :class:`~mmr_ext.train.config.TrainConfig`
epoch by epoch, checkpoints after every epoch and resumes exactly (see :mod:`mmr_ext.train`)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..geometry.sparsity import RECORD
from ..nn.zoo import build_model, short_model_name
from ..outputs import atomic_write_text, writing
from .checkpoint import (CheckpointError, build_from_checkpoint, config_differences, describe_differences,
                         load_checkpoint, save_checkpoint)
from .config import RUNTIME_FIELDS, ConfigError, TrainConfig, config_dict, resolve_config
from .data import load_dataset
from .distributed import Dist, restore_rng_state, rng_state, setup_distributed
from .loader import BatchLoader
from .objective import Objective, adversarial_batch
from .progress import RunProgress
from .protocol import CURVES_NAME, EVALUATION_NAME, final_evaluation, protocol_certified
from .reporting import clean_error, plot_metrics, write_metrics
from .schedules import Schedule

__all__ = ["TrainResult", "train", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"


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


def _prepare_resume(c: TrainConfig, d: Dist, out_dir: Path) -> Optional[Tuple[Dict[str, Any], Path]]:
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
    processes train one model together (see :mod:`mmr_ext.train`). A failing write (disk full,
    permissions changed mid-run) raises :class:`mmr_ext.outputs.OutputError` naming the file; the
    last complete ``checkpoint.pt`` stays loadable and ``resume`` continues from it.
    """
    c = resolve_config(config)
    d = setup_distributed(c.device, c.threads)
    try:
        return _train(c, d)
    except BaseException as exc:
        d.close(exc)
        raise
    finally:
        d.close()


def _train(c: TrainConfig, d: Dist) -> TrainResult:
    start_time = time.time()
    out_dir = Path(c.out_dir).expanduser()
    resume = _prepare_resume(c, d, out_dir)
    if d.main:
        with writing(out_dir, "output folder"):
            out_dir.mkdir(parents=True, exist_ok=True)
            if resume is None:  # --overwrite: nothing of the previous run may be resumed by mistake later
                for old in [out_dir / CHECKPOINT_NAME, *out_dir.glob("epoch_[0-9][0-9][0-9].pt"),
                            *(out_dir / n for n in ("metrics.json", "metrics.csv", "summary.json",
                                                    "training_curves.png", EVALUATION_NAME,
                                                    "evaluation.points.jsonl", f"{CURVES_NAME}.json",
                                                    f"{CURVES_NAME}.png"))]:
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
        restore_rng_state(ckpt["rng"], loader_gen, attack_gen, d, path)
        RECORD.restore(model, ckpt.get("sparsity_state", {}))
        history = list(ckpt["metrics"])
        start_epoch = ckpt["epoch"]
        say(f"resuming from '{path}' after epoch {start_epoch}/{c.epochs}")

    objective = Objective(model, c, info.num_classes)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        runner = DistributedDataParallel(objective, device_ids=[d.device] if d.device.type == "cuda" else None)
    else:
        runner = objective

    cert_x, cert_y = x_test[:c.cert_points], y_test[:c.cert_points]
    n_eval = min(c.eval_points, x_test.shape[0])

    def certify_after(epoch: int) -> bool:  # the last epoch's numbers come from the final evaluation
        last = epoch + 1 == c.epochs
        return bool(c.cert_points) and ((epoch + 1) % c.cert_every == 0 or last) and not (last and n_eval)
    cert_epochs = sum(1 for e in range(start_epoch, c.epochs) if certify_after(e))
    # one display for the whole run; stage costs in training steps until measured (see progress.py)
    progress = RunProgress({"train": (c.epochs - start_epoch) * steps, "certify": 3 * cert_epochs * cert_x.shape[0],
                            "evaluate": n_eval, "curves": 5 * n_eval if c.curves else 0},
                           guesses={"certify": 0.2, "evaluate": 1.0, "curves": 0.25},
                           enabled=c.progress and d.main, desc=f"{c.mode} {short_model_name(c.model)}")
    if c.verbose and d.main:
        say = progress.write

    try:
        train_time = sum(r.get("time_s", 0.0) for r in history)
        if start_epoch == 0:
            say(f"training {c.mode} {short_model_name(c.model)} on {c.dataset} ({x_train.shape[0]} train / {x_test.shape[0]} test "
                f"points, preset {c.preset}) for {c.epochs} epochs of {steps} steps, batch {c.batch_size}"
                + (f" over {d.world} processes" if d.world > 1 else "") + f" on {d.device}; output in '{out_dir}'")
        for epoch in range(start_epoch, c.epochs):
            t0 = time.time()
            model.train()
            sums = torch.zeros(7, dtype=torch.float64)  # points, errors, then the term_keys weighted by points
            term_keys = ("loss", "cross_entropy", "boundary", "decision", "regularizer")
            seen_terms = set()
            progress.begin("train")
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
                        x = adversarial_batch(model, x, y, c, attack_gen)
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
                    progress.update("train", 1, f"epoch {epoch + 1}/{c.epochs} " +
                                    " ".join(f"{k} {v}" for k, v in post.items()))
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
                if certify_after(epoch):
                    progress.begin("certify")
                    row.update(protocol_certified(model, cert_x, cert_y, c.eps,
                                                  on_batch=lambda n: progress.update("certify", n)))
                row["eval_time_s"] = time.time() - t1
                history.append(row)
                msg = (f"epoch {epoch + 1}/{c.epochs}: loss {row['train_loss']:.4f}"
                       + (f" (ce {row['train_cross_entropy']:.4f}, reg {row['train_regularizer']:.4f})"
                          if row.get("train_regularizer") is not None else "")
                       + f", train err {100 * row['train_error']:.2f}%, test err {100 * row['test_error']:.2f}%")
                if "cert_union" in row:
                    msg += (f", certified (region + bounds, {c.cert_points} points) l1 {100 * row['cert_l1']:.1f}% "
                            f"l2 {100 * row['cert_l2']:.1f}% linf {100 * row['cert_linf']:.1f}% "
                            f"union {100 * row['cert_union']:.1f}%")
                say(msg + f" [{row['time_s']:.0f} s train, {row['eval_time_s']:.0f} s eval]")
            else:
                history.append(row)
            rng = rng_state(loader_gen, attack_gen, d)
            if d.main:
                state = {"model_name": c.model, "in_shape": list(info.in_shape), "num_classes": info.num_classes,
                         "dtype": c.dtype, "model_state": model.state_dict(), "epoch": epoch + 1,
                         "optimizer_state": optimizer.state_dict(), "schedule_state": schedule.state_dict(),
                         "rng": rng, "metrics": history, "config": config_dict(c), "world_size": d.world,
                         "sparsity_state": RECORD.state_of(model)}
                save_checkpoint(ckpt_path, state)
                if c.keep_checkpoints:
                    save_checkpoint(out_dir / f"epoch_{epoch + 1:03d}.pt", state)
                write_metrics(history, out_dir)
                if c.plots:
                    plot_metrics(history, out_dir / "training_curves.png", c.eps)
            d.barrier()

        summary = None
        if d.main:
            summary = {"mode": c.mode, "p": c.p, "at_norm": c.at_norm, "model": c.model, "dataset": c.dataset,
                       "epochs": c.epochs, "train_time_s": train_time, "eps": list(c.eps),
                       "test_error": clean_error(model, x_test, y_test), "test_points": int(x_test.shape[0])}
            if n_eval:
                progress.begin("evaluate")
                say(f"evaluating the first {n_eval} test points: attacks (PGD, minimum-norm), region certificate, "
                    f"bound propagation" + (", then the robustness curves" if c.curves else ""))
                summary.update(final_evaluation(model, x_test[:n_eval], y_test[:n_eval], c.eps, out_dir,
                                                resume=resume is not None, plots=c.plots, curves=c.curves,
                                                attack_steps=c.eval_attack_steps,
                                                on_eval_batch=lambda n: progress.update("evaluate", n),
                                                on_curve_batch=lambda n: progress.update("curves", n)))
                if history:  # the training curves end with the certified fractions the evaluation measured
                    table = summary["eval"]
                    history[-1].update({f"cert_{k}": 1 - table[k]["UB"] / 100 for k in ("l1", "l2", "linf", "union")},
                                       cert_points=n_eval)
                    write_metrics(history, out_dir)
                    if c.plots:
                        plot_metrics(history, out_dir / "training_curves.png", c.eps)
            summary["wall_time_s"] = time.time() - start_time
            atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    finally:
        progress.close()
    d.barrier()
    return TrainResult(model=model, config=c, metrics=history, summary=summary, out_dir=out_dir,
                       checkpoint=ckpt_path, train_time_s=train_time)
