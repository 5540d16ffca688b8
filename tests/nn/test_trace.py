"""Traced models (issue: bring your own network): any nn.Module whose forward is a chain of supported
operations is analysed as it runs. Every model of the zoo has a hand-written twin nn.Sequential
that shares its tensors; the twin's outputs equal the model's, and the oracles (autograd
Jacobians, the reference) run on the twin."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmr_ext
from mmr_ext.nn.chain import parse_model
from mmr_ext.nn.graph import Graph, parse_network
from mmr_ext.nn.layers import Scale
from oracles import assert_distances_close, distances_and_grads, jacobian_distances


class FunctionalCNN(nn.Module):
    """Modules for the convs, functional ReLU, pooling and flattening, a raw Parameter for the head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.head_weight = nn.Parameter(torch.randn(5, 4 * 2 * 2) * 0.4)
        self.head_bias = nn.Parameter(torch.randn(5) * 0.1)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.avg_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        x = F.relu(F.linear(x, self.head_weight, self.head_bias))
        return self.out(x)

    def twin(self):
        head = nn.Linear(16, 5)
        head.weight, head.bias = self.head_weight, self.head_bias
        return nn.Sequential(self.conv1, nn.ReLU(), self.conv2, nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), head,
                             nn.ReLU(), self.out)


class Block(nn.Module):
    def __init__(self, n_in, n_out, slope):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        self.slope = slope

    def forward(self, x):
        return F.leaky_relu(self.fc(x), self.slope)


class NestedMLP(nn.Module):
    """Nested user blocks in a ModuleList, torch.flatten, scaling by numbers and a negation."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(12, 8, 0.1), Block(8, 6, 0.0)])
        self.last = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.flatten(x, 1) / 2
        for block in self.blocks:
            x = block(x)
        return -(3 * self.last(x))

    def twin(self):
        return nn.Sequential(nn.Flatten(), Scale(0.5, torch.float64), self.blocks[0].fc, nn.LeakyReLU(0.1),
                             self.blocks[1].fc, nn.LeakyReLU(0.0), self.last, Scale(3.0, torch.float64),
                             Scale(-1.0, torch.float64))


class FunctionalConv(nn.Module):
    """F.conv2d with the model's own tensors (stride, padding, groups), x.reshape(-1, n), eval dropout."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 1, 3, 3) * 0.5)
        self.b = nn.Parameter(torch.randn(4) * 0.1)
        self.w2 = nn.Parameter(torch.randn(4, 2, 2, 2) * 0.5)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w, self.b, stride=2, padding=1))
        x = F.dropout(F.conv2d(x, self.w2, None, 1, 0, 1, 2), 0.3, self.training).relu()
        return self.fc(x.reshape(-1, 16))

    def twin(self):
        c1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        c1.weight, c1.bias = self.w, self.b
        c2 = nn.Conv2d(4, 4, 2, groups=2, bias=False)
        c2.weight = self.w2
        return nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), self.fc)


class Negated(nn.Sequential):
    """A Sequential subclass with its own forward: analysed as that forward, not as its layers."""

    def forward(self, x):
        return -super().forward(x)

    def twin(self):
        return nn.Sequential(*self, Scale(-1.0, torch.float64))


ZOO = {
    "functional_cnn": (FunctionalCNN, (1, 8, 8)),
    "nested_mlp": (NestedMLP, (2, 2, 3)),
    "functional_conv": (FunctionalConv, (1, 6, 6)),
    "sequential_subclass": (lambda: Negated(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), (5,)),
}


def build(name, seed=0):
    builder, shape = ZOO[name]
    torch.manual_seed(seed)
    model = builder().double().eval()
    x = torch.rand((6,) + shape, dtype=torch.float64)
    return model, model.twin(), x


@pytest.mark.parametrize("name", ZOO)
def test_twin_computes_the_same_function(name):
    model, twin, x = build(name)
    assert torch.equal(model(x), twin(x))


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_distances_of_traced_models_equal_autograd_jacobians(name, p):
    model, twin, x = build(name)
    b, d = mmr_ext.region_distances(model, x, p)
    eb, ed = jacobian_distances(twin, x, p)
    assert_distances_close(b, eb, 1e-10)
    assert_distances_close(d, ed, 1e-10)
    rb, rd = mmr_ext.region_distances_reference(model, x, p)
    assert_distances_close(rb, eb, 1e-10)
    assert_distances_close(rd, ed, 1e-10)


@pytest.mark.parametrize("name", ZOO)
def test_gradients_reach_the_models_own_parameters(name):
    model, twin, x = build(name)
    (b, d), grads = distances_and_grads(mmr_ext.region_distances, model, x, 2)
    grads_by_param = dict(zip([id(p) for p in model.parameters()], grads[1:]))
    (tb, td), twin_grads = distances_and_grads(mmr_ext.region_distances_reference, twin, x, 2)
    torch.testing.assert_close(grads[0], twin_grads[0], rtol=1e-9, atol=1e-12)
    for param, expected in zip(twin.parameters(), twin_grads[1:]):
        assert grads_by_param[id(param)] is not None
        torch.testing.assert_close(grads_by_param[id(param)], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ZOO)
