"""Test helper: the ``mmr-ext`` command line with a tiny architecture registered as ``tiny``.

Used by the tests in tests/train/ (test_resume.py, test_distributed.py) and tests/test_cli.py as
``python tests/train/ddp_worker.py train ...`` (plain subprocess, killed mid-run for the resume
test) and under ``torchrun`` (DDP test); the tests import ``tiny`` from ``train.ddp_worker``. The
``tiny`` network keeps the papers' layout (a strided convolution, a hidden fully connected layer)
at a size whose MMR geometry costs milliseconds.
"""
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

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
