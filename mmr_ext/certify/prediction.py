"""Whether the model, as the user runs it, classifies a point correctly beyond rounding
(docs/MATH.md §12): the certificates are computed on a float64 copy, so a point only counts as
correct when the model predicts its label in its own dtype too, and the float64 margin exceeds the
rounding level of that dtype."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..attacks import margins
from ..geometry import to_float64

#: The float64 margin must exceed this many times the rounding level (see :func:`reliably_correct`).
ROUNDING_FACTOR = 2.0


@torch.no_grad()
def reliably_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     logits64: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B] bool: ``model(x)`` in the model's own dtype predicts y with a positive margin, and the
    float64 margin ``f_y - max_{s != y} f_s`` exceeds ``ROUNDING_FACTOR * level``, where ``level =
    max(max_s |f_s - f64_s|, eps_dtype * (1 + max_s |f64_s|))`` is the observed difference between
    the two evaluations, and at least the dtype's relative rounding of the logits.

    ``logits64``: the float64 copy's logits at x [B, K], when already computed.
    """
    x = x.detach()
    own = model(x)
    if logits64 is None:
        logits64 = own if own.dtype == torch.float64 else to_float64(model)(x.double())
    own64 = own.double()
    level = torch.maximum((own64 - logits64).abs().amax(1),
                          torch.finfo(own.dtype).eps * (1.0 + logits64.abs().amax(1)))
    return (margins(own64, y) > 0) & (margins(logits64, y) > ROUNDING_FACTOR * level)
