"""Command line: help, argument errors, a tiny end-to-end run, python -m, mmr-ext evaluate."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from mmr_ext import cli
from mmr_ext.nn import zoo as models

from train.ddp_worker import tiny



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


# ------------------------------------------------------------------------------------------
# mmr-ext evaluate (moved from tests/test_evaluate.py with the command line)

def parse_evaluate(argv):
    """The options of ``mmr-ext evaluate`` parsed alone."""
    parser = argparse.ArgumentParser()
    cli.add_evaluate_arguments(parser)
    return parser.parse_args(argv)


def test_evaluate_from_checkpoint(tmp_path, capsys):
    from mmr_ext.train.checkpoint import save_checkpoint
    from mmr_ext.nn.zoo import build_model

    torch.manual_seed(0)
    model = build_model("fc1", (1, 28, 28), 10)
    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", {
        "model_name": "fc1", "in_shape": [1, 28, 28], "num_classes": 10,
        "model_state": model.state_dict(), "dtype": "float32"})
    out = tmp_path / "eval.json"
    args = parse_evaluate([str(ckpt), "--n-points", "4", "--attack-steps", "3", "--fmn-steps", "3",
                           "--norms", "1", "inf", "--out", str(out), "--no-progress"])
    assert cli.run_evaluate(args) == 0
    data = json.loads(out.read_text())
    assert data["n"] == 4 and data["eps"] == {"l1": 1.0, "linf": 0.1}  # MNIST defaults
    assert data["settings"]["dataset"] == "mnist5k" and data["settings"]["model"] == "fc1"
    printed = capsys.readouterr().out
    assert "TE" in printed and "l1+linf" in printed
    args = parse_evaluate([str(ckpt), "--n-points", "2", "--attack-steps", "2", "--fmn-steps", "2",
                           "--eps", "0.5", "0.2", "4/255", "--norms", "linf", "--no-bounds", "--no-progress"])
    assert cli.run_evaluate(args) == 0
    assert "eps=4/255" in capsys.readouterr().out


def test_evaluate_reports_problems(tmp_path, capsys):
    assert cli.run_evaluate(parse_evaluate([str(tmp_path / "missing.pt"), "--no-progress"])) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.run_evaluate(parse_evaluate([str(tmp_path / "missing.pt"), "--n-points", "0"])) == 1
    assert "--n-points" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_evaluate(["ckpt.pt", "--eps", "1", "x", "0.1"])
