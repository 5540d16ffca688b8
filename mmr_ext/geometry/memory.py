"""The memory budget of a geometry pass, as an explicit value (docs/MATH.md §13).

Two kinds of rows can be large: rows built on demand (never stored whole; built ``lazy_chunk``
samples at a time) and explicit patch rows of convolutions (stored for the whole pass; kept for the
backward when a layer differentiates through them, else transient). A pass records the size of
its explicit intermediates in an :class:`ExplicitRows` ledger; the plan
(:meth:`MemoryBudget.samples_per_pass`) is computed from those sizes, which depend on the shapes
and the plan of the rows only, before the real pass runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Default bound on the elements of the largest intermediate of rows built on demand (and of
#: explicit patch rows of a whole batch): 64 MiB in float64, 32 MiB in float32. Smaller chunks
#: were also faster on this project's CPUs (MNIST CNN loss, batch 128: 2^23 elements 0.98 s,
#: 2^25 1.23 s; cache effects).
DEFAULT_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class MemoryBudget:
    """``chunk_size`` samples per pass when given, else as many as keep the largest intermediate
    under ``max_elements`` elements. Only speed and memory depend on it, never the results."""

    chunk_size: Optional[int] = None
    max_elements: int = DEFAULT_CHUNK_ELEMENTS

    def lazy_chunk(self, elements_per_sample: int, batch: int) -> int:
        """Samples per pass over rows built on demand."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, min(batch, self.max_elements // max(1, elements_per_sample)))

    def samples_per_pass(self, explicit_per_sample: int, batch: int) -> int:
        """Samples per whole pass, given the largest explicit per-sample intermediate (elements)."""
        if explicit_per_sample == 0:
            return batch
        if self.chunk_size is not None:
            return min(batch, self.chunk_size)
        if explicit_per_sample * batch <= self.max_elements:
            return batch
        return max(1, self.max_elements // explicit_per_sample)


@dataclass
class ExplicitRows:
    """Ledger of a pass: the largest explicit per-sample intermediates it built (elements), those
    that the backward keeps (``per_sample``) and those alive during the pass only (``transient``)."""

    per_sample: int = 0
    transient: int = 0

    def record(self, Bp: int, elements: int, kept: bool = True) -> None:
        """An intermediate of ``elements`` elements over ``Bp`` samples (Bp = 1: shared rows)."""
        if Bp > 1 and kept:
            self.per_sample = max(self.per_sample, elements // Bp)
        elif Bp > 1:
            self.transient = max(self.transient, elements // Bp)

    def keep(self, rep) -> None:
        """A layer differentiates through the patch rows ``rep``: the backward keeps them."""
        rep.cache["kept"] = True
        self.record(rep.P.shape[0], rep.P.numel())
