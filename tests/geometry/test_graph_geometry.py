"""Geometry of graph networks (max pooling, residual sums) against autograd Jacobians and brute-force
window enumeration, float64 (docs/MATH.md §10-11)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmr_ext
from mmr_ext.geometry.graph_reference import graph_hyperplanes
from mmr_ext.nn.adapters import pair
from mmr_ext.nn.graph import ACT, MAXPOOL, Graph, parse_network

from graph_models import GRAPH_MODELS, model_and_input

NAMES = [name for name, _, _ in GRAPH_MODELS]


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="this model is a graph network")
        yield


def jacobian_rows(fn, x):
    """[B, d, n] rows of the per-sample Jacobian of fn at x (autograd)."""
    B, d = x.shape[0], x[0].numel()
    rows = []
    for b in range(B):
        J = torch.autograd.functional.jacobian(lambda z: fn(z.reshape((1,) + x.shape[1:])).reshape(-1),
                                               x[b].reshape(-1))
        rows.append(J.t())
    return torch.stack(rows).reshape(B, d, -1)


def brute_force_planes(graph, x):
    """(value, rows) per activation (its signed pre-activation) and per max-pooling node (the gaps
    selected minus other entry), by autograd and loops over windows."""
    values = graph.values(x)
    planes = []
    for node in graph.nodes:
        if node.op not in (ACT, MAXPOOL):
            continue
        i = node.inputs[0]
        rows = jacobian_rows(lambda z: graph.values(z)[i], x)
        a = values[i]
        if node.op == ACT:
            planes.append((a.reshape(x.shape[0], -1), rows))
            continue
        pool = node.pool
        (kh, kw), (sh, sw) = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
        (ph, pw), (dh, dw) = pair(pool.padding), pair(pool.dilation)
        _, idx = F.max_pool2d(a, (kh, kw), (sh, sw), (ph, pw), (dh, dw), return_indices=True)
        C, H, W = a.shape[1:]
        Ho, Wo = idx.shape[2:]
        gaps, gap_rows = [], []
        for b in range(x.shape[0]):
            g, r = [], []
            for c in range(C):
                for oh in range(Ho):
                    for ow in range(Wo):
                        sel = int(idx[b, c, oh, ow])
                        for i_ in range(kh):
                            for j_ in range(kw):
                                h, w = oh * sh - ph + i_ * dh, ow * sw - pw + j_ * dw
                                if not (0 <= h < H and 0 <= w < W) or h * W + w == sel:
                                    continue
                                g.append(a[b, c].reshape(-1)[sel] - a[b, c, h, w])
                                r.append(rows[b, :, c * H * W + sel] - rows[b, :, c * H * W + h * W + w])
            gaps.append(torch.stack(g))
            gap_rows.append(torch.stack(r, dim=1))
        planes.append((torch.stack(gaps), torch.stack(gap_rows)))
    return planes


@pytest.mark.parametrize("name", NAMES)
def test_graph_computes_the_model(name):
    model, x = model_and_input(name)
    graph = parse_network(model)
    assert isinstance(graph, Graph)
    torch.testing.assert_close(graph(x), model(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_rows_and_selection_hyperplanes_match_autograd(name):
    model, x = model_and_input(name, batch=2)
    graph = parse_network(model)
    planes, logits, V_logits = graph_hyperplanes(graph, x)
    expected = brute_force_planes(graph, x)
    assert len(planes) == len(expected)
    for (v, V, kept), (ev, eV) in zip(planes, expected):
        if kept is not None:  # the listed selection hyperplanes
            v = v[kept].reshape(v.shape[0], -1)
            V = V.transpose(1, 2)[kept].reshape(V.shape[0], -1, V.shape[1]).transpose(1, 2)
        torch.testing.assert_close(v, ev, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(V, eV, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(V_logits, jacobian_rows(model, x), rtol=1e-10, atol=1e-12)
    assert all((v >= 0).all() for v, _, kept in planes if kept is not None)  # selected minus other entries


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("name", NAMES)
def test_region_distances_match_brute_force(name, p):
    model, x = model_and_input(name, batch=3, seed=1)
    graph = parse_network(model)
    q = 1.0 if p == math.inf else (math.inf if p == 1 else p / (p - 1))
    expected = []
    for v, V in brute_force_planes(graph, x):
        norm = torch.linalg.vector_norm(V, ord=q, dim=1)  # zero rows (a window of inactive units): no hyperplane
        expected.append(torch.where(norm > 0, v.abs() / norm, math.inf))
    expected = torch.cat(expected, 1)
    boundary, decision = mmr_ext.region_distances(model, x, p)
    torch.testing.assert_close(boundary, expected, rtol=1e-10, atol=1e-12)
    logits, J = model(x), jacobian_rows(model, x)
    c = logits.argmax(1)
    for b in range(x.shape[0]):
        for s in range(logits.shape[1]):
            if s == c[b]:
                assert decision[b, s] == math.inf
                continue
            row = J[b, :, c[b]] - J[b, :, s]
            want = (logits[b, c[b]] - logits[b, s]) / torch.linalg.vector_norm(row, ord=q)
            torch.testing.assert_close(decision[b, s], want, rtol=1e-10, atol=1e-12)


def test_selection_hyperplane_count():
    model, x = model_and_input("max_pool_cnn", batch=2)
    boundary, _ = mmr_ext.region_distances(model, x, 2)
    # conv1: 3x8x8 units; pool 3/2/1 on 8x8: 16 windows per channel, 4 corner-ish windows have 4 real
    # cells, 8 edge windows 6, 4 inner ones 9; conv2: 4x4x4 units; pool 2 on 4x4: 4 windows of 4 cells
    windows1 = 3 * (1 * 3 + 3 * 5 + 3 * 5 + 9 * 8)  # real cells minus the selected one, per window
    assert boundary.shape == (2, 3 * 64 + windows1 + 4 * 16 + 4 * 4 * 3)


def test_max_pool_of_kernel_one_equals_the_chain():
    torch.manual_seed(3)
    chain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).double()
    graph = nn.Sequential(chain[0], chain[1], nn.MaxPool2d(1), chain[2], chain[3])
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    for p in (1, 2, math.inf):
        for got, want in zip(mmr_ext.region_distances(graph, x, p), mmr_ext.region_distances(chain, x, p)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["residual_mlp", "max_pool_cnn"])
def test_distances_gradcheck(name):
    model, x = model_and_input(name, batch=2, seed=2)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: torch.cat(mmr_ext.region_distances(model, z, 2), 1).clamp(max=1e6),
                                    (x,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_universal_loss_trains_graph_models(name):
    model, x = model_and_input(name, batch=4, seed=4)
    y = torch.arange(4) % 3
    kwargs = dict(k_boundary=5, gamma=(0.5, 0.5))
    loss = mmr_ext.universal_loss(model, x, y, **kwargs)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.isfinite(loss) and any(g.abs().sum() > 0 for g in grads)
    chunked = mmr_ext.universal_loss(model, x, y, chunk_size=1, **kwargs)
    grads_chunked = torch.autograd.grad(chunked, list(model.parameters()))
    torch.testing.assert_close(chunked, loss, rtol=1e-12, atol=0)
    for a, b in zip(grads_chunked, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_graph_networks_warn_once_that_they_use_the_reference():
    from mmr_ext.geometry.engine import warn_reference_path
    model, x = model_and_input("residual_mlp")
    warn_reference_path.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mmr_ext.region_distances(model, x, 2)
        mmr_ext.universal_loss(model, x, torch.zeros(4, dtype=torch.long), k_boundary=3, gamma=(0.5, 0.5))
    assert len([w for w in caught if "graph network" in str(w.message) and "reference" in str(w.message)]) == 1
