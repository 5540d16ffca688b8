"""Exact resume (from an intermediate checkpoint and after a kill) and the errors of corrupt or
mismatched checkpoints."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmr_ext.train import ConfigError, train
from mmr_ext.train import checkpoint as ckpt_mod
from mmr_ext.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from faults import fail_writes
from train.runs import WORKER, final_state, run_worker, tiny_args, tiny_config


def test_resume_from_intermediate_checkpoint_is_exact(tmp_path):
    kw = dict(epochs=3, train_subset=64, mode="universal", cert_points=0, eval_points=0,
              keep_checkpoints=True)
    full = train(tiny_config(tmp_path / "full", **kw))
    assert (tmp_path / "full" / "epoch_002.pt").exists()
    part = tmp_path / "part"
    part.mkdir()
    (part / "checkpoint.pt").write_bytes((tmp_path / "full" / "epoch_002.pt").read_bytes())
    resumed = train(tiny_config(part, resume="auto", **kw))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2, 3]
    assert resumed.metrics[:2] == full.metrics[:2]
    # the row engine's plan of the next step travels with the checkpoint
    state = load_checkpoint(tmp_path / "full" / "epoch_002.pt")["sparsity_state"]
    names = dict(full.model.named_modules())
    assert state and all(name in names and 0.0 <= v <= 1.0 for name, v in state.items())


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    # 60 steps per epoch (about a second here): the kill lands well inside the second epoch
    args = ["--epochs", "3", "--train-subset", "1920", "--mode", "universal", "--eval-points", "0",
            "--cert-points", "0", "--seed", "3"]
    ref = run_worker(tiny_args(tmp_path / "ref", *args))
    assert ref.returncode == 0, ref.stderr
    killed_dir = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(WORKER), *tiny_args(killed_dir, *args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (killed_dir / "checkpoint.pt").exists():
            assert proc.poll() is None, "the run ended before writing its first checkpoint"
            assert time.time() < deadline, "no checkpoint after 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epoch = load_checkpoint(killed_dir / "checkpoint.pt")["epoch"]
    assert 1 <= epoch < 3, "the run was not interrupted mid-training"
    # without --resume the existing run is protected
    again = run_worker(tiny_args(killed_dir, *args))
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_worker(tiny_args(killed_dir, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = final_state(tmp_path / "ref"), final_state(killed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    rb = json.loads((killed_dir / "metrics.json").read_text())
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]


def test_corrupt_and_mismatched_checkpoints_raise(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, epochs=2, train_subset=32, cert_points=0, eval_points=0))
    good = (run / "checkpoint.pt").read_bytes()

    # an existing run is never overwritten silently, and never silently restarted
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(run, epochs=2, train_subset=32))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_config(tmp_path / "empty", epochs=2, resume="auto"))
    # a different configuration
    with pytest.raises(CheckpointError, match="lr: 0.001 in the checkpoint, 0.01 requested"):
        train(tiny_config(run, epochs=2, train_subset=32, lr=0.01, resume="auto"))
    with pytest.raises(CheckpointError, match="epochs"):
        train(tiny_config(run, epochs=3, train_subset=32, resume="auto"))
    # truncated and garbage files
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        train(tiny_config(run, epochs=2, train_subset=32, resume="auto"))
    (run / "checkpoint.pt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(run / "checkpoint.pt")
    torch.save({"weights": torch.zeros(3)}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not an mmr_ext checkpoint"):
        load_checkpoint(run / "checkpoint.pt")
    # model-only and tampered checkpoints
    (run / "checkpoint.pt").write_bytes(good)
    ck = load_checkpoint(run / "checkpoint.pt")
    partial = {k: v for k, v in ck.items() if k not in ("format", "version", "optimizer_state")}
    save_checkpoint(run / "checkpoint.pt", partial)
    with pytest.raises(CheckpointError, match="optimizer_state"):
        train(tiny_config(run, epochs=2, train_subset=32, resume="auto"))
    bad = {k: v for k, v in ck.items() if k not in ("format", "version")}
    bad["model_state"] = {k: v[..., :1] for k, v in ck["model_state"].items()}
    save_checkpoint(run / "checkpoint.pt", bad)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        train(tiny_config(run, epochs=2, train_subset=32, resume="auto"))
    with pytest.raises(CheckpointError, match="weights do not fit"):
        ckpt_mod.load_model(run / "checkpoint.pt")
    bad = {k: v for k, v in ck.items() if k not in ("format", "version")}
    bad["version"] = 99
    torch.save({"format": ckpt_mod.FORMAT, **bad}, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(run / "checkpoint.pt")
    # a finished run resumed: nothing left to train, same weights
    (run / "checkpoint.pt").write_bytes(good)
    done = train(tiny_config(run, epochs=2, train_subset=32, resume="auto", eval_points=0))
    model, _ = ckpt_mod.load_model(run / "checkpoint.pt")
    assert all(torch.equal(v, done.model.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("target, error", [("checkpoint.pt", errno.ENOSPC), ("metrics.json", errno.EACCES)])
def test_write_failure_mid_run_is_a_clear_error_and_the_run_resumes(tmp_path, monkeypatch, capsys, target, error):
    """The disk fills up (or permissions change) while epoch 2 is saved: the CLI names the file,
    the epoch-1 checkpoint stays loadable, no temporary file is left, and --resume finishes the run
    with the weights of an uninterrupted one."""
    from mmr_ext import cli

    args = tiny_args(tmp_path / "run", "--epochs", "3", "--eval-points", "0", "--cert-points", "0")
    assert cli.main(tiny_args(tmp_path / "ref", *args[len(tiny_args(tmp_path / "run")):])) == 0
    failed = fail_writes(monkeypatch, target, after=1, error=error)
    capsys.readouterr()
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert failed and "Traceback" not in err
    assert f"'{tmp_path / 'run' / target}'" in err and os.strerror(error) in err
    assert "--resume" in err and "checkpoint.pt' is intact" in err
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["epoch"] == (1 if target == "checkpoint.pt" else 2)
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert cli.main(args + ["--resume"]) == 0
    a, b = final_state(tmp_path / "ref"), final_state(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_final_evaluation_resumes_to_the_same_table(tmp_path, monkeypatch):
    import importlib

    protocol = importlib.import_module("mmr_ext.train.protocol")
    evaluation = importlib.import_module("mmr_ext.evaluation")
    real = protocol.evaluate
    stop_after = {"batches": None}

    def small_batches(*a, **k):  # 12 points in 3 batches; optionally interrupted after some of them
        k["batch_size"] = 4
        inner, done = k["on_batch"], [0]

        def on_batch(n):
            inner(n)
            done[0] += 1
            if done[0] == stop_after["batches"]:
                raise KeyboardInterrupt
        k["on_batch"] = on_batch
        return real(*a, **k)
    monkeypatch.setattr(protocol, "evaluate", small_batches)
    kw = dict(epochs=1, train_subset=64, cert_points=0, eval_points=12, curves=False)
    ref = train(tiny_config(tmp_path / "ref", **kw))

    run = tmp_path / "run"
    stop_after["batches"] = 2
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run, **kw))
    lines = (run / "evaluation.points.jsonl").read_text().splitlines()
    assert sum('"batch"' in line for line in lines) == 2
    stop_after["batches"] = None
    pgd_calls = []
    real_pgd = evaluation.pgd
    monkeypatch.setattr(evaluation, "pgd", lambda *a, **k: pgd_calls.append(1) or real_pgd(*a, **k))
    resumed = train(tiny_config(run, resume="auto", **kw))
    assert len(pgd_calls) == 3  # only the last batch is attacked again (once per norm)
    assert resumed.summary["eval"] == ref.summary["eval"]
    assert json.loads((run / "evaluation.json").read_text())["points"] == \
        json.loads((tmp_path / "ref" / "evaluation.json").read_text())["points"]
