"""Simulated I/O failures for the tests (``import faults``): a disk that fills up, or permissions
that change, while a run writes its outputs."""
import errno
import os

import pytest


def fail_writes(monkeypatch, name_part, after=0, error=errno.ENOSPC):
    """Every flush to disk (``os.fsync``) of a file whose path contains ``name_part`` raises
    ``OSError(error)`` once ``after`` such flushes have succeeded; returns the list of failed paths.

    The writers of mmr_ext flush every file they write (checkpoints, metrics, per-point results,
    result JSON), so this is where a full disk shows up first.
    """
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell the files apart")
    real = os.fsync
    seen, failed = [0], []

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if name_part in os.path.basename(path):
            seen[0] += 1
            if seen[0] > after:
                failed.append(path)
                cls = PermissionError if error in (errno.EACCES, errno.EPERM) else OSError
                raise cls(error, os.strerror(error))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed
