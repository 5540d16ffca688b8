"""Distributed training: two gloo processes under torchrun train the same model as one process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mmr_ext.nn import zoo as models
from mmr_ext.train.checkpoint import load_checkpoint

from train.runs import WORKER, final_state, run_worker, tiny_args


def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    # 69 points in global batches of 16: the last batch (5 points) splits 3 / 2 over the ranks
    args = ["--epochs", "2", "--train-subset", "69", "--batch-size", "16", "--dtype", "float64",
            "--mode", "universal", "--cert-points", "0", "--eval-points", "0", "--lr", "0.003"]
    single = run_worker(tiny_args(tmp_path / "single", *args))
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), *tiny_args(tmp_path / "ddp", *args)]
    ddp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    # the worker exits with status 3 if gloo threads outlive train() (they can abort the exit)
    left = [line for line in ddp.stderr.splitlines() if "gloo threads still running" in line]
    assert not left, "the process group outlived train(): " + "; ".join(left)
    assert "terminate called" not in ddp.stderr, ddp.stderr[-3000:]
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "over 2 processes" in ddp.stdout
    a, b = final_state(tmp_path / "single"), final_state(tmp_path / "ddp")
    torch.manual_seed(0)
    init = models.build_model("tiny", (1, 28, 28), 10).double().state_dict()
    for k in a:
        assert (a[k] - init[k]).abs().max() > 1e-3, "training did not move the weights"
        torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-10)
    ma = json.loads((tmp_path / "single" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    for ra, rb in zip(ma, mb):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-9)
        assert rb["train_error"] == ra["train_error"]
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]["attack"]) == 2
