"""Certificates of robustness: the region certificate (box, neighbouring regions, Thm 4.1 of the
MMR-Universal paper), bound propagation, and exact verification by MIP (docs/MATH.md §3, §5,
§7-§9)."""
from .bounds import BoundedNetwork, certified_by_bounds, layer_bounds, margin_bounds
from .certificate import Certificate
from .mip import MIPResult, verify_mip
from .prediction import reliably_correct
from .region import certify

__all__ = ["BoundedNetwork", "Certificate", "MIPResult", "certified_by_bounds", "certify", "layer_bounds",
           "margin_bounds", "reliably_correct", "verify_mip"]
