"""Training checkpoints: atomic writes, validated reads, exact resume.

A checkpoint is a dict saved with ``torch.save`` and read back with ``weights_only=True`` (no
code runs on load). Keys:

    format, version      ``"mmr_ext.checkpoint"`` and :data:`VERSION`
    model_name           architecture name for :func:`mmr_ext.nn.zoo.build_model`
    in_shape, num_classes
    model_state          ``state_dict`` of the model
    dtype                parameter dtype, ``"float32"`` or ``"float64"``
    epoch                number of completed epochs
    optimizer_state      ``state_dict`` of the optimizer (absent in model-only files)
    schedule_state       :meth:`mmr_ext.train.schedules.Schedule.state_dict`
    rng                  RNG states: torch CPU (and CUDA) global states, the data-loader
                         generator, and the attack generator of every rank
    metrics              list of per-epoch metric dicts
    config               the resolved training configuration (dict of plain values)
    world_size           number of processes that trained it
    sparsity_state       per layer (module name), the gradient density the row engine plans its
                         next step from (:mod:`mmr_ext.geometry.sparsity`; that of rank 0)

Files are written to a temporary file in the target folder, flushed to disk and moved into place
with ``os.replace``, so a crash or a failing write (disk full) leaves either the previous
checkpoint or the new one, never a partial file or a temporary one; a failing write raises
:class:`mmr_ext.outputs.OutputError` naming the file. Every problem on reading raises
:class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import nn

from ..outputs import atomic_write

__all__ = ["CheckpointError", "FORMAT", "VERSION", "save_checkpoint", "load_checkpoint",
           "load_model", "build_from_checkpoint", "config_differences", "describe_differences"]

FORMAT = "mmr_ext.checkpoint"
VERSION = 1
PathLike = Union[str, os.PathLike]

MODEL_KEYS = ("model_name", "in_shape", "num_classes", "model_state")
TRAINING_KEYS = ("epoch", "optimizer_state", "schedule_state", "rng", "metrics", "config")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt, or does not match the requested run."""


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus ``format``/``version``) to ``path``; returns the path.

    A failing write (disk full, permission denied) raises :class:`mmr_ext.outputs.OutputError`
    (an ``OSError``) naming the file, and leaves the previous file at ``path`` as it was.
    """
    payload = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda f: torch.save(payload, f), binary=True, what="checkpoint")


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu",
                    require_training_state: bool = False) -> Dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` if the file is missing, truncated or corrupt, is not an
    mmr_ext checkpoint, has an unsupported version, or lacks required keys (the training state
    too when ``require_training_state``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign object, ...
        raise CheckpointError(f"checkpoint '{path}' is corrupt or unreadable "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                              ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an mmr_ext checkpoint (no '{FORMAT}' format tag)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {ckpt.get('version')!r}; "
                              f"this mmr_ext reads version {VERSION}")
    required = MODEL_KEYS + (TRAINING_KEYS if require_training_state else ())
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {', '.join(missing)}"
                              + (" (a model-only file cannot be resumed)" if require_training_state
                                 and "model_state" in ckpt else ""))
    if not isinstance(ckpt["model_state"], dict):
        raise CheckpointError(f"checkpoint '{path}': model_state is not a state dict")
    return ckpt


def build_from_checkpoint(ckpt: Dict[str, Any], path: PathLike = "<checkpoint>") -> nn.Module:
    """Rebuild the model described by a loaded checkpoint and load its weights (strict)."""
    from ..nn.zoo import build_model

    try:
        model = build_model(ckpt["model_name"], tuple(ckpt["in_shape"]), int(ckpt["num_classes"]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' describes an invalid model: {exc}") from exc
    dtype = _DTYPES.get(ckpt.get("dtype", "float32"))
    if dtype is None:
        raise CheckpointError(f"checkpoint '{path}' has unsupported dtype {ckpt.get('dtype')!r}")
    model = model.to(dtype)
    try:
        model.load_state_dict(ckpt["model_state"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint '{path}': weights do not fit model "
                              f"'{ckpt['model_name']}' with in_shape {tuple(ckpt['in_shape'])} and "
                              f"{ckpt['num_classes']} classes: {exc}") from exc
    return model


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu"
               ) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model, checkpoint)`` from a checkpoint file; the model is in eval mode on
    ``map_location``."""
    ckpt = load_checkpoint(path, map_location=map_location)
    model = build_from_checkpoint(ckpt, path).to(map_location)
    return model.eval(), ckpt


def config_differences(saved: Dict[str, Any], requested: Dict[str, Any],
                       ignore: Iterable[str] = ()) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (saved, requested)}`` for every configuration entry that differs."""
    ignore = set(ignore)
    keys = (set(saved) | set(requested)) - ignore
    missing = object()
    out = {}
    for k in sorted(keys):
        a, b = saved.get(k, missing), requested.get(k, missing)
        if _normal(a) != _normal(b):
            out[k] = (None if a is missing else a, None if b is missing else b)
    return out


def _normal(v: Any) -> Any:
    """Compare lists and tuples alike (a checkpoint round trip may turn one into the other)."""
    if isinstance(v, (list, tuple)):
        return tuple(_normal(x) for x in v)
    if isinstance(v, dict):
        return {k: _normal(x) for k, x in v.items()}
    return v


def describe_differences(diff: Dict[str, Tuple[Any, Any]], limit: Optional[int] = 8) -> str:
    """One line per difference, ``key: saved -> requested``."""
    items = list(diff.items())[:limit]
    text = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} requested" for k, (a, b) in items)
    if limit is not None and len(diff) > limit:
        text += f"; and {len(diff) - limit} more"
    return text
