"""The box-constrained region certificate from rows on demand (certify/box_radius.py) against the
dense per-point search of certify/neighbors.py, and PointRows against region_geometry."""
import importlib
import math

import pytest
import torch
from torch import nn

from mmr_ext.certify import certify
from mmr_ext.geometry import region_geometry
from mmr_ext.geometry.regions import PointRows
from mmr_ext.math.norms import dual_exponent

neighbors = importlib.import_module("mmr_ext.certify.neighbors")
region = importlib.import_module("mmr_ext.certify.region")
INF = math.inf


def nets():
    torch.manual_seed(3)
    fc = nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 15), nn.LeakyReLU(0.1),
                       nn.Linear(15, 4))
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16, 5))
    return {"fc": (fc, (1, 3, 4)), "cnn": (cnn, (1, 6, 6))}


@pytest.mark.parametrize("name", ["fc", "cnn"])
def test_rows_on_demand_equal_the_dense_region(name):
    model, shape = nets()[name]
    model = model.double().eval()
    x = torch.rand((1,) + shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = region_geometry(model, x)
    rows = PointRows(model, x)
    units = torch.tensor([0, 5, dense.weight.shape[1] - 1, 7])
    w, b = rows.units(units)
    torch.testing.assert_close(w, dense.weight[0, units], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b, dense.bias[0, units], rtol=1e-12, atol=1e-14)
    W, c = rows.logits()
    torch.testing.assert_close(W, dense.logit_weight[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, dense.logit_bias[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["fc", "cnn"])
@pytest.mark.parametrize("edge", [False, True])
def test_box_radius_equals_the_dense_search(name, edge):
    model, shape = nets()[name]
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand((40,) + shape, dtype=torch.float64, generator=g)
    if edge:  # many coordinates on the box's faces: the box constraints bind
        x = torch.where(torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.5, x.round(), x)
    with torch.no_grad():
        y = model(x).argmax(1)
    cert = certify(model, x, y, norms=(1, 2, INF, 3), box=(0.0, 1.0))
    box = region.check_certify_box((0.0, 1.0), x)
    checked = 0
    for i in cert.correct.nonzero()[:, 0].tolist():
        point = neighbors.Point(model, x[i:i + 1], int(y[i]), box)
        for p in (1.0, 2.0, INF, 3.0):
            lower, exact = neighbors.search(point, p, dual_exponent(p), 0)
            assert float(cert.radius[p][i]) == pytest.approx(lower, rel=1e-10, abs=1e-14), (i, p)
            assert bool(cert.exact[p][i]) == exact, (i, p)
            checked += 1
    assert checked >= 100
    # the box only adds constraints: never below the unconstrained certificate
    free = certify(model, x, y, norms=(1, 2, INF, 3))
    for p in (1.0, 2.0, INF, 3.0):
        assert (cert.radius[p] >= free.radius[p]).all()
