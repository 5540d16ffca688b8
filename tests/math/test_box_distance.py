"""Tests of mmr_ext.math.box_distance (docs/MATH.md §7): box-constrained lp-distances to hyperplanes against an exact
active-set enumeration, scipy's LP solver (p = 1, inf) and SLSQP (p = 2, 3), degenerate geometry,
dtypes and errors. The early-stopping minimum: test_box_min_distance.py; the minimisers:
test_box_closest_point.py."""
import math

import numpy as np
import pytest
import torch

from mmr_ext.math.box_distance import box_distance, box_min_distance
from oracles import enumerate_active_sets, linprog_distance, meets_box, random_box_case, slsqp_distance

INF = math.inf
P_ALL = [1.0, 1.3, 2.0, 3.0, 7.5, INF]


def dual(p):
    return INF if p == 1 else (1.0 if math.isinf(p) else p / (p - 1.0))


def run(w, b, x, p, lo, hi, **kw):
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)
    return box_distance(t(w), t(b), t(x), p, t(lo), t(hi), **kw).numpy()


# ------------------------------------------------------------------------------------------
# exactness

@pytest.mark.parametrize("p", P_ALL)
@pytest.mark.parametrize("tensor_box", [False, True])
def test_matches_active_set_enumeration(p, tensor_box):
    rng = np.random.default_rng(int(10 * (p if p < INF else 99)) + tensor_box)
    n_inf = n_fin = 0
    for _ in range(12):
        d = int(rng.integers(2, 6))
        w, b, x, lo, hi = random_box_case(rng, d, 6, tensor_box=tensor_box)
        out = run(w, b, x, p, lo, hi)
        for i in range(x.shape[0]):
            for m in range(w.shape[0]):
                ref = enumerate_active_sets(w[m], b[m], x[i], p, lo, hi)
                if math.isinf(ref):
                    assert out[i, m] == INF, (d, m)
                    n_inf += 1
                else:
                    assert out[i, m] == pytest.approx(ref, rel=1e-9, abs=1e-12), (d, m)
                    n_fin += 1
    assert n_inf > 10 and n_fin > 30                    # both kinds of cases were exercised


