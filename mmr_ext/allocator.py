"""Process-wide tuning of the C allocator for the row engine's large, short-lived tensors.

A training step of the row engine allocates and frees tensors of tens of MB (the rows of every
layer and their gradients). glibc's malloc serves blocks above its mmap threshold (at most 32 MiB)
with fresh mappings and returns them to the OS when freed, so every such tensor pays one page
fault per 4 KiB page on first touch, every step: on FC10 at batch 128 the kernel's page-fault
handling took about a third of the step. :func:`retain_freed_memory` makes malloc serve every
block from its heap and keep freed memory for reuse. ``mmr-ext train`` and ``mmr-ext evaluate``
apply it; library users may call it once at start-up.
"""
from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt parameters of glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

#: Freed memory at the top of the heap above this many bytes is still returned to the OS.
TRIM_THRESHOLD = 1 << 30

__all__ = ["retain_freed_memory"]


def retain_freed_memory() -> bool:
    """Tells glibc's malloc to serve large blocks from its heap (no mmap) and to return freed
    memory to the OS only above 1 GiB of free heap, so that the engine's large tensors reuse pages
    already mapped instead of faulting in fresh ones every step. Process-wide: the resident size
    then stays near the peak of live memory. Returns whether it applied (False where the C library
    is not glibc); results never depend on it, only speed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
