"""The fused native step ops.conv_transpose_row_distances (rows walked back through a transposed
conv onto its input, reduced to dual norms without being stored) against torch's transposed
convolution and vector norms; its use by rows built in reverse order; argument errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import mmr_ext
from mmr_ext.geometry import reverse_rows, steps
from mmr_ext.native import available, ops
from oracles import assert_distances_close, make_model

pytestmark = pytest.mark.skipif(not available(), reason="compiled extension missing")

QS = [1.0, 2.0, math.inf, 1.5]
# (C, Cin, kernel, stride, padding, dilation, grid (Ho, Wo), input (Hin, Win)): tap counts of the
# compile-time kernels (16, 27) and the generic one (24), output padding, dilation, no padding
GEOMETRIES = [
    (5, 1, (4, 4), (2, 2), (1, 1), (1, 1), (6, 6), (12, 12)),
    (4, 3, (3, 3), (1, 1), (1, 1), (1, 1), (5, 7), (5, 7)),
    (6, 2, (4, 3), (2, 2), (1, 0), (1, 2), (7, 6), (15, 16)),
    (3, 2, (2, 2), (3, 2), (0, 0), (1, 1), (3, 4), (10, 9)),
]


def _case(geometry_, dtype, channels_last=False, seed=0):
    C, Cin, k, s, p, d, (Ho, Wo), (Hin, Win) = geometry_
    g = torch.Generator().manual_seed(seed)
    n, R = 3, 4
    maps = torch.randn((n, R, C, Ho, Wo), generator=g, dtype=dtype)
    maps = maps * (torch.rand((n, 1, C, Ho, Wo), generator=g) > 0.4).to(dtype)  # an activation pattern
    maps[1, 2] = 0  # a zero row: +inf
    if channels_last:
        maps = maps.reshape(n * R, C, Ho, Wo).contiguous(memory_format=torch.channels_last).reshape(n, R, C, Ho, Wo)
    weight = torch.randn((C, Cin) + k, generator=g, dtype=dtype)
    f = torch.randn((n, R), generator=g, dtype=dtype)
    return f, maps, weight, s, p, d, (Cin, Hin, Win)


@pytest.mark.parametrize("geometry_", GEOMETRIES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_step_matches_transposed_conv_then_norms(geometry_, dtype, tol):
    for channels_last in (False, True):
        f, maps, weight, s, p, d, in_shape = _case(geometry_, dtype, channels_last)
        got = ops.conv_transpose_row_distances(f, maps, None, weight, s, p, d, in_shape, QS)
        rows_ref = _rows(maps, weight, s, p, d, in_shape)
        want = torch.stack([f.abs() / torch.linalg.vector_norm(rows_ref, ord=q, dim=2) for q in QS])
        assert got.shape == (len(QS),) + f.shape and got.dtype == dtype
        assert torch.isinf(got[:, 1, 2]).all()
        assert_distances_close(got.double(), want.double(), tol)


def _rows(maps, weight, stride, padding, dilation, in_shape):
    n, R, C, Ho, Wo = maps.shape
    full = [(o - 1) * s - 2 * p + d * (k - 1) + 1
            for o, s, p, d, k in zip((Ho, Wo), stride, padding, dilation, weight.shape[-2:])]
    extra = [i - o for i, o in zip(in_shape[1:], full)]
    assert all(0 <= e < max(s, d) for e, s, d in zip(extra, stride, dilation))
    return F.conv_transpose2d(maps.reshape(n * R, C, Ho, Wo), weight, stride=stride, padding=padding,
                              output_padding=extra, dilation=dilation).reshape(n, R, -1)


@pytest.mark.parametrize("geometry_", GEOMETRIES[:3])
def test_activation_mask_inside_the_fused_step_equals_masking_the_maps(geometry_):
    f, maps, weight, s, p, d, in_shape = _case(geometry_, torch.float64, seed=1)
    g = torch.Generator().manual_seed(2)
    mask = (torch.rand(maps.shape[:1] + maps.shape[2:], generator=g) > 0.5).double() * 0.7
    for layout in (mask, mask.contiguous(memory_format=torch.channels_last)):
        got = ops.conv_transpose_row_distances(f, maps, layout, weight, s, p, d, in_shape, QS)
        want = ops.conv_transpose_row_distances(f, maps * mask[:, None], None, weight, s, p, d, in_shape, QS)
        assert_distances_close(got, want, 1e-12)


def test_rows_shared_by_the_batch_through_a_broadcast_view():
    f, maps, weight, s, p, d, in_shape = _case(GEOMETRIES[0], torch.float64)
    shared = maps[:1].expand_as(maps)  # stride 0 over samples
    got = ops.conv_transpose_row_distances(f, shared, None, weight, s, p, d, in_shape, [2.0])
    want = ops.conv_transpose_row_distances(f, shared.contiguous(), None, weight, s, p, d, in_shape, [2.0])
    assert torch.equal(got, want)


def test_reverse_rows_use_the_fused_step(monkeypatch):
    """The first conv of a CNN (after Normalize, whose scale is folded into the weight) is walked
    back by the fused op; its distances equal the reference's."""
    monkeypatch.setattr(steps, "PATCH_COST_WEIGHT", 1e12)  # the Linear after convs in reverse order
    calls = []
    original = ops.conv_transpose_row_distances

    def spy(*args):
        calls.append(args[3].shape)
        return original(*args)

    monkeypatch.setattr(reverse_rows, "conv_transpose_row_distances", spy)
    model, x = make_model("cnn")
    b, d = mmr_ext.region_distances(model, x, 1)
    rb, rd = mmr_ext.region_distances_reference(model, x, 1)
    assert calls and calls[0] == model[1].weight.shape
    assert_distances_close(b, rb, 1e-10)
    assert_distances_close(d, rd, 1e-10)


