"""Per-point results of :func:`mmr_ext.evaluate` written as they finish (JSON lines), and resuming
from them: an interrupted evaluation continues where it stopped and ends with the same result as an
uninterrupted one.

One JSON object per line:

- ``header`` (first line): ``{"format": "mmr_ext.evaluation.points", "version": 1, "n": N,
  "model_sha256": .., "data_sha256": .., "settings": {..}, ...}``: what the results belong to. A
  resumed evaluation must match it exactly (same model weights and architecture, same points and
  labels, same eps, box, attacks, steps, seed, batch size, ...), else :class:`RecordsError` lists
  the differences.
- ``point``: ``{"i": index, "label": y, "correct": bool, "norms": {"l1": {"radius": r,
  "min_norm": m, "attacked_by": {"pgd": bool, "fmn": bool}, "certified_by": {"region": bool,
  "bounds": bool}}, ...}}``, the verdicts of the attacks and certifiers before the MIP stage;
  radius and min_norm are floats written exactly (``repr``), non-finite ones as ``"inf"``.
- ``batch``: ``{"batch": [start, stop], "timing": {..}}``, written with the batch's point lines,
  after them, in one flushed write: a batch counts as done only when its ``batch`` line is there.
- ``mip``: ``{"mip": index, "norm": "l1", "status": .., "certified": bool, "attacked": bool,
  "time": s}``, one per point the MIP decided, written per chunk of points.

A line cut short by a kill is dropped on resume. The attacks of a batch draw their random starts
from a generator seeded by :func:`batch_seed` (the evaluation's seed and the batch's first index),
so they do not depend on which batches ran before in the same process.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .math.norms import norm_name
from .outputs import writing

__all__ = ["RecordsError", "PointRecords", "FORMAT", "VERSION", "records_path", "records_header",
           "batch_seed", "fingerprint"]

FORMAT = "mmr_ext.evaluation.points"
VERSION = 1
WHAT = "per-point results"
PathLike = Union[str, os.PathLike]
_MASK = (1 << 63) - 1


class RecordsError(ValueError):
    """A per-point results file is corrupt, or belongs to another evaluation than the requested one."""


def records_path(out: PathLike) -> Path:
    """The per-point results file next to an output JSON: ``eval.json`` -> ``eval.points.jsonl``."""
    out = Path(out)
    stem = out.name[:-len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(stem + ".points.jsonl")


def batch_seed(seed: int, start: int) -> int:
    """Seed of the attacks' random starts for the batch beginning at point ``start``."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(start) * 0xBF58476D1CE4E5B9 + 1) & _MASK


def fingerprint(*items: Union[nn.Module, torch.Tensor]) -> str:
    """SHA-256 of modules (architecture and every tensor of the state dict) and tensors."""
    h = hashlib.sha256()

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())

    for k, item in enumerate(items):
        if isinstance(item, nn.Module):
            h.update(repr(item).encode())
            for name, t in item.state_dict().items():
                add(f"{k}.{name}", t)
        else:
            add(str(k), item)
    return h.hexdigest()


def records_header(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict) -> dict:
    """The header line: what the per-point results belong to."""
    from . import __version__

    return {"format": FORMAT, "version": VERSION, "mmr_ext": __version__, "n": int(x.shape[0]),
            "input_shape": list(x.shape[1:]), "dtype": str(x.dtype).replace("torch.", ""),
            "device": x.device.type, "model_sha256": fingerprint(model),
            "data_sha256": fingerprint(x, y.long()), "settings": settings}


def _plain(obj):
    """JSON round trip (tuples become lists, float keys strings) for exact comparisons."""
    return json.loads(json.dumps(obj, allow_nan=False))


def _enc(v: float):
    return v if math.isfinite(v) else str(v)


def _dec(v) -> float:
    return float(v)  # floats, and "inf" / "-inf" / "nan"


def _differences(saved: dict, requested: dict, prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(saved) | set(requested)):
        a, b = saved.get(k, "<missing>"), requested.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the file, {b!r} requested")
    return out


