"""Tests of the receptive-field back-substitution (mmr_ext.certify.patch_bounds) and the other exact
shortcuts of hidden_bounds: the same bounds as the dense reference (bounds.SHORTCUTS = False) up to
float64 rounding on random convolutional networks (stride, padding, dilation, groups, scales), and
sound on points sampled in the lp-ball ∩ box."""
import math

import pytest
import torch
from torch import nn

import mmr_ext
from mmr_ext.certify import bounds
from mmr_ext.certify.bounds import BoundedNetwork, layer_bounds
from mmr_ext.nn.zoo import large
from oracles import preactivations, randomize_batchnorm

INF = math.inf
RADII = {1: 1.5, 2: 0.5, INF: 0.12}


def conv_net(seed, in_shape, convs, head=(9,), prefix=(), act=nn.ReLU):
    """convs: (out_channels, kernel, stride, padding, dilation, groups) per conv block, each
    followed by ``act``; then Flatten and Linear layers of widths ``head``, and 3 logits."""
    torch.manual_seed(seed)
    layers, c, shape = list(prefix), in_shape[0], in_shape
    for out_c, k, s, p, d, g in convs:
        layers += [nn.Conv2d(c, out_c, k, s, p, d, g), act()]
        c = out_c
    probe = nn.Sequential(*layers)(torch.zeros((1,) + tuple(shape)))
    layers.append(nn.Flatten())
    width = probe.numel()
    for h in head:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers).double()


CONFIGS = {
    "stride1_pad0": ((1, 8, 8), [(3, 3, 1, 0, 1, 1), (4, 3, 2, 1, 1, 1)]),
    "stride2_pad2_groups": ((2, 16, 16), [(4, 4, 2, 2, 1, 2), (4, 3, 1, 1, 2, 4),
                                          (3, (2, 3), (2, 1), (0, 1), 1, 1)]),
    "one_block": ((1, 7, 7), [(4, 5, 1, 2, 1, 1)]),
    "dilated_rect": ((2, 10, 9), [(3, (3, 2), (1, 2), (2, 0), (2, 1), 1), (5, 2, 2, 1, 1, 1)]),
}


