"""mmr_ext: training and certifying ReLU networks that are provably robust in every lp-norm.

Implements MMR (Croce, Andriushchenko & Hein 2019) and MMR-Universal (Croce & Hein 2020) with
native (C++/CUDA) kernels for the linear-region geometry. See README.md and docs/MATH.md.
"""
import torch  # noqa: F401  (the compiled module needs libtorch loaded first)

from .allocator import retain_freed_memory
from .attacks import min_norm_attack, pgd, pgd_max, verify_adversarial
from .certify import Certificate, MIPResult, certified_by_bounds, certify, layer_bounds, margin_bounds, verify_mip
from .curves import RobustnessCurves, robustness_curves
from .evaluation import EvaluationResult, evaluate
from .geometry import (RegionGeometry, activation_pattern, flip_units, region_distances, region_distances_reference,
                       region_geometry)
from .nn import Normalize
from .losses import MMRLoss, UniversalLoss, mmr_loss, mmr_regularizer, mmr_universal, universal_loss
from .math.ball_radii import naive_radius, union_radius
from .math.box_distance import box_closest_point, box_distance, box_min_distance
from .math.hull_radius import hull_radius
from .math.universal_radius import universal_radius

__version__ = "0.1.0"

__all__ = [
    "Certificate",
    "EvaluationResult",
    "RobustnessCurves",
    "robustness_curves",
    "MIPResult",
    "certified_by_bounds",
    "evaluate",
    "layer_bounds",
    "margin_bounds",
    "min_norm_attack",
    "pgd",
    "pgd_max",
    "verify_adversarial",
    "verify_mip",
    "MMRLoss",
    "RegionGeometry",
    "activation_pattern",
    "certify",
    "flip_units",
    "region_geometry",
    "box_closest_point",
    "box_distance",
    "box_min_distance",
    "hull_radius",
    "naive_radius",
    "union_radius",
    "universal_radius",
    "Normalize",
    "UniversalLoss",
    "mmr_loss",
    "mmr_regularizer",
    "mmr_universal",
    "region_distances",
    "region_distances_reference",
    "retain_freed_memory",
    "universal_loss",
]
