"""Native kernels and the fast geometry path against the pure-PyTorch reference."""
import math

import pytest
import torch
from torch import nn

import mmr_ext
from mmr_ext.math.norms import dual_exponent
from mmr_ext.native import available, ops
from oracles import (MODELS, NORMS, assert_distances_close, distances_and_grads, dual_norm,
                      gradcheck_distances, make_model)

pytestmark = pytest.mark.skipif(not available(), reason="compiled extension missing")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rows(shared: bool, dtype=torch.float64, B=4, R=7, D=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn((1 if shared else B, R, D), generator=g, dtype=torch.float64).to(dtype)
    rows[:, 2] = 0.0  # a zero row: no hyperplane
    f = torch.randn((B, R), generator=g, dtype=torch.float64).to(dtype)
    return f, rows


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("is_signed", [False, True])
def test_row_distances_match_definition(p, shared, is_signed):
    q = dual_exponent(p)
    f, rows = _rows(shared)
    dist, norm = (t[0] for t in ops.row_distances(f, rows, [q], is_signed))
    expected_norm = dual_norm(rows, p)  # dual_norm takes the primal p
    torch.testing.assert_close(norm, expected_norm, rtol=1e-12, atol=0)
    num = f if is_signed else f.abs()
    expected = num / expected_norm.expand_as(f)
    expected[:, 2] = math.inf
    assert_distances_close(dist, expected, 1e-12)


@pytest.mark.parametrize("p", NORMS)
def test_row_distances_float32(p):
    q = dual_exponent(p)
    f, rows = _rows(False, torch.float32)
    dist = ops.row_distances(f, rows, [q])[0][0]
    ref = ops.row_distances(f.double(), rows.double(), [q])[0][0]
    assert dist.dtype == torch.float32
    assert_distances_close(dist.double(), ref, 1e-5)


@pytest.mark.parametrize("p", [1, 1.5, 2, 3])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("is_signed", [False, True])
def test_row_distances_gradcheck(p, shared, is_signed):
    q = dual_exponent(p)
    f, rows = _rows(shared, R=5, D=6)
    rows[:, 2] = torch.randn(rows.shape[0], 6, dtype=torch.float64)  # gradcheck needs finite outputs
    f.requires_grad_(True)
    rows.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ops.row_distances(a, b, [q], is_signed)[0], (f, rows))


def test_row_distances_gradcheck_linf_dual():
    """p = 1 (q = inf) needs a unique maximum per row: nudge rows apart from ties."""
    f, rows = _rows(False, R=5, D=6)
    rows[:, 2] = torch.randn(rows.shape[0], 6, dtype=torch.float64)
    f.requires_grad_(True)
    rows.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ops.row_distances(a, b, [math.inf, 2.0, 3.0])[0], (f, rows))


def test_row_distances_backward_skips_unselected_rows():
    f, rows = _rows(False)
    f.requires_grad_(True)
    rows.requires_grad_(True)
    dist = ops.row_distances(f, rows, [2.0, 1.0])[0]
    dist[:, :, 0].sum().backward()
    assert rows.grad[:, 1:].abs().sum() == 0 and rows.grad[:, 0].abs().sum() > 0
    assert f.grad[:, 1:].abs().sum() == 0


def _topk_reference(dist, k, gamma):
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    return torch.relu(1 - dist.gather(1, order) / gamma).mean(1), order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_hinge_matches_sort_and_breaks_ties_by_index(dtype):
    g = torch.Generator().manual_seed(1)
    dist = torch.rand(6, 40, generator=g, dtype=torch.float64).to(dtype)
    dist[:, 10:20] = dist[:, 0:1]  # ties with the first entry
    dist[0, 5] = math.inf
    for k in [1, 7, 15, 40]:
        value, index = ops.topk_hinge(dist, k, 0.6)
        ref_value, ref_index = _topk_reference(dist, k, 0.6)
        assert torch.equal(index, ref_index)
        torch.testing.assert_close(value, ref_value)


def test_topk_hinge_gradcheck_and_selection_only():
    g = torch.Generator().manual_seed(2)
    dist = (torch.rand(3, 12, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d: ops.topk_hinge(d, 4, 1.3)[0], (dist,))
    value, index = ops.topk_hinge(dist, 4, 1.3)
    value.sum().backward()
    selected = torch.zeros_like(dist, dtype=torch.bool).scatter(1, index, True)
    assert (dist.grad[~selected] == 0).all()


def test_topk_hinge_argument_errors():
    dist = torch.rand(2, 5)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, 5\], got 6"):
        ops.topk_hinge(dist, 6, 1.0)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, 5\], got 0"):
        ops.topk_hinge(dist, 0, 1.0)
    with pytest.raises(RuntimeError, match="gamma must be positive"):
        ops.topk_hinge(dist, 2, 0.0)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("p", NORMS)
def test_fast_path_matches_reference_float64(name, p):
    model, x = make_model(name)
    boundary, decision = mmr_ext.region_distances(model, x, p)
    ref_boundary, ref_decision = mmr_ext.region_distances_reference(model, x, p)
    assert_distances_close(boundary, ref_boundary, 1e-10)
    assert_distances_close(decision, ref_decision, 1e-10)


