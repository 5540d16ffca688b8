"""Tests of mmr_ext.evaluation: LB <= UB, the table against a per-point recomputation, JSON
output and the consistency check (the command line ``mmr-ext evaluate``: tests/test_cli.py)."""
import importlib
import json
import math

import pytest
import torch
from torch import nn

from mmr_ext.evaluation import EvaluationResult, evaluate

# the module itself (mmr_ext may export a function of the same name)
ev = importlib.import_module("mmr_ext.evaluation")

INF = math.inf
EPS = {1: 0.4, 2: 0.2, INF: 0.08}


@pytest.fixture(scope="module")
def tiny():
    """A small ReLU network on 2x3 "images" and labels that are mostly its predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3)).double().eval()
    with torch.no_grad():  # first-layer hyperplanes through the box
        model[1].weight.mul_(3)
        model[1].bias.copy_(0.2 * model[1].bias - 0.5 * model[1].weight.sum(1))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(30, 1, 2, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3  # three misclassified points
    result = evaluate(model, x, y, eps=EPS, attack_steps=20, fmn_steps=30, use_mip=True,
                      mip_time_limit=20, batch_size=7, progress=False)
    return model, x, y, result


def pct(mask):
    return 100.0 * mask.double().mean().item()


def test_bounds_are_ordered_and_match_per_point_recomputation(tiny):
    model, x, y, r = tiny
    assert isinstance(r, EvaluationResult) and r.n == 30 and r.norms == (1.0, 2.0, INF)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert torch.equal(r.correct, correct)
    assert r.test_error == pytest.approx(pct(~correct)) and r.test_error == pytest.approx(10.0)
    rows = r.rows()
    for p in (1.0, 2.0, INF):
        att, cert = r.attacked[p], r.certified[p]
        assert not (att & cert).any()
        assert att[~correct].all() and not cert[~correct].any()
        # every verdict comes from a named method
        assert torch.equal(att, torch.stack(list(r.attacked_by[p].values()) + [~correct]).any(0))
        assert torch.equal(cert, torch.stack(list(r.certified_by[p].values())).any(0))
        name = ev.norm_name(p)
        assert rows[name]["LB"] == pytest.approx(pct(att))
        assert rows[name]["UB"] == pytest.approx(pct(~cert))
        assert rows[name]["LB"] <= rows[name]["UB"]
        # the region radius certifies exactly the points it claims
        assert torch.equal(r.certified_by[p]["region"], correct & (r.radius[p] > EPS[p]))
        # a found minimal adversarial norm never lies below a certified radius
        assert (r.min_norm[p][correct] >= r.radius[p][correct]).all()
    union_att = torch.stack([r.attacked[p] for p in r.eps]).any(0)
    union_cert = torch.stack([r.certified[p] for p in r.eps]).all(0)
    assert rows["union"]["LB"] == pytest.approx(pct(union_att))
    assert rows["union"]["UB"] == pytest.approx(pct(~union_cert))
    assert rows["union"]["LB"] <= rows["union"]["UB"]
    assert rows["union"]["UB"] >= max(rows[ev.norm_name(p)]["UB"] for p in r.eps)
    # the evaluation decided something in each direction
    assert any(r.certified[p][correct].any() for p in r.eps)
    assert any(r.attacked[p][correct].any() for p in r.eps)
    assert r.certified_by[1.0]["mip"].any()  # the MIP decides points the bounds leave open
    # MIP ran only on l1 / l∞ and only where needed
    assert all(s is None for s in r.mip_status[2.0])
    for p in (1.0, INF):
        for i, s in enumerate(r.mip_status[p]):
            if s == "verified":
                assert r.certified_by[p]["mip"][i]


def test_table_shows_the_numbers(tiny):
    _, _, _, r = tiny
    text = r.table("tiny")
    lines = text.splitlines()
    assert lines[0] == "tiny"
    assert "l1 (eps=0.4)" in text and "linf (eps=0.08)" in text and "l1+l2+linf" in text
    values = [float(v) for v in lines[4].split()]
    rows = r.rows()
    expected = [rows["TE"]] + [v for k in ("l1", "l2", "linf", "union") for v in (rows[k]["LB"], rows[k]["UB"])]
    assert values == pytest.approx([round(v, 2 if i == 0 else 1) for i, v in enumerate(expected)])
    assert str(r) == r.table()


def test_json_round_trip(tiny, tmp_path):
    _, x, _, r = tiny
    path = r.to_json(tmp_path / "sub" / "eval.json")
    data = json.loads(path.read_text())
    assert data["n"] == x.shape[0]
    assert data["table"] == r.rows()  # floats survive JSON exactly
    assert data["eps"] == {"l1": 0.4, "l2": 0.2, "linf": 0.08}
    pts = data["points"]
    assert pts["correct"] == r.correct.tolist()
    for p in r.eps:
        name = ev.norm_name(p)
        assert pts["attacked"][name] == r.attacked[p].tolist()
        assert pts["certified"][name] == r.certified[p].tolist()
        assert len(pts["min_norm"][name]) == x.shape[0]
    assert set(pts["mip_status"]["linf"]) <= {None, "verified", "falsified", "timeout", "unknown"}


def test_inconsistent_verdicts_raise_loudly(tiny, monkeypatch):
    model, x, y, _ = tiny

    def liar(model64, x64, yb, norms, box, neighbors):  # a broken certifier: everything is safe
        return {p: torch.full((x64.shape[0],), INF, dtype=torch.float64) for p in norms}

    monkeypatch.setattr(ev, "_region_radii", liar)
    with pytest.raises(RuntimeError, match="INCONSISTENT"):
        evaluate(model, x, y, eps={INF: 0.5}, attacks=("fmn",), fmn_steps=30, use_bounds=False,
                 progress=False)


def test_custom_attack_and_settings(tiny):
    model, x, y, _ = tiny
    calls = []

    def shift(model, x, y, *, norm, eps, lo, hi):
        calls.append(norm)
        return x.clone()  # never adversarial

    r = evaluate(model, x[:5], y[:5], eps={"linf": 0.01}, attacks=[shift], use_bounds=False, progress=False)
    assert calls == [INF] and "shift" in r.attacked_by[INF]
    assert not r.attacked_by[INF]["shift"].any()
    assert r.settings["attacks"] == ["shift"]


def test_errors(tiny):
    model, x, y, _ = tiny
    with pytest.raises(ValueError, match="eps key must be 1, 2 or inf"):
        evaluate(model, x, y, eps={3: 0.1}, progress=False)
    with pytest.raises(TypeError, match="eps"):
        evaluate(model, x, y, eps=0.1, progress=False)
    with pytest.raises(ValueError, match="attack"):
        evaluate(model, x, y, eps={1: 0.1}, attacks=("fgsm",), progress=False)
    with pytest.raises(ValueError, match="box"):
        evaluate(model, x + 1, y, eps={1: 0.1}, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, x, y, eps={1: 0.1}, batch_size=0, progress=False)
