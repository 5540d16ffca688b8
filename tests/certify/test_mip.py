"""Tests of mmr_ext.certify.mip: verdicts against a fine grid on 2-input networks, real counterexamples,
statuses, parallel workers and errors."""
import math

import pytest
import torch
from torch import nn

from mmr_ext.attacks import distance, margins
from mmr_ext.certify.mip import MIPResult, verify_mip

INF = math.inf
STATUSES = {"verified", "falsified", "timeout", "unknown"}
H = 1 / 800
GRID = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, 801, dtype=torch.float64)] * 2, indexing="ij"),
                   -1).reshape(-1, 2)


def net2(seed, slope=0.0):
    torch.manual_seed(seed)
    act = nn.ReLU() if slope == 0 else nn.LeakyReLU(slope)
    model = nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 10), act, nn.Linear(10, 3)).double()
    with torch.no_grad():  # first-layer hyperplanes through the box: several classes in [0, 1]^2
        model[0].weight.mul_(4)
        model[0].bias.copy_(0.3 * model[0].bias - model[0].weight @ torch.full((2,), 0.5, dtype=torch.float64))
    return model


def lipschitz_linf(model):
    """A crude bound on how much a margin f_y - f_s can change between grid neighbours."""
    W = [m.weight.detach().abs() for m in model if isinstance(m, nn.Linear)]
    prod = W[-1].sum(0, keepdim=True) * 2
    for w in reversed(W[:-1]):
        prod = prod @ w
    return prod.sum().item()


def check_counterexample(model, x, y, res, p, eps):
    ce = res.counterexample
    assert ce is not None and ce.shape == x.shape and ce.dtype == x.dtype
    assert distance(ce[None], x[None], p).item() <= eps
    assert ((ce >= 0) & (ce <= 1)).all()
    with torch.no_grad():
        logits = model(ce[None])
    assert margins(logits, y[None]).item() < 0
    assert res.target == int(logits[0].scatter(0, y[None], -INF).argmax())


@pytest.mark.parametrize("p", [1, INF])
@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_verdicts_match_fine_grid(p, slope):
    model = net2(4 if slope else 1, slope)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(10, 2, generator=g, dtype=torch.float64)
    x[0] = torch.tensor([0.0, 0.0], dtype=torch.float64)
    y = model(x).argmax(1)
    y[1] = (y[1] + 1) % 3  # one misclassified point
    with torch.no_grad():
        out = model(GRID)
    slack = lipschitz_linf(model) * H  # margins between grid points differ by at most this
    seen = set()
    for eps in (0.05, 0.15, 0.3):
        results = verify_mip(model, x, y, norm=p, eps=eps, time_limit=30)
        assert len(results) == 10 and all(isinstance(r, MIPResult) for r in results)
        for b, res in enumerate(results):
            assert res.status in ("verified", "falsified"), res.message
            seen.add(res.status)
            inside = torch.linalg.vector_norm(GRID - x[b], ord=p, dim=1) <= eps
            m = out[inside][:, y[b], None] - out[inside]
            m[:, y[b]] = INF
            grid_min = m.min().item()
            if res.status == "falsified":
                check_counterexample(model, x[b], y[b], res, p, eps)
            else:
                assert grid_min > 0, (eps, b, grid_min)
            if grid_min < 0:
                assert res.status == "falsified"
            if grid_min > slack:
                assert res.status == "verified"
        assert results[1].status == "falsified" and torch.equal(results[1].counterexample, x[1])
    assert seen == {"verified", "falsified"}


def test_float32_counterexamples_are_real():
    model = net2(4).float()
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    results = verify_mip(model, x, y, norm=INF, eps=0.5, time_limit=30)
    falsified = [b for b, r in enumerate(results) if r.status == "falsified"]
    assert falsified
    for b in falsified:
        check_counterexample(model, x[b], y[b], results[b], INF, 0.5)


