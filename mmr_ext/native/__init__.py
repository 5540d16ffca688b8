"""Access to the compiled extension ``mmr_ext._C`` with a one-time warning when it is missing."""
from __future__ import annotations

import warnings

try:
    from .. import _C  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = error
else:
    _IMPORT_ERROR = None

_warned = False


def available() -> bool:
    """True when the compiled extension imported."""
    return _C is not None


def native_or_warn() -> bool:
    """True when the native path can run; otherwise warns once that the reference is used."""
    global _warned
    if _C is not None:
        return True
    if not _warned:
        warnings.warn(f"mmr_ext: the compiled extension mmr_ext._C could not be imported ({_IMPORT_ERROR}); "
                      "falling back to the pure-PyTorch reference (slow). Reinstall with "
                      "`pip install --no-build-isolation .`", RuntimeWarning, stacklevel=3)
        _warned = True
    return False


from .ops import (conv_transpose_fits, conv_transpose_row_distances, lazy_row_distances,  # noqa: E402
                  row_distances, topk_hinge)
