"""Linear-region geometry of ReLU networks: the row engine, the reference oracle, regions of an
explicit activation pattern (docs/MATH.md §1-3, §8, §13)."""
from .engine import compute_geometry, region_distances
from .memory import DEFAULT_CHUNK_ELEMENTS, MemoryBudget
from .reference import region_distances_reference
from .regions import RegionGeometry, activation_pattern, flip_units, region_geometry, to_float64

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "MemoryBudget", "RegionGeometry", "activation_pattern", "compute_geometry",
           "flip_units", "region_distances", "region_distances_reference", "region_geometry", "to_float64"]
