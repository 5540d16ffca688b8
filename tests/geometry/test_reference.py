"""The pure-PyTorch reference geometry against independent constructions (docs/MATH.md §1-3)."""
import math

import pytest
import torch
from torch import nn

import mmr_ext
from mmr_ext.nn.chain import parse_model
from oracles import MODELS, NORMS, assert_distances_close, jacobian_distances, make_model, preactivations


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("p", NORMS)
def test_reference_matches_autograd_jacobians(name, p):
    model, x = make_model(name)
    boundary, decision = mmr_ext.region_distances_reference(model, x, p)
    exp_boundary, exp_decision = jacobian_distances(model, x, p)
    assert_distances_close(boundary, exp_boundary, 1e-10)
    assert_distances_close(decision, exp_decision, 1e-10)


def test_consecutive_affine_layers_fold_into_one_block():
    model, x = make_model("deep_fc")
    chain = parse_model(model)
    assert len(chain.blocks) == 6  # 5 activations
    hidden, _ = preactivations(model, x)
    boundary, _ = mmr_ext.region_distances_reference(model, x, 2)
    assert boundary.shape[1] == sum(h.shape[1] for h in hidden) == 8 + 8 + 7 + 6 + 5


def test_float32_matches_float64():
    model, x = make_model("cnn")
    b64, d64 = mmr_ext.region_distances_reference(model, x, 2)
    b32, d32 = mmr_ext.region_distances_reference(model.float(), x.float(), 2)
    assert b32.dtype == torch.float32
    assert_distances_close(b32.double(), b64, 1e-4)
    assert_distances_close(d32.double(), d64, 1e-4)


def test_dead_rows_give_inf_never_nan():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 3)).double()
    with torch.no_grad():
        model[0].weight[1].zero_()            # unit 1 of layer 1: zero row of V(1)
        model[0].bias.copy_(torch.tensor([-100.0, 1.0, 1.0]))  # unit 0 always dead
        model[2].weight[:, 0] = 5.0           # layer 2 reads unit 0 only through a dead mask...
        model[2].weight[0, 1:] = 0.0          # ...so unit 0 of layer 2 has a zero row
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    for p in NORMS:
        boundary, decision = mmr_ext.region_distances_reference(model, x, p)
        assert not torch.isnan(boundary).any() and not torch.isnan(decision).any()
        assert torch.isinf(boundary[:, 1]).all() and torch.isinf(boundary[:, 3]).all()
        finite = torch.isfinite(boundary).float() * boundary.nan_to_num(posinf=0.0)
        (finite.sum() + decision.nan_to_num(posinf=0.0).sum()).backward()
        assert not torch.isnan(x.grad).any()
        x.grad = None


def test_labels_versus_prediction_and_sign_of_decision_distances():
    model, x = make_model("fc")
    logits = model(x)
    pred = logits.argmax(1)
    b0, d0 = mmr_ext.region_distances_reference(model, x, 2)
    b1, d1 = mmr_ext.region_distances_reference(model, x, 2, labels=pred)
    assert torch.equal(b0, b1) and torch.equal(d0, d1)
    assert (d0[torch.isfinite(d0)] >= 0).all()
    wrong = (pred + 1) % logits.shape[1]
    _, dw = mmr_ext.region_distances_reference(model, x, 2, labels=wrong)
    assert torch.isinf(dw.gather(1, wrong[:, None])).all()
    # the class that beats the wrong label has a negative signed distance, exactly at the prediction
    neg = dw < 0
    assert neg.any(1).all()
    assert neg.gather(1, pred[:, None]).all()


def _minimal_perturbation(w: torch.Tensor, g: float, p: float) -> torch.Tensor:
    """Minimal lp-norm delta with <w, delta> = -g (closed form per norm)."""
    if math.isinf(p):
        return -g / w.abs().sum() * torch.sign(w)
    if p == 1:
        j = w.abs().argmax()
        delta = torch.zeros_like(w)
        delta[j] = -g / w[j]
        return delta
    q = p / (p - 1)
    return -g * torch.sign(w) * w.abs().pow(q - 1) / w.abs().pow(q).sum()


def _points_near_decision_boundary(model, x):
    """Points a small step inside the decision boundary on segments between differently classified inputs."""
    pred = model(x).argmax(1)
    points = []
    for a in range(x.shape[0]):
        for b in range(a + 1, x.shape[0]):
            if pred[a] == pred[b]:
                continue
            lo, hi = 0.0, 1.0
            for _ in range(60):
                mid = (lo + hi) / 2
                same = model((x[a] + mid * (x[b] - x[a]))[None]).argmax(1) == pred[a]
                lo, hi = (mid, hi) if same else (lo, mid)
            points.append(x[a] + (lo - 1e-3) * (x[b] - x[a]))
    return torch.stack(points) if points else x[:0]


@pytest.mark.parametrize("p", NORMS)
def test_projection_onto_closest_decision_hyperplane_flips_exactly_at_dD(p):
    """docs/MATH.md §3: when dD < dB, x + (1-1e-6) dD keeps the class and x + (1+1e-6) dD flips it."""
    checked = 0
    for seed in range(6):
        model, x = make_model("fc", seed=seed)
        model.requires_grad_(False)
        x = _points_near_decision_boundary(model, 4 * torch.randn((12,) + x.shape[1:], dtype=x.dtype,
                                                             generator=torch.Generator().manual_seed(seed)))
        if x.shape[0] == 0:
            continue
        boundary, decision = mmr_ext.region_distances_reference(model, x, p)
        logits = model(x)
        c = logits.argmax(1)
        for b in range(x.shape[0]):
            dB, (dD, s) = boundary[b].min(), decision[b].min(0)
            if not dD < dB:
                continue
            xi = x[b].reshape(-1)
            J = torch.func.jacrev(lambda z: model(z.reshape(x[b:b + 1].shape))[0])(xi)
            w = J[c[b]] - J[s]
            delta = _minimal_perturbation(w, float(logits[b, c[b]] - logits[b, s]), p)
            assert torch.linalg.vector_norm(delta, ord=p).item() == pytest.approx(dD.item(), rel=1e-9)
            inside = model((xi + (1 - 1e-6) * delta).reshape(x[b:b + 1].shape)).argmax(1)
            outside = model((xi + (1 + 1e-6) * delta).reshape(x[b:b + 1].shape)).argmax(1)
            assert inside.item() == c[b].item()
            assert outside.item() != c[b].item()
            checked += 1
    assert checked >= 5


def test_reference_is_differentiable_in_input_and_parameters():
    model, x = make_model("paper_cnn")
    x = x[:2].clone().requires_grad_(True)
    weight = model[2].weight
    b, d = mmr_ext.region_distances_reference(model, x, 2)
    (b.sum() + d[torch.isfinite(d)].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
