"""Bound propagation through graph networks (docs/MATH.md §9.3, §10-11): every bound holds on points
sampled in the lp-ball ∩ box (random, vertices, sparse), and the bounds collapse to the values at eps -> 0."""
import math

import pytest
import torch

import mmr_ext
from mmr_ext.certify.graph_bounds import BoundedGraph, graph_node_bounds
from mmr_ext.nn.graph import ACT, MAXPOOL

from graph_models import GRAPH_MODELS, model_and_input

NAMES = [name for name, _, _ in GRAPH_MODELS]


def samples(x, p, eps, n, gen):
    """n points of {||z - x||_p <= eps, 0 <= z <= 1} per row of x [B, d]: vertices/sparse/random."""
    B, d = x.shape
    if p == math.inf:
        u = torch.where(torch.rand((n, B, d), generator=gen, dtype=x.dtype) < 0.5, -1.0, 1.0)
        u[n // 2:] *= torch.rand((n - n // 2, B, d), generator=gen, dtype=x.dtype)
    elif p == 1:
        u = torch.zeros((n, B, d), dtype=x.dtype)
        idx = torch.randint(0, d, (n, B, 1), generator=gen)
        signs = torch.where(torch.rand((n, B, 1), generator=gen, dtype=x.dtype) < 0.5, -1.0, 1.0).to(x.dtype)
        u.scatter_(2, idx, signs)
        dense = torch.randn((n // 2, B, d), generator=gen, dtype=x.dtype)
        u[n // 2:] = dense / dense.abs().sum(2, keepdim=True)
    else:
        u = torch.randn((n, B, d), generator=gen, dtype=x.dtype)
        u = u / torch.linalg.vector_norm(u, dim=2, keepdim=True)
    return (x + eps * u).clamp(0, 1)  # clipping keeps the norm below eps


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("name", NAMES)
def test_node_and_margin_bounds_hold_on_samples(name, p):
    model, x = model_and_input(name, batch=3, seed=8)
    eps = {1.0: 0.5, 2.0: 0.2, math.inf: 0.03}[p]
    y = model(x).argmax(1)
    net = BoundedGraph(model, x)
    flat = x.reshape(3, -1)
    bounds = graph_node_bounds(net, flat, p, torch.full((3,), eps, dtype=torch.float64), 0.0, 1.0)
    z = samples(flat, p, eps, 400, torch.Generator().manual_seed(0))
    with torch.no_grad():
        values = net.graph.values(z.reshape((-1,) + x.shape[1:]))
    for i, v in enumerate(values):
        l, u = bounds[i]
        v = v.reshape(400, 3, -1)
        assert (v >= l - 1e-9).all() and (v <= u + 1e-9).all(), f"node {i} ({net.graph.nodes[i].op})"
    margins = mmr_ext.margin_bounds(model, x, y, norm=p, eps=eps)
    logits = values[-1].reshape(400, 3, -1)
    true = logits.gather(2, y.expand(400, 3)[..., None]) - logits
    finite = torch.isfinite(margins).expand_as(true)
    assert (true[finite] >= margins.expand_as(true)[finite] - 1e-9).all()
    assert torch.isinf(margins.gather(1, y[:, None])).all()
    pairs = mmr_ext.layer_bounds(model, x, norm=p, eps=eps)
    assert len(pairs) == sum(node.op in (ACT, MAXPOOL) for node in net.graph.nodes)


@pytest.mark.parametrize("name", NAMES)
def test_bounds_collapse_at_zero_radius(name):
    model, x = model_and_input(name, batch=2, seed=9)
    y = model(x).argmax(1)
    margins = mmr_ext.margin_bounds(model, x, y, norm=math.inf, eps=1e-9)
    logits = model(x)
    true = logits.gather(1, y[:, None]) - logits
    finite = torch.isfinite(margins)
    torch.testing.assert_close(margins[finite], true[finite], rtol=0, atol=1e-6)


def test_certified_by_bounds_on_graph_models_is_sound():
    model, x = model_and_input("max_pool_cnn", batch=6, seed=10)
    y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 3
    proved = mmr_ext.certified_by_bounds(model, x, y, norm=math.inf, eps=1e-4)
    assert not proved[0] and proved[1:].any()
    z = samples(x.reshape(6, -1), math.inf, 1e-4, 200, torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = model(z.reshape((-1,) + x.shape[1:])).argmax(1).reshape(200, 6)
    assert (pred[:, proved] == y[proved]).all()
