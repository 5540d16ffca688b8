"""Command line: help, argument errors, a tiny end-to-end run, python -m, mmr-ext evaluate."""
import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from mmr_ext import cli
from mmr_ext.nn import zoo as models

from faults import fail_writes
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
    (["train", "--model", "/nonexistent/net.py:build"], ["--model", "does not exist"]),
    (["train", "--model", "no_such_package.nets:build"], ["--model", "cannot be imported"]),
    (["train", "--model", "json:no_such_builder"], ["--model", "has no function 'no_such_builder'"]),
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
            "--test-subset", "50", "--cert-points", "10", "--eval-points", "20", "--out-dir", str(out_dir),
            "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "MMR-Universal tiny on mnist5k: 2 epochs" in out
    assert "test error:" in out and "union" in out and "LB" in out and "certified against every" in out
    for name in ("checkpoint.pt", "metrics.json", "metrics.csv", "training_curves.png", "summary.json",
                 "evaluation.json", "robustness_curves.json", "robustness_curves.png"):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["eval_points"] == 20 and summary["test_points"] == 50
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


USER_NETWORK = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2, 4, stride=4)
        self.fc = nn.Linear(2 * 7 * 7, 12)
        self.out = nn.Linear(12, classes)

    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        return self.out(F.relu(self.fc(x)))


def build(in_shape, num_classes):
    return Net(in_shape[0], num_classes)
"""


def test_train_and_evaluate_a_network_from_the_users_file(tmp_path, capsys, monkeypatch):
    """--model path/to/file.py:function trains a class model (traced); the checkpoint records the
    builder with an absolute path, so evaluate rebuilds it from another working directory."""
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "mynet.py").write_text(USER_NETWORK)
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "run"
    argv = ["train", "--model", "nets/mynet.py:build", "--epochs", "1", "--batch-size", "32", "--train-subset",
            "64", "--test-subset", "20", "--cert-points", "5", "--eval-points", "5", "--out-dir", str(out_dir),
            "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 0
    assert "MMR-Universal build on mnist5k" in capsys.readouterr().out
    ckpt = torch.load(out_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["model_name"] == f"{tmp_path / 'nets' / 'mynet.py'}:build"
    monkeypatch.chdir(out_dir)
    args = parse_evaluate([str(out_dir / "checkpoint.pt"), "--n-points", "3", "--attack-steps", "2", "--fmn-steps",
                           "2", "--norms", "inf", "--out", str(out_dir / "eval.json"), "--no-progress"])
    assert cli.run_evaluate(args) == 0
    assert json.loads((out_dir / "eval.json").read_text())["n"] == 3


GRAPH_NETWORKS = """
import torch.nn.functional as F
from torch import nn


