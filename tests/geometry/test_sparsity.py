"""The gradient sparsity record and the plan it drives: each backward records, per layer, the
fraction of (sample, unit) pairs whose distance got a gradient; the next pass keeps the rows of a
Linear layer after convolutions on demand when that fraction is small, else explicit. Values and
gradients never depend on the plan, and a checkpointed pass recomputes the graph it planned even
when the record changes during its backward."""
import gc
import math
import unittest.mock as mock
import weakref

import pytest
import torch

import mmr_ext
from mmr_ext.geometry import MemoryBudget, compute_geometry, conv_rows, engine, steps
from mmr_ext.geometry.sparsity import RECORD, SparsityRecord
from mmr_ext.native import available
from oracles import assert_distances_close, make_model

pytestmark = pytest.mark.skipif(not available(), reason="compiled extension missing")

FC_UNITS = slice(3 * 36 + 4 * 9, 3 * 36 + 4 * 9 + 10)  # paper_cnn: conv 3x6x6, conv 4x3x3, fc 10


def fc_layer(model):
    return next(m for m in model.modules() if isinstance(m, torch.nn.Linear))


def backward_with(model, x, weight):
    b, _ = mmr_ext.region_distances(model, x, math.inf)
    (b.nan_to_num(posinf=0.0) * weight).sum().backward()
    return b


def test_backward_records_the_fraction_of_pairs_with_a_gradient():
    model, x = make_model("paper_cnn")
    weight = torch.zeros(5, FC_UNITS.stop, dtype=x.dtype)
    weight[0, FC_UNITS.start + 1] = 1.0
    weight[3, FC_UNITS.start + 4] = 2.0
    weight[3, FC_UNITS.start + 5] = -1.0
    backward_with(model, x, weight)
    assert RECORD.snapshot()[fc_layer(model)] == pytest.approx(3 / 50)


def test_the_record_of_a_model_round_trips_by_module_name():
    """What a training checkpoint keeps: the densities by module name, restored onto a new model."""
    model, x = make_model("paper_cnn")
    weight = torch.zeros(5, FC_UNITS.stop, dtype=x.dtype)
    weight[0, FC_UNITS.start + 1] = 1.0
    backward_with(model, x, weight)
    state = RECORD.state_of(model)
    name = next(n for n, m in model.named_modules() if m is fc_layer(model))
    assert state[name] == pytest.approx(1 / 50)
    other, _ = make_model("paper_cnn", seed=1)
    RECORD.restore(other, state)
    assert RECORD.state_of(other) == state
    assert RECORD.snapshot()[fc_layer(other)] == pytest.approx(1 / 50)


def test_a_layer_that_is_gone_leaves_the_record():
    record = SparsityRecord()
    model, x = make_model("paper_cnn")
    d = torch.ones(1, 5, 10, dtype=x.dtype, requires_grad=True)
    record.watch(fc_layer(model), d * 2)
    del model
    assert record.snapshot() == {}


@pytest.mark.parametrize("fc_gradient,on_demand", [(0.0, True), (1.0, False)])
def test_the_next_pass_plans_from_the_record(monkeypatch, fc_gradient, on_demand):
    """The density recorded by a backward reaches the next pass's plan (here a stand-in rule:
    on demand below one half), and the values equal the reference's under either plan."""
    monkeypatch.setattr(steps, "PATCH_COST_WEIGHT", 1e-12)  # the forward order is cheaper
    seen = []
    monkeypatch.setattr(steps, "on_demand_pays", lambda density, *a: seen.append(density) or stand_in_rule(density))
    model, x = make_model("paper_cnn")
    weight = torch.zeros(5, FC_UNITS.stop, dtype=x.dtype)
    weight[:, :FC_UNITS.start] = 1.0
    weight[:, FC_UNITS] = fc_gradient
    backward_with(model, x, weight)  # records the fc layer's density: 0 or 1
    seen.clear()
    explicit = []
    original = steps.patches_to_dense
    monkeypatch.setattr(steps, "patches_to_dense", lambda *a: explicit.append(1) or original(*a))
    for p in (1, math.inf):
        b, d = mmr_ext.region_distances(model, x, p)
        rb, rd = mmr_ext.region_distances_reference(model, x, p)
        assert_distances_close(b, rb, 1e-10)
        assert_distances_close(d, rd, 1e-10)
    assert seen and all(density == fc_gradient for density in seen)
    assert bool(explicit) != on_demand


