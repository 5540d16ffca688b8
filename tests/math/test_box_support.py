"""Tests of mmr_ext.math.box_support (docs/MATH.md §7): min of a linear function over an lp-ball ∩ box
against scipy's LP solver (p = 1, inf), SLSQP and a bisection on the KKT path (p = 2), the top-k
shortcut against the full sort, and shared rows."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from mmr_ext.math.box_support import support_min
from oracles import lp_ball_box_min

INF = math.inf
NORMS = [1, 2, INF]



@pytest.mark.parametrize("p", NORMS)
def test_support_min_is_exact(p):
    g = torch.Generator().manual_seed(0)
    B, R, d = 3, 5, 9
    x = torch.rand(B, d, generator=g, dtype=torch.float64)
    x[0, :4] = 0.0  # points on the faces of the box
    x[1, :3] = 1.0
    a = torch.randn(B, R, d, generator=g, dtype=torch.float64)
    a[2, 0, :5] = 0.0  # zero coefficients
    eps = torch.tensor([0.3, 1.5, 0.05], dtype=torch.float64)
    got = support_min(a, x, p, eps, 0.0, 1.0)
    for b in range(B):
        for r in range(R):
            want = lp_ball_box_min(a[b, r].numpy(), x[b].numpy(), p, float(eps[b]))
            assert got[b, r].item() <= want + 1e-9  # a valid lower bound ...
            assert got[b, r].item() >= want - (1e-6 if p == 2 else 1e-9)  # ... and the exact one


@pytest.mark.parametrize("p", [1, 2])
def test_support_min_shortcut_equals_full_sort(p):
    """The top-k shortcut (exact when the optimum uses only the k best coordinates) and its
    full-sort fallback agree with the full sort everywhere."""
    g = torch.Generator().manual_seed(1)
    B, R, d = 4, 50, 200
    x = torch.rand(B, d, generator=g, dtype=torch.float64)
    x[:, : d // 2] = 0.0
    a = torch.randn(B, R, d, generator=g, dtype=torch.float64)
    a[:, : R // 2] *= torch.rand(B, R // 2, d, generator=g, dtype=torch.float64) ** 8  # skewed rows
    for e in (0.05, 0.5, 5.0, 50.0):
        eps = torch.full((B,), e, dtype=torch.float64)
        full = support_min(a, x, p, eps, 0.0, 1.0, top=d)
        for top in (1, 3, 16):
            assert torch.allclose(support_min(a, x, p, eps, 0.0, 1.0, top=top), full, rtol=0, atol=1e-11)


def test_support_min_shared_rows_broadcast():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 6, generator=g, dtype=torch.float64)
    a = torch.randn(1, 3, 6, generator=g, dtype=torch.float64)
    eps = torch.rand(4, generator=g, dtype=torch.float64)
    for p in NORMS:
        assert torch.allclose(support_min(a, x, p, eps, 0.0, 1.0),
                              support_min(a.expand(4, -1, -1), x, p, eps, 0.0, 1.0), atol=1e-13)


def linprog_support(a, x, p, eps, lo, hi):
    """min <a, z> over ||z - x||_p <= eps, lo <= z <= hi as a linear program (p = 1 or inf)."""
    d = a.size
    if p == 1:  # z = x + u - v, 0 <= u <= hi - x, 0 <= v <= x - lo, Σ(u + v) <= eps
        res = linprog(np.r_[a, -a], A_ub=np.ones((1, 2 * d)), b_ub=[eps],
                      bounds=[(0, hi - xi) for xi in x] + [(0, xi - lo) for xi in x], method="highs")
    else:  # z = x + δ, max(lo - x, -eps) <= δ <= min(hi - x, eps)
        res = linprog(a, bounds=[(max(lo - xi, -eps), min(hi - xi, eps)) for xi in x], method="highs")
    assert res.status == 0, res.message
    return float(a @ x + res.fun)


def bisection_support_l2(a, x, eps, lo, hi, iters=200):
    """p = 2 from the KKT conditions, by bisection instead of sorted breakpoints: the maximiser of
    Σ |a_i| t_i over ||t||_2 <= eps, 0 <= t <= room is t_i = min(μ |a_i|, room_i)."""
    w = np.abs(a)
    room = np.maximum(np.where(a > 0, x - lo, hi - x), 0.0)
    if np.sum(np.where(w > 0, room, 0.0) ** 2) <= eps ** 2:   # the whole box corner fits in the ball
        return float(a @ x - np.sum(w * room))
    mu_lo, mu_hi = 0.0, 1.0
    while np.linalg.norm(np.minimum(mu_hi * w, room)) < eps:
        mu_hi *= 2
    for _ in range(iters):
        mid = 0.5 * (mu_lo + mu_hi)
        mu_lo, mu_hi = (mid, mu_hi) if np.linalg.norm(np.minimum(mid * w, room)) < eps else (mu_lo, mid)
    return float(a @ x - np.sum(w * np.minimum(mu_hi * w, room)))


def random_rows(seed, B, R, d, lo, hi, skew=True):
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(B, d, generator=g, dtype=torch.float64)
    x[0, : d // 3] = lo                              # points on the faces of the box
    x[-1, : d // 4] = hi
    a = torch.randn(B, R, d, generator=g, dtype=torch.float64)
    a[:, 0, : d // 2] = 0.0                          # zero coefficients
    if skew:  # (HiGHS drops coefficients below its tolerance: not for the LP oracle)
        a[:, 1] *= torch.rand(B, d, generator=g, dtype=torch.float64) ** 6
    return a, x


@pytest.mark.parametrize("p", [1, INF])
def test_support_min_equals_linprog_in_any_box(p):
    lo, hi = -0.5, 2.0
    for seed, d in enumerate((2, 7, 40)):
        a, x = random_rows(seed, 3, 6, d, lo, hi, skew=False)
        for e in (0.01, 0.4, 3.0, 100.0):
            eps = torch.full((3,), e, dtype=torch.float64)
            got = support_min(a, x, p, eps, lo, hi)
            for b in range(3):
                for r in range(6):
                    want = linprog_support(a[b, r].numpy(), x[b].numpy(), p, e, lo, hi)
                    assert got[b, r].item() == pytest.approx(want, rel=1e-9, abs=1e-9), (d, e, b, r)


def test_support_min_l2_equals_kkt_bisection_and_is_never_beaten():
    lo, hi = -1.0, 1.5
    rng = np.random.default_rng(3)
    for seed, d in enumerate((2, 5, 30)):
        a, x = random_rows(10 + seed, 3, 6, d, lo, hi)
        for e in (0.02, 0.7, 4.0, 50.0):
            eps = torch.full((3,), e, dtype=torch.float64)
            got = support_min(a, x, 2, eps, lo, hi)
            for b in range(3):
                for r in range(6):
                    an, xn = a[b, r].numpy(), x[b].numpy()
                    assert got[b, r].item() == pytest.approx(bisection_support_l2(an, xn, e, lo, hi),
                                                             rel=1e-10, abs=1e-10)
                    # random feasible points (inside the ball, clipped to the box) never go lower
                    v = rng.normal(size=(200, d))
                    v *= (e * rng.random((200, 1)) ** (1 / d)) / np.linalg.norm(v, axis=1, keepdims=True)
                    z = np.clip(xn + v, lo, hi)
                    assert (z @ an).min() >= got[b, r].item() - 1e-12
