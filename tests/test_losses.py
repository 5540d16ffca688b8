"""MMR / MMR-Universal losses against hand-written formulas (docs/MATH.md §6)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmr_ext
from mmr_ext import losses
from oracles import make_model


def _hinge_mean_smallest(d, k, gamma):
    vals = sorted(d.tolist())[:k]
    return sum(max(0.0, 1.0 - v / gamma) for v in vals) / k


def _hand_universal(model, x, y, k, gamma, lam, selection="per_norm"):
    b1, d1 = mmr_ext.region_distances_reference(model, x, 1, labels=y)
    bi, di = mmr_ext.region_distances_reference(model, x, math.inf, labels=y)
    K = d1.shape[1]
    out = []
    for s in range(x.shape[0]):
        if selection == "per_norm":
            bt = lam[0] * _hinge_mean_smallest(b1[s], k, gamma[0]) + lam[1] * _hinge_mean_smallest(bi[s], k, gamma[1])
        else:
            i1 = sorted(range(b1.shape[1]), key=lambda j: (b1[s, j].item(), j))[:k]
            ii = sorted(range(bi.shape[1]), key=lambda j: (bi[s, j].item(), j))[:k]
            bt = sum(lam[0] * max(0, 1 - b1[s, j].item() / gamma[0]) + lam[1] * max(0, 1 - bi[s, j].item() / gamma[1])
                     for j in set(i1) | set(ii)) / k
        dt = (lam[0] * _hinge_mean_smallest(d1[s], K - 1, gamma[0])
              + lam[1] * _hinge_mean_smallest(di[s], K - 1, gamma[1]))
        out.append(bt + dt)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", ["fc", "paper_cnn", "cnn"])
@pytest.mark.parametrize("selection", ["per_norm", "union"])
def test_mmr_universal_matches_equation_9(name, selection):
    model, x = make_model(name)
    y = torch.arange(x.shape[0]) % model(x).shape[1]
    gamma, lam = (1.5, 0.2), (3.0, 12.0)
    reg = mmr_ext.mmr_universal(model, x, y, k_boundary=7, gamma=gamma, lam=lam, selection=selection)
    expected = _hand_universal(model, x, y, 7, gamma, lam, selection)
    torch.testing.assert_close(reg, expected, rtol=1e-10, atol=1e-12)
    loss = mmr_ext.universal_loss(model, x, y, k_boundary=7, gamma=gamma, lam=lam, selection=selection)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y) + expected.mean(), rtol=1e-10, atol=1e-12)


def test_mmr_loss_matches_equation_6():
    model, x = make_model("paper_cnn")
    y = torch.arange(x.shape[0]) % 5
    for p in [1, 2, math.inf]:
        loss = mmr_ext.mmr_loss(model, x, y, p=p, k_boundary=9, k_decision=3, gamma_boundary=0.7,
                                gamma_decision=2.0, lam=0.5)
        b, d = mmr_ext.region_distances_reference(model, x, p, labels=y)
        reg = torch.tensor([_hinge_mean_smallest(b[s], 9, 0.7) + _hinge_mean_smallest(d[s], 3, 2.0)
                            for s in range(x.shape[0])], dtype=torch.float64)
        torch.testing.assert_close(loss, F.cross_entropy(model(x), y) + 0.5 * reg.mean(), rtol=1e-10, atol=1e-12)
    # kD = K means all K-1 other classes
    a = mmr_ext.mmr_regularizer(model, x, y, p=2, k_boundary=3, k_decision=5, gamma_boundary=1, gamma_decision=1)
    b = mmr_ext.mmr_regularizer(model, x, y, p=2, k_boundary=3, k_decision=4, gamma_boundary=1, gamma_decision=1)
    assert torch.equal(a, b)


def test_fraction_k_and_modules():
    model, x = make_model("fc")
    y = torch.zeros(x.shape[0], dtype=torch.long)
    n_hidden = 9 + 7
    a = mmr_ext.mmr_universal(model, x, y, k_boundary=0.25, gamma=(1, 1), lam=(1, 1))
    b = mmr_ext.mmr_universal(model, x, y, k_boundary=round(0.25 * n_hidden), gamma=(1, 1), lam=(1, 1))
    assert torch.equal(a, b)
    module = mmr_ext.UniversalLoss(k_boundary=4, gamma=(1.0, 0.3), lam=(2.0, 5.0))
    loss, terms = module(model, x, y, return_terms=True)
    assert loss.item() == pytest.approx(terms["cross_entropy"] + terms["boundary"] + terms["decision"], rel=1e-12)
    module.k_boundary = 6  # schedules change attributes
    assert module(model, x, y).item() != loss.item()
    mmr = mmr_ext.MMRLoss(p=2, k_boundary=4, k_decision=3, gamma_boundary=1, gamma_decision=1, lam=1)
    assert torch.isfinite(mmr(model, x, y))


class _Regularizer(nn.Module):
    def __init__(self, model, **kw):
        super().__init__()
        self.model, self.kw = model, kw

    def forward(self, x, y):
        return mmr_ext.mmr_universal(self.model, x, y, **self.kw)


def test_mmr_universal_gradcheck_input_and_parameters():
    model, x = make_model("paper_cnn")
    y = torch.arange(x.shape[0]) % 5
    # large gammas keep every hinge active, so the loss is smooth away from top-k ties
    wrapper = _Regularizer(model, k_boundary=6, gamma=(50.0, 5.0), lam=(1.0, 2.0))
    names = ["model.2.weight", "model.7.weight"]
    values = [wrapper.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    xx = x[:2].clone().requires_grad_(True)

    def fn(xi, *ws):
        return torch.func.functional_call(wrapper, dict(zip(names, ws)), (xi, y[:2]))

    assert torch.autograd.gradcheck(fn, (xx, *values), atol=1e-7, rtol=1e-5, fast_mode=True)


def test_regularizer_is_per_sample_and_batch_invariant():
    model, x = make_model("cnn")
    y = torch.arange(x.shape[0]) % 6
    kw = dict(k_boundary=5, gamma=(1.0, 0.2), lam=(1.0, 1.0))
    full = mmr_ext.mmr_universal(model, x, y, **kw)
    for i in range(x.shape[0]):
        torch.testing.assert_close(mmr_ext.mmr_universal(model, x[i:i + 1], y[i:i + 1], **kw), full[i:i + 1],
                                   rtol=1e-12, atol=0)


def test_torch_fallback_matches_native(monkeypatch):
    model, x = make_model("paper_cnn")
    y = torch.arange(x.shape[0]) % 5
    kw = dict(k_boundary=8, gamma=(1.0, 0.2), lam=(3.0, 12.0))
    native = mmr_ext.mmr_universal(model, x, y, **kw)
    monkeypatch.setattr(losses, "native_or_warn", lambda: False)
    torch.testing.assert_close(mmr_ext.mmr_universal(model, x, y, **kw), native, rtol=1e-12, atol=0)


def test_loss_argument_errors():
    model, x = make_model("fc")
    y = torch.zeros(x.shape[0], dtype=torch.long)
    kw = dict(gamma=(1.0, 0.1), lam=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"k_boundary must be in \[1, 16\]"):
        mmr_ext.universal_loss(model, x, y, k_boundary=0, **kw)
    with pytest.raises(ValueError, match=r"k_boundary must be in \[1, 16\]"):
        mmr_ext.universal_loss(model, x, y, k_boundary=17, **kw)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        mmr_ext.universal_loss(model, x, y, k_boundary=1.5, **kw)
    with pytest.raises(ValueError, match="k_boundary=1.0 is ambiguous"):
        mmr_ext.universal_loss(model, x, y, k_boundary=1.0, **kw)
    with pytest.raises(TypeError, match="or 'all'"):
        mmr_ext.universal_loss(model, x, y, k_boundary="half", **kw)
    with pytest.raises(ValueError, match=r"gamma\[1\] must be a positive"):
        mmr_ext.universal_loss(model, x, y, k_boundary=3, gamma=(1.0, 0.0), lam=(1, 1))
    with pytest.raises(ValueError, match=r"lam\[0\] must be a non-negative"):
        mmr_ext.universal_loss(model, x, y, k_boundary=3, gamma=(1.0, 1.0), lam=(-1, 1))
    with pytest.raises(ValueError, match="gamma must be a pair"):
        mmr_ext.universal_loss(model, x, y, k_boundary=3, gamma=1.0, lam=(1, 1))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        mmr_ext.universal_loss(model, x, torch.full_like(y, 4), k_boundary=3, **kw)
    with pytest.raises(ValueError, match="selection must be one of"):
        mmr_ext.universal_loss(model, x, y, k_boundary=3, selection="both", **kw)
    with pytest.raises(ValueError, match="gamma_boundary must be a positive"):
        mmr_ext.mmr_loss(model, x, y, p=2, k_boundary=3, k_decision=2, gamma_boundary=-1, gamma_decision=1, lam=1)
    with pytest.raises(ValueError, match=r"k_decision must be in \[1, 3\]"):
        mmr_ext.mmr_loss(model, x, y, p=2, k_boundary=3, k_decision=6, gamma_boundary=1, gamma_decision=1, lam=1)
    with pytest.raises(ValueError, match="lam must be a non-negative"):
        mmr_ext.mmr_loss(model, x, y, p=2, k_boundary=3, k_decision=2, gamma_boundary=1, gamma_decision=1, lam=-2)


def test_k_all_and_count_one_differ_and_all_equals_the_count_of_every_hyperplane():
    """k='all' means every hidden unit, the int 1 the closest one; the float 1.0, which read as either,
    is refused (above)."""
    model, x = make_model("fc")
    y = torch.zeros(x.shape[0], dtype=torch.long)
    kw = dict(gamma=(1.0, 0.1), lam=(1.0, 1.0))
    every = mmr_ext.universal_loss(model, x, y, k_boundary="all", **kw)
    assert torch.equal(every, mmr_ext.universal_loss(model, x, y, k_boundary=16, **kw))  # fc: 9 + 7 units
    assert not torch.equal(every, mmr_ext.universal_loss(model, x, y, k_boundary=1, **kw))