def test_losses_and_certificates_of_traced_models_equal_their_twins(name):
    model, twin, x = build(name)
    y = model(x).argmax(1)
    kwargs = dict(k_boundary=3, gamma=(0.5, 0.1))
    torch.testing.assert_close(mmr_ext.universal_loss(model, x, y, **kwargs),
                               mmr_ext.universal_loss(twin, x, y, **kwargs), rtol=1e-10, atol=0)
    cert, twin_cert = mmr_ext.certify(model, x, y), mmr_ext.certify(twin, x, y)
    assert torch.equal(cert.correct, twin_cert.correct)
    for p in cert.radius:
        torch.testing.assert_close(cert.radius[p], twin_cert.radius[p], rtol=1e-10, atol=0)
    torch.testing.assert_close(mmr_ext.margin_bounds(model, x, y, norm=2, eps=0.05),
                               mmr_ext.margin_bounds(twin, x, y, norm=2, eps=0.05), rtol=1e-10, atol=1e-12)


def test_exact_verification_of_a_traced_model_equals_its_twin():
    model, twin, x = build("functional_conv")
    y = model(x).argmax(1)
    verdicts = [r.status for r in mmr_ext.verify_mip(model, x, y, norm=math.inf, eps=0.02, time_limit=30)]
    assert verdicts == [r.status for r in mmr_ext.verify_mip(twin, x, y, norm=math.inf, eps=0.02, time_limit=30)]
    assert {"verified", "falsified"} <= set(verdicts)
    parallel = mmr_ext.verify_mip(model, x[:2], y[:2], norm=math.inf, eps=0.02, time_limit=30, workers=2)
    assert [r.status for r in parallel] == verdicts[:2]


def test_a_sequential_subclass_is_certified_as_it_runs():
    """Analysed as its plain layers, this model got a positive radius at points it misclassifies."""
    model, twin, x = build("sequential_subclass")
    y = nn.Sequential(*model)(x).argmax(1)  # the labels its layers, not its forward, would predict
    cert = mmr_ext.certify(model, x, y)
    assert not cert.correct.any()
    assert all(bool((r == 0).all()) for r in cert.radius.values())


def test_tracing_changes_nothing_in_the_model():
    model, _, x = build("functional_conv")
    model.train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="training mode with p=0.3"):
        parse_model(model)
    model.eval()
    chain = parse_model(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not model.training and [m.training for m in model.modules()] == [False] * len(list(model.modules()))
    assert any(layer.weight is model.w for block in chain.blocks for layer in block.layers
               if isinstance(layer, nn.Conv2d))


class MaxPoolIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2, return_indices=True)[0].flatten(1)


class CeilPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.conv(x))).flatten(1))


class EndsWithActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return F.relu(F.max_pool2d(self.conv(x), 2).flatten(1))


class AddConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(F.relu(self.a(x)) + 1.0)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x + F.relu(self.a(x)))


class Sigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return torch.sigmoid(self.a(x))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x)
        return y, y


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else -self.a(x)


class Products(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x) * x[:, :2]


@pytest.mark.parametrize("model, message", [
    (MaxPoolIndices(), r"'max_pool2d_with_indices' \(graph node 'max_pool2d_with_indices', test_trace.py:\d+\) is not"),
    (CeilPool(), r"layer 'pool' \(MaxPool2d\) uses ceil_mode"),
    (AddConstant(), r"'add' \(graph node 'add', test_trace.py:\d+\) adds a constant"),
    (Sigmoid(), r"'sigmoid' \(graph node 'sigmoid', test_trace.py:\d+\) is not supported"),
    (TwoOutputs(), r"does not return the result of the last operation"),
    (DataDependent(), r"torch.fx cannot trace DataDependent.forward"),
    (Products(), r"'getitem' \(graph node 'getitem', test_trace.py:\d+\)"),
    (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), Block(3, 2, 0.0), nn.Sigmoid(), nn.Linear(2, 2)),
     r"layer '3' \(Sigmoid"),
])
def test_unsupported_operations_name_the_node_and_the_line(model, message):
    with pytest.raises(NotImplementedError, match=message):
        parse_network(model)


def test_graph_networks_are_parsed_by_parse_network_only():
    assert isinstance(parse_network(Residual()), Graph)
    with pytest.raises(NotImplementedError, match="the model computes a sum of two branches"):
        parse_model(Residual())
    with pytest.raises(NotImplementedError, match="the model computes max pooling"):
        parse_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="model ends with 'relu' \\(act\\)"):
        parse_network(EndsWithActivation())


def test_view_to_the_wrong_width_is_refused_when_it_runs():
    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x):
            return self.a(x.view(-1, 2))

    model = Wrong().double()
    with pytest.raises(ValueError, match="mixes samples"):
        mmr_ext.region_distances(model, torch.rand(3, 4, dtype=torch.float64), 2)
