"""Tests of mmr_ext.certify and mmr_ext.geometry.regions (docs/MATH.md §3, §5, §7, §8).

Independent oracles: the exact minimal adversarial l1 / l∞ norm of tiny ReLU nets from a big-M
MILP solved by scipy.optimize.milp (bounds by interval arithmetic, with and without the [0, 1]
box), adversarial examples found by ray search, closed-form projections, and
region_distances / hull_radius for the plain region certificate.
"""
import math

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import lil_matrix
from torch import nn

import mmr_ext
from mmr_ext.attacks import margins
from mmr_ext.certify import Certificate, certify, neighbors
from mmr_ext.geometry.regions import activation_pattern, flip_units, region_geometry, unit_location

from oracles import make_model

INF = math.inf
DISP = False  # print HiGHS logs of the MILP oracle


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation, which costs seconds
    per call when the CPU is shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# tiny networks whose decision varies inside [0, 1]^d

def tiny_net(seed, d=3, hidden=(6, 5), K=3):
    """Gaussian weights; every hidden hyperplane passes through the image of a random point of
    [0, 1]^d and the logits tie at the mean image, so regions and decision boundaries cut
    through the unit box."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(64, d, dtype=torch.float64, generator=g)
    layers, prev = [], d
    for n in hidden:
        lin = nn.Linear(prev, n).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, prev, generator=g, dtype=torch.float64))
            anchor = pts[torch.randint(0, 64, (n,), generator=g)]
            lin.bias.copy_(-(lin.weight * anchor).sum(1))
            pts = torch.relu(lin(pts))
        layers += [lin, nn.ReLU()]
        prev = n
    last = nn.Linear(prev, K).double()
    with torch.no_grad():
        last.weight.copy_(torch.randn(K, prev, generator=g, dtype=torch.float64))
        last.bias.copy_(-(last.weight @ pts.mean(0)))
    return nn.Sequential(*layers, last)


def tiny_points(seed, n, d=3):
    """Points of [0, 1]^d, about a third of the coordinates on a face of the box."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.rand(n, d, dtype=torch.float64, generator=g)
    face = torch.rand(n, d, generator=g) < 0.3
    return torch.where(face, (torch.rand(n, d, generator=g) < 0.5).double(), x)


def predict(model, z):
    with torch.no_grad():
        return model(z).argmax(dim=1)


# ------------------------------------------------------------------------------------------
# oracle 1: exact minimal adversarial norm by MILP (l1, l∞; Linear/ReLU chains)

