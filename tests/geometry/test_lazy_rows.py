"""Rows of fully connected layers after convolutions, built on demand (in reverse order, or with
values in forward order from the receptive-field rows) or explicitly in forward order: values and
gradients against the reference for every chunk size and order, and a backward that rebuilds only
the rows whose distance has a gradient."""
import math

import pytest
import torch
from torch import nn

import mmr_ext
from mmr_ext.geometry import MemoryBudget, compute_geometry, conv_rows, engine, reverse_rows, steps
from mmr_ext.native import available
from oracles import (NORMS, assert_distances_close, distances_and_grads, gradcheck_distances, make_model,
                      randomize_batchnorm)

pytestmark = pytest.mark.skipif(not available(), reason="compiled extension missing")


def cnn_two_fc():
    """Conv, then two fully connected hidden layers, one followed by BatchNorm (forces its rows)."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 9), nn.ReLU(),
                         nn.Linear(9, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 4))


def _model(name):
    if name == "cnn_two_fc":
        g = torch.Generator().manual_seed(3)
        torch.manual_seed(3)
        model = randomize_batchnorm(cnn_two_fc(), g).double()
        return model, torch.rand((5, 2, 7, 7), generator=g, dtype=torch.float64)
    return make_model(name)


#: Orders of the first Linear after convolutions: (cost weight of the forward order, whether its
#: rows are kept on demand, whether the backward rebuilds their pairs in forward order).
ORDERS = {"reverse": (1e12, None, None), "explicit": (1e-12, False, None),
          "on demand, pairs reversed": (1e-12, True, False), "on demand, pairs forward": (1e-12, True, True)}


def set_order(monkeypatch, name):
    weight, on_demand, pairs_forward = ORDERS[name]
    monkeypatch.setattr(steps, "PATCH_COST_WEIGHT", weight)
    if on_demand is not None:
        monkeypatch.setattr(steps, "on_demand_pays", lambda *args: on_demand)
    if pairs_forward is not None:
        monkeypatch.setattr(reverse_rows.ReverseRows, "forward_cheaper", lambda self, distinct, pairs: pairs_forward)


@pytest.fixture(params=list(ORDERS))
def either_order(request, monkeypatch):
    """The first Linear after convolutions in reverse order (on demand), explicit in forward order,
    or on demand with values in forward order and the backward's pairs rebuilt in either order."""
    set_order(monkeypatch, request.param)


@pytest.fixture(params=[name for name in ORDERS if name != "explicit"])
def on_demand_order(request, monkeypatch):
    """The orders that keep the rows of the first Linear after convolutions on demand."""
    set_order(monkeypatch, request.param)


