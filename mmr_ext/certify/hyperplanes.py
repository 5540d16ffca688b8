"""Distances from one point (float64, flat [d]) to hyperplanes w [M, d], b [M], free or inside
a box (docs/MATH.md §2, §7)."""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ..math.box_distance import box_distance, box_min_distance
from ..math.distances import row_norms, safe_distance


def distances(w, b, x, p, q, box) -> torch.Tensor:
    """All distances [M], box-constrained when ``box`` is given (+inf for zero rows)."""
    if box is None:
        return safe_distance((w @ x + b).abs(), row_norms(w, q, dim=1))
    return box_distance(w, b, x, p, box[0], box[1])


def min_distance(w, b, x, p, q, box) -> Tuple[float, int]:
    """(smallest distance, its row) over the rows; (inf, -1) without rows or reachable planes."""
    if w.shape[0] == 0:
        return math.inf, -1
    if box is None:
        dist = distances(w, b, x, p, q, None)
        index = int(dist.argmin())
        value = dist[index].item()
        return (value, index) if value < math.inf else (math.inf, -1)
    value, index = box_min_distance(w, b, x, p, box[0], box[1])
    return value.item(), int(index)
