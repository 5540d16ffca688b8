"""Tests of mmr_ext.math.ball_radii, hull_radius and universal_radius (docs/MATH.md §4, §5): the closed forms against independent numerical
optimisation, the paper's numbers, limits in p, degenerate radii, broadcasting and errors."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mmr_ext.math.ball_radii import naive_radius, union_radius
from mmr_ext.math.hull_radius import hull_radius
from mmr_ext.math.universal_radius import universal_radius

INF = math.inf
FUNCS = [naive_radius, union_radius, hull_radius, universal_radius]


def dual(p):
    return INF if p == 1 else (1.0 if math.isinf(p) else p / (p - 1.0))


# ------------------------------------------------------------------------------------------
# independent numerical oracles

def hull_ratio(U, e1, e_inf, p):
    """h(v) / ||v||_q for v = (1, U) (so ||v||_∞ = 1), h the support function of the hull."""
    q = dual(p)
    l1 = 1.0 + U.sum(-1)
    lq = np.ones_like(l1) if math.isinf(q) else (1.0 + (U ** q).sum(-1)) ** (1.0 / q)
    return np.maximum(e1, e_inf * l1) / lq


def hull_numeric(e1, e_inf, p, d):
    """min over v != 0 of max(e1 ||v||_∞, e∞ ||v||_1) / ||v||_q (docs/MATH.md §4).

    By symmetry (signs, permutations, scale) v = (1, u) with u in [0, 1]^{d-1}: a dense grid,
    then Nelder-Mead from the five best grid points. Every value is attained by some v, so the
    result can only overestimate the true minimum.
    """
    n = {2: 4001, 3: 301, 4: 61}[d]
    g = np.linspace(0.0, 1.0, n)
    U = np.stack(np.meshgrid(*[g] * (d - 1), indexing="ij"), -1).reshape(-1, d - 1)
    vals = hull_ratio(U, e1, e_inf, p)
    best = vals.min()
    for i in np.argsort(vals)[:5]:
        res = minimize(lambda u: hull_ratio(np.clip(u, 0, 1)[None], e1, e_inf, p)[0], U[i],
                       method="Nelder-Mead", bounds=[(0, 1)] * (d - 1),
                       options={"xatol": 1e-13, "fatol": 1e-15, "maxiter": 3000})
        best = min(best, res.fun)
    return best


def union_numeric(e1, e_inf, p, d):
    """min ||x||_p over ||x||_1 >= e1, ||x||_∞ >= e∞ (the closure of the outside of the union).

    By symmetry x >= 0 with x_0 the largest coordinate: a convex program (linear constraints
    x_0 >= e∞, Σ x >= e1), solved by SLSQP from several random starts.
    """
    rng = np.random.default_rng(0)
    cons = [{"type": "ineq", "fun": lambda x: x[0] - e_inf, "jac": lambda x: np.eye(d)[0]},
            {"type": "ineq", "fun": lambda x: x.sum() - e1, "jac": lambda x: np.ones(d)}]
    best = INF
    for _ in range(4):
        x0 = rng.random(d) * 2 * max(e1, e_inf)
        res = minimize(lambda x: np.sum(x ** p), x0, jac=lambda x: p * x ** (p - 1), method="SLSQP",
                       bounds=[(0, None)] * d, constraints=cons, options={"ftol": 1e-15, "maxiter": 500})
        x = np.maximum(res.x, 0)
        if x[0] >= e_inf * (1 - 1e-9) and x.sum() >= e1 * (1 - 1e-9):
            best = min(best, np.sum(x ** p) ** (1 / p))
    return best


# ------------------------------------------------------------------------------------------
# closed forms vs numerics

@pytest.mark.parametrize("d", [2, 3, 4])
@pytest.mark.parametrize("p", [1.3, 2.0, 3.7])
def test_hull_matches_support_function_minimum(d, p):
    # r = e1/e∞ below 1, between the integers, and at or beyond d
    for e1 in (0.61, 1.0, 1.2345, 2.0, 2.71828, 3.14159, 4.5, 6.0):
        e_inf = 0.8
        exact = hull_radius(e1, e_inf, p, d)
        numeric = hull_numeric(e1, e_inf, p, d)
        assert numeric >= exact * (1 - 1e-12), (e1, numeric, exact)   # a lower bound ...
        assert numeric == pytest.approx(exact, rel=1e-7), e1          # ... and attained


@pytest.mark.parametrize("d", [2, 3, 5])
@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
def test_union_matches_convex_program(d, p):
    e_inf = 1.0
    for e1 in (0.5, 1.0, 1.3, 0.5 * (1 + d), d - 0.2, float(d), d + 2.0):
        exact = union_radius(e1, e_inf, p, d)
        assert union_numeric(e1, e_inf, p, d) == pytest.approx(exact, rel=1e-6), e1


def test_union_brute_force_d2():
    # d = 2, p = 2: a fine grid over the outside of the union in the first quadrant
    e1, e_inf = 1.5, 1.0
    g = np.linspace(0, 2, 2001)
    X, Y = np.meshgrid(g, g)
    outside = (X + Y > e1) & (np.maximum(X, Y) > e_inf)
    brute = np.sqrt(X ** 2 + Y ** 2)[outside].min()
    exact = union_radius(e1, e_inf, 2, 2)
    assert exact == pytest.approx(math.sqrt(1 + 0.25))
    assert exact <= brute <= exact + 2e-3


def test_paper_formulas_written_out():
    # Prop 3.1 and Thm 3.1 as printed in docs/MATH.md, in the proper case e∞ < e1 < d e∞
    rng = np.random.default_rng(1)
    for _ in range(200):
        d = int(rng.integers(2, 4000))
        e_inf = float(rng.uniform(0.01, 2))
        e1 = float(e_inf * rng.uniform(1.001, d * 0.999))
        p = float(rng.choice([1.1, 1.5, 2.0, 3.0, 10.0]))
        q = p / (p - 1)
        union = (e_inf ** p + (e1 - e_inf) ** p / (d - 1) ** (p - 1)) ** (1 / p)
        r = e1 / e_inf
        a = r - math.floor(r)
        hull = e1 / (r - a + a ** q) ** (1 / q)
        assert union_radius(e1, e_inf, p, d) == pytest.approx(union, rel=1e-12)
        assert hull_radius(e1, e_inf, p, d) == pytest.approx(hull, rel=1e-12)
        assert naive_radius(e1, e_inf, p, d) == pytest.approx(max(e_inf, e1 * d ** ((1 - p) / p)),
                                                               rel=1e-12)


# ------------------------------------------------------------------------------------------
# the paper's numbers

@pytest.mark.parametrize("e1, e_inf, d, expected", [
    (1.0, 0.1, 784, 0.3162),        # MNIST, F-MNIST
    (3.0, 4 / 255, 3072, 0.2170),   # GTS
    (2.0, 2 / 255, 3072, 0.1252),   # CIFAR-10
])
def test_table1(e1, e_inf, d, expected):
    assert round(hull_radius(e1, e_inf, 2, d), 4) == expected


@pytest.mark.parametrize("d, peak", [(784, 3.8), (3072, 5.3)])
def test_figure2_peak_ratio(d, peak):
    e1 = torch.linspace(1.0, float(d), 20001, dtype=torch.float64)
    ratio = hull_radius(e1, 1.0, 2, d) / union_radius(e1, 1.0, 2, d)
    i = int(ratio.argmax())
    assert float(ratio[i]) == pytest.approx(peak, abs=0.05)
    assert abs(float(e1[i]) - math.sqrt(d)) < 0.1 * math.sqrt(d)
    assert float(ratio[0]) == pytest.approx(1.0) and float(ratio[-1]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# structure: ordering, regimes, continuity, limits in p

def test_naive_below_union_below_hull():
    e = torch.tensor([0.0, 1e-300, 0.3, 1.0, 2.5, 7.0, 100.0, 1e300, INF], dtype=torch.float64)
    e1, e_inf = e[:, None], e[None, :]
    for d in (2, 3, 784):
        for p in (1.0, 1.0 + 1e-12, 1.5, 2.0, 7.0, 1e12, INF):
            n, u, h = (f(e1, e_inf, p, d) for f in (naive_radius, union_radius, hull_radius))
            for t in (n, u, h):
                assert not torch.isnan(t).any()
            fin = torch.isfinite(h)
            assert (n <= u * (1 + 1e-12)).all() and (u <= h * (1 + 1e-12)).all(), (d, p)
            assert torch.equal(torch.isfinite(n), fin) and torch.equal(torch.isfinite(u), fin)


@pytest.mark.parametrize("p", [1.0, 1.7, 2.0, 4.0, INF])
def test_nested_regimes(p):
    d, q = 10, dual(p)
    l1_value = lambda e1: e1 * d ** (-(0.0 if math.isinf(q) else 1 / q))
    for f in (union_radius, hull_radius):
        assert f(0.5, 1.0, p, d) == 1.0            # B1 ⊂ B∞
        assert f(1.0, 1.0, p, d) == pytest.approx(1.0, rel=1e-15)
        assert f(25.0, 1.0, p, d) == pytest.approx(l1_value(25.0), rel=1e-15)    # B∞ ⊂ B1
        assert f(10.0, 1.0, p, d) == pytest.approx(l1_value(10.0), rel=1e-12)    # r = d
        # continuity where the regimes meet
        assert f(1.0 + 1e-9, 1.0, p, d) == pytest.approx(1.0, rel=1e-7)
        assert f(10.0 - 1e-9, 1.0, p, d) == pytest.approx(l1_value(10.0), rel=1e-7)


@pytest.mark.parametrize("p", [1.2, 2.0, 5.0])
def test_hull_continuous_across_integer_ratios(p):
    for k in (2, 3, 7):
        left = hull_radius(k - 1e-10, 1.0, p, 50)
        right = hull_radius(k + 1e-10, 1.0, p, 50)
        assert left == pytest.approx(right, rel=1e-8)
        assert hull_radius(float(k), 1.0, p, 50) == pytest.approx(k ** (1 / p), rel=1e-12)


def test_hull_independent_of_d_in_proper_case():
    for d in (30, 784, 3072):
        assert hull_radius(7.3, 1.0, 2, d) == hull_radius(7.3, 1.0, 2, 30)


def test_limits_in_p():
    d = 784
    for e1, e_inf in ((1.0, 0.1), (5.0, 1.0), (0.5, 1.0), (2000.0, 1.0)):
        # p = 1: ||.||_1 >= ||.||_∞, so both balls certify directly
        assert hull_radius(e1, e_inf, 1, d) == max(e1, e_inf)
        assert hull_radius(e1, e_inf, 1 + 1e-10, d) == pytest.approx(max(e1, e_inf), rel=1e-7)
        # p = inf: ||.||_∞ >= ||.||_1 / d
        assert hull_radius(e1, e_inf, INF, d) == pytest.approx(max(e_inf, e1 / d), rel=1e-15)
        assert hull_radius(e1, e_inf, 1e10, d) == pytest.approx(max(e_inf, e1 / d), rel=1e-7)
        assert naive_radius(e1, e_inf, 1, d) == max(e1, e_inf)
        assert naive_radius(e1, e_inf, INF, d) == max(e_inf, e1 / d)
    # union: e1 at p = 1 and e∞ at p = inf in the proper case
    assert union_radius(5.0, 1.0, 1, d) == pytest.approx(5.0, rel=1e-15)
    assert union_radius(5.0, 1.0, 1 + 1e-10, d) == pytest.approx(5.0, rel=1e-7)
    assert union_radius(5.0, 1.0, INF, d) == 1.0
    assert union_radius(5.0, 1.0, 1e10, d) == pytest.approx(1.0, rel=1e-7)


def test_hull_monotone_in_radii():
    e = torch.logspace(-3, 3, 61, dtype=torch.float64)
    h = hull_radius(e[:, None], e[None, :], 2.5, 100)
    assert (h[1:] >= h[:-1] * (1 - 1e-15)).all() and (h[:, 1:] >= h[:, :-1] * (1 - 1e-15)).all()


# ------------------------------------------------------------------------------------------
# degenerate radii

@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, INF])
def test_zero_and_infinite_radii(p):
    d, q = 784, dual(p)
    l1_value = lambda e1: e1 * d ** (-(0.0 if math.isinf(q) else 1 / q))
    for f in (union_radius, hull_radius):
        assert f(0.0, 0.0, p, d) == 0.0
        assert f(0.0, 0.3, p, d) == 0.3                      # B1 = {0}: the set is B∞
        assert f(2.0, 0.0, p, d) == pytest.approx(l1_value(2.0))   # B∞ = {0}: the set is B1
        assert f(INF, 0.3, p, d) == INF                      # B1 = R^d
        assert f(2.0, INF, p, d) == INF                      # B∞ = R^d
        assert f(INF, INF, p, d) == INF
        assert f(0.0, INF, p, d) == INF and f(INF, 0.0, p, d) == INF
    assert naive_radius(0.0, 0.0, p, d) == 0.0 and naive_radius(INF, 1.0, p, d) == INF


# ------------------------------------------------------------------------------------------
# universal radius (Thm 4.1)

def test_universal_equals_hull_for_positive_radii():
    rho1 = torch.tensor([0.3, 1.0, 2.0, 50.0, 3000.0], dtype=torch.float64)
    rho_inf = torch.tensor([0.1, 0.05, 1.0, 0.2, 1.0], dtype=torch.float64)
    for p in (1.0, 1.5, 2.0, 6.0, INF):
        assert torch.equal(universal_radius(rho1, rho_inf, p, 784), hull_radius(rho1, rho_inf, p, 784))


def test_universal_edge_values():
    d = 784
    # p = 1: max(rho1, rho_inf); p = inf: max(rho_inf, rho1 / d)
    assert universal_radius(1.0, 0.1, 1, d) == 1.0
    assert universal_radius(0.05, 0.1, 1, d) == 0.1
    assert universal_radius(1.0, 0.1, INF, d) == 0.1
    assert universal_radius(1000.0, 0.1, INF, d) == pytest.approx(1000.0 / d)
    for p in (1, 2, 3.5, INF):
        # a zero radius marks an uncertified point
        assert universal_radius(0.0, 0.0, p, d) == 0.0
        assert universal_radius(0.0, 0.7, p, d) == 0.0
        assert universal_radius(0.7, 0.0, p, d) == 0.0
        assert universal_radius(0.0, INF, p, d) == 0.0
        # no hyperplane at all: unbounded
        assert universal_radius(INF, INF, p, d) == INF
        assert universal_radius(INF, 0.2, p, d) == INF and universal_radius(3.0, INF, p, d) == INF


@pytest.mark.parametrize("d", [2, 5, 40])
def test_universal_is_sound_for_linear_classifiers(d):
    # one decision hyperplane: r_p = |g| / ||w||_q exactly, rho1 = |g| / ||w||_∞, rho∞ = |g| / ||w||_1
    gen = torch.Generator().manual_seed(d)
    w = torch.randn(500, d, generator=gen, dtype=torch.float64)
    w = w * torch.rand(500, d, generator=gen, dtype=torch.float64) ** 4   # uneven weights
    g = torch.rand(500, generator=gen, dtype=torch.float64)
    rho1 = g / w.abs().amax(1)
    rho_inf = g / w.abs().sum(1)
    for p in (1.0, 1.1, 1.5, 2.0, 3.0, 10.0, INF):
        exact = g / torch.linalg.vector_norm(w, dual(p), dim=1)
        cert = universal_radius(rho1, rho_inf, p, d)
        assert (cert <= exact * (1 + 1e-12)).all(), p
        assert (cert >= torch.maximum(rho_inf, rho1 * d ** (-(1 - 1 / p) if p != INF else -1.0))
                * (1 - 1e-12)).all()   # never worse than the naive bound


def test_universal_tight_when_hull_is_the_region():
    # w with equal magnitudes on k coordinates: r_2 = g / sqrt(k) and the hull bound is exact
    d, g = 10, 1.0
    for k in range(1, d + 1):
        w = torch.zeros(d, dtype=torch.float64)
        w[:k] = 1.0
        rho1, rho_inf = g / w.abs().max(), g / w.abs().sum()
        assert universal_radius(float(rho1), float(rho_inf), 2, d) == pytest.approx(g / math.sqrt(k), rel=1e-14)


# ------------------------------------------------------------------------------------------
# types, broadcasting, dtype and device

@pytest.mark.parametrize("f", FUNCS)
def test_float_in_float_out(f):
    out = f(1.0, 0.1, 2, 784)
    assert type(out) is float
    assert type(f(1, 1, 2, 784)) is float
    assert type(f(np.float64(1.0), np.float32(0.1), 2.0, np.int64(784))) is float


@pytest.mark.parametrize("f", FUNCS)
def test_tensor_broadcasting_and_agreement_with_floats(f):
    e1 = torch.tensor([[0.5], [1.0], [3.0]], dtype=torch.float64)
    e_inf = torch.tensor([0.1, 0.4, 1.0, 2.0], dtype=torch.float64)
    out = f(e1, e_inf, 2.5, 100)
    assert out.shape == (3, 4) and out.dtype == torch.float64
    for i in range(3):
        for j in range(4):
            assert float(out[i, j]) == f(float(e1[i, 0]), float(e_inf[j]), 2.5, 100)
    # python number against a tensor, 0-dim tensors
    mixed = f(1.0, e_inf, 2.5, 100)
    assert mixed.shape == (4,) and torch.equal(mixed, f(torch.ones(4, dtype=torch.float64), e_inf, 2.5, 100))
    zero_dim = f(torch.tensor(1.0), 0.1, 2.5, 100)
    assert isinstance(zero_dim, torch.Tensor) and zero_dim.dim() == 0


@pytest.mark.parametrize("f", FUNCS)
def test_dtypes_and_rounding_toward_zero(f):
    e1 = torch.rand(1000, dtype=torch.float64) * 20 + 0.01
    e_inf = torch.rand(1000, dtype=torch.float64) + 0.01
    ref = f(e1, e_inf, 2.0, 784)
    out32 = f(e1.float(), e_inf.float(), 2.0, 784)
    assert out32.dtype == torch.float32
    ref32 = f(e1.float().double(), e_inf.float().double(), 2.0, 784)   # same inputs, float64 out
    assert (out32.double() <= ref32).all()                                # never rounded up
    up = torch.nextafter(out32, torch.full_like(out32, INF)).double()
    assert (up > ref32).all()                                              # and the nearest below
    assert torch.allclose(out32.double(), ref, rtol=1e-6)
    # promotion: float32 with float64 gives float64; integer tensors the default dtype
    assert f(e1.float(), e_inf, 2.0, 784).dtype == torch.float64
    assert f(torch.tensor([3, 5]), torch.tensor([1, 1]), 2.0, 784).dtype == torch.get_default_dtype()


def test_requires_grad_input_is_accepted():
    e1 = torch.tensor([1.0, 2.0], requires_grad=True)
    out = hull_radius(e1, 0.1, 2, 784)
    assert not out.requires_grad and out.shape == (2,)


def test_no_nan_on_a_dense_grid_of_edge_values():
    e = torch.tensor([0.0, 5e-324, 1e-300, 1e-8, 1.0, 1.5, 783.9, 784.0, 784.1, 1e300, 1.7e308, INF],
                     dtype=torch.float64)
    for p in (1.0, 1 + 2.2e-16, 1 + 1e-9, 1.01, 2.0, 50.0, 1e15, 1e300, INF):
        for f in FUNCS:
            out = f(e[:, None], e[None, :], p, 784)
            assert not torch.isnan(out).any(), (f.__name__, p)
            assert (out >= 0).all()


# ------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("f", FUNCS)
def test_errors(f):
    a, b = ("rho1", "rho_inf") if f is universal_radius else ("e1", "e_inf")
    with pytest.raises(ValueError, match="p must be >= 1"):
        f(1.0, 0.1, 0.5, 784)
    with pytest.raises(ValueError, match="p must be >= 1"):
        f(1.0, 0.1, float("nan"), 784)
    with pytest.raises(TypeError, match="p must be"):
        f(1.0, 0.1, [2], 784)
    with pytest.raises(ValueError, match="p must be"):
        f(1.0, 0.1, "two", 784)
    assert f(1.0, 0.1, "l2", 784) == f(1.0, 0.1, "2", 784) == f(1.0, 0.1, 2, 784)  # names as everywhere
    assert f(1.0, 0.1, "linf", 784) == f(1.0, 0.1, math.inf, 784)
    with pytest.raises(ValueError, match="d must be an integer >= 2"):
        f(1.0, 0.1, 2, 1)
    with pytest.raises(ValueError, match="d must be an integer >= 2"):
        f(1.0, 0.1, 2, 2.5)
    with pytest.raises(ValueError, match="d must be an integer >= 2"):
        f(1.0, 0.1, 2, torch.tensor(3.5))
    with pytest.raises(TypeError, match="d must be"):
        f(1.0, 0.1, 2, "784")
    with pytest.raises(TypeError, match="d must be"):
        f(1.0, 0.1, 2, True)
    with pytest.raises(ValueError, match=f"{a} must be >= 0"):
        f(-1.0, 0.1, 2, 784)
    with pytest.raises(ValueError, match=f"{b} must be >= 0"):
        f(1.0, torch.tensor([0.1, -0.1]), 2, 784)
    with pytest.raises(ValueError, match=f"{a} contains NaN"):
        f(torch.tensor([1.0, float("nan")]), 0.1, 2, 784)
    with pytest.raises(ValueError, match=f"{b} contains NaN"):
        f(1.0, float("nan"), 2, 784)
    with pytest.raises(TypeError, match=a):
        f("1.0", 0.1, 2, 784)
    with pytest.raises(TypeError, match=b):
        f(1.0, torch.tensor([True]), 2, 784)
    with pytest.raises(ValueError, match="do not broadcast"):
        f(torch.ones(3), torch.ones(4), 2, 784)
    # accepted spellings of d
    assert f(1.0, 0.1, 2, 784.0) == f(1.0, 0.1, 2, torch.tensor(784))