def milp_min_adversarial(model, x, c, p, box=None, radius=4.0):
    """min ||z - x||_p (p = 1 or inf) s.t. some logit s != c is >= logit c, z in the box and in
    x + [-radius, radius]^d. Exact (up to solver tolerances) when the result is < radius; +inf if
    no such z exists in that domain."""
    lin = [m for m in model if isinstance(m, nn.Linear)]
    Ws = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in lin]
    x = np.asarray(x, dtype=float)
    d = x.size
    lo, hi = x - radius, x + radius
    if box is not None:
        lo, hi = np.maximum(lo, box[0]), np.minimum(hi, box[1])
    # interval arithmetic for the pre-activation bounds
    pre_bounds, L, U = [], lo, hi
    for W, b in Ws[:-1]:
        Wp, Wn = np.maximum(W, 0), np.minimum(W, 0)
        pl, pu = Wp @ L + Wn @ U + b, Wp @ U + Wn @ L + b
        pre_bounds.append((pl, pu))
        L, U = np.maximum(pl, 0), np.maximum(pu, 0)
    # variables: z [d], e [d] (|z - x|, l1) or t (l∞), then per layer h (pre), a (post), s (binary)
    z = np.arange(d)
    n_var = d
    if p == 1:
        e = np.arange(n_var, n_var + d)
        n_var += d
    else:
        t = n_var
        n_var += 1
    layer_vars = []
    for pl, _ in pre_bounds:
        n = pl.size
        layer_vars.append((np.arange(n_var, n_var + n), np.arange(n_var + n, n_var + 2 * n),
                           np.arange(n_var + 2 * n, n_var + 3 * n)))
        n_var += 3 * n
    lb, ub, integrality = np.full(n_var, -np.inf), np.full(n_var, np.inf), np.zeros(n_var)
    lb[z], ub[z] = lo, hi
    rows, r_lo, r_hi = [], [], []

    def add(coef, low, high):
        rows.append(coef)
        r_lo.append(low)
        r_hi.append(high)

    for i in range(d):
        k = e[i] if p == 1 else t
        add({k: 1.0, z[i]: -1.0}, -x[i], np.inf)
        add({k: 1.0, z[i]: 1.0}, x[i], np.inf)
    prev = z
    for (W, b), (pl, pu), (h, a, s) in zip(Ws[:-1], pre_bounds, layer_vars):
        for j in range(W.shape[0]):
            coef = {h[j]: 1.0}
            for k in range(W.shape[1]):
                coef[prev[k]] = -W[j, k]
            add(coef, b[j], b[j])
            lb[h[j]], ub[h[j]] = pl[j], pu[j]
            lb[a[j]], ub[a[j]] = 0.0, max(pu[j], 0.0)
            lb[s[j]], ub[s[j]], integrality[s[j]] = 0, 1, 1
            if pu[j] <= 0:
                add({a[j]: 1.0}, 0.0, 0.0)
            elif pl[j] >= 0:
                add({a[j]: 1.0, h[j]: -1.0}, 0.0, 0.0)
            else:
                add({a[j]: 1.0, h[j]: -1.0}, 0.0, np.inf)
                add({a[j]: 1.0, h[j]: -1.0, s[j]: -pl[j]}, -np.inf, -pl[j])
                add({a[j]: 1.0, s[j]: -pu[j]}, -np.inf, 0.0)
        prev = a
    WL, bL = Ws[-1]
    cost = np.zeros(n_var)
    if p == 1:
        cost[e] = 1.0
    else:
        cost[t] = 1.0
    best = INF
    for target in range(WL.shape[0]):
        if target == c:
            continue
        coef = {prev[k]: WL[target, k] - WL[c, k] for k in range(WL.shape[1])}
        all_rows = rows + [coef]
        A = lil_matrix((len(all_rows), n_var))
        for r, co in enumerate(all_rows):
            for k, v in co.items():
                A[r, k] = v
        res = milp(cost, constraints=LinearConstraint(A.tocsr(), r_lo + [bL[c] - bL[target]], r_hi + [np.inf]),
                   integrality=integrality, bounds=Bounds(lb, ub), options={"mip_rel_gap": 1e-9, "disp": DISP})
        assert res.status in (0, 2), res.message
        if res.status == 0:
            best = min(best, res.fun)
    return best


# ------------------------------------------------------------------------------------------
# oracle 2: adversarial examples by ray search (any model)

def lp_norm(v, p, dim=-1):
    return torch.linalg.vector_norm(v, ord=p, dim=dim)


def ray_attack(model, x, c, p, directions, box=None, t_max=4.0, steps=400):
    """Smallest lp-norm of an adversarial point found along the rays x + t u (u normalised in lp),
    t in (0, t_max], inside the box; every ray's first crossing is refined by bisection. +inf if
    no ray finds one."""
    shape = tuple(x.shape)
    x = x.reshape(-1)

    def label(z):
        with torch.no_grad():
            return model(z.reshape((-1,) + shape)).argmax(dim=1)

    u = directions / lp_norm(directions, p)[:, None]
    t = torch.linspace(0, t_max, steps + 1, dtype=torch.float64)[1:]
    z = x[None, None] + t[None, :, None] * u[:, None]
    inside = torch.ones(z.shape[:2], dtype=torch.bool)
    if box is not None:
        inside = ((z >= box[0]) & (z <= box[1])).all(-1)
    adv = (label(z.reshape(-1, x.numel())).reshape(z.shape[:2]) != c) & inside
    rays = adv.any(1).nonzero()[:, 0]
    if rays.numel() == 0:
        return INF
    k = adv[rays].int().argmax(1)                      # first adversarial step of each ray
    hi = t[k]
    lo = torch.where(k > 0, t[(k - 1).clamp(min=0)], torch.zeros_like(hi))
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        flipped = label(x[None] + mid[:, None] * u[rays]) != c
        hi = torch.where(flipped, mid, hi)
        lo = torch.where(flipped, lo, mid)
    return hi.min().item()