def test_on_demand_pays_when_the_rebuilt_pairs_and_the_logits_walk_cost_less_than_a_dense_backward():
    """3 (ρ O + K) r < 2 F: r the walk back of one row, F the forward-order rows of a sample."""
    class Rows:
        def linear_macs(self, O):
            return 1000.0 * O
    trace = [(torch.nn.Linear(40, 50, bias=False), (40,), (50,))]  # one row walks back in 2000 MACs
    # O = 100, K = 10: 3 (100 ρ + 10) 2000 < 2e5  <=>  ρ < 0.2333
    assert steps.on_demand_pays(0.2, Rows(), trace, 100, 10)
    assert not steps.on_demand_pays(0.25, Rows(), trace, 100, 10)
    assert not steps.on_demand_pays(None, Rows(), trace, 100, 10)


def test_a_checkpointed_pass_recomputes_the_graph_it_planned(monkeypatch):
    """Planned on demand (the fc rows got no gradient last time), the backward of the loss's last
    chunk records a dense fc layer before the earlier chunks are recomputed: the recomputations
    still follow the plan, and the gradients equal the reference's."""
    monkeypatch.setattr(steps, "PATCH_COST_WEIGHT", 1e-12)
    planned = []
    monkeypatch.setattr(steps, "on_demand_pays", lambda density, *a: planned.append(stand_in_rule(density)) or
                        planned[-1])
    model, x = make_model("paper_cnn")
    y = torch.tensor([0, 1, 2, 3, 4])
    weight = torch.zeros(5, FC_UNITS.stop, dtype=x.dtype)
    weight[:, 0] = 1.0
    backward_with(model, x, weight)
    assert RECORD.snapshot()[fc_layer(model)] == 0.0
    planned.clear()
    grads = []
    for native in (True, False):
        model.zero_grad()
        with mock.patch.object(engine, "native_or_warn", lambda: native):
            loss = mmr_ext.universal_loss(model, x, y, k_boundary=0.5, gamma=(1.0, 0.15), lam=(3.0, 12.0),
                                          chunk_size=2)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if native:
            assert RECORD.snapshot()[fc_layer(model)] > 0.0
    assert planned and all(planned)  # every pass and recomputation: on demand
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def stand_in_rule(density):
    """A plan rule for these small nets: on demand below a density of one half."""
    return density is not None and density < 0.5


def sparse_plan(monkeypatch):
    """paper_cnn with its fc rows planned on demand (forward order cheaper, no fc gradient last time)."""
    monkeypatch.setattr(steps, "PATCH_COST_WEIGHT", 1e-12)
    monkeypatch.setattr(steps, "on_demand_pays", lambda density, *a: stand_in_rule(density))
    model, x = make_model("paper_cnn")
    weight = torch.zeros(5, FC_UNITS.stop, dtype=x.dtype)
    weight[:, 0] = 1.0
    backward_with(model, x, weight)
    return model, x


def test_transient_conv_rows_are_freed_before_the_backward(monkeypatch):
    """The second conv's rows, which no layer keeps, are not held by the backward (its pairs are
    rebuilt from the recipe), and the gradients still equal the reference's."""
    model, x = sparse_plan(monkeypatch)
    built = []
    original = conv_rows.KernelConvRows.rows
    monkeypatch.setattr(conv_rows.KernelConvRows, "rows",
                        lambda self, samples, tensors: built.append(original(self, samples, tensors)) or built[-1])
    b, _ = mmr_ext.region_distances(model, x, math.inf)
    alive = [weakref.ref(P) for P in built]
    built.clear()
    gc.collect()
    assert alive and all(ref() is None for ref in alive)
    model.zero_grad()
    b.nan_to_num(posinf=0.0).sum().backward()
    got = grads_of(model)
    model.zero_grad()
    rb, _ = mmr_ext.region_distances_reference(model, x, math.inf)
    rb.nan_to_num(posinf=0.0).sum().backward()
    for a, b in zip(got, grads_of(model)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def grads_of(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_a_recomputation_does_not_rebuild_transient_rows(monkeypatch):
    """Checkpointed chunks (the walk back of the logits' rows over the budget) recompute what the
    backward saved, not the values of transient conv rows, which only distances read."""
    model, x = sparse_plan(monkeypatch)
    calls = []
    original = conv_rows.KernelConvRows.rows
    monkeypatch.setattr(conv_rows.KernelConvRows, "rows",
                        lambda self, samples, tensors: calls.append(samples) or original(self, samples, tensors))
    b = compute_geometry(model, x, (math.inf,), None, MemoryBudget(2))[0][0][0]
    assert len(calls) == 4  # the plan's pass over two samples, then one build per chunk of 2, 2 and 1
    recomputed = []
    monkeypatch.setattr(conv_rows.KernelConvRows, "empty", lambda self, _o=conv_rows.KernelConvRows.empty:
                        recomputed.append(1) or _o(self))
    b.nan_to_num(posinf=0.0).sum().backward()
    assert len(calls) == 4 and len(recomputed) == 3  # each chunk recomputed, its rows left unbuilt
