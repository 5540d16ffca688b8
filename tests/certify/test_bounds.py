"""Tests of mmr_ext.certify.bounds (the support function of lp-ball ∩ box: tests/math/test_box_support.py): validity of the margin
and layer bounds (dense sampling, independent MILP), exactness without unstable units, the
layer adjoints, and errors."""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from mmr_ext.certify.bounds import BoundedNetwork, certified_by_bounds, layer_bounds, margin_bounds
from oracles import lp_ball_box_min, make_model, preactivations

INF = math.inf
NORMS = [1, 2, INF]


# ------------------------------------------------------------------------------------------
# validity on tiny networks

def tiny_net(seed, act=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 10), act(), nn.Linear(10, 8), nn.LeakyReLU(0.2), nn.Linear(8, 3)).double()


GRID = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, 501, dtype=torch.float64)] * 2, indexing="ij"),
                   -1).reshape(-1, 2)


@pytest.mark.parametrize("p", NORMS)
def test_margin_bounds_below_sampled_minimum(p):
    for seed in range(2):
        net = tiny_net(seed)
        x = torch.rand(6, 2, dtype=torch.float64) * 0.8 + 0.1
        x[0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # a corner of the box
        y = net(x).argmax(1)
        with torch.no_grad():
            out = net(GRID)
        for eps in (0.05, 0.2, 0.6):
            lb = margin_bounds(net, x, y, norm=p, eps=eps)
            lba = margin_bounds(net, x, y, norm=p, eps=eps, alpha_steps=10)
            assert torch.isinf(lb.gather(1, y[:, None])).all()
            assert (lba >= lb - 1e-12).all()  # α-optimisation never loosens
            for b in range(6):
                inside = torch.linalg.vector_norm(GRID - x[b], ord=p, dim=1) <= eps
                m = (out[inside][:, y[b], None] - out[inside]).min(0).values
                m[y[b]] = INF
                assert (lba[b] <= m + 1e-10).all(), (seed, eps, b, lba[b], m)


def exact_min_margin_linf(model, x, y, s, eps):
    """min f_y - f_s over the l∞-ball ∩ box by scipy's MILP with naive big-M (any depth)."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    d = lins[0].in_features
    M = 1e3
    sizes = [m.out_features for m in lins[:-1]]
    nv = d + 2 * sum(sizes)
    rows, lo, hi = [], [], []
    prev = list(range(d))
    off = d
    int_mask = np.zeros(nv)
    lb = list(np.maximum(0, x.numpy() - eps))
    ub = list(np.minimum(1, x.numpy() + eps))
    for lin in lins[:-1]:
        W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        n = W.shape[0]
        a_idx, d_idx = range(off, off + n), range(off + n, off + 2 * n)
        int_mask[off + n:off + 2 * n] = 1
        lb += [0.0] * n + [0.0] * n
        ub += [M] * n + [1.0] * n
        for j in range(n):
            r = np.zeros(nv); r[a_idx[j]] = 1; r[prev] = -W[j]
            rows.append(r); lo.append(b[j]); hi.append(np.inf)
            r = np.zeros(nv); r[a_idx[j]] = 1; r[prev] = -W[j]; r[d_idx[j]] = M
            rows.append(r); lo.append(-np.inf); hi.append(b[j] + M)
            r = np.zeros(nv); r[a_idx[j]] = 1; r[d_idx[j]] = -M
            rows.append(r); lo.append(-np.inf); hi.append(0)
        prev = list(a_idx)
        off += 2 * n
    W, b = lins[-1].weight.detach().numpy(), lins[-1].bias.detach().numpy()
    c = np.zeros(nv)
    c[prev] = W[y] - W[s]
    res = milp(c, integrality=int_mask, bounds=Bounds(lb, ub),
               constraints=[LinearConstraint(np.array(rows), lo, hi)])
    assert res.status == 0
    return res.fun + b[y] - b[s]


def test_margin_bounds_below_exact_milp_minimum():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    x = torch.rand(4, 5, dtype=torch.float64)
    y = net(x).argmax(1)
    for eps in (0.02, 0.1, 0.3):
        lb = margin_bounds(net, x, y, norm=INF, eps=eps, alpha_steps=20)
        for b in range(4):
            for s in range(3):
                if s == y[b]:
                    continue
                exact = exact_min_margin_linf(net, x[b], int(y[b]), s, eps)
                assert lb[b, s].item() <= exact + 1e-7
                if eps == 0.02:  # few unstable units: the bound is nearly tight
                    assert lb[b, s].item() >= exact - 0.05 * (1 + abs(exact))


def test_alpha_optimisation_tightens_and_stays_valid():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 4)).double()
    x = torch.rand(8, 10, dtype=torch.float64)
    y = net(x).argmax(1)
    lb = margin_bounds(net, x, y, norm=INF, eps=0.1)
    lba = margin_bounds(net, x, y, norm=INF, eps=0.1, alpha_steps=20)
    finite = torch.isfinite(lb)
    assert (lba[finite] >= lb[finite]).all() and (lba[finite] - lb[finite]).sum() > 1e-3
    for b in range(1):  # still below the exact MILP minimum
        for s in range(4):
            if s != y[b]:
                exact = exact_min_margin_linf(net, x[b], int(y[b]), s, 0.1)
                assert lba[b, s].item() <= exact + 1e-7


@pytest.mark.parametrize("p", NORMS)
def test_exact_when_no_unit_is_unstable(p):
    """With every unit stable on the set the network is affine there and the bound is the
    exact minimum of an affine function over the lp-ball ∩ box."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.LeakyReLU(0.3), nn.Linear(4, 3)).double()
    with torch.no_grad():  # biases far from zero: every unit stable for small eps
        net[0].bias.copy_(torch.tensor([5.0, -5.0, 6.0, -6.0, 4.0], dtype=torch.float64))
        net[2].bias.copy_(torch.tensor([9.0, -9.0, 8.0, -8.0], dtype=torch.float64))
    x = torch.rand(3, 6, dtype=torch.float64)
    y = net(x).argmax(1)
    eps = 0.3
    for (l, u) in layer_bounds(net, x, norm=p, eps=eps):
        assert ((l >= 0) | (u <= 0)).all()
    lb = margin_bounds(net, x, y, norm=p, eps=eps)
    J = torch.func.jacrev(lambda z: net(z[None])[0])(x[0])  # the affine map (same for all x here)
    for b in range(3):
        with torch.no_grad():
            f0 = net(x[b:b + 1])[0]
        for s in range(3):
            if s == y[b]:
                continue
            a = (J[y[b]] - J[s]).detach().numpy()
            exact = float(f0[y[b]] - f0[s]) - float(a @ x[b].numpy()) + lp_ball_box_min(a, x[b].numpy(), p, eps)
            assert abs(lb[b, s].item() - exact) <= (1e-6 if p == 2 else 1e-10) * (1 + abs(exact))


@pytest.mark.parametrize("name", ["fc", "deep_fc", "cnn", "paper_cnn"])
def test_layer_bounds_contain_sampled_preactivations(name):
    model, x = make_model(name)
    x = x.clamp(0, 1)
    for p, eps in [(1, 0.5), (2, 0.2), (INF, 0.03)]:
        bounds = layer_bounds(model, x, norm=p, eps=eps)
        g = torch.Generator().manual_seed(0)
        flat = x.reshape(x.shape[0], -1)
        for _ in range(3):
            v = torch.randn(flat.shape, generator=g, dtype=torch.float64)
            v = v / torch.linalg.vector_norm(v, ord=p, dim=1, keepdim=True) * eps
            z = (flat + v * torch.rand(flat.shape[0], 1, generator=g, dtype=torch.float64)).clamp(0, 1)
            hidden, _ = preactivations(model, z.reshape(x.shape))
            for (l, u), h in zip(bounds, hidden):
                assert (l <= h + 1e-9).all() and (h <= u + 1e-9).all()
        lb = margin_bounds(model, x, torch.zeros(x.shape[0], dtype=torch.long), norm=p, eps=eps)
        assert lb.shape == (x.shape[0], model(x).shape[1])


@pytest.mark.parametrize("name", ["cnn", "paper_cnn", "deep_fc"])
def test_block_adjoints_match_the_jacobian(name):
    """back() (transposed convolutions, BatchNorm, Normalize, AvgPool) equals the Jacobian."""
    model, x = make_model(name)
    net = BoundedNetwork(model, x)
    g = torch.Generator().manual_seed(0)
    for blk in net.blocks:
        lam = torch.randn(3, blk.n_out, generator=g, dtype=torch.float64)
        J = torch.func.jacrev(lambda v: blk.forward_linear(v[None])[0])(torch.zeros(blk.n_in, dtype=torch.float64))
        assert torch.allclose(blk.back(lam), lam @ J, atol=1e-12)
        v = torch.rand(2, blk.n_in, generator=g, dtype=torch.float64)
        assert (blk.forward_abs(v) >= (v @ J.abs().T) - 1e-12).all()  # |W| v upper bound


def test_certified_by_bounds_at_zero_radius_is_correctness():
    net = tiny_net(5)
    x = torch.rand(20, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    pred = net(x).argmax(1)
    for p in NORMS:
        assert torch.equal(certified_by_bounds(net, x, y, norm=p, eps=0.0), pred == y)


def test_float32_model_and_input_are_accepted():
    net = tiny_net(6).float()
    x = torch.rand(5, 2)
    y = net(x).argmax(1)
    lb = margin_bounds(net, x, y, norm=2, eps=0.01)
    assert lb.dtype == torch.float64 and net[0].weight.dtype == torch.float32


def test_errors():
    net = tiny_net(0)
    x = torch.rand(2, 2, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="norm"):
        margin_bounds(net, x, y, norm=3, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        margin_bounds(net, x, y, norm=2, eps=float("nan"))
    with pytest.raises(ValueError, match="box"):
        margin_bounds(net, x + 1.5, y, norm=2, eps=0.1)
    with pytest.raises(ValueError, match="alpha_steps"):
        margin_bounds(net, x, y, norm=2, eps=0.1, alpha_steps=-1)
    bad = nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(1.5), nn.Linear(3, 2)).double()
    with pytest.raises(NotImplementedError, match="negative_slope"):
        margin_bounds(bad, x, y, norm=2, eps=0.1)
    with pytest.raises(NotImplementedError, match="Sigmoid"):
        margin_bounds(nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 2)).double(), x, y,
                      norm=2, eps=0.1)
