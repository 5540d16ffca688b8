"""The only code that touches the compiled library: ``torch.ops.mmr_ext`` loaded (:mod:`.library`),
its fake kernels and autograd formulas registered (:mod:`.registration`), Python wrappers
(:mod:`.ops`) and distances to rows built on demand (:mod:`.lazy_rows`)."""
from .lazy_rows import is_recomputing, lazy_row_distances, recomputing
from .library import HAS_CUDA, MAX_CONV_TAPS, MAX_CUDA_CANVAS_BYTES, available, native_or_warn
from .ops import (conv_patch_rows, conv_transpose_fits, conv_transpose_row_distances, patch_linear_rows, row_distances,
                  topk_hinge)

if available():
    from . import registration  # noqa: F401

__all__ = ["HAS_CUDA", "MAX_CONV_TAPS", "MAX_CUDA_CANVAS_BYTES", "available", "conv_patch_rows",
           "conv_transpose_fits", "conv_transpose_row_distances", "is_recomputing", "lazy_row_distances", "recomputing", "native_or_warn", "patch_linear_rows", "row_distances",
           "topk_hinge"]
