"""Robustness curves (mmr_ext.curves): the t = 1 column is the evaluation's table, the curves are
monotone and ordered, every verdict at every scale agrees with an exact MILP (l1, l∞) and with a
direct recomputation, the union combines the norms, files and errors."""
import json
import math

import pytest
import torch
from torch import nn

from mmr_ext.certify import certified_by_bounds, verify_mip
from mmr_ext.curves import KINDS, RobustnessCurves, robustness_curves
from mmr_ext.evaluation import evaluate

INF = math.inf
EPS = {1: 0.4, 2: 0.2, INF: 0.08}
SCALES = (0.5, 1.5, 2.5)


@pytest.fixture(scope="module")
def run():
    """A small ReLU network on 2x3 "images" (hyperplanes through the box), its evaluation and curves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3)).double().eval()
    with torch.no_grad():
        model[1].weight.mul_(3)
        model[1].bias.copy_(0.2 * model[1].bias - 0.5 * model[1].weight.sum(1))
    x = torch.rand(24, 1, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 3  # two misclassified points
    result = evaluate(model, x, y, eps=EPS, attack_steps=20, fmn_steps=30, batch_size=8, progress=False)
    calls = []
    curves = robustness_curves(model, x, y, result, scales=SCALES, batch_size=5, on_batch=calls.append)
    return model, x, y, result, curves, calls


def test_t1_is_the_table_and_t0_the_accuracy(run):
    _, _, _, result, curves, _ = run
    assert curves.scales == (0.0, 0.5, 1.0, 1.5, 2.5) and curves.n == 24
    i1 = curves.scales.index(1.0)
    for key in list(EPS) + ["union"]:
        k = "union" if key == "union" else float(key)
        assert curves.accuracy("certified", k)[i1] == pytest.approx(100 - result.upper_bound(k))
        assert curves.accuracy("attacked", k)[i1] == pytest.approx(100 - result.lower_bound(k))
        assert curves.accuracy("certified", k)[0] == pytest.approx(100 - result.test_error)
        assert curves.accuracy("attacked", k)[0] == pytest.approx(100 - result.test_error)


def test_curves_are_monotone_and_ordered(run):
    curves = run[4]
    for key in (1.0, 2.0, INF, "union"):
        cert, att = curves.mask("certified", key), curves.mask("attacked", key)
        assert not (cert & att).any()
        assert (cert[1:] <= cert[:-1]).all() and (att[1:] >= att[:-1]).all()  # per point, along t
        assert (curves.mask("region", key) <= cert).all() and (curves.mask("min_norm", key) <= att).all()


def test_union_certifies_in_every_norm_and_is_attacked_in_some(run):
    curves = run[4]
    stacked = {kind: torch.stack([curves.mask(kind, p) for p in (1.0, 2.0, INF)]) for kind in KINDS}
    assert torch.equal(curves.mask("certified", "union"), stacked["certified"].all(0))
    assert torch.equal(curves.mask("attacked", "union"), stacked["attacked"].any(0))


@pytest.mark.parametrize("p", [1.0, INF])
def test_every_verdict_agrees_with_the_exact_milp(run, p):
    model, x, y, result, curves, _ = run
    cert, att = curves.mask("certified", p), curves.mask("attacked", p)
    for i, t in enumerate(curves.scales):
        if t == 0:
            continue
        exact = verify_mip(model, x, y, norm=p, eps=t * EPS[p], time_limit=30)
        for j, res in enumerate(exact):
            if cert[i, j]:
                assert res.status == "verified", (t, j, res.status)
            if att[i, j] and result.correct[j]:
                assert res.status == "falsified", (t, j, res.status)


def test_bound_propagation_at_each_scale_is_what_it_proves_directly(run):
    model, x, y, result, curves, calls = run
    assert calls and all(1 <= n <= 5 for n in calls)
    for p, e in EPS.items():
        p = float(p)
        cert = curves.mask("certified", p)
        for i, t in enumerate(curves.scales):
            if t in (0.0, 1.0):
                continue
            direct = certified_by_bounds(model, x, y, norm=p, eps=t * e) & result.correct
            region = result.correct & (result.radius[p] > t * e)
            if t < 1:  # smaller balls: what was certified at eps, the region, or bounds at t eps
                assert torch.equal(cert[i], direct | region | result.certified[p])
            else:  # larger balls: only what bounds (or the region) prove there
                assert (cert[i] <= direct | region).all()
                assert (cert[i] >= region).all()


def test_json_and_png(run, tmp_path):
    curves = run[4]
    data = json.loads(curves.to_json(tmp_path / "c.json").read_text())
    assert data["n"] == 24 and data["scales"] == list(curves.scales)
    assert set(data["curves"]) == {"l1", "l2", "linf", "union"}
    assert data["curves"]["linf"]["eps"] == [round(t * 0.08, 12) for t in curves.scales]
    assert data["curves"]["union"]["certified"] == curves.accuracy("certified", "union")
    assert curves.plot(tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors(run):
    model, x, y, result, _, _ = run
    with pytest.raises(ValueError, match="scales"):
        robustness_curves(model, x, y, result, scales=(-1.0,))
    with pytest.raises(TypeError, match="scales"):
        robustness_curves(model, x, y, result, scales=("a",))
    with pytest.raises(ValueError, match="labels of result"):
        robustness_curves(model, x, (y + 1) % 3, result)
    with pytest.raises(ValueError, match="points of result"):
        robustness_curves(model, x[:3], y[:3], result)
    with pytest.raises(TypeError, match="EvaluationResult"):
        robustness_curves(model, x, y, {"table": 1})
    assert isinstance(run[4], RobustnessCurves)