def balanced(name, seed=0):
    """A conftest model whose last bias is shifted so that the classes of random inputs in
    [0, 1] are mixed (the random initialisations are nearly constant classifiers)."""
    model, x = make_model(name, seed=seed)
    z = torch.rand((200,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64)
    with torch.no_grad():
        model[-1].bias -= model(z).mean(0)
    return model, x


def attack_directions(d, p, n, seed, axes=True):
    """n random directions suited to the norm (sparse-ish for l1, near-corners for l∞), plus the
    2d coordinate directions when ``axes``."""
    g = torch.Generator().manual_seed(seed)
    if p == 1:
        rand = torch.randn(n, d, generator=g, dtype=torch.float64) ** 3
    elif math.isinf(p):
        rand = torch.sign(torch.randn(n, d, generator=g, dtype=torch.float64))
        rand = rand * torch.where(torch.rand(n, d, generator=g) < 0.8, 1.0, torch.rand(n, d, generator=g)).double()
    else:
        rand = torch.randn(n, d, generator=g, dtype=torch.float64)
    if not axes:
        return rand
    return torch.cat([torch.eye(d, dtype=torch.float64), -torch.eye(d, dtype=torch.float64), rand])


# ------------------------------------------------------------------------------------------
# (a) the plain certificate is min(dB, dD) of region_distances

def hand_certificate(model, x, y, p):
    boundary, decision = mmr_ext.region_distances(model, x, p, labels=y)
    dB = boundary.amin(1) if boundary.shape[1] else torch.full((x.shape[0],), INF, dtype=x.dtype)
    dD = decision.amin(1)
    correct = model(x).argmax(1) == y
    return torch.where(correct, torch.minimum(dB, dD).clamp(min=0), 0.0), ~correct | (dD <= dB), correct


@pytest.mark.parametrize("name", ["fc", "deep_fc", "cnn", "paper_cnn"])
def test_radius_is_region_certificate(name):
    model, x = make_model(name)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % model(x[:1]).shape[1]                     # one misclassified point
    norms = (1, 1.5, 2, INF)
    cert = certify(model, x, y, norms=norms)
    assert isinstance(cert, Certificate) and cert.norms == (1.0, 1.5, 2.0, INF)
    assert cert.correct.tolist() == [False] + [True] * (x.shape[0] - 1)
    for p in norms:
        radius, exact, _ = hand_certificate(model, x, y, p)
        assert cert.radius[p].dtype == torch.float64
        torch.testing.assert_close(cert.radius[p], radius, rtol=1e-10, atol=0)
        assert cert.radius[p][0] == 0 and cert.exact[p][0]
        assert torch.equal(cert.exact[p], exact)
        assert (cert.radius[p][1:] > 0).all()


def test_float32_inputs_round_down():
    model64, x64 = make_model("fc")
    y = predict(model64, x64)
    cert64 = certify(model64, x64, y)
    cert32 = certify(model64.float(), x64.float(), y)
    for p in (1, 2, INF):
        assert cert32.radius[p].dtype == torch.float32
        # float32 copies of the weights define a slightly different network; compare loosely,
        # and check the cast itself never rounds up
        torch.testing.assert_close(cert32.radius[p].double(), cert64.radius[p], rtol=1e-4, atol=0)
    cert = certify(model64.float(), x64.float(), y, norms=(2,))
    exact64 = certify(model64.float().double(), x64.float().double(), y, norms=(2,)).radius[2]
    assert (cert.radius[2].double() <= exact64).all()
    assert ((exact64 - cert.radius[2].double()) <= exact64 * 2 ** -23).all()


# ------------------------------------------------------------------------------------------
# (b) exact radii are attained by the projection onto the closest decision hyperplane

def closest_decision_step(model, x, c, p):
    """Closed-form minimal lp step from x onto the closest decision hyperplane of its region."""
    J = torch.func.jacrev(lambda z: model(z[None])[0])(x).reshape(-1, x.numel())
    logits = model(x[None])[0]
    best = None
    for s in range(logits.numel()):
        if s == c:
            continue
        w = J[c] - J[s]
        m = (logits[c] - logits[s]).item()
        if p == 1:
            j = int(w.abs().argmax())
            step = torch.zeros_like(w)
            step[j] = -m / w[j]
        elif math.isinf(p):
            step = -m * torch.sign(w) / w.abs().sum()
        else:
            q = p / (p - 1)
            step = -m * torch.sign(w) * w.abs() ** (q - 1) / (w.abs() ** q).sum()
        if best is None or lp_norm(step, p) < lp_norm(best, p):
            best = step
    return best.reshape(x.shape)


def near_boundary_points(model, x, offset=1e-3):
    """Points close to the decision boundary: bisect between consecutive points of different
    predicted classes and step back by ``offset`` of the segment."""
    y = predict(model, x)
    a = (y[:-1] != y[1:]).nonzero()[:, 0]
    start, end = x[a], x[a + 1]
    lo, hi = torch.zeros(len(a), dtype=torch.float64), torch.ones(len(a), dtype=torch.float64)
    view = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        same = predict(model, start + mid.reshape(view) * (end - start)) == y[a]
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    return start + (lo - offset).clamp(min=0).reshape(view) * (end - start)


@pytest.mark.parametrize("name", ["fc", "deep_fc", "paper_cnn"])
def test_exact_radii_are_attained(name):
    model, x = balanced(name)
    g = torch.Generator().manual_seed(3)
    n = 20 if name == "paper_cnn" else 40
    x = near_boundary_points(model, torch.rand((n,) + tuple(x.shape[1:]), generator=g, dtype=torch.float64))
    y = predict(model, x)
    n_exact = 0
    for p in (1, 2, 3, INF):
        cert = certify(model, x, y, norms=(p,))
        for i in cert.exact[p].nonzero()[:, 0].tolist():
            step = closest_decision_step(model, x[i], int(y[i]), p)
            r = cert.radius[p][i].item()
            assert lp_norm(step.reshape(-1), p).item() == pytest.approx(r, rel=1e-9)
            assert predict(model, (x[i] + (1 + 1e-6) * step)[None])[0] != y[i]
            assert predict(model, (x[i] + (1 - 1e-6) * step)[None])[0] == y[i]
            n_exact += 1
    assert n_exact >= 5, "the test needs some exact certificates"


# ------------------------------------------------------------------------------------------
# the per-region bounds of the neighbour search against exact LP distances

def lp_distance(x, p, box, ineq=(), eq=()):
    """min ||z - x||_p (p = 1, inf) s.t. <a, z> + c >= 0 for (a, c) in ineq, = 0 for eq, z in box."""
    d = x.size
    n = d + (d if p == 1 else 1)
    cost = np.zeros(n)
    cost[d:] = 1.0
    A, ub = [], []
    for i in range(d):                                 # |z_i - x_i| <= e_i (l1) or t (l∞)
        k = d + i if p == 1 else d
        for sign in (1.0, -1.0):
            row = np.zeros(n)
            row[i], row[k] = sign, -1.0
            A.append(row)
            ub.append(sign * x[i])
    for a, c in ineq:
        A.append(np.concatenate([-a, np.zeros(n - d)]))
        ub.append(c)
    A_eq = [np.concatenate([a, np.zeros(n - d)]) for a, _ in eq]
    b_eq = [-c for _, c in eq]
    lo, hi = (None, None) if box is None else box
    res = linprog(cost, A_ub=np.array(A), b_ub=np.array(ub), A_eq=np.array(A_eq) if eq else None,
                  b_eq=np.array(b_eq) if eq else None, bounds=[(lo, hi)] * d + [(0, None)] * (n - d),
                  method="highs")
    assert res.status in (0, 2), res.message
    return res.fun if res.status == 0 else INF


@pytest.mark.parametrize("box", [None, (0.0, 1.0)])
def test_region_bounds_below_lp_distances(box):
    """ℓ_P <= dist(x, Q_P), D_P <= dist(x, Q_P ∩ {L_c <= L_s}) and e_P(u) <= dist(x, Q_P ∩ π_u)
    on regions two or three flips away from x, with the distances solved exactly as LPs."""
    checked = combined = 0
    for seed in (1, 2):
        model = tiny_net(seed)
        x = tiny_points(seed, 3)
        y = predict(model, x)
        box64 = None if box is None else (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
        for i in range(len(x)):
            point = neighbors.Point(model, x[i:i + 1], int(y[i]), box64)
            xn = x[i].numpy()
            for flips in ([0, 7], [2, 9, 4], [5, 10], [1, 6, 8]):
                pattern = point.root.pattern.clone()
                pattern[flips] = ~pattern[flips]
                region = point.region(pattern)
                sigma = np.where(region.pattern.numpy(), 1.0, -1.0)
                W, b = region.w.numpy() * sigma[:, None], region.b.numpy() * sigma
                cells = list(zip(W, b))
                for p in (1, INF):
                    q = 1.0 if p == INF else INF
                    in_region = lp_distance(xn, p, box, cells)
                    ell = neighbors.violated_bound(point, region, p, q)
                    assert ell <= in_region * (1 + 1e-9) + 1e-12
                    decision = min(lp_distance(xn, p, box, cells + [(-dw, -db)])
                                   for dw, db in zip(region.dw.numpy(), region.db.numpy()))
                    bound = neighbors.decision_bound(point, region, p, q, ell, flips[-1])
                    assert bound <= decision * (1 + 1e-9) + 1e-12, (seed, i, flips, p, bound, decision)
                    state = neighbors.SearchState(region, ell, bound, torch.ones_like(region.pattern))
                    value, unit = neighbors.frontier(point, state, p, q)
                    on_planes = min(lp_distance(xn, p, box, cells, [(W[u], b[u])]) for u in range(len(b)))
                    assert value <= on_planes * (1 + 1e-9) + 1e-12
                    checked += decision < INF
                    combined += decision < INF and bound > ell
    assert checked >= 3 and combined >= 1


# ------------------------------------------------------------------------------------------
# (c), (d), (e) soundness against the MILP truth and attacks; neighbours; box

@pytest.fixture(scope="module")
def tiny_cases():
    """Per (seed, box): the model, points, labels, MILP truths per norm and certificates."""
    cases = []
    for seed in (1, 2):
        model = tiny_net(seed)
        x = tiny_points(seed, 5)
        y = predict(model, x)
        for box in (None, (0.0, 1.0)):
            truth = {p: [milp_min_adversarial(model, x[i].numpy(), int(y[i]), p, box) for i in range(len(x))]
                     for p in (1, INF)}
            certs = {n: certify(model, x, y, norms=(1, 2, INF), box=box, neighbors=n) for n in (0, 2, 5)}
            cases.append((seed, box, model, x, y, truth, certs))
    return cases


def test_radii_never_exceed_milp_truth(tiny_cases):
    finite = 0
    for seed, box, model, x, y, truth, certs in tiny_cases:
        for n, cert in certs.items():
            for p in (1, INF):
                for i in range(len(x)):
                    r, m = cert.radius[p][i].item(), truth[p][i]
                    assert r <= m * (1 + 1e-7) + 1e-9, (seed, box, n, p, i, r, m)
                    if cert.exact[p][i]:
                        assert r == pytest.approx(m, rel=1e-6, abs=1e-9), (seed, box, n, p, i)
                    finite += m < INF
    assert finite > 40


def test_neighbours_tighten_soundly(tiny_cases):
    improved = newly_exact = 0
    for seed, box, model, x, y, truth, certs in tiny_cases:
        for p in (1, 2, INF):
            r0, r2, r5 = (certs[n].radius[p] for n in (0, 2, 5))
            assert (r2 >= r0).all() and (r5 >= r2).all()
            assert torch.equal(certs[5].exact[p] | ~certs[0].exact[p], torch.ones_like(r0, dtype=torch.bool))
            improved += int((r5 > r0 * (1 + 1e-6)).sum())
            newly_exact += int((certs[5].exact[p] & ~certs[0].exact[p]).sum())
            # exact radii stay exact and unchanged
            e0 = certs[0].exact[p]
            torch.testing.assert_close(r5[e0], r0[e0], rtol=1e-12, atol=0)
    assert improved >= 20 and newly_exact >= 2


def test_box_radii_between_plain_and_box_truth(tiny_cases):
    by_seed = {}
    for seed, box, model, x, y, truth, certs in tiny_cases:
        by_seed.setdefault(seed, {})[box] = (certs, truth)
    larger = 0
    for seed, runs in by_seed.items():
        plain, boxed = runs[None][0][0], runs[(0.0, 1.0)][0][0]
        box_truth = runs[(0.0, 1.0)][1]
        for p in (1, 2, INF):
            assert (boxed.radius[p] >= plain.radius[p]).all()
            larger += int((boxed.radius[p] > plain.radius[p] * (1 + 1e-9)).sum())
            if p != 2:
                assert (boxed.radius[p] <= torch.tensor(box_truth[p]) * (1 + 1e-7) + 1e-9).all()
    assert larger >= 3


@pytest.mark.parametrize("box", [None, (0.0, 1.0)])
def test_radii_never_exceed_attacks(tiny_cases, box):
    checked = 0
    for seed, b, model, x, y, truth, certs in tiny_cases:
        if b != box:
            continue
        for p in (1, 2, INF):
            dirs = attack_directions(3, p, 300, seed)
            for i in range(len(x)):
                found = ray_attack(model, x[i], int(y[i]), p, dirs, box=box)
                assert certs[5].radius[p][i].item() <= found * (1 + 1e-9), (seed, p, i)
                checked += found < INF
    assert checked > 20


@pytest.mark.parametrize("name", ["deep_fc", "paper_cnn"])
def test_neighbours_on_deep_and_conv_models_below_attacks(name):
    model, x = balanced(name, seed=4)
    x = x[:3]
    y = predict(model, x)
    c0 = certify(model, x, y, norms=(2, INF), neighbors=0)
    c3 = certify(model, x, y, norms=(2, INF), neighbors=3)
    for p in (2, INF):
        assert (c3.radius[p] >= c0.radius[p]).all()
        dirs = attack_directions(x[0].numel(), p, 32, 7, axes=name != "paper_cnn")
        for i in range(x.shape[0]):
            found = ray_attack(model, x[i], int(y[i]), p, dirs, t_max=3.0, steps=40)
            assert c3.radius[p][i].item() <= found * (1 + 1e-9)


def test_box_counterexample_to_hull_of_box_radii():
    """The decision boundary 2 z1 + z2 = 0.3 seen from x = (0.2, 0.9) in [0, 1]^2: box distances
    l1 0.8, l∞ 0.6, l2 sqrt(0.4); the Thm 4.1 hull of the box radii (0.759) would be unsound."""
    first = nn.Linear(2, 2).double()
    last = nn.Linear(2, 2).double()
    with torch.no_grad():
        first.weight.copy_(torch.eye(2, dtype=torch.float64))
        first.bias.fill_(10.0)                      # always active near the box
        last.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
        last.bias.copy_(torch.tensor([-30.3, 0.0], dtype=torch.float64))
    model = nn.Sequential(first, nn.ReLU(), last)
    x = torch.tensor([[0.2, 0.9]], dtype=torch.float64)
    y = torch.tensor([0])
    boxed = certify(model, x, y, norms=(1, 2, INF), box=(0, 1))
    assert boxed.radius[1].item() == pytest.approx(0.8, rel=1e-12)
    assert boxed.radius[INF].item() == pytest.approx(0.6, rel=1e-12)
    assert boxed.radius[2].item() == pytest.approx(math.sqrt(0.4), rel=1e-12)
    assert all(bool(boxed.exact[p][0]) for p in (1, 2, INF))
    assert predict(model, torch.tensor([[0.0, 0.3 - 1e-9]], dtype=torch.float64))[0] == 1
    hull_of_box = mmr_ext.hull_radius(0.8, 0.6, 2, 2)
    assert hull_of_box > math.sqrt(0.4) + 0.1
    assert boxed.universal(2).item() <= math.sqrt(0.4)
    # without the box the exact l2 distance is |g| / ||w||_2 = 1 / sqrt(5)
    plain = certify(model, x, y, norms=(2,))
    assert plain.radius[2].item() == pytest.approx(1 / math.sqrt(5), rel=1e-12)
    torch.testing.assert_close(boxed.universal(2), plain.universal(2))


# ------------------------------------------------------------------------------------------
# (f) universal radius

@pytest.mark.parametrize("name", ["fc", "deep_fc", "paper_cnn"])
def test_universal_is_hull_of_region_radii(name):
    model, x = make_model(name)
    y = predict(model, x)
    y[1] = (y[1] + 1) % model(x[:1]).shape[1]
    cert = certify(model, x, y, norms=(2, 3))
    rho1, _, _ = hand_certificate(model, x, y, 1)
    rho_inf, _, _ = hand_certificate(model, x, y, INF)
    d = x[0].numel()
    for p in (1, 1.5, 2, 3, 10, INF):
        expected = mmr_ext.hull_radius(rho1, rho_inf, p, d)
        expected = torch.where((rho1 > 0) & (rho_inf > 0), expected, 0.0)
        torch.testing.assert_close(cert.universal(p), expected, rtol=1e-10, atol=0)
        assert cert.universal(p)[1] == 0
    for p in (2, 3):   # the hull lies in the region's correct part: never above its lp radius
        assert (cert.universal(p) <= cert.radius[p] * (1 + 1e-12)).all()
    # box and neighbours do not change the universal radius (it needs one convex set)
    other = certify(model, x, y, norms=(2,), neighbors=2)
    torch.testing.assert_close(other.universal(2), cert.universal(2))


def test_universal_l2_below_fine_ray_search():
    checked = 0
    for seed in (5, 6):
        model = tiny_net(seed, d=2, hidden=(5, 4), K=3)
        x = tiny_points(seed, 5, d=2)
        y = predict(model, x)
        cert = certify(model, x, y, norms=(1, INF))
        angles = torch.linspace(0, 2 * math.pi, 1441, dtype=torch.float64)[:-1]
        dirs = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        for i in range(len(x)):
            found = ray_attack(model, x[i], int(y[i]), 2, dirs, t_max=3.0, steps=600)
            assert cert.universal(2)[i].item() <= found * (1 + 1e-9)
            assert cert.universal(1.5)[i].item() <= ray_attack(model, x[i], int(y[i]), 1.5, dirs, t_max=3.0,
                                                               steps=300) * (1 + 1e-9)
            checked += found < INF
    assert checked >= 6


# ------------------------------------------------------------------------------------------
# (g) fraction_certified

def test_fraction_certified_counts():
    model, x = make_model("deep_fc")
    g = torch.Generator().manual_seed(9)
    x = torch.rand(30, 10, generator=g, dtype=torch.float64)
    y = predict(model, x)
    y[:4] = (y[:4] + 1) % 3
    cert = certify(model, x, y)
    eps = {1: 0.05, 2: 0.02, INF: 0.005}
    out = cert.fraction_certified(eps)
    per = {p: cert.correct & (cert.radius[p] > e) for p, e in eps.items()}
    uni = {p: cert.correct & (cert.universal(p) > e) for p, e in eps.items()}
    for p in eps:
        assert out["radius"][p] == pytest.approx(per[p].double().mean().item())
        assert out["universal"][p] == pytest.approx(uni[p].double().mean().item())
    assert out["union"] == pytest.approx((per[1] & per[2] & per[INF]).double().mean().item())
    assert out["union_universal"] == pytest.approx((uni[1] & uni[2] & uni[INF]).double().mean().item())
    assert out["union"] <= min(out["radius"].values())
    assert 0 < out["union"] < 26 / 30
    # eps = 0: the certified fraction is the accuracy (all correct points have positive radii)
    assert cert.fraction_certified({2: 0.0})["radius"][2] == pytest.approx(26 / 30)
    # huge eps: nothing certified
    assert cert.fraction_certified({1: 1e9})["union"] == 0.0
    # a norm not certified individually: only the universal fractions
    partial = certify(model, x, y, norms=(1, INF)).fraction_certified(eps)
    assert partial["union"] is None and set(partial["radius"]) == {1.0, INF}
    assert partial["universal"] == out["universal"] and partial["union_universal"] == out["union_universal"]


# ------------------------------------------------------------------------------------------
# regions

def test_region_geometry_matches_region_distances_and_network():
    for name in ("deep_fc", "cnn"):
        model, x = make_model(name)
        geo = region_geometry(model, x)
        assert geo.weight.dtype == torch.float64 and not geo.violated(x).any()
        torch.testing.assert_close(geo.logits(x), model(x), rtol=1e-12, atol=1e-12)
        boundary, _ = mmr_ext.region_distances(model, x, 2)
        mine = geo.preactivations(x).abs() / torch.linalg.vector_norm(geo.weight, dim=2)
        torch.testing.assert_close(mine, boundary, rtol=1e-10, atol=0)
        y = predict(model, x)
        w, b = geo.decision(y)
        assert (w[torch.arange(len(y)), y] == 0).all()
        torch.testing.assert_close(torch.einsum("bkd,bd->bk", w, x.reshape(len(y), -1)) + b,
                                   model(x).gather(1, y[:, None]) - model(x), rtol=0, atol=1e-12)


def test_flipped_pattern_describes_the_neighbouring_region():
    model, x = make_model("deep_fc")
    x = x[:1]
    pattern = activation_pattern(model, x)
    geo = region_geometry(model, x, pattern)
    dist = geo.preactivations(x)[0].abs() / torch.linalg.vector_norm(geo.weight[0], dim=1)
    u = int(dist.argmin())
    # step just across unit u's hyperplane (l2 projection times 1 + 1e-3)
    w, f = geo.weight[0, u], geo.preactivations(x)[0, u]
    z = x - (1 + 1e-3) * f * w / (w @ w)
    flipped = flip_units(pattern, [u])
    layer, j = unit_location(geo.layer_sizes, u)
    assert flipped[layer][0, j] != pattern[layer][0, j]
    actual = activation_pattern(model, z)
    assert all(torch.equal(a, b) for a, b in zip(actual, flipped))
    neighbour = region_geometry(model, x, flipped)
    assert neighbour.violated(x)[0, u] and not neighbour.violated(z).any()
    torch.testing.assert_close(neighbour.logits(z), model(z), rtol=1e-12, atol=1e-12)
    assert (geo.logits(z) - model(z)).abs().max() > 1e-9      # the old region's map is wrong there
    # units of the same and earlier layers keep their hyperplanes
    n_before = sum(geo.layer_sizes[:layer + 1])
    torch.testing.assert_close(neighbour.weight[:, :n_before], geo.weight[:, :n_before])


def test_region_errors():
    model, x = make_model("fc")
    pattern = activation_pattern(model, x)
    with pytest.raises(ValueError, match="hidden layers"):
        region_geometry(model, x, pattern[:1])
    with pytest.raises(TypeError, match="bool"):
        region_geometry(model, x, [pattern[0].float(), pattern[1]])
    with pytest.raises(ValueError, match="shape"):
        region_geometry(model, x, [pattern[0][:, :3], pattern[1]])
    with pytest.raises(ValueError, match="out of range"):
        flip_units(pattern, [100])


# ------------------------------------------------------------------------------------------
# (h) errors and options

def test_argument_errors():
    model, x = make_model("fc")
    y = predict(model, x)
    with pytest.raises(ValueError, match=">= 1"):
        certify(model, x, y, norms=(0.5,))
    with pytest.raises(TypeError, match="p must be"):
        certify(model, x, y, norms=(None,))
    with pytest.raises(ValueError, match="must not be empty"):
        certify(model, x, y, norms=())
    with pytest.raises(ValueError, match="lo < hi"):
        certify(model, x, y, box=(1.0, 0.0))
    with pytest.raises(ValueError, match="inside the box"):
        certify(model, x + 1.0, y, box=(0.0, 1.0))
    with pytest.raises(TypeError, match="pair"):
        certify(model, x, y, box=(0.0,))
    with pytest.raises(ValueError, match="does not fit"):
        certify(model, x, y, box=(torch.zeros(5), 1.0))
    with pytest.raises(TypeError, match="neighbors"):
        certify(model, x, y, neighbors=1.5)
    with pytest.raises(TypeError, match="neighbors"):
        certify(model, x, y, neighbors=True)
    with pytest.raises(ValueError, match="neighbors must be >= 0"):
        certify(model, x, y, neighbors=-1)
    with pytest.raises(ValueError, match=r"y must have shape \(5,\)"):
        certify(model, x, y[:3])
    with pytest.raises(ValueError, match=r"y must lie in \[0, 4\)"):
        certify(model, x, torch.full_like(y, 4))
    with pytest.raises(TypeError, match="y must be an integer tensor"):
        certify(model, x, y.double())
    with pytest.raises(TypeError, match="float32"):
        certify(model, x.long(), y)
    with pytest.raises(NotImplementedError, match="AdaptiveMaxPool2d"):
        certify(nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(3, 4)).double(), x, y)
    cert = certify(model, x, y, norms=(1,))
    with pytest.raises(TypeError, match="non-empty dict"):
        cert.fraction_certified({})
    with pytest.raises(ValueError, match="eps"):
        cert.fraction_certified({1: -0.1})
    with pytest.raises(ValueError, match=">= 1"):
        cert.universal(0.3)


def test_box_tensor_bounds_and_progress(capsys):
    model, x = make_model("paper_cnn")
    x = x[:2]
    y = predict(model, x)
    lo = torch.zeros(12, 1, dtype=torch.float64)               # per image row, broadcast
    cert = certify(model, x, y, norms=(2,), box=(lo, 1.0), neighbors=1, progress=True)
    plain = certify(model, x, y, norms=(2,))
    assert (cert.radius[2] >= plain.radius[2]).all()
    assert cert.box[0].shape == (x[0].numel(),)
    assert "certify" in capsys.readouterr().err


def _near_ties(n_models=40, seed=0):
    """float32 networks and points whose float64 margin is within float32 rounding of zero: the
    last bias is set so that the float64 logits of the first point nearly tie."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(n_models):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)).eval()
        x = torch.rand(1, 6, generator=g)
        with torch.no_grad():
            f = model.double()(x.double())[0]
            model.float()
            top2 = f.topk(2).indices
            model[2].bias[top2[1]] += float(f[top2[0]] - f[top2[1]])  # float32: the tie lands within an ulp
        cases.append((model, x, top2[0].reshape(1)))
    return cases


def test_float32_points_misclassified_as_run_are_never_certified():
    """A float32 model used to be certified through its float64 copy alone: near a tie the float32
    network misclassified x while certify reported it correct with a radius of about 1e-8."""
    disagree = 0
    for model, x, y in _near_ties():
        with torch.no_grad():
            wrong32 = bool(model(x).argmax(1) != y) or bool(margins(model(x).double(), y) <= 0)
            wrong64 = bool(model.double()(x.double()).argmax(1) != y)
            model.float()
        disagree += wrong32 != wrong64
        cert = certify(model, x, y, norms=(1, 2, math.inf))
        bounds = mmr_ext.certified_by_bounds(model, x, y, norm=math.inf, eps=0.0)
        if wrong32:
            assert not cert.correct.any() and all(float(cert.radius[p]) == 0 for p in (1, 2, math.inf))
            assert float(cert.universal(2)) == 0
            assert not bounds.any()
    assert disagree > 0  # the construction does produce float32/float64 disagreements


def test_points_far_from_a_tie_keep_their_certificates_in_float32():
    model, x = make_model("paper_cnn", dtype=torch.float32)
    y = model(x).argmax(1)
    cert32 = certify(model, x, y, norms=(2,))
    cert64 = certify(model.double(), x.double(), y, norms=(2,))
    assert cert32.correct.all() and cert64.correct.all()
    torch.testing.assert_close(cert32.radius[2].double(), cert64.radius[2], rtol=1e-6, atol=0)