@pytest.mark.parametrize("weight", [0.0, math.inf])
@pytest.mark.parametrize("name", ["cnn", "paper_cnn"])
def test_patch_and_reverse_orders_agree_with_reference(monkeypatch, weight, name):
    """Rows of a Linear after conv layers: values by patch contraction (weight 0) or reverse order (inf)."""
    monkeypatch.setattr(mmr_ext.geometry.steps, "PATCH_COST_WEIGHT", weight)
    model, x = make_model(name)
    for p in (1, 2.5, math.inf):
        boundary, decision = mmr_ext.region_distances(model, x, p)
        ref_boundary, ref_decision = mmr_ext.region_distances_reference(model, x, p)
        assert_distances_close(boundary, ref_boundary, 1e-10)
        assert_distances_close(decision, ref_decision, 1e-10)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_fast_path_float32_against_float64_reference(name, p):
    model, x = make_model(name)
    ref_boundary, ref_decision = mmr_ext.region_distances_reference(model, x, p)
    boundary, decision = mmr_ext.region_distances(model.float(), x.float(), p)
    assert boundary.dtype == torch.float32
    assert_distances_close(boundary.double(), ref_boundary, 1e-4)
    assert_distances_close(decision.double(), ref_decision, 1e-4)


@pytest.mark.parametrize("name", ["deep_fc", "paper_cnn"])
@pytest.mark.parametrize("p", [2, 3])
def test_fast_path_gradcheck_input_and_parameters(name, p):
    model, x = make_model(name)
    assert gradcheck_distances(model, x[:2], p, max_params=3)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("p", NORMS)
def test_fast_path_gradients_match_reference_autograd(name, p):
    """Backward of the native path equals autograd through the dense reference, for x and all parameters."""
    model, x = make_model(name)
    _, fast = distances_and_grads(mmr_ext.region_distances, model, x, p)
    _, ref = distances_and_grads(mmr_ext.region_distances_reference, model, x, p)
    for g_fast, g_ref in zip(fast, ref):
        assert g_fast is not None and g_ref is not None
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


def test_batch_invariance():
    model, x = make_model("cnn")
    b_all, d_all = mmr_ext.region_distances(model, x, 2)
    for i in range(x.shape[0]):
        b_one, d_one = mmr_ext.region_distances(model, x[i:i + 1], 2)
        torch.testing.assert_close(b_one, b_all[i:i + 1], rtol=1e-12, atol=0)
        torch.testing.assert_close(d_one, d_all[i:i + 1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    nn.AvgPool2d(2, ceil_mode=True),
])
def test_layouts_outside_fast_path_fall_back_to_reference(layer):
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), layer, nn.ReLU(), nn.Flatten()).double()
    x = torch.rand(3, 2, 9, 9, dtype=torch.float64)
    model = nn.Sequential(*features, nn.Linear(features(x).shape[1], 3)).double()
    b, d = mmr_ext.region_distances(model, x, 2)
    rb, rd = mmr_ext.region_distances_reference(model, x, 2)
    assert torch.equal(b, rb) and torch.equal(d, rd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("p", NORMS)
def test_cuda_matches_cpu(p):
    q = dual_exponent(p)
    for shared in (False, True):
        f, rows = _rows(shared, torch.float32, B=9, R=300, D=77)
        dist = ops.row_distances(f, rows, [q, 2.0])[0]
        dist_c = ops.row_distances(f.cuda(), rows.cuda(), [q, 2.0])[0]
        assert_distances_close(dist_c.cpu().double(), dist.double(), 1e-5)
        value, index = ops.topk_hinge(dist[0].nan_to_num(posinf=1e9), 20, 0.7)
        value_c, index_c = ops.topk_hinge(dist_c[0].nan_to_num(posinf=1e9), 20, 0.7)
        assert torch.equal(index_c.cpu(), index)
        torch.testing.assert_close(value_c.cpu(), value, rtol=1e-5, atol=1e-6)
    model, x = make_model("cnn")
    b, d = mmr_ext.region_distances(model.float(), x.float(), p)
    bc, dc = mmr_ext.region_distances(model.float().cuda(), x.float().cuda(), p)
    assert_distances_close(bc.cpu().double(), b.double(), 1e-4)
    assert_distances_close(dc.cpu().double(), d.double(), 1e-4)


def test_several_norms_in_one_pass_equal_separate_calls_and_sum_gradients():
    f, rows = _rows(False, R=6, D=9)
    qs = [math.inf, 1.0, 2.0, 3.0]
    f.requires_grad_(True)
    rows.requires_grad_(True)
    dist, norm = ops.row_distances(f, rows, qs)
    weights = torch.rand(dist.shape, dtype=dist.dtype)
    (dist.nan_to_num(posinf=0.0) * weights).sum().backward()
    grad_f, grad_rows = f.grad.clone(), rows.grad.clone()
    f.grad = rows.grad = None
    total = 0
    for k, q in enumerate(qs):
        single, single_norm = ops.row_distances(f, rows, [q])
        assert torch.equal(single[0], dist[k]) and torch.equal(single_norm[0], norm[k])
        total = total + (single[0].nan_to_num(posinf=0.0) * weights[k]).sum()
    total.backward()
    torch.testing.assert_close(grad_f, f.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_rows, rows.grad, rtol=1e-12, atol=1e-14)
