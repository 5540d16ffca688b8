"""How sparse the backward of each layer's distances was, as the plan of the next pass reads it
(docs/MATH.md §13.2).

Which rows of a fully connected layer after convolutions receive a gradient is only known after
the loss: after a top-k hinge selection on a trained network, a few percent of them; at
initialisation, most. The cheapest exact plan differs between the two (rows on demand with the
decision rows walked back, or explicit rows), so every backward records, per fully connected layer, the fraction of
(sample, unit) pairs whose distance got a gradient, and the next pass plans from it. A pass reads
the record once, before it starts (:meth:`SparsityRecord.snapshot`), so that a checkpointed chunk
recomputes exactly the graph it built. Only speed depends on it, never the results.
"""
from __future__ import annotations

import weakref
from typing import Dict

import torch
from torch import nn


class SparsityRecord:
    """Per layer (held weakly), the fraction of pairs whose distance got a gradient last time."""

    def __init__(self):
        self._density: "weakref.WeakKeyDictionary[nn.Module, float]" = weakref.WeakKeyDictionary()

    def snapshot(self) -> Dict[nn.Module, float]:
        """The densities as they are now, for one pass to plan from."""
        return dict(self._density)

    def state_of(self, model: nn.Module) -> Dict[str, float]:
        """The densities of ``model``'s layers by module name (what a training checkpoint keeps)."""
        return {name: self._density[m] for name, m in model.named_modules() if m in self._density}

    def restore(self, model: nn.Module, state: Dict[str, float]) -> None:
        """Sets the densities of ``model``'s layers from a :meth:`state_of` dict, so that a resumed
        run plans its next step as the interrupted one would have."""
        modules = dict(model.named_modules())
        for name, density in state.items():
            if name in modules:
                self._density[modules[name]] = float(density)

    def watch(self, layer: nn.Module, distances: torch.Tensor) -> None:
        """Records, when the backward reaches them, which of ``distances`` [Q, B, n] got a gradient."""
        if not distances.requires_grad:
            return
        ref = weakref.ref(layer)

        def record(grad: torch.Tensor) -> None:
            owner = ref()
            if owner is not None and grad is not None and grad.numel() > 0:
                self._density[owner] = float((grad != 0).any(dim=0).float().mean())
        distances.register_hook(record)


#: The record the row engine plans from.
RECORD = SparsityRecord()
