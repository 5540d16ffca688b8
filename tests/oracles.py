"""Model builders and independent oracles shared by the tests (imported as ``import oracles``)."""
import itertools
import math

import numpy as np
import torch
from scipy.optimize import linprog, minimize
from torch import nn

import mmr_ext

NORMS = [1, 1.5, 2, 3, math.inf]


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model.eval()


def fc_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 4))


def deep_fc_model():
    return nn.Sequential(
        nn.Linear(10, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Dropout(0.3),
        nn.Linear(8, 8), nn.ReLU(), nn.Identity(), nn.Linear(8, 6), nn.Linear(6, 7), nn.ReLU(),
        nn.Sequential(nn.Linear(7, 6), nn.LeakyReLU(0.2)), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def cnn_model():
    return nn.Sequential(
        mmr_ext.Normalize([0.4, 0.5], [0.3, 0.25]),
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=1, padding=2, dilation=2, groups=2), nn.LeakyReLU(0.1),
        nn.AvgPool2d(2, padding=1, count_include_pad=False), nn.Conv2d(6, 5, (2, 3), padding=(0, 1)), nn.ReLU(),
        nn.AvgPool2d(2, stride=1), nn.Flatten(), nn.Linear(5 * 1 * 2, 12), nn.ReLU(), nn.Linear(12, 6))


def paper_cnn_small():
    """The papers' CNN layout (conv 4x4/2 pad 1 twice, fc) on small 12x12 inputs."""
    return nn.Sequential(nn.Conv2d(1, 3, 4, 2, 1), nn.ReLU(), nn.Conv2d(3, 4, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 10), nn.ReLU(), nn.Linear(10, 5))


MODELS = {
    "fc": (fc_model, (3, 4)),
    "deep_fc": (deep_fc_model, (10,)),
    "cnn": (cnn_model, (2, 9, 9)),
    "paper_cnn": (paper_cnn_small, (1, 12, 12)),
}


def make_model(name: str, dtype=torch.float64, seed: int = 0):
    builder, in_shape = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = randomize_batchnorm(builder(), g).to(dtype)
    x = torch.rand((5,) + in_shape, generator=g, dtype=torch.float64).to(dtype)
    return model, x


def leaves(module: nn.Module):
    for child in module.children():
        if isinstance(child, nn.Sequential):
            yield from leaves(child)
        else:
            yield child


def preactivations(model: nn.Module, x: torch.Tensor):
    """Inputs of every activation module (hidden pre-activations) and the logits: plain forward."""
    outs = []
    z = x
    for layer in leaves(model):
        if isinstance(layer, (nn.ReLU, nn.LeakyReLU)):
            outs.append(z.reshape(z.shape[0], -1))
        z = layer(z)
    return outs, z.reshape(z.shape[0], -1)


def dual_norm(v: torch.Tensor, p: float) -> torch.Tensor:
    """||v||_q over the last dim, written out from the definition (independent of the library)."""
    if p == 1:
        return v.abs().amax(-1)
    if math.isinf(p):
        return v.abs().sum(-1)
    q = p / (p - 1)
    return v.abs().pow(q).sum(-1).pow(1 / q)


def jacobian_distances(model: nn.Module, x: torch.Tensor, p: float, labels=None):
    """Independent oracle: per-unit input gradients from torch.func.jacrev, then |f| / ||grad||_q."""
    def stacked(xi):
        hidden, logits = preactivations(model, xi[None])
        return torch.cat([h[0] for h in hidden] + [logits[0]])

    boundary, decision = [], []
    hidden, logits = preactivations(model, x)
    n_hidden = sum(h.shape[1] for h in hidden)
    pre = torch.cat(hidden, dim=1)
    c = logits.argmax(1) if labels is None else labels
    for b in range(x.shape[0]):
        J = torch.func.jacrev(stacked)(x[b]).reshape(n_hidden + logits.shape[1], -1)
        norms = dual_norm(J[:n_hidden], p)
        boundary.append(torch.where(norms > 0, pre[b].abs() / norms, torch.full_like(norms, math.inf)))
        JL = J[n_hidden:]
        diff = JL[c[b]] - JL
        margin = logits[b, c[b]] - logits[b]
        dn = dual_norm(diff, p)
        dec = torch.where(dn > 0, margin / dn, torch.full_like(dn, math.inf))
        dec[c[b]] = math.inf
        decision.append(dec)
    return torch.stack(boundary), torch.stack(decision)


def assert_distances_close(actual, expected, rtol):
    assert actual.shape == expected.shape
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), "infinite entries differ"
    assert torch.equal(actual[~finite], expected[~finite])
    assert not torch.isnan(actual).any()
    a, e = actual[finite], expected[finite]
    err = ((a - e).abs() / e.abs().clamp_min(1e-12)).max().item() if e.numel() else 0.0
    assert err <= rtol, f"max relative error {err:.3e} > {rtol:.1e}"


