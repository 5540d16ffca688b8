"""Helpers of the training tests (``from train.runs import ...``): tiny runs of ``mmr-ext train``, in
this process and as the worker script ``ddp_worker.py``."""
import os
import subprocess
import sys
from pathlib import Path

from mmr_ext.train import TrainConfig
from mmr_ext.train.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")


def tiny_config(out_dir, **kw):
    """A run of a few seconds: the tiny network on the first points of mnist5k."""
    base = dict(model="tiny", epochs=2, batch_size=32, train_subset=96, test_subset=100, cert_points=20,
                eval_points=20, out_dir=str(out_dir), progress=False, plots=False, verbose=False,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def tiny_args(out_dir, *extra):
    return ["train", "--model", "tiny", "--batch-size", "32", "--train-subset", "96", "--test-subset", "100",
            "--cert-points", "10", "--eval-points", "10", "--out-dir", str(out_dir), "--no-progress",
            "--no-plots", "--threads", "1", *extra]


def run_worker(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
                          timeout=240, **kw)


def final_state(out_dir):
    return load_checkpoint(Path(out_dir) / "checkpoint.pt")["model_state"]
