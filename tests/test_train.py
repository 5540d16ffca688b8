"""Training pipeline: schedules, configuration, training, checkpoints, exact resume, DDP."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmr_ext import checkpoint as ckpt_mod
from mmr_ext.nn import zoo as models
from mmr_ext.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mmr_ext.schedules import Schedule
from mmr_ext.train import ConfigError, TrainConfig, format_summary, resolve_config, train

from ddp_worker import tiny

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(autouse=True)
def _tiny_model():
    models.MODELS.setdefault("tiny", tiny)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_config(out_dir, **kw):
    """A run of a few seconds: the tiny network on the first points of mnist5k."""
    base = dict(model="tiny", epochs=2, batch_size=32, train_subset=96, test_subset=100, cert_points=20,
                final_cert_points=20, out_dir=str(out_dir), progress=False, plots=False, verbose=False,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def tiny_args(out_dir, *extra):
    return ["train", "--model", "tiny", "--batch-size", "32", "--train-subset", "96", "--test-subset", "100",
            "--cert-points", "10", "--final-cert-points", "10", "--out-dir", str(out_dir), "--no-progress",
            "--no-plots", "--threads", "1", *extra]


def run_worker(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
                          timeout=240, **kw)


def final_state(out_dir):
    return load_checkpoint(Path(out_dir) / "checkpoint.pt")["model_state"]


# ---------------------------------------------------------------------------------------------
# schedules

def test_paper_schedule_per_epoch():
    s = Schedule(epochs=100, k_start=0.2, k_end=0.05, warmup_epochs=10, lr_drop_epochs=10)
    assert s.k_boundary(0) == pytest.approx(0.2) and s.k_boundary(99) == pytest.approx(0.05)
    assert s.k_boundary(33) == pytest.approx(0.2 - 0.15 * 33 / 99)
    assert s.lam_scale(0) == pytest.approx(0.1) and s.lam_scale(5) == pytest.approx(0.55)
    assert s.lam_scale(10) == 1.0 and s.lam_scale(60) == 1.0
    assert [s.lr_scale(e) for e in (0, 89, 90, 99)] == [1.0, 1.0, 0.1, 0.1]
    # per-epoch: every step of an epoch sees the same values
    assert s.values(7, 0, 50) == s.values(7, 49, 50)


def test_step_schedule_scales_to_short_runs():
    s = Schedule(epochs=3, k_start=0.1, k_end=0.02, warmup_epochs=0.3, lr_drop_epochs=0.3, unit="step")
    assert s.k_boundary(0, 0, 10) == pytest.approx(0.1) and s.k_boundary(2, 9, 10) == pytest.approx(0.02)
    ks = [s.k_boundary(e, i, 10) for e in range(3) for i in range(10)]
    assert all(a > b for a, b in zip(ks, ks[1:]))
    assert s.lam_scale(0, 0, 10) == pytest.approx(0.1) and s.lam_scale(0, 1, 10) == pytest.approx(0.4)
    assert s.lam_scale(0, 3, 10) == 1.0
    assert s.lr_scale(2, 6, 10) == 1.0 and s.lr_scale(2, 7, 10) == 0.1
    assert Schedule.from_state_dict(s.state_dict()) == s


@pytest.mark.parametrize("kw, word", [(dict(epochs=0), "epochs"), (dict(epochs=5, k_start=0), "k_start"),
                                      (dict(epochs=5, k_end=1.5), "k_end"),
                                      (dict(epochs=5, warmup_epochs=6), "warmup_epochs"),
                                      (dict(epochs=5, unit="batch"), "unit")])
def test_schedule_rejects_bad_values(kw, word):
    with pytest.raises(ValueError, match=word):
        Schedule(**kw)


# ---------------------------------------------------------------------------------------------
# configuration

def test_paper_defaults_per_dataset(tmp_path):
    c = resolve_config(TrainConfig(dataset="mnist", data_dir=str(tmp_path)))
    assert c.preset == "paper" and c.epochs == 100 and c.batch_size == 128 and c.schedule_unit == "epoch"
    assert c.lam == (3.0, 12.0) and c.gamma == (1.0, 0.15) and c.lr == 5e-4
    assert c.k_boundary == (0.2, 0.05) and c.warmup_epochs == 10 and c.lr_drop_epochs == 10
    assert c.eps == (1.0, 0.3, 0.1) and c.augment is False
    assert resolve_config(TrainConfig(dataset="fashion-mnist", data_dir=str(tmp_path))).lam == (3.0, 40.0)
    cifar = resolve_config(TrainConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert cifar.lam == (1.0, 6.0) and cifar.lr == 1e-3 and cifar.augment is True
    assert cifar.eps == pytest.approx((2.0, 0.1, 2 / 255))
    gts = resolve_config(TrainConfig(dataset="gtsrb", data_dir=str(tmp_path)))
    assert gts.lam == (3.0, 12.0) and gts.lr == 1e-3
    mmr = resolve_config(TrainConfig(mode="mmr", p="l2", dataset="mnist", data_dir=str(tmp_path)))
    assert mmr.p == "2" and mmr.k_boundary == (0.1, 0.02) and mmr.gamma == pytest.approx((0.45, 0.45))
    assert mmr.lr == 1e-4 and mmr.k_decision is None
    at = resolve_config(TrainConfig(mode="at", dataset="mnist", data_dir=str(tmp_path)))
    assert at.at_norm == "max" and at.at_steps == 40 and at.at_clean_fraction == 0.0 and at.lam is None
    mat = resolve_config(TrainConfig(mode="mmr+at", p=1, dataset="cifar10", data_dir=str(tmp_path)))
    assert mat.at_norm == "1" and mat.at_clean_fraction == 0.5 and mat.at_steps == 10


def test_demo_preset_and_overrides():
    c = resolve_config(TrainConfig())
    assert c.preset == "demo" and c.mode == "universal" and c.model == "cnn" and c.schedule_unit == "step"
    assert c.lam == (3.0, 12.0) and c.gamma == (1.0, 0.15)
    c = resolve_config(TrainConfig(epochs=7, batch_size=16, lr="1/1000", eps=["1", "0.3", "2/255"]))
    assert (c.epochs, c.batch_size, c.lr) == (7, 16, 1e-3)
    assert c.warmup_epochs == pytest.approx(0.7) and c.eps[2] == pytest.approx(2 / 255)


@pytest.mark.parametrize("kw, argument", [
    (dict(mode="robust"), "mode"), (dict(dataset="imagenet"), "dataset"), (dict(dataset="mnist"), "data_dir"),
    (dict(dataset="cifar10", data_dir="/nonexistent/dir"), "data_dir"), (dict(model="resnet"), "model"),
    (dict(lam=[3.0]), "lam"), (dict(gamma=[1.0, -0.1]), "gamma"), (dict(eps=[1, 0.3]), "eps"),
    (dict(eps=[1, 0, 0.1]), "eps"), (dict(eps=[1, "x", 0.1]), "eps"), (dict(epochs=0), "epochs"),
    (dict(batch_size=2.5), "batch_size"), (dict(k_boundary=[0.2, 1.5]), "k_boundary"),
    (dict(mode="mmr", p=3), "p"), (dict(mode="at", at_norm="l0"), "at_norm"),
    (dict(mode="at", at_clean_fraction=1.0), "at_clean_fraction"), (dict(at_steps=10), "at_steps"),
    (dict(mode="plain", lam=[1.0]), "lam"), (dict(warmup_epochs=100), "warmup_epochs"),
    (dict(dtype="float16"), "dtype"), (dict(device="tpu"), "device"), (dict(preset="fast"), "preset"),
    (dict(schedule_unit="batch"), "schedule_unit"), (dict(mode="mmr", k_decision=11), "k_decision"),
])
def test_bad_options_name_the_argument(kw, argument):
    with pytest.raises(ConfigError) as info:
        resolve_config(TrainConfig(**kw))
    assert info.value.argument == argument and str(info.value).startswith(argument)


# ---------------------------------------------------------------------------------------------
# training

def test_short_universal_run_reduces_regularizer_and_error(tmp_path):
    # constant k_B and λ so that the objective itself does not move
    cfg = tiny_config(tmp_path, epochs=8, train_subset=256, lr=2e-2, k_boundary=[0.1], warmup_epochs=0,
                      lr_drop_epochs=0, lam=[0.1, 0.4], cert_points=0, final_cert_points=30, plots=True)
    result = train(cfg)
    m = result.metrics
    assert [r["epoch"] for r in m] == list(range(1, 9))
    assert m[-1]["train_regularizer"] < 0.6 * m[0]["train_regularizer"]
    assert m[-1]["train_error"] < m[0]["train_error"] - 0.2
    assert m[-1]["train_loss"] < m[0]["train_loss"]
    assert m[-1]["train_regularizer"] == pytest.approx(m[-1]["train_boundary"] + m[-1]["train_decision"])
    assert all(math.isfinite(r["test_error"]) for r in m)
    s = result.summary
    assert 0 <= s["test_error"] <= 1 and s["cert_points"] == 30 and s["test_points"] == 100
    for key in ("cert_l1", "cert_l2", "cert_linf", "cert_union", "cert_union_universal"):
        assert 0 <= s[key] <= 1
    assert s["cert_union"] <= min(s["cert_l1"], s["cert_l2"], s["cert_linf"])
    text = format_summary(s)
    assert "test error" in text and "union" in text and "linf" in text
    # outputs
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(lines) == 9 and lines[0].startswith("epoch,")
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())["test_error"] == s["test_error"]
    ck = load_checkpoint(tmp_path / "checkpoint.pt", require_training_state=True)
    assert ck["epoch"] == 8 and ck["model_name"] == "tiny" and ck["num_classes"] == 10
    assert ck["in_shape"] == [1, 28, 28] and ck["config"]["lr"] == 2e-2
    for name, t in result.model.state_dict().items():
        assert torch.equal(ck["model_state"][name], t)


def test_certificates_tracked_each_epoch(tmp_path):
    result = train(tiny_config(tmp_path, epochs=2, cert_points=15, cert_every=1))
    for row in result.metrics:
        assert row["cert_points"] == 15
        assert 0 <= row["cert_union"] <= row["cert_linf"] <= 1
        assert row["median_radius_l2"] >= 0


@pytest.mark.parametrize("mode, extra", [
    ("plain", {}),
    ("mmr", dict(p="1")),
    ("at", dict(at_norm="2", at_steps=2)),
    ("at", dict(at_norm="max", at_steps=2)),
    ("mmr+at", dict(p="inf", at_steps=2)),
])
def test_every_mode_trains(tmp_path, mode, extra):
    result = train(tiny_config(tmp_path, mode=mode, epochs=1, train_subset=64, cert_points=0,
                               final_cert_points=0, **extra))
    row = result.metrics[0]
    assert math.isfinite(row["train_loss"]) and 0 <= row["train_error"] <= 1
    assert (row["train_regularizer"] is not None) == mode.startswith("mmr")
    assert "cert_points" not in result.summary


def test_training_is_deterministic(tmp_path):
    a = train(tiny_config(tmp_path / "a", epochs=1, train_subset=64, final_cert_points=0))
    b = train(tiny_config(tmp_path / "b", epochs=1, train_subset=64, final_cert_points=0))
    c = train(tiny_config(tmp_path / "c", epochs=1, train_subset=64, final_cert_points=0, seed=1))
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# checkpoints and resume

def test_resume_from_intermediate_checkpoint_is_exact(tmp_path):
    kw = dict(epochs=3, train_subset=64, mode="universal", cert_points=0, final_cert_points=0,
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


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    # 60 steps per epoch (about a second here): the kill lands well inside the second epoch
    args = ["--epochs", "3", "--train-subset", "1920", "--mode", "universal", "--final-cert-points", "0",
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


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model_name": "tiny", "in_shape": [1, 28, 28], "num_classes": 10, "model_state": {}})

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model_name": "other"})
    monkeypatch.undo()
    assert load_checkpoint(path)["model_name"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_corrupt_and_mismatched_checkpoints_raise(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, epochs=2, train_subset=32, cert_points=0, final_cert_points=0))
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
    done = train(tiny_config(run, epochs=2, train_subset=32, resume="auto", final_cert_points=0))
    model, _ = ckpt_mod.load_model(run / "checkpoint.pt")
    assert all(torch.equal(v, done.model.state_dict()[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------
# distributed

def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    # 69 points in global batches of 16: the last batch (5 points) splits 3 / 2 over the ranks
    args = ["--epochs", "2", "--train-subset", "69", "--batch-size", "16", "--dtype", "float64",
            "--mode", "universal", "--cert-points", "0", "--final-cert-points", "0", "--lr", "0.003"]
    single = run_worker(tiny_args(tmp_path / "single", *args))
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), *tiny_args(tmp_path / "ddp", *args)]
    ddp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
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