class PointRecords:
    """The JSON-lines file of per-point results of one evaluation (see the module docstring).

    ``resume=False`` refuses a file that already holds results; ``resume=True`` loads it (after
    checking its header against ``header``) or starts it when it does not exist or is empty.
    Write failures raise :class:`mmr_ext.outputs.OutputError` naming the file; everything written
    before stays readable.
    """

    def __init__(self, path: PathLike, header: dict, resume: bool):
        self.path = Path(path).expanduser()
        self.header = _plain(header)
        self.points: Dict[int, dict] = {}
        self.batches: Dict[int, Tuple[int, dict]] = {}
        self.mip: Dict[str, Dict[int, dict]] = {}
        if self.path.is_dir():
            raise RecordsError(f"per-point results file '{self.path}' is a folder")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size and not resume:
            raise RecordsError(f"'{self.path}' already holds per-point results of an evaluation: resume it "
                               f"(mmr-ext evaluate --resume, evaluate(..., resume=True)) or remove the file")
        keep = self._load() if size else 0
        with writing(self.path, WHAT):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "r+b" if size else "wb") as f:
                f.truncate(keep)  # a line cut short by a kill
            if keep == 0:
                self._append([self.header])

    @property
    def done(self) -> int:
        """Number of points whose batch is complete in the file."""
        return sum(stop - start for start, (stop, _) in self.batches.items())

    def _load(self) -> int:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        lines = data[:end].splitlines()
        if not lines:
            return 0
        try:
            records = [json.loads(line) for line in lines]
        except json.JSONDecodeError as exc:
            raise RecordsError(f"per-point results file '{self.path}' is corrupt ({exc}); remove it to "
                               f"evaluate from the first point") from None
        head = records[0]
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise RecordsError(f"'{self.path}' is not a per-point results file of mmr_ext.evaluate")
        diff = _differences(head, self.header)
        if diff:
            raise RecordsError(f"'{self.path}' holds the results of a different evaluation ("
                               + "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
                               + "): resume with the original model, data and options, or remove the file")
        n = self.header["n"]
        for k, rec in enumerate(records[1:], start=2):
            try:
                if "i" in rec and isinstance(rec["i"], int) and 0 <= rec["i"] < n:
                    self.points[rec["i"]] = rec
                elif "batch" in rec:
                    start, stop = rec["batch"]
                    self.batches[int(start)] = (int(stop), dict(rec.get("timing", {})))
                elif "mip" in rec:
                    self.mip.setdefault(str(rec["norm"]), {})[int(rec["mip"])] = rec
                else:
                    raise ValueError("unknown record")
            except (TypeError, ValueError, KeyError):
                raise RecordsError(f"per-point results file '{self.path}' line {k} is not a record of "
                                   f"evaluate: {str(rec)[:200]}; remove the file to start afresh") from None
        return end

    def _append(self, records: Sequence[dict]) -> None:
        data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode()
        with writing(self.path, WHAT), open(self.path, "ab", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[f.write(view):]
                os.fsync(f.fileno())
            except BaseException:  # what did not surely reach the disk is not kept
                try:
                    os.ftruncate(f.fileno(), size)
                except OSError:
                    pass
                raise

    # -- batches: (correct, attacked_by, certified_by, radius, min_norm) as in evaluate -----------

    def restore_batch(self, start: int, stop: int, correct, attacked_by, certified_by, radius,
                      min_norm) -> Optional[dict]:
        """Fills the batch's verdicts from the file and returns its timing, or ``None`` if the
        batch is not complete there."""
        if self.batches.get(start, (None,))[0] != stop or any(i not in self.points for i in range(start, stop)):
            return None
        recs = [self.points[i] for i in range(start, stop)]
        dev = correct.device
        try:
            correct[start:stop] = torch.tensor([bool(r["correct"]) for r in recs], device=dev)
            for p in attacked_by:
                d = [r["norms"][norm_name(p)] for r in recs]
                radius[p][start:stop] = torch.tensor([_dec(v["radius"]) for v in d], dtype=torch.float64)
                min_norm[p][start:stop] = torch.tensor([_dec(v["min_norm"]) for v in d], dtype=torch.float64)
                for key, by in (("attacked_by", attacked_by[p]), ("certified_by", certified_by[p])):
                    for m, mask in by.items():
                        mask[start:stop] = torch.tensor([bool(v[key][m]) for v in d], device=dev)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordsError(f"per-point results file '{self.path}': the records of points {start}..{stop - 1} "
                               f"are incomplete ({type(exc).__name__}: {exc}); remove the file to start afresh"
                               ) from None
        return self.batches[start][1]

    def save_batch(self, start: int, stop: int, timing: dict, labels, correct, attacked_by, certified_by,
                   radius, min_norm) -> None:
        """Appends the batch's point lines and its ``batch`` line in one flushed write."""
        sl = slice(start, stop)
        cols = {p: {"radius": [_enc(v) for v in radius[p][sl].tolist()],
                    "min_norm": [_enc(v) for v in min_norm[p][sl].tolist()],
                    "attacked_by": {m: v[sl].tolist() for m, v in attacked_by[p].items()},
                    "certified_by": {m: v[sl].tolist() for m, v in certified_by[p].items()}} for p in attacked_by}
        lines = []
        for j, (label, ok) in enumerate(zip(labels[sl].tolist(), correct[sl].tolist())):
            norms = {norm_name(p): {"radius": c["radius"][j], "min_norm": c["min_norm"][j],
                                    "attacked_by": {m: v[j] for m, v in c["attacked_by"].items()},
                                    "certified_by": {m: v[j] for m, v in c["certified_by"].items()}}
                     for p, c in cols.items()}
            lines.append({"i": start + j, "label": int(label), "correct": bool(ok), "norms": norms})
        lines.append({"batch": [start, stop], "timing": timing})
        self._append(lines)
        for rec in lines[:-1]:
            self.points[rec["i"]] = rec
        self.batches[start] = (stop, timing)

    # -- MIP ----------------------------------------------------------------------------------------

    def restore_mip(self, p: float, indices: Sequence[int], status: list, certified: torch.Tensor,
                    attacked: torch.Tensor) -> Tuple[List[int], float]:
        """Fills the MIP verdicts recorded for ``indices``; returns the indices still to solve and
        the recorded MIP time."""
        done = self.mip.get(norm_name(p), {})
        todo, spent = [], 0.0
        for i in indices:
            rec = done.get(i)
            if rec is None:
                todo.append(i)
                continue
            status[i] = rec["status"]
            certified[i] = bool(rec["certified"])
            attacked[i] = bool(rec["attacked"])
            spent += float(rec.get("time", 0.0))
        return todo, spent

    def save_mip(self, p: float, indices: Sequence[int], status: list, certified: torch.Tensor,
                 attacked: torch.Tensor, seconds: float) -> None:
        """Appends one ``mip`` line per point of a solved chunk."""
        name = norm_name(p)
        each = seconds / max(1, len(indices))
        lines = [{"mip": int(i), "norm": name, "status": status[i], "certified": bool(certified[i]),
                  "attacked": bool(attacked[i]), "time": each} for i in indices]
        self._append(lines)
        for rec in lines:
            self.mip.setdefault(name, {})[rec["mip"]] = rec
