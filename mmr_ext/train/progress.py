"""One progress display for a whole training run: the training steps, the certified fractions after
the epochs and the final evaluation, on one bar whose ETA covers all of them.

Each stage counts its own units (steps, points); the time per unit of a stage is measured as it
runs, and until a stage has run a first unit its cost is guessed from the training step time
(``per_point`` training-sample equivalents per evaluated point). The bar shows the share of the
estimated total time done and the estimated time left.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

__all__ = ["RunProgress"]


class RunProgress:
    """A tqdm bar over stages of ``{name: units}`` (see the module docstring).

    Args:
        stages: units per stage in the order they run, e.g. ``{"train": 630, "certify": 300,
            "evaluate": 500}``; stage costs are learnt as they run.
        guesses: a prior cost per unit of a stage in units of one training step (default 1).
        enabled: show the bar (nothing is printed otherwise).
    """

    def __init__(self, stages: Dict[str, float], guesses: Optional[Dict[str, float]] = None,
                 enabled: bool = True, desc: str = "run"):
        self.total = dict(stages)
        self.done = {k: 0.0 for k in stages}
        self.spent = {k: 0.0 for k in stages}
        self.guesses = dict(guesses or {})
        self.start = time.monotonic()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=1000, desc=desc, dynamic_ncols=True, leave=False,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed{postfix}")
        self.stage: Optional[str] = None
        self.mark = self.start
        self.note = ""

    def _unit_cost(self, stage: str) -> float:
        if self.done[stage] > 0:
            return self.spent[stage] / self.done[stage]
        step = self.spent.get("train", 0.0) / self.done["train"] if self.done.get("train") else None
        return (step or 0.0) * self.guesses.get(stage, 1.0)

    def remaining_s(self) -> float:
        """Estimated seconds left (0 before anything was measured)."""
        return sum(max(0.0, self.total[k] - self.done[k]) * self._unit_cost(k) for k in self.total)

    def update(self, stage: str, units: float = 1.0, note: Optional[str] = None) -> None:
        """``units`` of ``stage`` finished (the time since the previous update is charged to it)."""
        now = time.monotonic()
        if stage != self.stage:
            self.note = ""
        self.stage = stage  # the time since the previous update (or begin) was spent on this unit
        self.spent[stage] += now - self.mark
        self.done[stage] += units
        self.mark = now
        if note is not None:
            self.note = note
        self.refresh()

    def begin(self, stage: str) -> None:
        """Starts timing ``stage`` now (e.g. after a pause that belongs to no stage)."""
        if stage != self.stage:
            self.note = ""
        self.stage, self.mark = stage, time.monotonic()
        self.refresh()

    def refresh(self) -> None:
        if self.bar is None:
            return
        elapsed = time.monotonic() - self.start
        left = self.remaining_s()
        self.bar.n = int(1000 * elapsed / (elapsed + left)) if elapsed + left > 0 else 0
        m, s = divmod(int(round(left)), 60)
        done = f"{self.done[self.stage]:.0f}/{self.total[self.stage]:.0f}" if self.stage else ""
        self.bar.set_postfix_str(f"ETA {m}:{s:02d} | {self.stage or ''} {self.note or done}".rstrip(), refresh=True)

    def write(self, message: str) -> None:
        """Prints a line above the bar (or plainly without one)."""
        if self.bar is None:
            print(message, flush=True)
        else:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