def inputs(shape, n=4, seed=0):
    """Points in [0, 1] with about half of the coordinates on the box's faces."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + shape, generator=g, dtype=torch.float64)
    edge = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(edge, x.round(), x)


def assert_same(fast, dense):
    for (lf, uf), (ld, ud) in zip(fast, dense):
        for a, b in ((lf, ld), (uf, ud)):
            assert torch.isfinite(a).all()
            assert (a - b).abs().max() <= 1e-10 * (1 + b.abs().max()), (a - b).abs().max()


def dense_bounds(monkeypatch, model, x, p, eps):
    with monkeypatch.context() as m:
        m.setattr(bounds, "SHORTCUTS", False)
        return layer_bounds(model, x, norm=p, eps=eps)


def sampled_points(x, p, eps, n, seed=0):
    """n points per input in {||z - x||_p <= eps} ∩ [0, 1]^d (vertices of the ball included)."""
    g = torch.Generator().manual_seed(seed)
    flat = x.reshape(x.shape[0], 1, -1)
    v = torch.randn((x.shape[0], n, flat.shape[2]), generator=g, dtype=torch.float64)
    if p == 1:  # the l1 ball's vertices are sparse
        v = v * (torch.rand(v.shape, generator=g) < 0.05)
    elif p == INF:
        v = v.sign()
    v = v / torch.linalg.vector_norm(v, ord=p, dim=2, keepdim=True).clamp_min(1e-30)
    r = eps * torch.rand((x.shape[0], n, 1), generator=g, dtype=torch.float64).sqrt()
    z = (flat + r * v).clamp(0, 1)  # clamping towards x (in the box) stays in the ball
    return z.reshape((-1,) + tuple(x.shape[1:]))


def assert_sound(model, x, p, eps, result):
    n = 64
    z = sampled_points(x, p, eps, n)
    hidden, _ = preactivations(model, z)
    for (l, u), h in zip(result, hidden):
        h = h.reshape(x.shape[0], n, -1)
        assert (l[:, None] <= h + 1e-9).all() and (h <= u[:, None] + 1e-9).all()


@pytest.mark.parametrize("p", [1, 2, INF])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patches_match_dense_and_are_sound(monkeypatch, name, p):
    in_shape, convs = CONFIGS[name]
    model = conv_net(1, in_shape, convs)
    x = inputs(in_shape)
    net = BoundedNetwork(model, x)
    assert all(net.patch_plan(k) is not None for k in range(len(convs)))
    assert net.patch_plan(len(convs)) is None  # the Linear block: dense
    fast = layer_bounds(model, x, norm=p, eps=RADII[p])
    dense = dense_bounds(monkeypatch, model, x, p, RADII[p])
    unstable = [int(((l < 0) & (u > 0)).sum()) for l, u in dense]
    assert all(n > 0 for n in unstable[:len(convs)]), unstable  # the back-substitution is exercised
    assert_same(fast, dense)
    assert_sound(model, x, p, RADII[p], fast)


@pytest.mark.parametrize("p", [1, 2, INF])
def test_scales_around_the_conv_and_leaky_relu(monkeypatch, p):
    """Normalize before and BatchNorm2d after a conv fold into its kernel (the bias map, with
    Normalize's shift cut off at the zero padding, stays the block's own)."""
    g = torch.Generator().manual_seed(3)
    prefix = (mmr_ext.Normalize([0.4, 0.6], [0.3, 0.2]),)
    model = conv_net(2, (2, 8, 8), [(4, 3, 2, 1, 1, 1), (3, 3, 1, 1, 1, 1)], prefix=prefix,
                     act=lambda: nn.LeakyReLU(0.2))
    model.insert(2, nn.BatchNorm2d(4).double())
    randomize_batchnorm(model, g)
    x = inputs((2, 8, 8), seed=1)
    net = BoundedNetwork(model, x)
    assert net.patch_plan(0) is not None and net.patch_plan(1) is not None
    eps = RADII[p] / 3
    fast = layer_bounds(model, x, norm=p, eps=eps)
    assert_same(fast, dense_bounds(monkeypatch, model, x, p, eps))
    assert_sound(model, x, p, eps, fast)


@pytest.mark.parametrize("p", [1, 2, INF])
def test_four_conv_blocks_as_in_the_large_model(monkeypatch, p):
    """The layout of the zoo's ``large`` network (3x3/1 and 4x4/2 convolutions, padding 1), narrower."""
    model = conv_net(5, (1, 16, 16), [(6, 3, 1, 1, 1, 1), (6, 4, 2, 1, 1, 1), (8, 3, 1, 1, 1, 1),
                                      (8, 4, 2, 1, 1, 1)], head=(12,))
    x = inputs((1, 16, 16), n=2, seed=2)
    net = BoundedNetwork(model, x)
    assert all(net.patch_plan(k) is not None for k in range(4))
    eps = RADII[p] / 2
    fast = layer_bounds(model, x, norm=p, eps=eps)
    dense = dense_bounds(monkeypatch, model, x, p, eps)
    assert all(((l < 0) & (u > 0)).any() for l, u in dense[:4])
    assert_same(fast, dense)
    assert_sound(model, x, p, eps, fast)


def test_the_zoo_large_model_is_planned():
    model = large((1, 28, 28), 10).double()
    net = BoundedNetwork(model, torch.zeros(1, 1, 28, 28, dtype=torch.float64))
    assert all(net.patch_plan(k) is not None for k in range(4)) and net.patch_plan(4) is None


def test_uncovered_blocks_fall_back_to_dense(monkeypatch):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Conv2d(3, 2, 2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(18, 3)).double()
    x = inputs((1, 8, 8), seed=3)
    net = BoundedNetwork(model, x)
    assert net.patch_plan(0) is not None
    assert net.patch_plan(1) is None and net.patch_plan(2) is None
    for p in (1, 2):
        fast = layer_bounds(model, x, norm=p, eps=RADII[p])
        assert_same(fast, dense_bounds(monkeypatch, model, x, p, RADII[p]))
