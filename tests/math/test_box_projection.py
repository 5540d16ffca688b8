"""Tests of mmr_ext.math.box_projection (docs/MATH.md §7): the float64 Euclidean projection onto an
lp-ball ∩ box against bisections on the one-dimensional duals and SLSQP, feasibility, fixed
points and degenerate radii. The rounding of :func:`mmr_ext.attacks.project` to the input dtype
is tested in tests/test_attacks.py."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mmr_ext.math.box_projection import project_ball_box

INF = math.inf
NORMS = [1, 2, INF]


def bisection_magnitudes(u, cap, eps, p, iters=200):
    """|δ| from the KKT conditions by bisection on the scalar dual (independent of the sorted
    breakpoints): l1 |δ_i| = clamp(|u_i| - λ, 0, cap_i), l2 |δ_i| = min(s |u_i|, cap_i)."""
    a = np.abs(u)
    clipped = np.minimum(a, cap)
    if math.isinf(p):
        return np.minimum(clipped, eps)
    if np.linalg.norm(clipped, ord=p) <= eps:
        return clipped
    if p == 1:
        f = lambda lam: np.clip(a - lam, 0, cap)           # noqa: E731  (decreasing in lam)
        lo, hi = 0.0, a.max()
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid).sum() > eps else (lo, mid)
        return f(hi)
    f = lambda s: np.minimum(s * a, cap)                   # noqa: E731  (increasing in s)
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.linalg.norm(f(mid)) < eps else (lo, mid)
    return f(lo)


def random_case(seed, B, d, lo, hi, spread):
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(B, d, generator=g, dtype=torch.float64)
    x[0, : d // 3] = lo                                    # on the faces of the box
    x[-1, : d // 3] = hi
    z = x + spread * torch.randn(B, d, generator=g, dtype=torch.float64)
    z[1, : d // 2] = x[1, : d // 2]                         # coordinates that do not move
    return x, z


@pytest.mark.parametrize("p", NORMS)
def test_projection_equals_bisection_on_the_dual(p):
    lo, hi = -0.5, 1.5
    for seed, (d, spread) in enumerate(((3, 0.3), (10, 1.0), (100, 0.2), (50, 3.0))):
        x, z = random_case(seed, 5, d, lo, hi, spread)
        for e in (0.0, 0.05, 0.6, 4.0, 1e3):
            eps = torch.full((5,), e, dtype=torch.float64)
            delta = project_ball_box(x, z, p, eps, lo, hi)
            n = torch.linalg.vector_norm(delta, ord=p, dim=1)
            assert (n <= eps).all()                          # feasible in float64, not just up to rounding
            v = x + delta
            assert ((v >= lo - 1e-15) & (v <= hi + 1e-15)).all()
            assert ((delta == 0) | (torch.sign(delta) == torch.sign(z - x))).all()
            for b in range(5):
                u = (z[b] - x[b]).numpy()
                cap = np.where(u > 0, hi - x[b].numpy(), x[b].numpy() - lo).clip(0)
                want = np.sign(u) * bisection_magnitudes(u, cap, e, p)
                np.testing.assert_allclose(delta[b].numpy(), want, rtol=0, atol=1e-10 * (1 + e))


@pytest.mark.parametrize("p", NORMS)
def test_projection_is_never_beaten_by_slsqp(p):
    lo, hi = 0.0, 1.0
    x, z = random_case(11, 6, 5, lo, hi, 0.7)
    eps = torch.full((6,), 0.4, dtype=torch.float64)
    v = x + project_ball_box(x, z, p, eps, lo, hi)
    for b in range(6):
        xb, zb = x[b].numpy(), z[b].numpy()
        cons = [{"type": "ineq", "fun": lambda s: 0.4 - np.linalg.norm(s - xb, ord=p)}]
        res = minimize(lambda s: ((s - zb) ** 2).sum(), xb, bounds=[(lo, hi)] * 5, constraints=cons,
                       method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
        assert float(((v[b] - z[b]) ** 2).sum()) <= res.fun + 1e-7


@pytest.mark.parametrize("p", NORMS)
def test_feasible_points_are_fixed_points(p):
    x, z = random_case(3, 4, 30, 0.0, 1.0, 0.5)
    eps = torch.full((4,), 0.5, dtype=torch.float64)
    v = (x + project_ball_box(x, z, p, eps, 0.0, 1.0)).clamp(0.0, 1.0)
    again = x + project_ball_box(x, v, p, eps, 0.0, 1.0)
    torch.testing.assert_close(again, v, rtol=0, atol=1e-15)
    # a point of the box far outside the ball lands on the ball's boundary
    far = torch.where(z > x, torch.ones_like(x), torch.zeros_like(x))
    n = torch.linalg.vector_norm(project_ball_box(x, far, p, eps, 0.0, 1.0), ord=p, dim=1)
    torch.testing.assert_close(n, eps, rtol=1e-12, atol=0)
