"""The training loop: a short run reduces the objective and writes its outputs, every mode trains,
certificates each epoch, determinism."""
import json
import math

import pytest
import torch

from mmr_ext.train import format_summary, train
from mmr_ext.train.checkpoint import load_checkpoint

from train.runs import tiny_config


def test_short_universal_run_reduces_regularizer_and_error(tmp_path):
    # constant k_B and λ so that the objective itself does not move
    cfg = tiny_config(tmp_path, epochs=8, train_subset=256, lr=2e-2, k_boundary=[0.1], warmup_epochs=0,
                      lr_drop_epochs=0, lam=[0.1, 0.4], cert_points=0, eval_points=30, plots=True)
    result = train(cfg)
    m = result.metrics
    assert [r["epoch"] for r in m] == list(range(1, 9))
    assert m[-1]["train_regularizer"] < 0.6 * m[0]["train_regularizer"]
    assert m[-1]["train_error"] < m[0]["train_error"] - 0.2
    assert m[-1]["train_loss"] < m[0]["train_loss"]
    assert m[-1]["train_regularizer"] == pytest.approx(m[-1]["train_boundary"] + m[-1]["train_decision"])
    assert all(math.isfinite(r["test_error"]) for r in m)
    s = result.summary
    assert 0 <= s["test_error"] <= 1 and s["eval_points"] == 30 and s["test_points"] == 100
    table = s["eval"]
    for key in ("l1", "l2", "linf"):
        assert 0 <= table[key]["LB"] <= table[key]["UB"] <= 100
        assert table["union"]["LB"] >= table[key]["LB"] and table["union"]["UB"] >= table[key]["UB"]
    assert table["TE"] <= min(table[key]["LB"] for key in ("l1", "l2", "linf"))
    # the summary's table is the one of the evaluation written next to it
    assert json.loads((tmp_path / "evaluation.json").read_text())["table"] == table
    curves = json.loads((tmp_path / "robustness_curves.json").read_text())["curves"]
    assert curves["union"]["certified"][curves["union"]["eps"]["l1"].index(1.0)] == pytest.approx(
        100 - table["union"]["UB"])
    assert (tmp_path / "robustness_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_summary(s)
    assert "test error" in text and "union" in text and "linf" in text and "certified against every" in text
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
    result = train(tiny_config(tmp_path, epochs=3, cert_points=15, cert_every=1, eval_points=20))
    first, *_, last = result.metrics
    for row in result.metrics:
        assert 0 <= row["cert_union"] <= row["cert_linf"] <= 1
    assert first["cert_points"] == 15 and first["median_radius_l2"] >= 0
    # the last epoch shows what the final evaluation measured (not a second certification)
    table = result.summary["eval"]
    assert last["cert_points"] == 20
    for key in ("l1", "l2", "linf", "union"):
        assert last[f"cert_{key}"] == pytest.approx(1 - table[key]["UB"] / 100)
    assert json.loads((tmp_path / "metrics.json").read_text())[-1]["cert_points"] == 20


@pytest.mark.parametrize("mode, extra", [
    ("plain", {}),
    ("mmr", dict(p="1")),
    ("at", dict(at_norm="2", at_steps=2)),
    ("at", dict(at_norm="max", at_steps=2)),
    ("mmr+at", dict(p="inf", at_steps=2)),
])
def test_every_mode_trains(tmp_path, mode, extra):
    result = train(tiny_config(tmp_path, mode=mode, epochs=1, train_subset=64, cert_points=0,
                               eval_points=0, **extra))
    row = result.metrics[0]
    assert math.isfinite(row["train_loss"]) and 0 <= row["train_error"] <= 1
    assert (row["train_regularizer"] is not None) == mode.startswith("mmr")
    assert "eval" not in result.summary


def test_training_is_deterministic(tmp_path):
    a = train(tiny_config(tmp_path / "a", epochs=1, train_subset=64, eval_points=0))
    b = train(tiny_config(tmp_path / "b", epochs=1, train_subset=64, eval_points=0))
    c = train(tiny_config(tmp_path / "c", epochs=1, train_subset=64, eval_points=0, seed=1))
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