def test_first_layers_the_fused_step_cannot_take_are_walked_back_by_torch():
    conv = torch.nn.Conv2d(4, 2, 3, groups=2)
    trace = [(conv, (4, 6, 6), (2, 4, 4))]
    assert reverse_rows.fusable_first_conv(trace, [conv.weight]) is None  # grouped
    big = torch.nn.Conv2d(16, 2, 3)  # 144 taps
    assert reverse_rows.fusable_first_conv([(big, (16, 6, 6), (2, 4, 4))], [big.weight]) is None
    mask = torch.ones(1, 2, 4, 4)
    assert reverse_rows.fusable_first_conv([mask], [None]) is None


@pytest.mark.parametrize("change,message", [
    (dict(maps=lambda m: m[0]), "5-D"),
    (dict(f=lambda f: f[:, :2]), "f must have shape"),
    (dict(mask=lambda m: torch.ones(3, 5, 6, 5, dtype=torch.float64)), "mask must have shape"),
    (dict(weight=lambda w: w[:2]), "weight must be a conv weight"),
    (dict(in_shape=lambda s: (s[0] + 1,) + s[1:]), "in_shape"),
    (dict(stride=lambda s: (0, 1)), "positive"),
    (dict(weight=lambda w: w.float()), "same dtype"),
    (dict(weight=lambda w: torch.zeros(w.shape[0], 9, 4, 4, dtype=w.dtype), in_shape=lambda s: (9,) + s[1:]), "taps"),
])
def test_argument_errors(change, message):
    f, maps, weight, s, p, d, in_shape = _case(GEOMETRIES[0], torch.float64)
    args = dict(f=f, maps=maps, mask=None, weight=weight, stride=s, padding=p, dilation=d, in_shape=in_shape)
    for key, fn in change.items():
        args[key] = fn(args[key])
    with pytest.raises(RuntimeError, match=message):
        ops.conv_transpose_row_distances(args["f"], args["maps"], args["mask"], args["weight"], args["stride"],
                                         args["padding"], args["dilation"], args["in_shape"], QS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("geometry_", GEOMETRIES)
def test_cuda_matches_cpu(geometry_):
    for channels_last in (False, True):
        f, maps, weight, s, p, d, in_shape = _case(geometry_, torch.float32, channels_last)
        for mask in (None, (maps[:, 0] > 0.2).to(maps.dtype)):
            cpu = ops.conv_transpose_row_distances(f, maps, mask, weight, s, p, d, in_shape, QS)
            cuda = ops.conv_transpose_row_distances(f.cuda(), maps.cuda(), None if mask is None else mask.cuda(),
                                                    weight.cuda(), s, p, d, in_shape, QS)
            assert_distances_close(cuda.cpu().double(), cpu.double(), 1e-5)
