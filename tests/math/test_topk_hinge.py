"""Tests of mmr_ext.math.topk_hinge (docs/MATH.md §6): the hinge, the pure-PyTorch top-k hinge mean
against its definition and against the native op, ties, gradients."""
import pytest
import torch

import mmr_ext.native as native
from mmr_ext.math.topk_hinge import hinge, topk_hinge_mean_reference


def test_hinge_values_and_gradient():
    d = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0, float("inf")], dtype=torch.float64, requires_grad=True)
    h = hinge(d, 2.0)
    assert torch.equal(h.detach(), torch.tensor([1.5, 1.0, 0.75, 0.0, 0.0, 0.0], dtype=torch.float64))
    h.sum().backward()
    assert torch.equal(d.grad, torch.tensor([-0.5, -0.5, -0.5, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_reference_is_the_mean_over_the_k_smallest_with_ties_by_index():
    dist = torch.tensor([[0.3, 0.1, 0.3, 2.0, 0.1], [5.0, 4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    value, index = topk_hinge_mean_reference(dist, 3, 1.0)
    assert index.tolist() == [[1, 4, 0], [4, 3, 2]]
    torch.testing.assert_close(value, torch.tensor([(0.9 + 0.9 + 0.7) / 3, 0.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(6, 40, generator=g, dtype=torch.float64) * 2
    for k in (1, 7, 40):
        value, _ = topk_hinge_mean_reference(dist, k, 0.8)
        want = torch.clamp(1 - torch.sort(dist, dim=1).values[:, :k] / 0.8, min=0).mean(1)
        torch.testing.assert_close(value, want, rtol=1e-15, atol=0)


def test_gradient_reaches_only_selected_active_entries():
    dist = torch.tensor([[0.2, 0.9, 0.5, 1.5, 0.05]], dtype=torch.float64, requires_grad=True)
    value, _ = topk_hinge_mean_reference(dist, 4, 1.0)
    value.sum().backward()
    # selected: 0.05, 0.2, 0.5, 0.9 (active); 1.5 is not selected
    assert torch.equal(dist.grad, torch.tensor([[-0.25, -0.25, -0.25, 0.0, -0.25]], dtype=torch.float64))


@pytest.mark.skipif(not native.available(), reason="needs the compiled extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_the_native_op(dtype):
    g = torch.Generator().manual_seed(1)
    dist = (torch.rand(8, 60, generator=g, dtype=torch.float64) * 3).to(dtype)
    dist[:, ::5] = dist[:, :1]                                 # ties
    dist[0, 3] = float("inf")
    for k in (1, 10, 60):
        a = dist.clone().requires_grad_(True)
        b = dist.clone().requires_grad_(True)
        value, index = native.topk_hinge(a, k, 1.3)
        ref, ref_index = topk_hinge_mean_reference(b, k, 1.3)
        assert torch.equal(index, ref_index)
        torch.testing.assert_close(value, ref)
        value.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(a.grad, b.grad)
