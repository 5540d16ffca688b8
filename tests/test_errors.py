"""Every error path of model parsing and of bad input (issue: foundation, item 4 and 6)."""
import math

import pytest
import torch
from torch import nn

import mmr_ext
from mmr_ext.nn.chain import parse_model
from mmr_ext.nn.layers import Scale
from oracles import make_model

APIS = [mmr_ext.region_distances, mmr_ext.region_distances_reference]


@pytest.mark.parametrize("layer, kind", [
    (nn.AdaptiveMaxPool2d(2), "AdaptiveMaxPool2d"), (nn.Sigmoid(), "Sigmoid"), (nn.Tanh(), "Tanh"),
    (nn.Conv1d(1, 1, 1), "Conv1d"),
])
def test_unsupported_layers_name_layer_and_position(layer, kind):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Identity(), layer), nn.Flatten(),
                          nn.Linear(8, 2))
    with pytest.raises(NotImplementedError, match=rf"'2\.1' \({kind}\)"):
        parse_model(model)


def test_train_mode_batchnorm_and_dropout_are_rejected():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        parse_model(bn)
    parse_model(bn.eval())
    no_stats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.ReLU(),
                             nn.Linear(4, 2)).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        parse_model(no_stats)
    drop = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'2' \(Dropout\) is in training mode"):
        parse_model(drop)
    parse_model(drop.eval())
    parse_model(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, 2)))