class DistancesModule(nn.Module):
    """Makes region_distances a module forward so torch.func.functional_call can swap parameters."""

    def __init__(self, model, p, **kwargs):
        super().__init__()
        self.model, self.p, self.kwargs = model, p, kwargs

    def forward(self, x):
        b, d = mmr_ext.region_distances(self.model, x, self.p, **self.kwargs)
        return b.nan_to_num(posinf=0.0), d.nan_to_num(posinf=0.0)


def gradcheck_distances(model, x, p, max_params=None, **kwargs) -> bool:
    """gradcheck of region_distances w.r.t. x and the model's weight tensors (the first max_params)."""
    wrapper = DistancesModule(model, p, **kwargs)
    names = [n for n, prm in wrapper.named_parameters() if prm.dim() > 1][:max_params]
    values = [wrapper.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def fn(xx, *ws):
        return torch.func.functional_call(wrapper, dict(zip(names, ws)), (xx,))

    return torch.autograd.gradcheck(fn, (x.clone().requires_grad_(True), *values), atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


def distances_and_grads(fn, model, x, p, **kwargs):
    """((boundary, decision), [grad of x, grads of every parameter]) of a fixed weighted sum of the
    finite distances computed by fn(model, x, p, **kwargs)."""
    model.zero_grad()
    xx = x.clone().requires_grad_(True)
    b, d = fn(model, xx, p, **kwargs)
    wb = torch.linspace(0.1, 1.0, b.shape[1], dtype=b.dtype)
    wd = torch.linspace(-1.0, 1.0, d.shape[1], dtype=d.dtype)
    ((b.nan_to_num(posinf=0.0) * wb).sum() + (d.nan_to_num(posinf=0.0) * wd).sum()).backward()
    return (b.detach(), d.detach()), [xx.grad] + [None if prm.grad is None else prm.grad.clone()
                                                   for prm in model.parameters()]


# ------------------------------------------------------------------------------------------
# lp distance to a hyperplane inside a box (docs/MATH.md §7), one hyperplane at a time in numpy/scipy

def pnorm(v, p):
    v = np.abs(v)
    return v.max(initial=0.0) if math.isinf(p) else (v ** p).sum() ** (1 / p)


def enumerate_active_sets(w, b, x, p, lo, hi, return_point=False):
    """Exact box distance for small d: every coordinate is at its lower bound, at its upper bound
    or free; with the clamped ones fixed, the smallest lp step on the free ones that reaches the
    hyperplane has a closed form (Hölder). The optimum is one of these candidates, and every
    candidate that respects the box is feasible, so the smallest feasible candidate is exact.
    With ``return_point``: (distance, minimiser or None)."""
    d = len(w)
    g = w @ x + b
    if not w.any():
        return (math.inf, None) if return_point else math.inf
    if g == 0:
        return (0.0, x.copy()) if return_point else 0.0
    best, best_z = math.inf, None
    for labels in itertools.product((0, 1, 2), repeat=d):
        delta = np.zeros(d)
        lab = np.array(labels)
        delta[lab == 0] = (lo - x)[lab == 0]
        delta[lab == 1] = (hi - x)[lab == 1]
        free = lab == 2
        c = -g - w[~free] @ delta[~free]            # what the free coordinates must contribute
        wf = w * free
        if c != 0:
            if not wf.any():
                continue
            if p == 1:
                j = int(np.argmax(np.abs(wf)))
                delta[j] = c / w[j]
            elif math.isinf(p):
                t = abs(c) / np.abs(wf).sum()
                delta[free] = np.sign(c) * np.sign(w[free]) * t
            else:
                q = p / (p - 1.0)
                mag = np.abs(wf) ** (q - 1)
                delta[free] = np.sign(c) * np.sign(w[free]) * mag[free] * abs(c) / (np.abs(wf) ** q).sum()
        z = x + delta
        if np.all(z >= lo - 1e-12) and np.all(z <= hi + 1e-12) and abs(w @ z + b) <= 1e-9 * (1 + abs(b)):
            if pnorm(delta, p) < best:
                best, best_z = pnorm(delta, p), z
    return (best, best_z) if return_point else best


def linprog_distance(w, b, x, p, lo, hi):
    """p = 1 (δ = u - v, u, v >= 0) and p = inf (epigraph variable t) as linear programs."""
    d = len(w)
    g = w @ x + b
    if p == 1:
        bounds = [(0, h - xi) for h, xi in zip(hi, x)] + [(0, xi - l) for l, xi in zip(lo, x)]
        res = linprog(np.ones(2 * d), A_eq=np.concatenate([w, -w])[None], b_eq=[-g], bounds=bounds,
                      method="highs")
    else:
        c = np.zeros(d + 1)
        c[-1] = 1.0
        A_ub = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
        res = linprog(c, A_ub=A_ub, b_ub=np.zeros(2 * d), A_eq=np.append(w, 0.0)[None], b_eq=[-g],
                      bounds=list(zip(lo - x, hi - x)) + [(0, None)], method="highs")
    assert res.status in (0, 2), res.message
    return res.fun if res.status == 0 else math.inf


def slsqp_distance(w, b, x, p, lo, hi, rng, starts=5):
    """min ||z - x||_p^p over the box and the hyperplane by SLSQP from random starts."""
    best = math.inf
    for _ in range(starts):
        z0 = rng.uniform(lo, hi)
        res = minimize(lambda z: np.sum(np.abs(z - x) ** p), z0,
                       jac=lambda z: p * np.abs(z - x) ** (p - 1) * np.sign(z - x),
                       constraints=[{"type": "eq", "fun": lambda z: w @ z + b, "jac": lambda z: w}],
                       bounds=list(zip(lo, hi)), method="SLSQP", options={"ftol": 1e-15, "maxiter": 500})
        if abs(w @ res.x + b) < 1e-9 and np.all(res.x >= lo - 1e-12) and np.all(res.x <= hi + 1e-12):
            best = min(best, pnorm(res.x - x, p))
    return best


def meets_box(w, b, lo, hi):
    """The hyperplane meets the box iff -b lies between the min and max of <w, z> over it."""
    return np.minimum(w * lo, w * hi).sum() <= -b <= np.maximum(w * lo, w * hi).sum()


def random_box_case(rng, d, M, *, tensor_box):
    """Hyperplanes (some sparse, some missing the box, one zero row), a box, points inside it with
    coordinates on its faces."""
    w = rng.normal(size=(M, d)) * rng.random((M, d)) ** 2
    w[rng.random((M, d)) < 0.2] = 0.0
    w[0] = 0.0
    if tensor_box:
        lo = rng.uniform(-1, 0.5, d)
        hi = lo + rng.uniform(0, 1.5, d)
        hi[0] = lo[0]                             # a degenerate side: that coordinate cannot move
    else:
        lo, hi = np.zeros(d), np.ones(d)
    x = rng.uniform(lo, hi, size=(3, d))
    x = np.where(rng.random((3, d)) < 0.2, lo, np.where(rng.random((3, d)) < 0.2, hi, x))
    b = -(w @ rng.uniform(lo - 0.6, hi + 0.6))   # planes through random points, inside or outside
    return w, b, x, lo, hi


# ------------------------------------------------------------------------------------------
# min of a linear function over an lp-ball ∩ [0, 1]^d (docs/MATH.md §7)

def lp_ball_box_min(a, x, p, eps):
    """min <a, z> over ||z - x||_p <= eps, 0 <= z <= 1: linprog for l1 / l∞, SLSQP for l2."""
    d = a.size
    if p == math.inf:
        return float(a @ np.where(a > 0, np.maximum(0, x - eps), np.minimum(1, x + eps)))
    if p == 1:  # z = x + u - v, u, v >= 0, Σ(u + v) <= eps
        c = np.r_[a, -a]
        res = linprog(c, A_ub=np.ones((1, 2 * d)), b_ub=[eps],
                      bounds=[(0, 1 - xi) for xi in x] + [(0, xi) for xi in x], method="highs")
        return float(a @ x + res.fun)
    cons = [{"type": "ineq", "fun": lambda z: eps ** 2 - ((z - x) ** 2).sum(), "jac": lambda z: -2 * (z - x)}]
    best = math.inf
    for start in (x, np.clip(x - eps * a / max(np.linalg.norm(a), 1e-300), 0, 1)):
        res = minimize(lambda z: a @ z, start, jac=lambda z: a, bounds=[(0, 1)] * d, constraints=cons,
                       method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
        if res.success or res.status == 8:
            best = min(best, float(res.fun))
    return best
