"""No public function mutates the caller's model or tensors: every entry point runs on models with
BatchNorm and Dropout in eval mode, in train mode and in a mix (where most refuse), and
parameters, buffers, training flags, requires_grad flags and the inputs are compared afterwards."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmr_ext

EPS = {1: 0.5, 2: 0.1, math.inf: 0.02}
LOSS = dict(k_boundary=3, gamma=(1.0, 0.1), lam=(1.0, 1.0))
MMR = dict(p=2, k_boundary=3, k_decision=2, gamma_boundary=1.0, gamma_decision=1.0, lam=1.0)

ENTRY_POINTS = {
    "region_distances": lambda m, x, y: mmr_ext.region_distances(m, x, 2),
    "region_distances_reference": lambda m, x, y: mmr_ext.region_distances_reference(m, x, 1),
    "universal_loss": lambda m, x, y: mmr_ext.universal_loss(m, x, y, **LOSS),
    "mmr_universal": lambda m, x, y: mmr_ext.mmr_universal(m, x, y, **LOSS),
    "UniversalLoss": lambda m, x, y: mmr_ext.UniversalLoss(**LOSS)(m, x, y),
    "mmr_loss": lambda m, x, y: mmr_ext.mmr_loss(m, x, y, **MMR),
    "mmr_regularizer": lambda m, x, y: mmr_ext.mmr_regularizer(m, x, y, **{k: v for k, v in MMR.items() if k != "lam"}),
    "MMRLoss": lambda m, x, y: mmr_ext.MMRLoss(**MMR)(m, x, y),
    "activation_pattern": lambda m, x, y: mmr_ext.activation_pattern(m, x),
    "region_geometry": lambda m, x, y: mmr_ext.region_geometry(m, x),
    "certify": lambda m, x, y: mmr_ext.certify(m, x, y, box=(0.0, 1.0), neighbors=2),
    "layer_bounds": lambda m, x, y: mmr_ext.layer_bounds(m, x, norm=2, eps=0.05),
    "margin_bounds": lambda m, x, y: mmr_ext.margin_bounds(m, x, y, norm=1, eps=0.1, alpha_steps=2),
    "certified_by_bounds": lambda m, x, y: mmr_ext.certified_by_bounds(m, x, y, norm=math.inf, eps=0.01),
    "verify_mip": lambda m, x, y: mmr_ext.verify_mip(m, x[:1], y[:1], norm=math.inf, eps=0.01, time_limit=10),
    "pgd": lambda m, x, y: mmr_ext.pgd(m, x, y, norm=2, eps=0.3, steps=3),
    "pgd_max": lambda m, x, y: mmr_ext.pgd_max(m, x, y, eps=EPS, steps=2),
    "min_norm_attack": lambda m, x, y: mmr_ext.min_norm_attack(m, x, y, norm=1, steps=5),
    "verify_adversarial": lambda m, x, y: mmr_ext.verify_adversarial(m, x, x.clone(), y, 2, 0.1),
    "evaluate": lambda m, x, y: mmr_ext.evaluate(m, x, y, eps=EPS, attack_steps=3, fmn_steps=3, progress=False),
}


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for bn in (model[1], model[6]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    model[5].bias.requires_grad_(False)  # mixed flags must survive too
    return model


class _Traced(nn.Module):
    """The same network written as a class with functional ReLU and dropout (analysed as traced)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        conv, bn, _, _, _, fc, bn1, _, drop, out = self.layers
        x = F.dropout(F.relu(bn(conv(x))), 0.25, self.training).flatten(1)
        return out(drop(torch.relu(bn1(fc(x)))))


class _Graph(nn.Module):
    """A graph network (max pooling and a residual sum) with BatchNorm and Dropout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)
        self.fc, self.bn1, self.drop = nn.Linear(27, 8), nn.BatchNorm1d(8), nn.Dropout(0.1)
        self.inner, self.out = nn.Linear(8, 8), nn.Linear(8, 3)
        with torch.no_grad():
            for bn in (self.bn, self.bn1):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
        self.fc.bias.requires_grad_(False)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2, stride=1).flatten(1)
        h = self.drop(F.relu(self.bn1(self.fc(x))))
        return self.out(F.relu(h + self.inner(h)))


BUILDERS = {"sequential": _model, "traced": lambda: _Traced(_model()), "graph": lambda: _Graph().double()}
CHAINS_ONLY = ("activation_pattern", "region_geometry", "region_distances_reference")


def _set_mode(model, mode):
    if mode == "eval":
        model.eval()
    elif mode == "train":
        model.train()
    else:  # BatchNorm in eval mode, Dropout in train mode
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.train()
    return model


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [p.grad is None for p in model.parameters()])


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_leaves_model_and_inputs_unchanged(name, mode, build):
    model = _set_mode(BUILDERS[build](), mode)
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    _set_mode(model, mode)
    x0, y0 = x.clone(), y.clone()
    state, modes, flags, grads = _snapshot(model)
    try:
        ENTRY_POINTS[name](model, x, y)
    except (ValueError, NotImplementedError) as error:  # train-mode layers are refused, with a clear message
        if build == "graph" and name in CHAINS_ONLY and "a graph network" in str(error):
            pass  # defined for chains only, and says so
        else:
            assert mode != "eval", f"{name} failed on an eval-mode model: {error}"
            assert "training mode" in str(error) or "train" in str(error), str(error)
    after_state, after_modes, after_flags, after_grads = _snapshot(model)
    assert after_modes == modes, "training flags changed"
    assert after_flags == flags, "requires_grad flags changed"
    assert after_grads == grads, "parameter .grad fields changed"
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after_state[key], value), f"{key} changed"
    assert torch.equal(x, x0) and torch.equal(y, y0), "inputs changed"
