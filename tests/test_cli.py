"""Command line: help, argument errors, a tiny end-to-end run, python -m."""
import json
import os
import subprocess
import sys

import pytest

from mmr_ext import cli
from mmr_ext.nn import zoo as models

from ddp_worker import tiny



@pytest.fixture(autouse=True)
def _tiny_model():
    models.MODELS.setdefault("tiny", tiny)
    yield


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_top_level_help(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "train" in out and "evaluate" in out


def test_train_help_lists_the_options(capsys):
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0
    for opt in ("--mode", "--preset", "--resume", "--lam", "--gamma", "--k-boundary", "--at-norm", "--eps",
                "--data-dir", "--epochs", "torchrun"):
        assert opt in out
    assert "10%%" not in out


def test_evaluate_help(capsys):
    code, out, _ = run_main(["evaluate", "--help"], capsys)
    assert code == 0 and "usage: mmr-ext evaluate" in out


def test_missing_subcommand(capsys):
    code, _, err = run_main([], capsys)
    assert code == 2 and "required" in err


@pytest.mark.parametrize("argv, words", [
    (["train", "--mode", "robust"], ["--mode", "invalid choice", "robust"]),
    (["train", "--eps", "1", "0.3"], ["--eps", "expected 3 arguments"]),
    (["train", "--eps", "1", "-0.3", "0.1"], ["--eps", "positive"]),
    (["train", "--eps", "1", "abc", "0.1"], ["--eps", "'abc' is not a number"]),
    (["train", "--at-eps", "1", "0", "0.1", "--mode", "at"], ["--at-eps", "positive"]),
    (["train", "--dataset", "mnist"], ["--data-dir", "not bundled"]),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/mmr"], ["--data-dir", "not a directory"]),
    (["train", "--dataset", "svhn"], ["--dataset", "unknown dataset"]),
    (["train", "--model", "vgg"], ["--model", "vgg"]),
    (["train", "--lam", "3"], ["--lam", "2 value(s)"]),
    (["train", "--mode", "mmr", "--p", "3"], ["--p", "1, 2, inf"]),
    (["train", "--epochs", "ten"], ["--epochs", "invalid int value"]),
    (["train", "--epochs", "0"], ["--epochs", ">= 1"]),
    (["train", "--mode", "plain", "--at-steps", "5"], ["--at-steps", "only used by modes at and mmr+at"]),
    (["train", "--lr", "-1"], ["--lr", "positive"]),
    (["train", "--device", "tpu"], ["--device", "is not a device"]),
])
def test_bad_arguments_exit_2_naming_the_argument(argv, words, capsys):
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "usage: mmr-ext train" in err
    for w in words:
        assert w in err, err


def test_tiny_run_prints_summary_and_writes_outputs(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--epochs", "2", "--batch-size", "32", "--train-subset", "64",
            "--test-subset", "50", "--cert-points", "10", "--final-cert-points", "20", "--out-dir", str(out_dir),
            "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "MMR-Universal tiny on mnist5k: 2 epochs" in out
    assert "test error:" in out and "union" in out and "median radius" in out
    for name in ("checkpoint.pt", "metrics.json", "metrics.csv", "training_curves.png", "summary.json"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["cert_points"] == 20 and summary["test_points"] == 50
    # running again into the same folder without --resume is refused with a usage error
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "--out-dir" in err and "--resume" in err
    # a mismatched resume is a clear runtime error (exit 1), not a silent restart
    assert cli.main(argv[:4] + ["3"] + argv[5:] + ["--resume"]) == 1
    assert "different configuration" in capsys.readouterr().err
    # resuming the finished run trains nothing and prints the summary again
    assert cli.main(argv + ["--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test error:" in out and "epoch" not in out.split("MMR-Universal")[0]


def test_resume_missing_checkpoint_is_an_error(tmp_path, capsys):
    assert cli.main(["train", "--model", "tiny", "--out-dir", str(tmp_path / "none"), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-m", "mmr_ext", "train", "--help"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and "usage: mmr-ext train" in res.stdout
    res = subprocess.run([sys.executable, "-m", "mmr_ext", "train", "--mode", "nope"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and "--mode" in res.stderr