def test_structural_errors():
    class Net(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="no affine layers"):
        parse_model(Net())
    with pytest.raises(ValueError, match="must be a torch.nn.Module, got function"):
        parse_model(lambda x: x)
    with pytest.raises(ValueError, match="ends with the activation '1'"):
        parse_model(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))
    with pytest.raises(ValueError, match="two activations in a row"):
        parse_model(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no affine layers"):
        parse_model(nn.Sequential())


@pytest.fixture
def small():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    return model, torch.rand(2, 4, dtype=torch.float64)


@pytest.mark.parametrize("api", APIS)
def test_bad_input_tensors(api, small):
    model, x = small
    bad = x.clone()
    bad[0, 1] = math.nan
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        api(model, bad, 2)
    bad[0, 1] = math.inf
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        api(model, bad, 2)
    with pytest.raises(ValueError, match="non-empty batch"):
        api(model, x[0], 2)
    with pytest.raises(ValueError, match="non-empty batch"):
        api(model, x[:0], 2)
    with pytest.raises(ValueError, match="does not fit the model"):
        api(model, torch.rand(2, 7, dtype=torch.float64), 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        api(model, x.half(), 2)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        api(model, x.numpy(), 2)
    with pytest.raises(TypeError, match="model tensor '0.weight' is torch.float64 but x is torch.float32"):
        api(model, x.float(), 2)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("p", [0.5, 0, -1, math.nan])
def test_p_below_one(api, small, p):
    model, x = small
    with pytest.raises(ValueError, match="p must be >= 1"):
        api(model, x, p)


@pytest.mark.parametrize("api", APIS)
def test_p_wrong_type_and_labels(api, small):
    model, x = small
    with pytest.raises(TypeError, match="p must be a real number"):
        api(model, x, [2])
    with pytest.raises(ValueError, match="p must be a number >= 1"):
        api(model, x, "l_two")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        api(model, x, 2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        api(model, x, 2, labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        api(model, x, 2, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        api(model, x, 2, labels=torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("api", APIS)
def test_device_mismatch(api, small):
    model, x = small
    meta_x = torch.empty(2, 4, dtype=torch.float64, device="meta")
    with pytest.raises((ValueError, NotImplementedError)):
        api(model, meta_x, 2)


ONE_CLASS = [
    lambda m, x: mmr_ext.region_distances(m, x, 2),
    lambda m, x: mmr_ext.region_distances_reference(m, x, 2),
    lambda m, x: mmr_ext.certify(m, x, torch.zeros(x.shape[0], dtype=torch.long)),
    lambda m, x: mmr_ext.universal_loss(m, x, torch.zeros(x.shape[0], dtype=torch.long), k_boundary=1,
                                        gamma=(1.0, 0.1)),
    lambda m, x: mmr_ext.region_geometry(m, x),
]


@pytest.mark.parametrize("api", ONE_CLASS)
def test_one_class_models_are_refused(api):
    """A one-class model can never be attacked: radii (finite, before this check) or distances to a
    decision boundary it does not have would mislead."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with pytest.raises(ValueError, match="at least 2 classes"):
        api(model, torch.rand(2, 3, dtype=torch.float64))


class _Negated(nn.Sequential):
    def forward(self, x):
        return -super().forward(x)


class _Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _as_plain_linear(layer: nn.Linear) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features)
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain


class _Plain(nn.Sequential):  # a subclass that keeps Sequential's forward is fine
    pass


@pytest.mark.parametrize("build, twin", [
    (lambda: _Negated(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), lambda m: nn.Sequential(*m, Scale(-1.0))),
    (lambda: nn.Sequential(_Negated(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2)),
     lambda m: nn.Sequential(m[0][0], Scale(-1.0), *m[1:])),
    (lambda: nn.Sequential(_Doubled(3, 4), nn.ReLU(), nn.Linear(4, 2)),
     lambda m: nn.Sequential(_as_plain_linear(m[0]), Scale(2.0), *m[1:])),
])
def test_modules_that_override_forward_are_analysed_as_their_forward(build, twin):
    """Analysing the plain layer chain of a model whose forward computes something else gave
    certificates for the wrong function (a positive radius at a point the model misclassifies);
    such models are now traced."""
    torch.manual_seed(0)
    model = build().double().eval()
    reference = twin(model).double()
    x = torch.rand(4, 3, dtype=torch.float64)
    assert torch.equal(model(x), reference(x))
    y = model(x).argmax(1)
    cert, expected = mmr_ext.certify(model, x, y), mmr_ext.certify(reference, x, y)
    assert torch.equal(cert.correct, expected.correct)
    for p in expected.radius:
        torch.testing.assert_close(cert.radius[p], expected.radius[p], rtol=1e-10, atol=0)
    for a, b in zip(mmr_ext.region_distances(model, x, 2), mmr_ext.region_distances_reference(reference, x, 2)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    torch.testing.assert_close(mmr_ext.margin_bounds(model, x, y, norm=2, eps=0.1),
                               mmr_ext.margin_bounds(reference, x, y, norm=2, eps=0.1), rtol=1e-10, atol=1e-12)


def test_sequential_subclass_without_its_own_forward_is_analysed():
    torch.manual_seed(0)
    model = _Plain(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.rand(4, 3, dtype=torch.float64)
    b, d = mmr_ext.region_distances(model, x, 2)
    rb, rd = mmr_ext.region_distances_reference(nn.Sequential(*model), x, 2)
    torch.testing.assert_close(b, rb)


@pytest.mark.parametrize("name,p", [("l1", 1.0), ("L2", 2.0), ("linf", math.inf), ("inf", math.inf), ("l1.5", 1.5)])
def test_norm_names_are_accepted_everywhere(name, p):
    """'l2' worked in evaluate but not in certify, region_distances or the losses."""
    model, x = make_model("fc")
    y = model(x).argmax(1)
    for a, b in zip(mmr_ext.region_distances(model, x, name), mmr_ext.region_distances(model, x, p)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cert_named, cert = mmr_ext.certify(model, x, y, norms=(name,)), mmr_ext.certify(model, x, y, norms=(p,))
    assert torch.equal(cert_named.radius[p], cert.radius[p])
    assert torch.equal(cert.universal(name), cert.universal(p))
    assert cert.fraction_certified({name: 0.01}) == cert.fraction_certified({p: 0.01})
    kw = dict(k_boundary=3, k_decision=2, gamma_boundary=1.0, gamma_decision=1.0, lam=1.0)
    assert torch.equal(mmr_ext.mmr_loss(model, x, y, p=name, **kw), mmr_ext.mmr_loss(model, x, y, p=p, **kw))
    w, bias = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    assert torch.equal(mmr_ext.box_distance(w, bias, x[0].flatten(), name),
                       mmr_ext.box_distance(w, bias, x[0].flatten(), p))
    assert mmr_ext.hull_radius(1.0, 0.1, name, 784) == mmr_ext.hull_radius(1.0, 0.1, p, 784)


def test_certify_refuses_train_mode_batchnorm_before_running_the_model():
    """The model used to run once in train mode (updating the running statistics) before the
    refusal; BatchNorm1d then failed inside torch on a one-sample batch."""
    for bn in (nn.BatchNorm1d(4), nn.BatchNorm2d(2)):
        if isinstance(bn, nn.BatchNorm1d):
            model = nn.Sequential(nn.Linear(3, 4), bn, nn.ReLU(), nn.Linear(4, 2)).double().train()
            x = torch.rand(5, 3, dtype=torch.float64)
        else:
            model = nn.Sequential(nn.Conv2d(1, 2, 3), bn, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))
            model = model.double().train()
            x = torch.rand(5, 1, 6, 6, dtype=torch.float64)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for api in (lambda: mmr_ext.certify(model, x, torch.zeros(5, dtype=torch.long)),
                    lambda: mmr_ext.region_geometry(model, x), lambda: mmr_ext.activation_pattern(model, x),
                    lambda: mmr_ext.region_distances(model, x, 2)):
            with pytest.raises(ValueError, match="is in training mode"):
                api()
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed"
