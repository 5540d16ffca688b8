"""certify on graph networks (max pooling, residual sums): the region certificate is sound and, where
flagged exact, attained (docs/MATH.md §3, §10-11)."""
import math
import warnings

import pytest
import torch
from torch import nn

import mmr_ext
from mmr_ext.math.norms import dual_exponent

from graph_models import model_and_input

NAMES = ["residual_mlp", "max_pool_cnn", "projection_residual_cnn", "nested_residual"]


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="this model is a graph network")
        yield


def dual_step(w: torch.Tensor, p: float) -> torch.Tensor:
    """The direction u of lp-norm 1 that maximises <w, u> (the minimal-norm step onto a hyperplane)."""
    if p == math.inf:
        return torch.sign(w)
    if p == 1:
        u = torch.zeros_like(w)
        i = w.abs().argmax()
        u[i] = torch.sign(w[i])
        return u
    q = dual_exponent(p)
    u = torch.sign(w) * w.abs() ** (q - 1)
    return u / torch.linalg.vector_norm(u, ord=p)


def near_decision_boundary(model, x, steps=40, offset=1e-3):
    """Points just inside a decision boundary: bisection between pairs of points of different
    predicted classes, then a step of ``offset`` (of the segment) back to the first point's side."""
    with torch.no_grad():
        x = torch.cat([x, 4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)])
        c = model(x).argmax(1)
        out = []
        for i in range(x.shape[0]):
            j = next((j for j in range(x.shape[0]) if c[j] != c[i]), None)
            if j is None:
                continue
            lo_t, hi_t = 0.0, 1.0
            for _ in range(steps):
                mid = (lo_t + hi_t) / 2
                if model(((1 - mid) * x[i] + mid * x[j])[None]).argmax(1) == c[i]:
                    lo_t = mid
                else:
                    hi_t = mid
            out.append((1 - lo_t + offset) * x[i] + (lo_t - offset) * x[j])
    return torch.stack(out)


@pytest.mark.parametrize("name", NAMES)
def test_radii_are_sound_and_exact_radii_are_attained(name):
    model, x = model_and_input(name, batch=12, seed=5)
    with torch.no_grad():  # a head with larger weights, centred on the batch: all classes occur near x
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        head.weight.mul_(10)
        head.bias.mul_(10).sub_(model(x).mean(0))
    x = torch.cat([x, near_decision_boundary(model, x)])
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[:2] = (y[:2] + 1) % 3  # two misclassified points
    cert = mmr_ext.certify(model, x, y, norms=(1, 2, math.inf))
    assert torch.equal(cert.correct, logits.argmax(1) == y)
    gen = torch.Generator().manual_seed(0)
    checked_exact = 0
    for p in (1.0, 2.0, math.inf):
        r = cert.radius[p]
        assert (r[~cert.correct] == 0).all() and (r[cert.correct] > 0).all()
        for i in cert.correct.nonzero()[:, 0].tolist():
            d = x[i].numel()
            # random perturbations strictly inside the certified ball keep the label
            u = torch.randn((256, d), generator=gen, dtype=x.dtype)
            u = u / torch.linalg.vector_norm(u, ord=p, dim=1, keepdim=True)
            z = x[i].reshape(1, -1) + 0.999 * float(r[i]) * u
            assert (model(z.reshape((-1,) + x.shape[1:])).argmax(1) == y[i]).all()
            if not bool(cert.exact[p][i]):
                continue
            # exact: the closest point of the decision hyperplane, just beyond it, changes the label
            J = torch.autograd.functional.jacobian(lambda v: model(v.reshape((1,) + x.shape[1:]))[0], x[i].reshape(-1))
            margins = logits[i, y[i]] - logits[i]
            rows = J[y[i]] - J
            s = min((s for s in range(3) if s != y[i]),
                    key=lambda s: float(margins[s] / torch.linalg.vector_norm(rows[s], ord=dual_exponent(p))))
            beyond = x[i].reshape(-1) - float(r[i]) * (1 + 1e-6) * dual_step(rows[s], p)
            assert model(beyond.reshape((1,) + x.shape[1:])).argmax(1).item() != y[i]
            checked_exact += 1
    assert checked_exact > 0


def test_box_radius_is_at_least_the_plain_one_and_neighbours_fall_back_with_a_warning():
    model, x = model_and_input("max_pool_cnn", batch=4, seed=6)
    x = (x > 0.5).to(x.dtype)  # binary images: every coordinate on a face of the box
    y = model(x).argmax(1)
    plain = mmr_ext.certify(model, x, y, norms=(1, 2, math.inf))
    boxed = mmr_ext.certify(model, x, y, norms=(1, 2, math.inf), box=(0, 1))
    for p in (1.0, 2.0, math.inf):
        assert (boxed.radius[p] >= plain.radius[p]).all()
    assert all((boxed.radius[p] > plain.radius[p]).any() for p in (1.0, math.inf))  # the box matters
    with pytest.warns(UserWarning, match="neighbouring-regions search is not implemented"):
        searched = mmr_ext.certify(model, x, y, norms=(2,), box=(0, 1), neighbors=2)
    torch.testing.assert_close(searched.radius[2.0], boxed.radius[2.0], rtol=0, atol=0)
    assert searched.neighbors == 0


def test_universal_radius_of_a_graph_model():
    model, x = model_and_input("residual_mlp", batch=8, seed=7)
    y = model(x).argmax(1)
    cert = mmr_ext.certify(model, x, y)
    for p in (1.5, 2.0, 4.0):
        u = cert.universal(p)
        # the lp ball lies in the hull of the l1 and l∞ balls, which reaches max(ρ1, ρ∞) along an axis
        assert (u >= 0).all() and (u <= torch.maximum(cert.rho1, cert.rho_inf) + 1e-12).all()
    assert (cert.universal(2.0) > 0).any()