@pytest.mark.parametrize("p", [1.0, INF])
def test_matches_linprog(p):
    rng = np.random.default_rng(7 if p == 1 else 8)
    for d in (2, 3, 8, 40):
        w, b, x, lo, hi = random_box_case(rng, d, 8, tensor_box=d % 2 == 0)
        out = run(w, b, x, p, lo, hi)
        for i in range(x.shape[0]):
            for m in range(w.shape[0]):
                if not w[m].any():                       # zero rows define no hyperplane
                    assert out[i, m] == INF
                    continue
                ref = linprog_distance(w[m], b[m], x[i], p, lo, hi)
                assert (math.isinf(ref) == math.isinf(out[i, m])) and (math.isinf(ref) != meets_box(w[m], b[m], lo, hi))
                if not math.isinf(ref):
                    assert out[i, m] == pytest.approx(ref, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_matches_slsqp(p):
    rng = np.random.default_rng(int(p))
    for d in (2, 4, 6):
        w, b, x, lo, hi = random_box_case(rng, d, 5, tensor_box=False)
        out = run(w, b, x, p, lo, hi)
        for i in range(2):
            for m in range(w.shape[0]):
                if not w[m].any() or not meets_box(w[m], b[m], lo, hi):
                    assert out[i, m] == INF
                    continue
                ref = slsqp_distance(w[m], b[m], x[i], p, lo, hi, rng)
                assert out[i, m] <= ref * (1 + 1e-9)           # the exact optimum is not beaten
                assert out[i, m] == pytest.approx(ref, rel=1e-6)


def test_hand_computed_cases():
    f = lambda w, b, x, p, **kw: float(box_distance(torch.tensor([w], dtype=torch.float64),
                                                     torch.tensor([b], dtype=torch.float64),
                                                     torch.tensor(x, dtype=torch.float64), p, **kw)[0])
    # x1 + x2 = 1.5 from the origin: only the top-right corner region is reachable
    assert f([1.0, 1.0], -1.5, [0.0, 0.0], 2) == pytest.approx(math.sqrt(2 * 0.75 ** 2))
    assert f([1.0, 1.0], -1.5, [0.0, 0.0], INF) == pytest.approx(0.75)
    assert f([1.0, 1.0], -1.5, [0.0, 0.0], 1) == pytest.approx(1.5)
    # x1 + 4 x2 = 4.5 from the origin: x2 saturates at 1, then x1 moves 0.5
    assert f([1.0, 4.0], -4.5, [0.0, 0.0], 1) == pytest.approx(1.5)
    assert f([1.0, 4.0], -4.5, [0.0, 0.0], 2) == pytest.approx(math.sqrt(1.25))
    assert f([1.0, 4.0], -4.5, [0.0, 0.0], INF) == pytest.approx(0.9)
    # only the far corner lies on the plane
    assert f([1.0, 1.0], -2.0, [0.0, 0.0], 2) == pytest.approx(math.sqrt(2))
    assert f([1.0, 1.0], -2.0 - 1e-9, [0.0, 0.0], 2) == INF
    # x on the plane, on the box boundary
    assert f([1.0, -1.0], 0.0, [1.0, 1.0], 2) == 0.0
    # unconstrained solution inside the box: equals |g| / ||w||_q
    assert f([3.0, 4.0], -1.0, [0.5, 0.5], 2) == pytest.approx(2.5 / 5)
    # a custom box
    assert f([1.0, 0.0], 0.0, [2.0, 5.0], 2, lo=1.0, hi=6.0) == INF
    assert f([1.0, 0.0], -3.0, [2.0, 5.0], 2, lo=1.0, hi=6.0) == pytest.approx(1.0)


@pytest.mark.parametrize("p", P_ALL)
def test_unbounded_box_gives_unconstrained_distance(p):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(60, 50, generator=gen, dtype=torch.float64)
    b = torch.randn(60, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    free = (x @ w.T + b).abs() / torch.linalg.vector_norm(w, dual(p), dim=1)
    assert torch.allclose(box_distance(w, b, x, p, -INF, INF), free, rtol=1e-12, atol=0)
    lo = torch.full((50,), -INF, dtype=torch.float64)
    lo[::2] = -10.0                                      # half-bounded box: still reaches nothing
    assert torch.allclose(box_distance(w, b, x, p, lo, INF), free, rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", P_ALL)
def test_box_never_below_unconstrained_and_on_plane_is_zero(p):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(80, 30, generator=gen, dtype=torch.float64)
    x = torch.rand(6, 30, generator=gen, dtype=torch.float64)
    b = -(w @ torch.rand(30, generator=gen, dtype=torch.float64))
    b[::4] = -(w.clamp(min=0).sum(dim=1) + 0.01)[::4]   # <w, z> + b < 0 on the whole box
    out = box_distance(w, b, x, p)
    free = (x @ w.T + b).abs() / torch.linalg.vector_norm(w, dual(p), dim=1)
    assert (out >= free * (1 - 1e-13)).all()
    assert torch.isinf(out).any() and torch.isfinite(out).any()
    # hyperplanes through the points themselves
    b_on = -(x @ w[:6].T).diagonal()
    on = box_distance(w[:6], b_on, x, p)
    assert (on.diagonal() == 0).all()


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, INF])
def test_degenerate_rows_and_coordinates(p):
    x = torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.3, 0.4]], dtype=torch.float64)
    w = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, -1.0, -0.1], dtype=torch.float64)
    out = box_distance(w, b, x, p)
    assert torch.isinf(out[:, :2]).all()                # zero rows define no hyperplane
    assert out[0, 2] == pytest.approx(0.5) and out[1, 2] == pytest.approx(0.2)
    assert out[0, 3] == pytest.approx(0.1) and out[1, 3] == pytest.approx(0.1)
    # x at a corner of the box, the plane only reachable along one edge
    corner = torch.zeros(3, dtype=torch.float64)
    assert float(box_distance(torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64),
                              torch.tensor([-0.5], dtype=torch.float64), corner, p)[0]) == pytest.approx(0.5)
    # lo == hi in a coordinate: it cannot move
    lo = torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 0.3, 1.0], dtype=torch.float64)
    xm = torch.tensor([0.5, 0.3, 0.5], dtype=torch.float64)
    assert float(box_distance(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64),
                              torch.tensor([-0.4], dtype=torch.float64), xm, p, lo, hi)[0]) == INF


def test_continuity_in_p():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(40, 25, generator=gen, dtype=torch.float64)
    b = torch.randn(40, generator=gen, dtype=torch.float64)
    x = torch.rand(5, 25, generator=gen, dtype=torch.float64)
    pairs = [(2.0, 2.0 + 1e-9, 1e-7), (2.0, 2.0 - 1e-9, 1e-7), (INF, 1e9, 1e-6), (1.0, 1.0 + 1e-9, 1e-6)]
    for p0, p1, tol in pairs:
        a0, a1 = box_distance(w, b, x, p0), box_distance(w, b, x, p1)
        assert torch.equal(torch.isinf(a0), torch.isinf(a1))
        fin = torch.isfinite(a0)
        assert fin.sum() > 100
        assert torch.allclose(a0[fin], a1[fin], rtol=tol, atol=0), (p0, p1)
    # the lp box distance is non-increasing in p
    ps = [1.0, 1.01, 1.5, 2.0, 3.0, 10.0, 100.0, INF]
    outs = [box_distance(w, b, x, p) for p in ps]
    for lo_p, hi_p in zip(outs[:-1], outs[1:]):
        fin = torch.isfinite(lo_p)
        assert (hi_p[fin] <= lo_p[fin] * (1 + 1e-12)).all()


