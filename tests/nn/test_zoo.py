"""Tests of mmr_ext.nn.zoo: shapes, layer sizes and parameter counts of the paper architectures."""
import pytest
import torch
from torch import nn

from mmr_ext.nn.layers import Normalize
from mmr_ext.nn.graph import Graph, parse_network
from mmr_ext.nn.zoo import (MODELS, ResidualCNN, build_model, cnn, cnn_maxpool, fc1, fc10, large, resolve_model_name,
                            short_model_name)

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
SUPPORTED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, Normalize)
CHAINS = ("fc1", "fc10", "cnn", "large")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape,k", [(MNIST, 10), (CIFAR, 10), (CIFAR, 43)])
def test_output_shapes(name, shape, k):
    torch.manual_seed(0)
    model = build_model(name, shape, k)
    if name in CHAINS:
        assert isinstance(model, nn.Sequential)
        assert all(isinstance(m, SUPPORTED) for m in model)
    else:
        assert isinstance(parse_network(model), Graph)
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, k) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_fc1_parameter_count():
    model = fc1(MNIST, 10)
    assert n_params(model) == 784 * 1024 + 1024 + 1024 * 10 + 10
    assert [(m.in_features, m.out_features) for m in linears(model)] == [(784, 1024), (1024, 10)]
    assert n_params(fc1(CIFAR, 10)) == 3072 * 1024 + 1024 + 1024 * 10 + 10


def test_fc10_layer_sizes():
    model = fc10(MNIST, 10)
    widths = [m.out_features for m in linears(model)]
    assert widths == [124] + [104] * 7 + [86] * 2 + [10]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 10
    assert linears(model)[0].in_features == 784
    sizes = [784, 124] + [104] * 7 + [86, 86, 10]
    assert n_params(model) == sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def test_cnn_layers_and_parameter_count():
    model = cnn(MNIST, 10)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (16, (4, 4), (2, 2), (1, 1)), (32, (4, 4), (2, 2), (1, 1))]
    # 28 -> 14 -> 7: 32 * 7 * 7 = 1568 features into fc 100
    conv1 = 1 * 16 * 4 * 4 + 16
    conv2 = 16 * 32 * 4 * 4 + 32
    assert n_params(model) == conv1 + conv2 + (1568 * 100 + 100) + (100 * 10 + 10) == 166406
    # 32 -> 16 -> 8: 32 * 8 * 8 = 2048 features
    c_model = cnn(CIFAR, 10)
    conv1 = 3 * 16 * 4 * 4 + 16
    assert n_params(c_model) == conv1 + conv2 + (2048 * 100 + 100) + (100 * 10 + 10) == 214918


def test_large_layers():
    for shape, flat in ((MNIST, 64 * 7 * 7), (CIFAR, 64 * 8 * 8)):
        model = large(shape, 10)
        convs = [m for m in model if isinstance(m, nn.Conv2d)]
        assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
            (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)]
        assert [(m.in_features, m.out_features) for m in linears(model)] == [
            (flat, 512), (512, 512), (512, 10)]
        # a ReLU after every conv and hidden fc, none after the logits
        assert sum(isinstance(m, nn.ReLU) for m in model) == 6
        assert isinstance(model[-1], nn.Linear)


def test_graph_models_layers():
    pooled = cnn_maxpool(MNIST, 10)
    assert [type(m).__name__ for m in pooled] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d",
                                                  "Flatten", "Linear", "ReLU", "Linear"]
    assert pooled[7].in_features == 32 * 7 * 7 and cnn_maxpool(CIFAR, 10)[7].in_features == 32 * 8 * 8
    res = build_model("resnet", MNIST, 10)
    assert isinstance(res, ResidualCNN) and res.fc.in_features == 32 * 7 * 7
    ops = [node.op for node in parse_network(res).nodes]
    assert ops.count("add") == 1 and ops.count("act") == 5
    with pytest.raises(ValueError, match="too small"):
        cnn_maxpool((1, 3, 3), 10)


def test_normalize_prepended():
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    torch.manual_seed(1)
    model = build_model("cnn", CIFAR, 10, normalize=(mean, std))
    assert isinstance(model[0], Normalize)
    plain = nn.Sequential(*list(model)[1:])  # the same layers without Normalize
    assert len(plain) == len(cnn(CIFAR, 10))
    x = torch.rand(4, *CIFAR)
    x_norm = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(model(x), plain(x_norm), atol=1e-5)
    scalar = fc1(MNIST, 10, normalize=(0.1307, 0.3081))
    assert isinstance(scalar[0], Normalize) and scalar(torch.rand(2, *MNIST)).shape == (2, 10)


def test_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*fc1.*fc10.*cnn.*large.*cnn_maxpool.*resnet"):
        build_model("resnet50", MNIST, 10)
    with pytest.raises(ValueError, match="must be a zoo name"):
        build_model(None, MNIST, 10)
    assert isinstance(build_model(" CNN ", MNIST, 10), nn.Sequential)
    for bad in [(28, 28), (1, 0, 28), (1, 28.5, 28), "abc", None]:
        with pytest.raises(ValueError, match="in_shape"):
            build_model("fc1", bad, 10)
    for bad in [1, 0, 2.0, True]:
        with pytest.raises(ValueError, match="num_classes"):
            build_model("cnn", MNIST, bad)
    with pytest.raises(ValueError, match="too small"):
        large((1, 2, 2), 10)
    with pytest.raises(ValueError, match="normalize mean has 3 values; expected 1 or 1"):
        cnn(MNIST, 10, normalize=((0.1, 0.2, 0.3), 1.0))
    with pytest.raises(ValueError, match="pair"):
        cnn(MNIST, 10, normalize=0.5)


def test_user_builders_from_a_module_or_a_file(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text("from torch import nn\n\n"
                    "def mlp(in_shape, num_classes):\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes))\n\n"
                    "def not_a_model(in_shape, num_classes):\n"
                    "    return 3\n")
    name = resolve_model_name(f"{path}:mlp")
    assert name == f"{path.resolve()}:mlp" and short_model_name(name) == "mlp"
    model = build_model(name, MNIST, 10)
    assert model[1].weight.shape == (10, 784)
    assert isinstance(build_model("mmr_ext.nn.zoo:fc1", MNIST, 10), nn.Sequential)
    with pytest.raises(ValueError, match="returned int, not a torch.nn.Module"):
        build_model(f"{path}:not_a_model", MNIST, 10)
    with pytest.raises(ValueError, match="normalize applies to the zoo models"):
        build_model(name, MNIST, 10, normalize=(0.5, 0.5))
    with pytest.raises(ValueError, match="has no function 'missing'"):
        resolve_model_name(f"{path}:missing")
    (tmp_path / "broken.py").write_text("raise RuntimeError('oops')\n")
    with pytest.raises(ValueError, match="failed to import: RuntimeError: oops"):
        resolve_model_name(f"{tmp_path / 'broken.py'}:f")
