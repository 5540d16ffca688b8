"""Test helper: the ``mmr-ext`` command line with a tiny architecture registered as ``tiny``.

Used by the tests in tests/train/ (test_resume.py, test_distributed.py) and tests/test_cli.py as
``python tests/train/ddp_worker.py train ...`` (plain subprocess, killed mid-run for the resume
test) and under ``torchrun`` (DDP test); the tests import ``tiny`` from ``train.ddp_worker``. The
``tiny`` network keeps the papers' layout (a strided convolution, a hidden fully connected layer)
at a size whose MMR geometry costs milliseconds.

Under ``torchrun`` the worker also checks that ``mmr-ext train`` left no thread of the gloo backend
running (exit status 3 otherwise): threads still alive when the interpreter shuts down can abort
the process at exit (``terminate called without an active exception``, see ``Dist.close``), and
that abort is rare, while the surviving threads are seen every time.
"""
import os
import sys

from torch import nn

from mmr_ext import cli
from mmr_ext.nn import zoo as models  # the installed package, not the source tree


def tiny(in_shape, num_classes, *, normalize=None):
    """conv(2, 4x4, stride 4) - fc 12 - fc K."""
    c, h, w = in_shape
    return nn.Sequential(nn.Conv2d(c, 2, 4, stride=4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2 * (h // 4) * (w // 4), 12), nn.ReLU(), nn.Linear(12, num_classes))


models.MODELS.setdefault("tiny", tiny)


def backend_threads():
    """Names of this process's threads that belong to the gloo backend (``pt_gloo_runloop``,
    ``gloo_tcp_loop``); empty where ``/proc`` does not list threads."""
    names = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return names
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


if __name__ == "__main__":
    status = cli.main(sys.argv[1:])
    left = backend_threads() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else []
    if status == 0 and left:
        print(f"ddp_worker: rank {os.environ.get('RANK')}: gloo threads still running after "
              f"mmr-ext train returned: {left}", file=sys.stderr)
        status = 3
    sys.exit(status)