def test_extreme_p_and_scales_stay_finite():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(30, 20, generator=gen, dtype=torch.float64) * torch.logspace(-8, 8, 20, dtype=torch.float64)
    b = -(w @ torch.rand(20, generator=gen, dtype=torch.float64))
    x = torch.rand(3, 20, generator=gen, dtype=torch.float64)
    for p in (1 + 1e-12, 1.0001, 1e6, 1e300):
        out = box_distance(w, b, x, p)
        assert not torch.isnan(out).any() and torch.isfinite(out).all()
    # a hyperplane through an interior point is always reachable; scaling (w, b) changes nothing
    for p in P_ALL:
        base = box_distance(w, b, x, p)
        assert torch.allclose(box_distance(1e5 * w, 1e5 * b, x, p), base, rtol=1e-12, atol=0)
        assert torch.allclose(box_distance(-1e-5 * w, -1e-5 * b, x, p), base, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------
# shapes, blocks, dtypes

def test_shapes_batches_and_blocks_agree():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(37, 9, generator=gen, dtype=torch.float64)
    b = torch.randn(37, generator=gen, dtype=torch.float64)
    x = torch.rand(5, 9, generator=gen, dtype=torch.float64)
    for p in (1.0, 2.0, 2.5, INF):
        full = box_distance(w, b, x, p)
        assert full.shape == (5, 37)
        # one point or a batch: <w, x> comes from differently shaped matmuls (last-bit changes)
        assert torch.allclose(box_distance(w, b, x[2], p), full[2], rtol=1e-13, atol=0)
        assert box_distance(w, b, x[2], p).shape == (37,)
        for chunk_size in (1, 7, 1000):
            assert torch.equal(box_distance(w, b, x, p, chunk_size=chunk_size), full)
    assert box_distance(w[:0], b[:0], x, 2).shape == (5, 0)
    assert box_distance(w, b, x[:0], 2).shape == (0, 37)


def test_output_dtype_and_rounding_toward_zero():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(200, 12, generator=gen)
    b = torch.randn(200, generator=gen)
    x = torch.rand(4, 12, generator=gen)
    for p in (1.0, 2.0, 3.0, INF):
        out32 = box_distance(w, b, x, p)
        assert out32.dtype == torch.float32
        ref = box_distance(w.double(), b.double(), x.double(), p)   # same values, float64 out
        assert torch.equal(torch.isinf(out32), torch.isinf(ref))
        fin = torch.isfinite(ref)
        assert (out32.double()[fin] <= ref[fin]).all()
        up = torch.nextafter(out32, torch.full_like(out32, INF)).double()
        assert (up[fin] > ref[fin]).all()
    # w and b in another floating dtype than x: x decides the output
    assert box_distance(w.double(), b.double(), x, 2).dtype == torch.float32
    assert box_distance(w, b, x.double(), 2).dtype == torch.float64


def test_does_not_track_gradients():
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.rand(4, requires_grad=True)
    out = box_distance(w, torch.zeros(3), x, 2)
    assert not out.requires_grad


# ------------------------------------------------------------------------------------------
# errors

def test_errors():
    w, b, x = torch.randn(3, 4), torch.randn(3), torch.rand(4)
    with pytest.raises(ValueError, match="p must be >= 1"):
        box_distance(w, b, x, 0.5)
    with pytest.raises(ValueError, match="p must be >= 1"):
        box_distance(w, b, x, float("nan"))
    with pytest.raises(ValueError, match=r"w must have shape \[M, d\]"):
        box_distance(w[0], b, x, 2)
    with pytest.raises(ValueError, match="b must have shape"):
        box_distance(w, b[:2], x, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        box_distance(w, b, torch.rand(5), 2)
    with pytest.raises(ValueError, match="x must have shape"):
        box_distance(w, b, torch.rand(2, 2, 4), 2)
    for name, args in (("w", (w.clone().fill_(float("nan")), b, x)), ("b", (w, b + float("inf"), x)),
                       ("x", (w, b, torch.tensor([0.1, float("nan"), 0.2, 0.3])))):
        with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
            box_distance(*args, 2)
    with pytest.raises(ValueError, match="x must lie in the box"):
        box_distance(w, b, x + 1.5, 2)
    with pytest.raises(ValueError, match="x must lie in the box"):
        box_distance(w, b, x, 2, lo=torch.tensor([0.0, 0.0, 0.0, 0.999]))
    with pytest.raises(ValueError, match="lo must be <= hi"):
        box_distance(w, b, x, 2, lo=1.0, hi=0.0)
    with pytest.raises(ValueError, match="lo contains NaN"):
        box_distance(w, b, x, 2, lo=float("nan"))
    with pytest.raises(ValueError, match="hi must be a scalar or have shape"):
        box_distance(w, b, x, 2, hi=torch.ones(3))
    with pytest.raises(TypeError, match="hi must be a number or a tensor"):
        box_distance(w, b, x, 2, hi="1")
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        box_distance(w.numpy(), b, x, 2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        box_distance(w, b, torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        box_distance(w, b, x, 2, chunk_size=0)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        box_min_distance(w, b, x, 2, chunk=0)
    with pytest.raises(ValueError, match="x must lie in the box"):
        box_min_distance(w, b, -x - 0.1, 2)