class PoolNet(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2, 4, stride=4)
        self.out = nn.Linear(2 * 3 * 3, classes)

    def forward(self, x):
        return self.out(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


class ResidualNet(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2, 4, stride=4)
        self.fc = nn.Linear(2 * 7 * 7, 2 * 7 * 7)
        self.out = nn.Linear(2 * 7 * 7, classes)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.out(F.relu(h + self.fc(h)))


def pool(in_shape, num_classes):
    return PoolNet(in_shape[0], num_classes)


def residual(in_shape, num_classes):
    return ResidualNet(in_shape[0], num_classes)
"""


@pytest.mark.parametrize("builder", ["pool", "residual"])
def test_train_and_evaluate_graph_networks_end_to_end(tmp_path, capsys, builder):
    """A max-pooling CNN and a residual network written as classes train with MMR-Universal and
    evaluate with attacks, region certificate, bound propagation and MIP."""
    (tmp_path / "graphs.py").write_text(GRAPH_NETWORKS)
    out_dir = tmp_path / "run"
    argv = ["train", "--model", f"{tmp_path / 'graphs.py'}:{builder}", "--epochs", "1", "--batch-size", "32",
            "--train-subset", "64", "--test-subset", "20", "--cert-points", "5", "--eval-points", "5",
            "--out-dir", str(out_dir), "--no-progress", "--threads", "1"]
    assert cli.main(argv) == 0
    assert f"MMR-Universal {builder} on mnist5k" in capsys.readouterr().out
    args = parse_evaluate([str(out_dir / "checkpoint.pt"), "--n-points", "4", "--attack-steps", "2", "--fmn-steps",
                           "2", "--norms", "1", "inf", "--mip", "--mip-time-limit", "20", "--out",
                           str(out_dir / "eval.json"), "--no-progress"])
    assert cli.run_evaluate(args) == 0
    result = json.loads((out_dir / "eval.json").read_text())
    assert result["n"] == 4


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


# ------------------------------------------------------------------------------------------
# no silent wrong answers, no lost work: outputs checked before any work, I/O failures named,
# resumable evaluation, a clear --device error

ev = importlib.import_module("mmr_ext.evaluation")


@pytest.fixture(scope="module")
def fc1_state():
    """fc1 trained for a few steps on mnist5k: most test points correct, some attacked or certified."""
    from mmr_ext.nn.zoo import build_model
    from mmr_ext.train import load_dataset

    torch.manual_seed(0)
    model = build_model("fc1", (1, 28, 28), 10)
    data = load_dataset("mnist5k", split="train")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(0, 1024, 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.images[i:i + 64]), data.labels[i:i + 64]).backward()
        opt.step()
    return model.state_dict()


@pytest.fixture
def fc1_checkpoint(tmp_path, fc1_state):
    from mmr_ext.train.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "checkpoint.pt", {
        "model_name": "fc1", "in_shape": [1, 28, 28], "num_classes": 10,
        "model_state": fc1_state, "dtype": "float32"})


def small_eval(ckpt, out, *extra):
    return [str(ckpt), "--n-points", "6", "--batch-size", "2", "--attack-steps", "3", "--fmn-steps", "3",
            "--attack-restarts", "2", "--norms", "1", "inf", "--no-progress"] \
        + (["--out", str(out)] if out is not None else []) + list(extra)


def deny_access(monkeypatch, folder):
    """os.access says 'not writable' for ``folder``: chmod does not stop root, who runs the tests."""
    real = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode, **kw: False if os.path.abspath(p) == str(folder) else real(p, mode, **kw))


def no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(ev, "evaluate", boom)
    monkeypatch.setattr("mmr_ext.train.load_model", boom)


@pytest.mark.parametrize("case", ["folder", "under_file", "denied", "records_folder"])
def test_evaluate_rejects_an_unwritable_out_before_any_work(tmp_path, fc1_checkpoint, monkeypatch, capsys, case):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "ro").mkdir()
    out = {"folder": tmp_path / "ro", "under_file": tmp_path / "plain" / "eval.json",
           "denied": tmp_path / "ro" / "eval.json", "records_folder": tmp_path / "e.json"}[case]
    if case == "denied":
        deny_access(monkeypatch, tmp_path / "ro")
    if case == "records_folder":
        (tmp_path / "e.points.jsonl").mkdir()
    no_work(monkeypatch)
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out))) == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and "Traceback" not in err
    named = tmp_path / "e.points.jsonl" if case == "records_folder" else out
    assert f"'{named}'" in err
    assert {"folder": "is a folder", "under_file": "is a regular file", "denied": "permission denied",
            "records_folder": "is a folder"}[case] in err


@pytest.mark.parametrize("case", ["file", "under_file", "denied"])
def test_train_rejects_an_unwritable_out_dir_before_any_work(tmp_path, monkeypatch, capsys, case):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "ro").mkdir()
    out_dir = {"file": tmp_path / "plain", "under_file": tmp_path / "plain" / "run",
               "denied": tmp_path / "ro" / "run"}[case]
    if case == "denied":
        deny_access(monkeypatch, tmp_path / "ro")

    def boom(*a, **k):
        raise AssertionError("work started before --out-dir was checked")

    monkeypatch.setattr("mmr_ext.train.loop.load_dataset", boom)
    code, _, err = run_main(["train", "--model", "tiny", "--out-dir", str(out_dir), "--no-progress"], capsys)
    assert code == 2 and "usage: mmr-ext train" in err
    assert "argument --out-dir" in err and f"'{out_dir}'" in err and "Traceback" not in err
    assert {"file": "not a folder", "under_file": "is a regular file", "denied": "permission denied"}[case] in err
    assert not (tmp_path / "ro" / "run").exists()


def test_evaluate_cuda_without_a_gpu_says_so(fc1_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, None, "--device", device))) == 2
        err = capsys.readouterr().err
        assert f"--device: {device} requested but torch.cuda.is_available() is False" in err
        assert "corrupt" not in err and "unreadable" not in err


class Interrupt:
    """Replaces the region certificate of evaluate (one call per batch); Ctrl-C at call ``at``."""

    def __init__(self, at=None):
        self.at, self.calls, self.real = at, 0, ev._region_radii

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*a, **kw)


def results(path):
    data = json.loads(path.read_text())
    data.pop("timing")
    return data


def test_the_small_evaluation_decides_points_both_ways(tmp_path, fc1_checkpoint):
    out = tmp_path / "e.json"
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out))) == 0
    table = json.loads(out.read_text())["table"]
    assert table["TE"] < 50 and table["linf"]["LB"] > table["TE"] and table["l1"]["UB"] < 100


def test_evaluate_resume_after_an_interrupt_equals_an_uninterrupted_run(tmp_path, fc1_checkpoint, monkeypatch,
                                                                       capsys):
    ref = tmp_path / "ref.json"
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, ref))) == 0
    assert (tmp_path / "ref.points.jsonl").is_file()
    out = tmp_path / "eval.json"
    capsys.readouterr()
    monkeypatch.setattr(ev, "_region_radii", Interrupt(at=3))  # two of the three batches finish
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out))) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "eval.points.jsonl" in err
    assert not out.exists()
    # the same command again is refused: the finished points would be lost
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out))) == 2
    assert "--resume" in capsys.readouterr().err
    count = Interrupt()
    monkeypatch.setattr(ev, "_region_radii", count)
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out, "--resume"))) == 0
    assert count.calls == 1
    assert results(out) == results(ref)
    # resuming with other options is refused, naming the difference
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out, "--resume", "--seed", "1"))) == 1
    assert "settings.seed: 0 in the file, 1 requested" in capsys.readouterr().err
    # --overwrite starts afresh
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out, "--overwrite"))) == 0
    assert count.calls == 4 and results(out) == results(ref)
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, None, "--resume"))) == 2
    assert "--resume needs --out" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["eval.points.jsonl", "eval.json"])
def test_evaluate_disk_full_mid_run_names_the_file_and_keeps_the_points(tmp_path, fc1_checkpoint, monkeypatch,
                                                                        capsys, target):
    ref = tmp_path / "ref.json"
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, ref))) == 0
    out = tmp_path / "eval.json"
    # the header and the first batch reach the disk, the second batch does not; or the final JSON fails
    failed = fail_writes(monkeypatch, target, after=2 if target.endswith("jsonl") else 0)
    capsys.readouterr()
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out))) == 1
    err = capsys.readouterr().err
    assert failed and "Traceback" not in err
    assert f"'{tmp_path / target}'" in err and "No space left on device" in err and "--resume" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt", "eval.points.jsonl", "ref.json", "ref.points.jsonl"]
    monkeypatch.undo()
    count = Interrupt()
    monkeypatch.setattr(ev, "_region_radii", count)
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out, "--resume"))) == 0
    assert count.calls == (2 if target.endswith("jsonl") else 0)
    assert results(out) == results(ref)


def test_evaluate_curves_and_json(tmp_path, fc1_checkpoint, capsys):
    out = tmp_path / "eval.json"
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, out, "--curves", "--json"))) == 0
    printed = json.loads(capsys.readouterr().out)  # only JSON on stdout
    assert printed["table"] == json.loads(out.read_text())["table"]
    curves = json.loads((tmp_path / "eval_curves.json").read_text())
    assert printed["curves"] == curves and set(curves["curves"]) == {"l1", "linf", "union"}
    at1 = curves["scales"].index(1.0)
    assert curves["curves"]["union"]["certified"][at1] == pytest.approx(100 - printed["table"]["union"]["UB"])
    assert (tmp_path / "eval_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an explicit name; not a .png, or an unwritable place, is refused before any work
    png = tmp_path / "figs" / "c.png"
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, None, "--curves", str(png)))) == 0
    assert png.is_file() and png.with_suffix(".json").is_file()
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, None, "--curves", "c.txt"))) == 2
    assert "--curves" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.run_evaluate(parse_evaluate(small_eval(fc1_checkpoint, None, "--curves",
                                                      str(tmp_path / "file" / "c.png")))) == 2
