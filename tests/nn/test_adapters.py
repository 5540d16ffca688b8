"""The layer adapters (mmr_ext.nn.adapters) against independent definitions: the linear part from
the layer itself minus its bias, |W| from the dense matrix of the linear part, the transpose from
autograd's vector-Jacobian product, the row cost from the dense matrix's structure."""
import math

import pytest
import torch
from torch import nn

import mmr_ext
from mmr_ext.nn.adapters import ADAPTERS, adapter_for, adapter_of

F64 = torch.float64


def _bn(cls, n):
    bn = cls(n)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


CASES = {
    "linear": (lambda: nn.Linear(7, 5), (7,)),
    "conv": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 7, 6)),
    "conv_grouped_dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (4, 6, 6)),
    "conv_many_channels": (lambda: nn.Conv2d(5, 3, (2, 3), stride=(2, 1)), (5, 7, 7)),
    "conv_circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 5, 5)),
    "avgpool": (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (3, 7, 7)),
    "avgpool_divisor": (lambda: nn.AvgPool2d(2, divisor_override=3), (2, 6, 6)),
    "flatten": (lambda: nn.Flatten(), (3, 4, 4)),
    "batchnorm1d": (lambda: _bn(nn.BatchNorm1d, 6), (6,)),
    "batchnorm2d": (lambda: _bn(nn.BatchNorm2d, 3), (3, 4, 5)),
    "normalize": (lambda: mmr_ext.Normalize([0.1, 0.5, 0.9], [0.3, 0.2, 0.5]), (3, 4, 4)),
    "normalize_scalar": (lambda: mmr_ext.Normalize(0.5, 0.25), (2, 3, 3)),
}


def _case(name):
    torch.manual_seed(0)
    build, shape = CASES[name]
    layer = build().double()
    return layer, shape, adapter_of(layer)


def _dense(layer, shape):
    """The matrix W [n_out, n_in] of the layer's linear part: layer(e_i) - layer(0) per column."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=F64).reshape((n,) + shape)
    with torch.no_grad():
        cols = layer(eye) - layer(torch.zeros((1,) + shape, dtype=F64))
    return cols.reshape(n, -1).t()


@pytest.mark.parametrize("name", CASES)
def test_linear_part_is_the_layer_without_its_offset(name):
    layer, shape, adapter = _case(name)
    z = torch.randn((4,) + shape, dtype=F64)
    expected = layer(z) - layer(torch.zeros((1,) + shape, dtype=F64))
    torch.testing.assert_close(adapter.linear(layer, z), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_abs_linear_is_the_absolute_matrix(name):
    layer, shape, adapter = _case(name)
    W = _dense(layer, shape)
    z = torch.randn((3,) + shape, dtype=F64)
    out = adapter.abs_linear(layer, z).reshape(3, -1)
    torch.testing.assert_close(out, z.reshape(3, -1) @ W.abs().t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_transpose_is_the_vector_jacobian_product(name):
    layer, shape, adapter = _case(name)
    z = torch.randn((1,) + shape, dtype=F64, requires_grad=True)
    out = adapter.linear(layer, z)
    g = torch.randn((5,) + tuple(out.shape[1:]), dtype=F64)
    expected = torch.stack([torch.autograd.grad(out, z, gi[None], retain_graph=True)[0][0] for gi in g])
    got = adapter.transpose(layer, g, shape)
    assert got.shape == (5,) + shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in CASES if adapter_of(CASES[n][0]()).transpose_weight(CASES[n][0]())
                                  is not None])
def test_transpose_is_differentiable_in_the_weight_it_reads(name):
    layer, shape, adapter = _case(name)
    weight = adapter.transpose_weight(layer).detach().clone().requires_grad_(True)
    out_shape = tuple(adapter.linear(layer, torch.zeros((1,) + shape, dtype=F64)).shape[1:])
    g = torch.randn((2,) + out_shape, dtype=F64)
    assert torch.autograd.gradcheck(lambda w: adapter.transpose(layer, g, shape, w), (weight,))


@pytest.mark.parametrize("name", CASES)
def test_row_cost_counts_the_nonzeros_of_the_transposed_map(name):
    """Multiply-adds of one transposed row: at least the nonzeros of W (a dense product touches
    each once), at most one per (output, kernel tap) pair."""
    layer, shape, adapter = _case(name)
    W = _dense(layer, shape)
    out_shape = tuple(adapter.linear(layer, torch.zeros((1,) + shape, dtype=F64)).shape[1:])
    cost = adapter.row_cost(layer, shape, out_shape)
    assert (W != 0).sum().item() <= cost <= max(W.numel(), math.prod(out_shape))


def test_registry_covers_every_affine_layer_the_parser_accepts():
    kinds = {type(adapter).__name__: adapter.kind for adapter in ADAPTERS.values()}
    assert set(kinds.values()) == {"linear", "conv", "avgpool", "flatten", "scale"}
    assert adapter_for(nn.ReLU()) is None and adapter_for(nn.MaxPool2d(2)) is None
    with pytest.raises(NotImplementedError, match="MaxPool2d"):
        adapter_of(nn.MaxPool2d(2))


def test_subclasses_use_their_base_type_adapter():
    class MyLinear(nn.Linear):
        pass

    assert adapter_for(MyLinear(2, 3)) is ADAPTERS[nn.Linear]


def test_adapter_checks_refuse_layers_that_are_not_fixed_affine_maps():
    where = "layer 'x'"
    with pytest.raises(ValueError, match="training mode"):
        adapter_of(nn.BatchNorm1d(3)).check(where, nn.BatchNorm1d(3).train())
    with pytest.raises(ValueError, match="track_running_stats"):
        adapter_of(nn.BatchNorm2d(3)).check(where, nn.BatchNorm2d(3, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="divisor_override"):
        adapter_of(nn.AvgPool2d(2)).check(where, nn.AvgPool2d(2, divisor_override=-1))
