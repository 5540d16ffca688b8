"""Tests of mmr_ext.attacks: minimal adversarial examples of linear models (closed forms),
box and ball feasibility, the exact projection, PGD / pgd_max behaviour and verification."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from mmr_ext.attacks import (distance, margins, min_norm_attack, pgd, pgd_max, project,
                             verify_adversarial)

INF = math.inf
NORMS = [1, 2, INF]


# ------------------------------------------------------------------------------------------
# independent oracle: minimal lp distance from x to {<w, z> = c} inside the box [0, 1]^d

def box_hyperplane_distance(w, g, x, p):
    """min ||δ||_p s.t. <w, δ> = -g (g > 0), 0 <= x + δ <= 1, from the KKT conditions, solved by
    sorting (l1) or bisection (l2, l∞) in numpy."""
    a = np.abs(w)
    room = np.where(w > 0, x, 1 - x)  # how far each coordinate can move to decrease <w, z>
    if (a * room).sum() < g:
        return INF
    if p == 1:  # greedy: largest |w_i| first
        left, total = g, 0.0
        for i in np.argsort(-a):
            step = min(room[i], left / a[i]) if a[i] > 0 else 0.0
            total += step
            left -= step * a[i]
            if left <= 1e-15 * g:
                break
        return total

    def moved(t):  # t_i as a function of the scalar dual variable
        return np.minimum(t, room) if p == INF else np.minimum(t * a, room)

    lo, hi = 0.0, 1.0
    while (a * moved(hi)).sum() < g:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (a * moved(mid)).sum() < g else (lo, mid)
    return float(np.linalg.norm(moved(hi), ord=p))


def linear_model(d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 2)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(2, d, generator=g, dtype=torch.float64))
        model[0].bias.zero_()
    return model, g


def linear_case(d, seed, spread, dtype=torch.float64):
    """A 2-class linear model, points x and the exact minimal adversarial lp-norms (in the box)."""
    model, g = linear_model(d, seed, dtype)
    x = (0.5 + spread * (torch.rand(6, d, generator=g, dtype=torch.float64) - 0.5)).to(dtype)
    with torch.no_grad():
        logits = model(x).double()
    y = logits.argmax(1)
    W = model[0].weight.detach().double()
    exact = {}
    for p in NORMS:
        vals = []
        for i in range(x.shape[0]):
            w = (W[y[i]] - W[1 - y[i]]).numpy()
            gap = float(logits[i, y[i]] - logits[i, 1 - y[i]])
            vals.append(box_hyperplane_distance(w, gap, x[i].double().numpy(), p))
        exact[p] = torch.tensor(vals, dtype=torch.float64)
    return model, x, y, exact


# ------------------------------------------------------------------------------------------
# minimum-norm attack: finds the known minimal adversarial example

@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("spread", [0.1, 1.0], ids=["interior", "box-active"])
def test_min_norm_attack_finds_minimal_example(p, spread):
    model, x, y, exact = linear_case(12, seed=3, spread=spread)
    x_adv, found = min_norm_attack(model, x, y, norm=p, steps=200)
    finite = torch.isfinite(exact[p])
    assert finite.all()
    # never below the true minimum (it would not be adversarial), and close to it
    assert (found >= exact[p] * (1 - 1e-9)).all()
    tol = 2e-3 if p == 1 else 1e-5
    assert (found <= exact[p] * (1 + tol)).all(), (found / exact[p]).tolist()
    # the returned examples are real: in the box, at the reported distance, misclassified
    assert ((x_adv >= 0) & (x_adv <= 1)).all()
    assert torch.allclose(distance(x_adv, x, p), found, rtol=0, atol=1e-12)
    assert (margins(model(x_adv), y) < 0).all()
    assert verify_adversarial(model, x, x_adv, y, p, found, tol=0.0).all()


def test_min_norm_attack_interior_matches_unconstrained_closed_form():
    """Away from the box faces the answer is g / ||w||_q (docs/MATH.md §2)."""
    model, x, y, _ = linear_case(10, seed=5, spread=0.05)
    W = model[0].weight.detach()
    with torch.no_grad():
        logits = model(x)
    w = W[y] - W[1 - y]
    gap = logits.gather(1, y[:, None])[:, 0] - logits.gather(1, (1 - y)[:, None])[:, 0]
    for p, q in [(1, INF), (2, 2), (INF, 1)]:
        closed = gap / torch.linalg.vector_norm(w, ord=q, dim=1)
        if (closed > 0.45).any():  # keep the minimiser inside the box
            continue
        _, found = min_norm_attack(model, x, y, norm=p, steps=200)
        assert torch.allclose(found, closed, rtol=2e-3 if p == 1 else 1e-5)


def test_min_norm_attack_misclassified_point_has_norm_zero():
    model, x, y, _ = linear_case(5, seed=0, spread=0.5)
    x_adv, found = min_norm_attack(model, x, 1 - y, norm=2, steps=5)
    assert (found == 0).all()
    assert torch.equal(x_adv, x)


def test_min_norm_attack_reports_inf_when_nothing_is_found():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():  # class 0 wins everywhere in the box
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([1.0, 0.0]))
    x = torch.rand(4, 3, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    x_adv, found = min_norm_attack(model, x, y, norm=INF, steps=10)
    assert torch.isinf(found).all() and torch.equal(x_adv, x)


# ------------------------------------------------------------------------------------------
# PGD

@pytest.mark.parametrize("p", NORMS)
def test_pgd_succeeds_just_above_the_minimal_norm(p):
    # d = 20: the l1 sparse step (top 5% of |grad|) moves one coordinate at a time
    model, x, y, exact = linear_case(20, seed=7, spread=1.0)
    gen = torch.Generator().manual_seed(0)
    eps = exact[p] * 1.05
    x_adv = pgd(model, x, y, norm=p, eps=eps, steps=100, restarts=2, generator=gen)
    assert verify_adversarial(model, x, x_adv, y, p, eps, tol=0.0).all()
    below = exact[p] * 0.98  # no adversarial example exists: PGD must return a feasible point anyway
    x_adv = pgd(model, x, y, norm=p, eps=below, steps=20, generator=gen)
    assert (distance(x_adv, x, p) <= below).all()
    assert not verify_adversarial(model, x, x_adv, y, p, below).any()


def small_mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", NORMS)
def test_attacks_stay_in_box_and_ball_exactly(p, dtype):
    model = small_mlp(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 4, 4, generator=g, dtype=torch.float64)
    x[:, :, :2] = 0.0  # corners of the box, like an image background
    x[:, :, 3] = 1.0
    x = x.to(dtype)
    y = torch.randint(0, 4, (8,), generator=g)
    eps = {1: 0.7, 2: 0.3, INF: 0.08}[p]
    for x_adv in (pgd(model, x, y, norm=p, eps=eps, steps=15, restarts=2, generator=g),
                  min_norm_attack(model, x, y, norm=p, steps=15)[0]):
        assert x_adv.dtype == dtype and x_adv.shape == x.shape
        assert ((x_adv >= 0) & (x_adv <= 1)).all()
    x_adv = pgd(model, x, y, norm=p, eps=eps, steps=15, generator=g)
    assert (distance(x_adv, x, p) <= eps).all()  # exact, in float64 of the stored values


def test_pgd_keeps_training_flags_and_parameter_grads():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[5].eval()  # a mixed state must be restored as it was
    stats = model[2].running_mean.clone()
    x = torch.rand(6, 1, 4, 4)
    y = torch.randint(0, 3, (6,))
    for fn in (lambda: pgd(model, x, y, norm=2, eps=0.5, steps=3),
               lambda: pgd_max(model, x, y, eps={1: 1.0, 2: 0.5, INF: 0.1}, steps=2),
               lambda: min_norm_attack(model, x, y, norm=INF, steps=3)):
        fn()
        assert [m.training for m in model.modules()] == [True, True, True, True, True, True, False]
        assert all(prm.grad is None for prm in model.parameters())
        assert torch.equal(model[2].running_mean, stats)  # eval mode during the attack


@pytest.mark.parametrize("sparsity", [0.95, 0.5])
def test_pgd_max_takes_the_highest_loss_per_sample(sparsity):
    model = small_mlp(torch.float64, seed=2)
    x = torch.rand(10, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    eps = {"l1": 1.0, "l2": 0.4, "linf": 0.1}
    out = pgd_max(model, x, y, eps=eps, steps=5, l1_sparsity=sparsity, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    cands = [pgd(model, x, y, norm=p, eps=e, steps=5, l1_sparsity=sparsity, generator=gen) for p, e in eps.items()]
    with torch.no_grad():
        losses = torch.stack([nn.functional.cross_entropy(model(c), y, reduction="none") for c in cands])
    best = losses.argmax(0)
    expected = torch.stack(cands)[best, torch.arange(10)]
    assert torch.equal(out, expected)


def test_pgd_is_reproducible_with_a_generator():
    model = small_mlp(torch.float32)
    x = torch.rand(4, 1, 4, 4)
    y = torch.randint(0, 4, (4,))
    a = pgd(model, x, y, norm=1, eps=0.5, steps=4, generator=torch.Generator().manual_seed(9))
    b = pgd(model, x, y, norm=1, eps=0.5, steps=4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# projection

@pytest.mark.parametrize("p", NORMS)
def test_projection_is_the_euclidean_projection(p):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(6, 7, generator=g, dtype=torch.float64)
    z = x + torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.6
    eps = 0.5
    P = project(x, z, norm=p, eps=eps)
    assert (distance(P, x, p) <= eps * (1 + 1e-12)).all() and ((P >= 0) & (P <= 1)).all()
    for b in range(6):
        cons = [{"type": "ineq", "fun": lambda v, b=b: eps - np.linalg.norm(v - x[b].numpy(), ord=p)}]
        res = minimize(lambda v: ((v - z[b].numpy()) ** 2).sum(), np.clip(x[b].numpy(), 0, 1),
                       bounds=[(0, 1)] * 7, constraints=cons, method="SLSQP",
                       options={"ftol": 1e-14, "maxiter": 500})
        ours = float(((P[b] - z[b]) ** 2).sum())
        assert ours <= res.fun + 1e-7  # no feasible point is closer
    # feasible points are fixed points
    assert torch.allclose(project(x, P, norm=p, eps=eps), P, atol=1e-15)


def test_projection_rounds_toward_the_clean_point_in_float32():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(50, 30, generator=g)
    z = x + torch.randn(50, 30, generator=g)
    for p, eps in [(1, 1.3), (2, 0.37), (INF, 0.1)]:
        P = project(x, z, norm=p, eps=eps)
        assert P.dtype == torch.float32
        assert (distance(P, x, p) <= eps).all()
        assert ((P >= 0) & (P <= 1)).all()


# ------------------------------------------------------------------------------------------
# verification and errors

def test_verify_adversarial_checks_box_ball_and_flip():
    model, x, y, exact = linear_case(6, seed=1, spread=0.2)
    x_adv, found = min_norm_attack(model, x, y, norm=2, steps=100)
    assert verify_adversarial(model, x, x_adv, y, 2, found * 1.001).all()
    assert not verify_adversarial(model, x, x_adv, y, 2, found * 0.99).any()  # outside the ball
    assert not verify_adversarial(model, x, x, y, 2, 1.0).any()  # not misclassified
    outside = x_adv.clone()
    outside[:, 0] = 1.5  # leaves the box
    assert not verify_adversarial(model, x, outside, y, INF, 10.0).any()
    assert verify_adversarial(model, x, x_adv, y, 2, found * 1.001, lo=0.0, hi=1.0).dtype == torch.bool


def test_errors_name_the_argument():
    model = small_mlp(torch.float32)
    x = torch.rand(2, 1, 4, 4)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, norm=3, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, norm=2, eps=-1.0)
    with pytest.raises(ValueError, match="box"):
        pgd(model, x + 2, y, norm=2, eps=0.1)
    with pytest.raises(ValueError, match="l1_sparsity"):
        pgd(model, x, y, norm=1, eps=0.1, l1_sparsity=1.0)
    with pytest.raises(ValueError, match="steps"):
        min_norm_attack(model, x, y, norm=1, steps=0)
    with pytest.raises(ValueError, match="y"):
        pgd(model, x, y[:1], norm=2, eps=0.1)
    with pytest.raises(TypeError, match="eps"):
        pgd_max(model, x, y, eps=0.3)
    with pytest.raises(ValueError, match="lo < hi"):
        pgd(model, x, y, norm=2, eps=0.1, lo=1.0, hi=0.0)
