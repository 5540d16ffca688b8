"""Loading of the compiled library ``mmr_ext._C``, which registers ``torch.ops.mmr_ext``, and the
limits of its build; a one-time warning when it is missing."""
from __future__ import annotations

import warnings

import torch


def _load():
    """The ImportError of ``mmr_ext._C``, or None once it loaded."""
    try:
        from .. import _C  # noqa: F401  (loading it registers the ops)
    except ImportError as error:  # pragma: no cover - exercised only on broken installs
        return error
    return None


_LOAD_ERROR = _load()
_warned = False

# The limits of the build (torch.ops.mmr_ext.build_info): the most taps (Cin x kh x kw) per output
# position of the fused conv step, the largest input-space row (bytes) that its CUDA kernel keeps in
# shared memory, and whether the library has CUDA kernels. Without the library nothing fits.
if _LOAD_ERROR is None:
    MAX_CONV_TAPS, MAX_CUDA_CANVAS_BYTES, HAS_CUDA = torch.ops.mmr_ext.build_info()
else:  # pragma: no cover - exercised only on broken installs
    MAX_CONV_TAPS, MAX_CUDA_CANVAS_BYTES, HAS_CUDA = 0, 0, False


def available() -> bool:
    """True when the compiled extension loaded."""
    return _LOAD_ERROR is None


def native_or_warn() -> bool:
    """True when the native path can run; otherwise warns once that the reference is used."""
    global _warned
    if _LOAD_ERROR is None:
        return True
    if not _warned:
        warnings.warn(f"mmr_ext: the compiled extension mmr_ext._C could not be imported ({_LOAD_ERROR}); "
                      "falling back to the pure-PyTorch reference (slow). Reinstall with "
                      "`pip install --no-build-isolation .`", RuntimeWarning, stacklevel=3)
        _warned = True
    return False
