"""Tests of mmr_ext.math.box_distance.box_closest_point (docs/MATH.md §7): the minimiser of the box
distance lies in the box and on the hyperplane, its lp-distance to x is the returned distance, and
it is the minimiser found by an exact active-set enumeration (unique for 1 < p < inf)."""
import math

import numpy as np
import pytest
import torch

from mmr_ext.math.box_distance import box_closest_point, box_distance
from oracles import enumerate_active_sets, random_box_case

INF = math.inf
P_POINT = [1.0, 1.5, 2.0, 3.0, INF]


def t64(a):
    return torch.as_tensor(a, dtype=torch.float64)


def check_points(w, b, x, p, lo, hi, dist, point):
    """In the box exactly, on the hyperplane up to rounding, at lp-distance ``dist`` from x; NaN
    exactly where the distance is +inf. Shapes: w [M, d], x [B, d], dist [B, M], point [B, M, d]."""
    finite = torch.isfinite(dist)
    assert torch.equal(torch.isnan(point).any(-1), ~finite) and torch.equal(torch.isnan(point).all(-1), ~finite)
    z = point[finite]                                              # [n, d]
    lo_t, hi_t = torch.as_tensor(lo).expand(x.shape[1]), torch.as_tensor(hi).expand(x.shape[1])
    assert ((z >= lo_t) & (z <= hi_t)).all()
    m = torch.arange(w.shape[0]).expand_as(dist)[finite]
    xi = x[:, None, :].expand_as(point)[finite]
    residual = (w[m] * z).sum(-1) + b[m]
    scale = (w[m].abs() * (z.abs() + xi.abs())).sum(-1) + b[m].abs()
    assert (residual.abs() <= 1e-13 * (1 + scale)).all(), residual.abs().max()
    norms = torch.linalg.vector_norm(z - xi, ord=p, dim=-1)
    assert torch.allclose(norms, dist[finite], rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("p", P_POINT)
@pytest.mark.parametrize("tensor_box", [False, True])
def test_closest_point_is_the_enumerated_minimiser(p, tensor_box):
    rng = np.random.default_rng(int(10 * (p if p < INF else 99)) + 5 + tensor_box)
    n_fin = 0
    for _ in range(12):
        d = int(rng.integers(2, 6))
        w, b, x, lo, hi = random_box_case(rng, d, 6, tensor_box=tensor_box)
        dist, point = box_closest_point(t64(w), t64(b), t64(x), p, t64(lo), t64(hi))
        check_points(t64(w), t64(b), t64(x), p, t64(lo), t64(hi), dist, point)
        for i in range(x.shape[0]):
            for m in range(w.shape[0]):
                ref, ref_z = enumerate_active_sets(w[m], b[m], x[i], p, lo, hi, return_point=True)
                if math.isinf(ref):
                    assert torch.isnan(point[i, m]).all()
                    continue
                n_fin += 1
                assert dist[i, m].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
                if 1 < p < INF:  # strictly convex norm: the minimiser is unique
                    np.testing.assert_allclose(point[i, m].numpy(), ref_z, rtol=0, atol=1e-9)
    assert n_fin > 30


@pytest.mark.parametrize("p", P_POINT + [1.2, 7.5])
def test_closest_points_of_many_random_hyperplanes(p):
    gen = torch.Generator().manual_seed(int(p * 10) if p < INF else 1)
    for d, lo, hi in ((20, 0.0, 1.0), (64, -1.0, 0.5), (7, -INF, INF)):
        w = torch.randn(50, d, generator=gen, dtype=torch.float64) * torch.rand(50, d, generator=gen, dtype=torch.float64) ** 3
        w[::7] = 0.0                                               # zero rows: no hyperplane
        w[3, : d // 2] = 0.0
        box_lo, box_hi = (max(lo, -3.0), min(hi, 3.0))
        x = box_lo + (box_hi - box_lo) * torch.rand(6, d, generator=gen, dtype=torch.float64)
        x[0, : d // 3] = box_lo                                    # on faces of the box
        b = -(w @ (box_lo + (box_hi - box_lo) * (1.4 * torch.rand(d, generator=gen, dtype=torch.float64) - 0.2)))
        b[5] = -(w[5] @ x[1])                            # through a point: distance 0 (up to rounding of g)
        dist, point = box_closest_point(w, b, x, p, lo, hi)
        assert torch.equal(dist, box_distance(w, b, x, p, lo, hi))
        check_points(w, b, x, p, lo, hi, dist, point)
        assert torch.isinf(dist[:, ::7]).all() and torch.isfinite(dist).sum() > 100
        assert dist[1, 5] < 1e-14 and torch.allclose(point[1, 5], x[1], rtol=0, atol=1e-14)


def test_closest_point_closed_forms():
    w = t64([[3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [1.0, 4.0]])
    b = t64([-1.0, -2.0, -2.5, -4.5])
    x = t64([0.5, 0.5])
    _, z = box_closest_point(w, b, x, 2)
    # inside the box: the orthogonal projection x - g w / ||w||²
    torch.testing.assert_close(z[0], x - (w[0] @ x + b[0]) * w[0] / (w[0] @ w[0]), rtol=0, atol=1e-15)
    torch.testing.assert_close(z[1], t64([1.0, 1.0]), rtol=0, atol=0)   # only the far corner
    assert torch.isnan(z[2]).all()                                     # misses the box
    # x1 + 4 x2 = 4.5 from the origin: l1 saturates x2, then moves x1; l2 t = min(μ a, room)
    zero = t64([0.0, 0.0])
    _, z1 = box_closest_point(w[3:], b[3:], zero, 1)
    torch.testing.assert_close(z1[0], t64([0.5, 1.0]), rtol=0, atol=1e-15)
    _, zi = box_closest_point(w[3:], b[3:], zero, INF)
    torch.testing.assert_close(zi[0], t64([0.9, 0.9]), rtol=0, atol=1e-15)
    # without a box the l∞ minimiser moves every coordinate by the same amount
    _, zf = box_closest_point(w[:1], b[:1], x, INF, -INF, INF)
    torch.testing.assert_close(zf[0], x - 2.5 / 7, rtol=0, atol=1e-15)
    # x on the hyperplane: the point is x itself
    d0, z0 = box_closest_point(t64([[1.0, -1.0]]), t64([0.0]), t64([1.0, 1.0]), 1.5)
    assert d0[0] == 0 and torch.equal(z0[0], t64([1.0, 1.0]))


def test_closest_point_shapes_blocks_and_dtypes():
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(23, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(23, generator=gen, dtype=torch.float64) * 0.5
    x = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    for p in (1.0, 2.0, 2.5, INF):
        dist, point = box_closest_point(w, b, x, p)
        assert dist.shape == (4, 23) and point.shape == (4, 23, 6) and point.dtype == torch.float64
        for chunk_size in (1, 5, 1000):
            d2, p2 = box_closest_point(w, b, x, p, chunk_size=chunk_size)
            assert torch.equal(d2, dist) and torch.equal(p2.nan_to_num(7.0), point.nan_to_num(7.0))
        d1, p1 = box_closest_point(w, b, x[2], p)
        assert d1.shape == (23,) and p1.shape == (23, 6)
        torch.testing.assert_close(p1.nan_to_num(7.0), point[2].nan_to_num(7.0), rtol=1e-12, atol=1e-14)
        # float32 inputs: float32 distances (as box_distance), float64 points
        d32, p32 = box_closest_point(w.float(), b.float(), x.float(), p)
        assert d32.dtype == torch.float32 and p32.dtype == torch.float64
        assert torch.equal(d32, box_distance(w.float(), b.float(), x.float(), p))
    with pytest.raises(ValueError, match="x must lie in the box"):
        box_closest_point(w, b, x + 2, 2)
