"""Test error and lower / upper bounds on the robust test error per lp-norm and for their union.

Protocol of the MMR-Universal paper (Croce & Hein, ICLR 2020) (§5, App. C; docs/MATH.md §9). For every point and every norm p with radius ε_p:

- **LB** (lower bound, "attacked"): the point is misclassified, or an attack found a point of
  lp-norm <= ε_p inside the box that the network misclassifies. Every adversarial example is
  re-checked (box, norm, strict class flip) with a float64 copy of the network before it counts.
  Attacks: PGD (l1 with sparse steps, l2, l∞) and the minimum-norm attack of
  :mod:`mmr_ext.attacks`; with MIP, its counterexamples too.
- **UB** (upper bound, "not certified"): the point is misclassified or not proved robust by any
  certifier: the linear-region certificate (:func:`mmr_ext.certify`, box-aware, optionally with
  neighbouring regions; for l2 also the universal Thm 4.1 radius from l1 and l∞), linear bound
  propagation (:mod:`mmr_ext.certify.bounds`) and, optionally, exact MIP (:mod:`mmr_ext.certify.mip`, l1 and l∞).
  A certificate counts when its radius exceeds ε_p strictly.
- The union l1 + l2 + l∞: attacked in some norm (LB); not certified in every norm (UB).

A point that is both attacked and certified would mean a bug in an attack or a certifier:
:func:`evaluate` raises ``RuntimeError`` naming it. LB <= UB then holds by construction.
Rates are in percent of the evaluated points. ``mmr-ext evaluate CHECKPOINT`` runs it from the
command line (first 1000 test points, the papers' ε per data set). Deterministic; with ``records``
the per-point results are written as batches finish and ``resume`` continues from them
(:mod:`mmr_ext.evaluation_records`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Real
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .attacks import min_norm_attack, pgd, verify_adversarial
from .certify import certified_by_bounds, certify, reliably_correct, verify_mip
from .checks import check_batch, check_box, check_in_box, check_input, check_y, parse_eps_dict
from .evaluation_records import PointRecords, batch_seed, records_header
from .math.norms import norm_name, parse_norm
from .nn.graph import parse_network
from .outputs import atomic_write

__all__ = ["EvaluationResult", "evaluate", "ATTACKS", "norm_name"]

INF = math.inf
_ATTACKS = ("pgd", "fmn")
#: Names of the built-in attacks of :func:`evaluate` (the choices of ``mmr-ext evaluate --attacks``).
ATTACKS = _ATTACKS
_VERIFY_TOL = 1e-9  # our attacks place examples in the ball exactly; this only absorbs float64 noise
_MIP_CHUNK = 4  # points per worker between two writes of MIP verdicts to the per-point records
AttackFn = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------

def _pct(mask: torch.Tensor) -> float:
    return 100.0 * mask.double().mean().item() if mask.numel() else 0.0


@dataclass
class EvaluationResult:
    """Per-point verdicts of :func:`evaluate` and the table built from them.

    Attributes (per-norm dicts are keyed by 1.0, 2.0, inf):
        eps: radius per norm. box: (lo, hi).
        labels, correct: [N] labels and clean correctness (in the model's dtype and float64, docs/MATH.md §12).
        attacked: {p: [N] bool} misclassified or an adversarial example found (LB).
        certified: {p: [N] bool} correctly classified and proved robust (UB = not certified).
        attacked_by: {p: {method: [N] bool}} which attack succeeded ('pgd', 'fmn', 'mip', or a
            custom attack's name).
        certified_by: {p: {method: [N] bool}} which certifier succeeded ('region', 'bounds', 'mip').
        radius: {p: [N]} certified radius of the region certificate (0 if misclassified).
        min_norm: {p: [N]} norm of the smallest adversarial example found by the minimum-norm
            attack (+inf: none found, or the attack was not run).
        mip_status: {p: [N] list} MIP verdict per point (None where MIP did not run).
        settings, timing: what was run and how long each stage took (seconds).
    """

    eps: Dict[float, float]
    box: Tuple[float, float]
    labels: torch.Tensor
    correct: torch.Tensor
    attacked: Dict[float, torch.Tensor]
    certified: Dict[float, torch.Tensor]
    attacked_by: Dict[float, Dict[str, torch.Tensor]]
    certified_by: Dict[float, Dict[str, torch.Tensor]]
    radius: Dict[float, torch.Tensor]
    min_norm: Dict[float, torch.Tensor]
    mip_status: Dict[float, List[Optional[str]]]
    settings: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.correct.numel())

    @property
    def norms(self) -> Tuple[float, ...]:
        return tuple(self.eps)

    @property
    def test_error(self) -> float:
        """Clean test error in percent."""
        return _pct(~self.correct)

    def _key(self, p) -> Union[float, str]:
        if isinstance(p, str) and p.strip().lower() == "union":
            return "union"
        q = parse_norm(p, "p")
        if q not in self.eps:
            raise ValueError(f"norm {p!r} was not evaluated (norms: {[norm_name(n) for n in self.eps]})")
        return q

    def attacked_mask(self, p) -> torch.Tensor:
        k = self._key(p)
        if k == "union":
            return torch.stack([self.attacked[q] for q in self.eps]).any(0)
        return self.attacked[k]

    def certified_mask(self, p) -> torch.Tensor:
        k = self._key(p)
        if k == "union":
            return torch.stack([self.certified[q] for q in self.eps]).all(0)
        return self.certified[k]

    def lower_bound(self, p) -> float:
        """LB on the robust test error in percent for norm p (1, 2, inf) or ``'union'``."""
        return _pct(self.attacked_mask(p))

    def upper_bound(self, p) -> float:
        """UB on the robust test error in percent for norm p (1, 2, inf) or ``'union'``."""
        return _pct(~self.certified_mask(p))

    def rows(self) -> Dict[str, object]:
        """``{'TE': te, 'l1': {'LB': .., 'UB': ..}, ..., 'union': {...}}`` in percent."""
        out: Dict[str, object] = {"TE": self.test_error}
        for p in self.eps:
            out[norm_name(p)] = {"LB": self.lower_bound(p), "UB": self.upper_bound(p)}
        out["union"] = {"LB": self.lower_bound("union"), "UB": self.upper_bound("union")}
        return out

    def table(self, title: Optional[str] = None) -> str:
        """The table of the MMR-Universal paper (Table 4 layout): TE, then LB / UB per norm and for the union."""
        cols = [(f"{norm_name(p)} (eps={_fmt_eps(e)})", p) for p, e in self.eps.items()]
        cols.append(("+".join(norm_name(p) for p in self.eps) if len(self.eps) > 1 else "union", "union"))
        width = max(16, max(len(name) for name, _ in cols) + 2)
        half = width // 2
        lines = []
        if title:
            lines.append(title)
        lines.append(f"{self.n} points, box [{self.box[0]:g}, {self.box[1]:g}], robust test error "
                     "in %: LB (attacked) / UB (not certified)")
        lines.append(" " * 8 + "".join(f"{name:>{width}}" for name, _ in cols))
        lines.append(f"{'TE':>8}" + "".join(f"{'LB':>{half}}{'UB':>{width - half}}" for _ in cols))
        lines.append(f"{self.test_error:>8.2f}" + "".join(
            f"{self.lower_bound(p):>{half}.1f}{self.upper_bound(p):>{width - half}.1f}" for _, p in cols))
        for p in self.eps:
            cert = ", ".join(f"{m} {int(v.sum())}" for m, v in self.certified_by[p].items())
            att = ", ".join(f"{m} {int(v.sum())}" for m, v in self.attacked_by[p].items())
            extra = ""
            if any(s is not None for s in self.mip_status[p]):
                counts: Dict[str, int] = {}
                for s in self.mip_status[p]:
                    if s is not None:
                        counts[s] = counts.get(s, 0) + 1
                extra = "; MIP " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            lines.append(f"  {norm_name(p):>4}: certified by {cert or '-'}; attacked by {att or '-'}{extra}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        """Plain-JSON form: settings, table, counts, timing and every per-point verdict
        (infinite values as null)."""
        def floats(t: torch.Tensor) -> list:
            return [None if not math.isfinite(v) else v for v in t.double().tolist()]

        def bools(t: torch.Tensor) -> list:
            return [bool(v) for v in t.tolist()]

        points: Dict[str, object] = {"label": [int(v) for v in self.labels.tolist()],
                                     "correct": bools(self.correct)}
        for name, data in (("attacked", self.attacked), ("certified", self.certified)):
            points[name] = {norm_name(p): bools(v) for p, v in data.items()}
        for name, data in (("attacked_by", self.attacked_by), ("certified_by", self.certified_by)):
            points[name] = {norm_name(p): {m: bools(v) for m, v in d.items()} for p, d in data.items()}
        points["radius"] = {norm_name(p): floats(v) for p, v in self.radius.items()}
        points["min_norm"] = {norm_name(p): floats(v) for p, v in self.min_norm.items()}
        points["mip_status"] = {norm_name(p): list(v) for p, v in self.mip_status.items()}
        return {
            "n": self.n,
            "eps": {norm_name(p): e for p, e in self.eps.items()},
            "box": list(self.box),
            "table": self.rows(),
            "settings": self.settings,
            "timing": self.timing,
            "points": points,
        }

    def to_json(self, path: Union[str, os.PathLike]) -> Path:
        """Writes :meth:`to_dict` as JSON to ``path`` atomically (parent folders created); returns
        the path. A failing write raises :class:`mmr_ext.outputs.OutputError` naming it."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        return atomic_write(Path(path), lambda f: f.write(text), what="results file")


def _fmt_eps(e: float) -> str:
    text = f"{e:g}"
    frac = Fraction(e).limit_denominator(1000)
    if len(text) > 6 and abs(float(frac) - e) < 1e-12:
        return f"{frac.numerator}/{frac.denominator}"  # e.g. 4/255
    return text


# ---------------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------------

def _region_radii(model64: nn.Module, x64: torch.Tensor, y: torch.Tensor, norms, box, neighbors):
    """Region certificate radius per norm (float64 [B]); l2 and other p also use Thm 4.1."""

    cert = certify(model64, x64, y, norms=tuple(norms), box=box, neighbors=neighbors)
    out = {}
    for p in norms:
        r = cert.radius[p].to(torch.float64)
        if p not in (1.0, INF):
            r = torch.maximum(r, cert.universal(p).to(torch.float64))
        out[p] = torch.where(cert.correct, r, torch.zeros_like(r))
    return out


def _check_attacks(attacks) -> List[Tuple[str, object]]:
    if isinstance(attacks, (str, bytes)) or callable(attacks):
        attacks = (attacks,)
    out = []
    try:
        items = list(attacks)
    except TypeError:
        raise TypeError(f"attacks must be a sequence of names {_ATTACKS} or callables, got {attacks!r}") from None
    for a in items:
        if isinstance(a, str):
            key = a.strip().lower()
            if key not in _ATTACKS:
                raise ValueError(f"unknown attack {a!r} in attacks; valid names: {', '.join(_ATTACKS)} "
                                 "(or a callable f(model, x, y, *, norm, eps, lo, hi) -> x_adv)")
            out.append((key, key))
        elif callable(a):
            out.append((getattr(a, "__name__", "custom"), a))
        else:
            raise TypeError(f"attacks entries must be names or callables, got {a!r}")
    return out


def _int_arg(v, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _inconsistency(idx, p, eps, attacked_by, certified_by, radius, min_norm) -> RuntimeError:
    lines = [f"INCONSISTENT EVALUATION: {len(idx)} point(s) both attacked successfully and certified "
             f"at {norm_name(p)} eps={eps:g}. An attack or a certifier is wrong; please report this."]
    for i in idx[:10]:
        att = [m for m, v in attacked_by.items() if v[i]]
        cert = [m for m, v in certified_by.items() if v[i]]
        lines.append(f"  point {i}: attacked by {att}, certified by {cert}, region radius "
                     f"{radius[i].item():.6g}, smallest adversarial norm found {min_norm[i].item():.6g}")
    return RuntimeError("\n".join(lines))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: dict,
             box: Tuple[float, float] = (0.0, 1.0), attacks: Sequence = _ATTACKS,
             attack_steps: int = 100, attack_restarts: int = 1, fmn_steps: int = 100,
             use_bounds: bool = True, bound_alpha_steps: int = 0, use_mip: bool = False,
             mip_time_limit: float = 120.0, neighbors: int = 0, workers: int = 1,
             batch_size: int = 100, seed: int = 0, progress: bool = True,
             records: Optional[Union[str, os.PathLike]] = None, resume: bool = False,
             on_batch: Optional[Callable[[int], None]] = None) -> EvaluationResult:
    """Test error and lower / upper bounds on the robust test error (docs/MATH.md §9).

    Args:
        model: ``nn.Sequential`` ReLU network (eval-mode semantics are used; flags restored).
        x: test inputs [N, ...] in the box; y: int labels [N].
        eps: ``{norm: radius}`` for norms among 1, 2, inf (or 'l1', 'l2', 'linf').
        box: (lo, hi) input domain.
        attacks: names among 'pgd', 'fmn' (minimum-norm attack) or callables
            ``f(model, x, y, *, norm, eps, lo, hi) -> x_adv``; every example is re-checked.
        attack_steps, attack_restarts: PGD iterations and restarts. fmn_steps: minimum-norm
            attack iterations.
        use_bounds: run bound propagation on points the region certificate leaves open.
        bound_alpha_steps: α-optimisation steps of the final bound (0: adaptive CROWN).
        use_mip: run the MIP (l1 and l∞) on points still undecided, ``mip_time_limit`` seconds
            each, on ``workers`` processes.
        neighbors: neighbouring regions explored by the region certificate (the paper: 5).
        batch_size: points per batch. seed: seed of the attacks' random starts (each batch's
            generator is seeded from it and the batch's first index: results do not depend on what
            ran before). progress: tqdm progress bars.
        records: JSON-lines file of per-point results, appended batch by batch as they finish
            (:mod:`mmr_ext.evaluation_records`). resume: continue from ``records`` (its header must
            match this call's model, data and options); the result equals an uninterrupted run.
        on_batch: called with the number of points of each finished batch (e.g. to drive a
            progress display of a longer job).

    Returns:
        :class:`EvaluationResult`; ``.table()`` prints it, ``.to_json(path)`` saves it.

    Raises:
        RuntimeError: a point was both attacked successfully and certified (a bug somewhere).
    """
    radii = parse_eps_dict(eps)
    check_batch(x)
    check_y(y, x)
    if not isinstance(box, (tuple, list)) or len(box) != 2:
        raise ValueError(f"box must be a pair (lo, hi), got {box!r}")
    lo, hi = check_box(*box)
    check_in_box(x, lo, hi)
    attack_list = _check_attacks(attacks)
    attack_steps = _int_arg(attack_steps, "attack_steps", 1)
    attack_restarts = _int_arg(attack_restarts, "attack_restarts", 1)
    fmn_steps = _int_arg(fmn_steps, "fmn_steps", 1)
    bound_alpha_steps = _int_arg(bound_alpha_steps, "bound_alpha_steps", 0)
    neighbors = _int_arg(neighbors, "neighbors", 0)
    workers = _int_arg(workers, "workers", 1)
    batch_size = _int_arg(batch_size, "batch_size", 1)
    if isinstance(mip_time_limit, bool) or not isinstance(mip_time_limit, Real) or not mip_time_limit > 0:
        raise ValueError(f"mip_time_limit must be a positive number of seconds, got {mip_time_limit!r}")
    for name, v in (("use_bounds", use_bounds), ("use_mip", use_mip), ("progress", progress), ("resume", resume)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    if on_batch is not None and not callable(on_batch):
        raise TypeError(f"on_batch must be None or a callable, got {on_batch!r}")

    from tqdm.auto import tqdm


    parse_network(model)  # clear errors for unsupported models before any work
    check_input(model, x)  # dtype / device of x match the model's
    model64 = copy.deepcopy(model).to(torch.float64).eval().requires_grad_(False)
    N = x.shape[0]
    dev = x.device
    x = x.detach()
    y = y.detach().long()
    norms = tuple(radii)
    false = lambda: torch.zeros(N, dtype=torch.bool, device=dev)  # noqa: E731
    correct = false()
    attacked_by = {p: {name: false() for name, _ in attack_list} for p in norms}
    certified_by = {p: {"region": false()} for p in norms}
    if use_bounds:
        for p in norms:
            certified_by[p]["bounds"] = false()
    radius = {p: torch.zeros(N, dtype=torch.float64, device=dev) for p in norms}
    min_norm = {p: torch.full((N,), INF, dtype=torch.float64, device=dev) for p in norms}
    mip_status: Dict[float, List[Optional[str]]] = {p: [None] * N for p in norms}
    timing = {"region": 0.0, "attacks": 0.0, "bounds": 0.0, "mip": 0.0}
    settings = {"attacks": [name for name, _ in attack_list], "attack_steps": attack_steps,
                "attack_restarts": attack_restarts, "fmn_steps": fmn_steps, "use_bounds": use_bounds,
                "bound_alpha_steps": bound_alpha_steps, "use_mip": use_mip,
                "mip_time_limit": float(mip_time_limit), "neighbors": neighbors, "seed": seed,
                "batch_size": batch_size}
    log = None if records is None else PointRecords(records, records_header(
        model, x, y, dict(settings, eps={norm_name(p): e for p, e in radii.items()}, box=[lo, hi])), resume)
    state = (correct, attacked_by, certified_by, radius, min_norm)

    def attacked(p):
        return torch.stack(list(attacked_by[p].values()) + [~correct]).any(0)

    def certified(p):
        return torch.stack(list(certified_by[p].values())).any(0) & correct

    def check(p, idx=None):
        both = attacked(p) & certified(p)
        if idx is not None:
            both = both & idx
        if both.any():
            raise _inconsistency(both.nonzero()[:, 0].tolist(), p, radii[p], attacked_by[p],
                                 certified_by[p], radius[p], min_norm[p])

    batches = range(0, N, batch_size)
    for start in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        sl = slice(start, min(start + batch_size, N))
        in_batch = false()
        in_batch[sl] = True
        restored = log.restore_batch(start, sl.stop, *state) if log is not None else None
        if restored is not None:
            for k, v in restored.items():
                timing[k] = timing.get(k, 0.0) + v
            if on_batch is not None:
                on_batch(sl.stop - start)
            continue
        before = dict(timing)
        gen = torch.Generator(device=dev).manual_seed(batch_seed(seed, start))
        xb, yb = x[sl], y[sl]
        x64 = xb.to(torch.float64)
        with torch.no_grad():  # correct as the user runs it: own dtype and float64 (docs/MATH.md §12)
            ok = reliably_correct(model, xb, yb, model64(x64))
        correct[sl] = ok

        t = time.monotonic()
        r = _region_radii(model64, x64, yb, norms, (lo, hi), neighbors)
        for p in norms:
            radius[p][sl] = torch.where(ok, r[p], torch.zeros_like(r[p]))
            certified_by[p]["region"][sl] = ok & (r[p] > radii[p])
        timing["region"] += time.monotonic() - t

        t = time.monotonic()
        for p in norms:
            e = radii[p]
            for name, fn in attack_list:
                if not ok.any():
                    break
                if name == "fmn":
                    x_adv, found = min_norm_attack(model, xb, yb, norm=p, steps=fmn_steps, lo=lo, hi=hi)
                    min_norm[p][sl] = torch.where(ok, found, min_norm[p][sl])
                    cand = found <= e
                elif name == "pgd":
                    x_adv = pgd(model, xb, yb, norm=p, eps=e, steps=attack_steps,
                                restarts=attack_restarts, lo=lo, hi=hi, generator=gen)
                    cand = torch.ones_like(ok)
                else:
                    x_adv = fn(model, xb, yb, norm=p, eps=e, lo=lo, hi=hi)
                    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != xb.shape:
                        raise ValueError(f"attack {name!r} must return a tensor of shape {tuple(xb.shape)}")
                    cand = torch.ones_like(ok)
                good = verify_adversarial(model64, x64, x_adv.detach().to(torch.float64), yb, p, e,
                                          lo, hi, tol=_VERIFY_TOL)
                attacked_by[p][name][sl] = ok & cand & good
        timing["attacks"] += time.monotonic() - t

        if use_bounds:
            t = time.monotonic()
            for p in norms:
                open_ = ok & ~certified(p)[sl] & ~attacked(p)[sl]
                if open_.any():
                    idx = open_.nonzero()[:, 0]
                    proved = certified_by_bounds(model64, x64[idx], yb[idx], norm=p, eps=radii[p],
                                                 lo=lo, hi=hi, alpha_steps=bound_alpha_steps)
                    certified_by[p]["bounds"][start + idx] = proved
            timing["bounds"] += time.monotonic() - t
        for p in norms:
            check(p, in_batch)
        if log is not None:
            log.save_batch(start, sl.stop, {k: timing[k] - before[k] for k in timing}, y, *state)
        if on_batch is not None:
            on_batch(sl.stop - start)

    if use_mip:

        t = time.monotonic()
        for p in norms:
            if p == 2.0:
                continue
            certified_by[p]["mip"] = false()
            attacked_by[p]["mip"] = false()
            open_ = correct & ~certified(p) & ~attacked(p)
            todo = open_.nonzero()[:, 0].tolist()
            if log is not None:
                todo, spent = log.restore_mip(p, todo, mip_status[p], certified_by[p]["mip"], attacked_by[p]["mip"])
                timing["mip"] += spent
            for k in range(0, len(todo), _MIP_CHUNK * workers):
                chunk, t_chunk = todo[k:k + _MIP_CHUNK * workers], time.monotonic()
                idx = torch.tensor(chunk, dtype=torch.long, device=dev)
                results = verify_mip(model64, x[idx].to(torch.float64), y[idx], norm=p, eps=radii[p],
                                     lo=lo, hi=hi, time_limit=float(mip_time_limit), workers=workers)
                for i, res in zip(chunk, results):
                    mip_status[p][i] = res.status
                    if res.status == "verified":
                        certified_by[p]["mip"][i] = True
                    elif res.status == "falsified" and res.counterexample is not None:
                        ce = res.counterexample.to(torch.float64)[None]
                        good = verify_adversarial(model64, x[i:i + 1].to(torch.float64), ce, y[i:i + 1],
                                                  p, radii[p], lo, hi, tol=_VERIFY_TOL)
                        attacked_by[p]["mip"][i] = bool(good)
                if log is not None:
                    log.save_mip(p, chunk, mip_status[p], certified_by[p]["mip"], attacked_by[p]["mip"],
                                 time.monotonic() - t_chunk)
        timing["mip"] += time.monotonic() - t

    for p in norms:
        check(p)
    result = EvaluationResult(
        eps=dict(radii), box=(lo, hi), labels=y.cpu(), correct=correct.cpu(),
        attacked={p: attacked(p).cpu() for p in norms},
        certified={p: certified(p).cpu() for p in norms},
        attacked_by={p: {m: v.cpu() for m, v in d.items()} for p, d in attacked_by.items()},
        certified_by={p: {m: (v & correct).cpu() for m, v in d.items()} for p, d in certified_by.items()},
        radius={p: v.cpu() for p, v in radius.items()},
        min_norm={p: v.cpu() for p, v in min_norm.items()},
        mip_status=mip_status, settings=settings, timing=timing)
    for key in list(radii) + ["union"]:
        if result.lower_bound(key) > result.upper_bound(key) + 1e-9:  # impossible after check()
            raise RuntimeError(f"LB > UB for {key}: {result.lower_bound(key)} > {result.upper_bound(key)}")
    return result
