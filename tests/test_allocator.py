"""mmr_ext.retain_freed_memory: after it, large tensors freed and allocated again reuse pages that
are already mapped (few page faults), where glibc's default maps fresh ones every time."""
import resource

import pytest
import torch

from mmr_ext import retain_freed_memory


def faults_of_large_tensors() -> int:
    """Minor page faults of three 32 MiB tensors computed from each other, then freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(8 << 20, dtype=torch.float32)
    b = a * 2
    c = a + b
    del a, b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused():
    if not retain_freed_memory():
        pytest.skip("the C library is not glibc")
    pages = 3 * (32 << 20) // resource.getpagesize()
    faults = [faults_of_large_tensors() for _ in range(6)]  # the first ones grow the heap
    assert min(faults[2:]) < pages // 16, faults
