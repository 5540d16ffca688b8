"""Exact MILP verification of graph networks (docs/MATH.md §9.4, §10-11): verdicts agree with dense
sampling and real counterexamples, and certified radii never exceed the exact minimal adversarial
norm found by MILP bisection."""
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmr_ext

from graph_models import ResidualMLP


class TinyPool(nn.Module):
    """1x4x4 input, conv 2 channels 3x3 pad 1, overlapping max pool 3/2/1, linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        return self.head(F.max_pool2d(F.relu(self.conv(x)), 3, 2, 1).flatten(1))


class TinyResidual(ResidualMLP):
    def __init__(self):
        super().__init__(d=4, hidden=6, classes=3)


def model_and_points(cls, seed):
    torch.manual_seed(seed)
    model = cls().double().eval()
    shape = (1, 4, 4) if cls is TinyPool else (4,)
    x = torch.rand((4,) + shape, dtype=torch.float64)
    with torch.no_grad():  # centre the head on the points so that the classes are close
        model.head.weight.mul_(5)
        model.head.bias.sub_(model(x).mean(0))
    return model, x, model(x).argmax(1)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="this model is a graph network")
        yield


def minimal_adversarial_norm(model, x, y, p, steps=14):
    """[lower, upper] on the minimal lp-norm of an adversarial perturbation in [0, 1]^d, by MILP bisection."""
    lo_e, hi_e = 0.0, 1.0
    if mmr_ext.verify_mip(model, x, y, norm=p, eps=hi_e, time_limit=60)[0].status == "verified":
        return hi_e, math.inf
    for _ in range(steps):
        mid = (lo_e + hi_e) / 2
        status = mmr_ext.verify_mip(model, x, y, norm=p, eps=mid, time_limit=60)[0].status
        assert status in ("verified", "falsified")
        lo_e, hi_e = (mid, hi_e) if status == "verified" else (lo_e, mid)
    return lo_e, hi_e


@pytest.mark.parametrize("cls", [TinyPool, TinyResidual])
@pytest.mark.parametrize("p", [1.0, math.inf])
def test_certified_radius_never_exceeds_the_milp_minimal_norm(cls, p):
    model, x, y = model_and_points(cls, seed=11)
    plain = mmr_ext.certify(model, x, y, norms=(p,))
    boxed = mmr_ext.certify(model, x, y, norms=(p,), box=(0, 1))  # the MILP's input set is in [0, 1]^d
    for i in range(x.shape[0]):
        lower, upper = minimal_adversarial_norm(model, x[i:i + 1], y[i:i + 1], p)
        for cert in (plain, boxed):
            r = float(cert.radius[p][i])
            assert r <= upper * (1 + 1e-9)
        if bool(boxed.exact[p][i]) and upper < math.inf:  # exact box radii are the minimal norm
            assert float(boxed.radius[p][i]) >= lower * (1 - 1e-9) - 1e-9


@pytest.mark.parametrize("cls", [TinyPool, TinyResidual])
def test_verdicts_agree_with_counterexamples_and_vertex_sampling(cls):
    model, x, y = model_and_points(cls, seed=12)
    for eps in (0.02, 0.1, 0.3):
        results = mmr_ext.verify_mip(model, x, y, norm=math.inf, eps=eps, time_limit=60)
        for i, r in enumerate(results):
            assert r.status in ("verified", "falsified")
            if r.status == "falsified":
                z = r.counterexample
                assert (z - x[i]).abs().max() <= eps * (1 + 1e-12) and z.min() >= 0 and z.max() <= 1
                assert model(z[None]).argmax(1).item() != y[i]
                continue
            flat = x[i].reshape(-1)
            d = flat.numel()
            signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=d)), dtype=torch.float64) \
                if d <= 16 else torch.randn(4096, d, dtype=torch.float64).sign()
            corners = (flat + eps * signs).clamp(0, 1)
            rand = (flat + eps * (2 * torch.rand(2048, d, dtype=torch.float64) - 1)).clamp(0, 1)
            z = torch.cat([corners, rand]).reshape((-1,) + x.shape[1:])
            with torch.no_grad():
                assert (model(z).argmax(1) == y[i]).all()


def test_graph_mip_ignores_workers_and_validates_first():
    model, x, y = model_and_points(TinyResidual, seed=13)
    one = mmr_ext.verify_mip(model, x, y, norm=1, eps=0.2, time_limit=30)
    two = mmr_ext.verify_mip(model, x, y, norm=1, eps=0.2, time_limit=30, workers=2)
    assert [r.status for r in one] == [r.status for r in two]
    with pytest.raises(ValueError, match="norm=2"):
        mmr_ext.verify_mip(model, x, y, norm=2, eps=0.2)
