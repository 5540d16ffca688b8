"""Hyperparameter schedules of the MMR papers (docs/MATH.md §6).

Over a run of ``E`` epochs the papers use

- ``k_B`` (boundary hyperplanes penalised, as a fraction of the hidden units) decreasing linearly
  from ``k_start`` to ``k_end``: 20% → 5% for MMR-Universal, 10% → 2% for MMR-lp;
- ``λ`` increasing linearly from ``λ/10`` to ``λ`` during the first ``warmup_epochs`` (10 of 100
  epochs in the papers);
- the learning rate divided by 10 during the last ``lr_drop_epochs`` (10 of 100).

Short runs scale the last two with the run: their defaults are 10% of the epochs (see
:func:`default_warmup_epochs`). The schedule is evaluated either once per epoch
(``unit="epoch"``, the papers' choice: every step of epoch ``e`` uses the values at time ``e``)
or at every step (``unit="step"``: time ``e + i / steps_per_epoch`` at step ``i``), which makes
runs of a few epochs follow the same curves smoothly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Dict

__all__ = ["Schedule", "SCHEDULE_UNITS", "default_warmup_epochs", "default_lr_drop_epochs"]

SCHEDULE_UNITS = ("epoch", "step")


def default_warmup_epochs(epochs: int) -> float:
    """λ warm-up length: 10% of the run (the papers' 10 of 100 epochs)."""
    return 0.1 * epochs


def default_lr_drop_epochs(epochs: int) -> float:
    """Length of the final phase at lr / 10: 10% of the run (the papers' last 10 of 100 epochs)."""
    return 0.1 * epochs


def _number(v, name: str, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    if v < lo or (lo_open and v == lo) or v > hi:
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {left}{lo:g}, {hi:g}], got {v:g}")
    return v


@dataclass(frozen=True)
class Schedule:
    """k_B decay, λ warm-up and learning-rate drop as functions of the training position.

    Attributes:
        epochs: total number of epochs E (>= 1).
        k_start, k_end: k_B as a fraction of the hidden units in (0, 1] at the first and the last
            position; linear in between.
        warmup_epochs: length W of the λ ramp; λ scale is ``warmup_start + (1 - warmup_start) *
            min(1, t / W)`` at time t (1 throughout when W = 0).
        warmup_start: λ scale at t = 0 (the papers' 1/10).
        lr_drop_epochs: length D of the final phase with the learning rate multiplied by
            ``lr_drop_factor``: active when t >= E - D.
        lr_drop_factor: the papers' 1/10.
        unit: ``"epoch"`` or ``"step"`` (see the module docstring).
    """

    epochs: int
    k_start: float = 0.2
    k_end: float = 0.05
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1
    lr_drop_epochs: float = 0.0
    lr_drop_factor: float = 0.1
    unit: str = "epoch"

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        _number(self.k_start, "k_start", 0.0, 1.0, lo_open=True)
        _number(self.k_end, "k_end", 0.0, 1.0, lo_open=True)
        _number(self.warmup_epochs, "warmup_epochs", 0.0, float(self.epochs))
        _number(self.warmup_start, "warmup_start", 0.0, 1.0)
        _number(self.lr_drop_epochs, "lr_drop_epochs", 0.0, float(self.epochs))
        _number(self.lr_drop_factor, "lr_drop_factor", 0.0, 1.0, lo_open=True)
        if self.unit not in SCHEDULE_UNITS:
            raise ValueError(f"unit must be one of {SCHEDULE_UNITS}, got {self.unit!r}")

    # positions -------------------------------------------------------------------------------

    def _check_position(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch must be in [0, {self.epochs}), got {epoch}")
        if steps_per_epoch < 1 or not 0 <= step < steps_per_epoch:
            raise ValueError(f"step must be in [0, steps_per_epoch={steps_per_epoch}), got {step}")

    def time(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """Training time in epochs at which the values of this position are evaluated."""
        self._check_position(epoch, step, steps_per_epoch)
        return float(epoch) if self.unit == "epoch" else epoch + step / steps_per_epoch

    def progress(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """Fraction in [0, 1] of the way from the first to the last position (k_B decay)."""
        self._check_position(epoch, step, steps_per_epoch)
        if self.unit == "epoch":
            last = self.epochs - 1
            return epoch / last if last else 0.0
        last = self.epochs * steps_per_epoch - 1
        return (epoch * steps_per_epoch + step) / last if last else 0.0

    # values ----------------------------------------------------------------------------------

    def k_boundary(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """k_B as a fraction of the hidden units."""
        u = self.progress(epoch, step, steps_per_epoch)
        return self.k_start + (self.k_end - self.k_start) * u

    def lam_scale(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """Multiplier of λ (the warm-up)."""
        t = self.time(epoch, step, steps_per_epoch)
        if self.warmup_epochs <= 0:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * min(1.0, t / self.warmup_epochs)

    def lr_scale(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """Multiplier of the base learning rate (the final drop)."""
        t = self.time(epoch, step, steps_per_epoch)
        if self.lr_drop_epochs > 0 and t >= self.epochs - self.lr_drop_epochs:
            return self.lr_drop_factor
        return 1.0

    def values(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> Dict[str, float]:
        """``{"k_boundary", "lam_scale", "lr_scale"}`` at this position."""
        return {"k_boundary": self.k_boundary(epoch, step, steps_per_epoch),
                "lam_scale": self.lam_scale(epoch, step, steps_per_epoch),
                "lr_scale": self.lr_scale(epoch, step, steps_per_epoch)}

    # persistence -----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, object]:
        """The schedule's parameters (plain python values, for checkpoints)."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: Dict[str, object]) -> "Schedule":
        try:
            return cls(**state)
        except TypeError as exc:
            raise ValueError(f"invalid schedule state {state!r}: {exc}") from None