@pytest.mark.parametrize("name", ["cnn", "paper_cnn", "cnn_two_fc"])
@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_on_demand_rows_match_reference_values_and_gradients(either_order, name, p, chunk_size):
    model, x = _model(name)
    (b, d), fast = distances_and_grads(mmr_ext.region_distances, model, x, p, chunk_size=chunk_size)
    (rb, rd), ref = distances_and_grads(mmr_ext.region_distances_reference, model, x, p)
    assert_distances_close(b, rb, 1e-10)
    assert_distances_close(d, rd, 1e-10)
    for g_fast, g_ref in zip(fast, ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


def test_on_demand_rows_gradcheck(either_order):
    model, x = make_model("paper_cnn")
    assert gradcheck_distances(model, x[:3], 2, chunk_size=2)


def test_backward_rebuilds_only_rows_with_a_gradient(on_demand_order, monkeypatch):
    model, x = make_model("paper_cnn")  # conv 3x6x6, conv 4x3x3 (transient), fc 10 (on demand)
    rebuilt = {}

    def spy(self, samples, units, tensors=None, _original=reverse_rows.ReverseRows.rows_of):
        if units is not None:
            rebuilt["fc"] = rebuilt.get("fc", 0) + units.numel()
        return _original(self, samples, units, tensors)

    def conv_spy(self, samples, units, tensors, _original=conv_rows.KernelConvRows.pair_rows):
        rebuilt["conv"] = rebuilt.get("conv", 0) + units.numel()
        return _original(self, samples, units, tensors)
    monkeypatch.setattr(reverse_rows.ReverseRows, "rows_of", spy)
    monkeypatch.setattr(conv_rows.KernelConvRows, "pair_rows", conv_spy)
    b, _ = mmr_ext.region_distances(model, x, math.inf)
    assert b.shape[1] == 3 * 36 + 4 * 9 + 10
    weight = torch.zeros_like(b)
    weight[0, 108 + 5] = 1.0  # second conv: its rows were not kept, one pair rebuilt
    weight[1, 108 + 36 + 3] = 1.0  # fc
    weight[2, 108 + 36 + 7] = 2.0
    weight[4, 0] = 1.0  # first conv: shared rows, nothing to rebuild
    (b.nan_to_num(posinf=0.0) * weight).sum().backward()
    assert rebuilt == {"fc": 2, "conv": 1}


def test_universal_loss_and_gradients_do_not_depend_on_chunk_size(either_order):
    model, x = make_model("paper_cnn")
    y = torch.tensor([0, 1, 2, 3, 4])
    results = []
    for chunk_size in (1, 3, None):
        model.zero_grad()
        loss = mmr_ext.universal_loss(model, x, y, k_boundary=0.3, gamma=(1.0, 0.15), lam=(3.0, 12.0),
                                      chunk_size=chunk_size)
        loss.backward()
        results.append([loss.detach()] + [prm.grad.clone() for prm in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_no_grad_forward_of_on_demand_rows(on_demand_order):
    model, x = make_model("paper_cnn")
    with torch.no_grad():
        b, d = mmr_ext.region_distances(model, x, 1, chunk_size=2)
    rb, rd = mmr_ext.region_distances_reference(model, x, 1)
    assert_distances_close(b, rb.detach(), 1e-10)
    assert not b.requires_grad


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_chunk_size_must_be_a_positive_int(bad):
    model, x = make_model("paper_cnn")
    with pytest.raises(ValueError, match="chunk_size"):
        mmr_ext.region_distances(model, x, 2, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        mmr_ext.universal_loss(model, x, torch.zeros(5, dtype=torch.long), k_boundary=3, gamma=(1.0, 0.1),
                               chunk_size=bad)


@pytest.mark.parametrize("chunk_size,budget", [(None, 200), (2, None), (None, None)])
def test_deep_conv_patches_over_the_budget_are_built_in_checkpointed_chunks(monkeypatch, chunk_size, budget):
    """Explicit patch rows of deep convolutions that would break the memory budget (chunk_size
    samples, or max_elements elements) are built chunk by chunk, checkpointed, as the plan computed
    up front says; values and gradients equal the reference's."""
    passes = []
    original = engine.fast_geometry
    monkeypatch.setattr(engine, "fast_geometry", lambda chain, x, *a: passes.append(x.shape[0]) or
                        original(chain, x, *a))
    plan = MemoryBudget(chunk_size) if budget is None else MemoryBudget(chunk_size, budget)

    def distances(model, x, p):
        return compute_geometry(model, x, (p,), None, plan)[0][0]

    model, x = make_model("cnn")  # three convolutions: the third one's patches are explicit
    (b, d), fast = distances_and_grads(distances, model, x, 1)
    (rb, rd), ref = distances_and_grads(mmr_ext.region_distances_reference, model, x, 1)
    assert_distances_close(b, rb, 1e-10)
    assert_distances_close(d, rd, 1e-10)
    for g_fast, g_ref in zip(fast, ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    if chunk_size is None and budget is None:
        assert passes == [5]  # within the default budget: one whole-batch pass
    else:
        # chunks only (no whole-batch attempt), each once in the forward and once more when the
        # backward rebuilds it
        n = chunk_size or 1
        chunks = [min(n, 5 - s) for s in range(0, 5, n)]
        assert passes == chunks + chunks[::-1] or passes == chunks + chunks
    passes.clear()
    mmr_ext.region_distances(model, x, 1)  # the budget is a value: nothing carries over to the next call
    assert passes == [5]
    with torch.no_grad():
        nb, _ = mmr_ext.region_distances(model, x, 1, chunk_size=chunk_size)
    assert_distances_close(nb, rb.detach(), 1e-10)
