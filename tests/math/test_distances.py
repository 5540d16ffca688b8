"""Tests of mmr_ext.math.distances (docs/MATH.md §2) and mmr_ext.math.rounding: dual norms from the
definition, no overflow for general q, +inf for zero rows without NaN gradients, batch norms and
distances, rounding toward zero."""
import math

import pytest
import torch

from mmr_ext.math.distances import distance, lp_norm, row_norms, safe_distance
from mmr_ext.math.rounding import round_down

INF = math.inf


@pytest.mark.parametrize("q", [1.0, 1.5, 2.0, 3.0, 7.0, INF])
def test_row_norms_follow_the_definition(q):
    g = torch.Generator().manual_seed(0)
    V = torch.randn(5, 9, 4, generator=g, dtype=torch.float64)
    V[0, :, 1] = 0.0
    want = V.abs().amax(dim=1) if math.isinf(q) else (V.abs() ** q).sum(dim=1) ** (1 / q)
    torch.testing.assert_close(row_norms(V, q, dim=1), want, rtol=1e-13, atol=0)
    if q not in (2.0, INF):  # general q is scaled by the row maximum: |v|^q would overflow here
        big = torch.full((2, 3), 1e200, dtype=torch.float64)
        torch.testing.assert_close(row_norms(big, q, dim=1), torch.full((2,), 1e200 * 3 ** (1 / q), dtype=torch.float64),
                                   rtol=1e-13, atol=0)


def test_safe_distance_is_inf_for_zero_rows_and_nan_free():
    num = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    V = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    d = safe_distance(num, row_norms(V, 2.0, dim=1))
    assert d.tolist() == [0.2, INF, 0.0]
    d[torch.isfinite(d)].sum().backward()
    assert torch.isfinite(num.grad).all() and torch.isfinite(V.grad).all()
    assert num.grad[1] == 0 and (V.grad[1] == 0).all()


def test_lp_norm_and_distance_are_per_sample_float64():
    a = torch.rand(4, 2, 3, dtype=torch.float32)
    b = torch.rand(4, 2, 3, dtype=torch.float32)
    for p in (1, 2, INF):
        n = distance(a, b, p)
        assert n.dtype == torch.float64 and n.shape == (4,)
        want = torch.linalg.vector_norm((a.double() - b.double()).reshape(4, -1), ord=p, dim=1)
        assert torch.equal(n, want) and torch.equal(lp_norm(a.double() - b.double(), p), want)


def test_round_down_never_rounds_up():
    g = torch.Generator().manual_seed(2)
    v = torch.rand(1000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-5, 5, (1000,), generator=g)
    out = round_down(v, torch.float32)
    assert out.dtype == torch.float32
    assert (out.double() <= v).all()
    assert (torch.nextafter(out, torch.full_like(out, INF)).double() > v).all()   # the nearest below
    special = round_down(torch.tensor([0.0, INF, 1e300], dtype=torch.float64), torch.float32)
    assert special[0] == 0 and special[1] == INF and special[2] == torch.finfo(torch.float32).max
    assert round_down(v, torch.float64) is v