def test_statuses_on_a_larger_network_and_time_limit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 4)).double()
    x = torch.rand(3, 12, dtype=torch.float64)
    y = model(x).argmax(1)
    results = verify_mip(model, x, y, norm=1, eps=2.0, time_limit=0.05)
    for r in results:
        assert r.status in STATUSES
        assert r.time < 5.0
        if r.status == "falsified":
            check_counterexample(model, x[results.index(r)], y[results.index(r)], r, 1, 2.0)
        else:
            assert r.counterexample is None


def test_workers_give_the_same_verdicts():
    model = net2(5)
    x = torch.rand(3, 2, dtype=torch.float64)
    y = model(x).argmax(1)
    one = verify_mip(model, x, y, norm=INF, eps=0.2)
    two = verify_mip(model, x, y, norm=INF, eps=0.2, workers=2)
    assert [r.status for r in one] == [r.status for r in two]


def test_errors():
    model = net2(0)
    x = torch.rand(2, 2, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="norm=2"):
        verify_mip(model, x, y, norm=2, eps=0.1)
    with pytest.raises(ValueError, match="time_limit"):
        verify_mip(model, x, y, norm=1, eps=0.1, time_limit=0)
    with pytest.raises(ValueError, match="workers"):
        verify_mip(model, x, y, norm=1, eps=0.1, workers=0)
    with pytest.raises(ValueError, match="box"):
        verify_mip(model, x - 1, y, norm=1, eps=0.1)


@pytest.mark.parametrize("p", [1, INF])
def test_linear_model_matches_box_distance(p):
    """Without hidden layers the verdict is 'robust iff the box-constrained distance to every
    decision hyperplane exceeds eps' (mmr_ext.box_distance, docs/MATH.md §7)."""
    from mmr_ext import box_distance

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x = torch.rand(12, 4, dtype=torch.float64)
    y = model(x).argmax(1)
    W, b = model[0].weight.detach(), model[0].bias.detach()
    eps = 0.15
    results = verify_mip(model, x, y, norm=p, eps=eps)
    decided = 0
    for i, res in enumerate(results):
        others = [s for s in range(3) if s != y[i]]
        dist = min(box_distance((W[y[i]] - W[s])[None], (b[y[i]] - b[s])[None], x[i], p)[0].item()
                   for s in others)
        if abs(dist - eps) < 1e-6:
            continue
        decided += 1
        assert res.status == ("verified" if dist > eps else "falsified"), (i, dist)
        if res.status == "falsified":
            check_counterexample(model, x[i], y[i], res, p, eps)
    assert decided >= 10


@pytest.mark.parametrize("p", [1, INF])
def test_units_fixed_at_zero_are_encoded(p):
    """A bias-free unit that reads only dead units has bounds l = u = 0 (both 'active' and 'dead'):
    its encoding raised a KeyError. Verdicts against the grid, as in the tests above."""
    model = net2(2)
    hidden = nn.Linear(12, 10, bias=False).double()
    with torch.no_grad():
        model[0].weight[:4] = 0.0
        model[0].bias[:4] = -1.0  # units 0-3 of the first layer are dead on the whole box
        hidden.weight.copy_(model[2].weight)
        hidden.weight[:3, 4:] = 0.0  # units 0-2 of the second layer read only the dead ones
    model[2] = hidden
    x = torch.rand(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    results = verify_mip(model, x, y, norm=p, eps=0.3, time_limit=30)
    with torch.no_grad():
        grid_margins = margins(model(GRID).expand(x.shape[0], -1, -1).reshape(-1, 3),
                               y.repeat_interleave(GRID.shape[0]))
    for b, r in enumerate(results):
        inside = distance(GRID, x[b].expand_as(GRID), p) <= 0.3 - 2 * H
        broken = bool((grid_margins.reshape(x.shape[0], -1)[b][inside] < 0).any())
        assert r.status == ("falsified" if broken else "verified")
        if broken:
            check_counterexample(model, x[b], y[b], r, p, 0.3)
