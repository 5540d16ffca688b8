"""The receptive-field row ops (torch.ops.mmr_ext.conv_patch_rows, patch_linear_rows): values and
gradients against an independent dense construction (windows placed on the input, the conv or the
Linear layer applied to the input-space rows with torch), gradcheck, opcheck, argument errors, and
CUDA against CPU (skipped without a GPU)."""
import pytest
import torch
import torch.nn.functional as F

from mmr_ext import native
from mmr_ext.geometry.representations import window_inside

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled extension missing")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]

# (n, C, grid, Cin, window, prev stride, prev offset, O, kernel, stride, padding, dilation, input side)
CONV_CASES = [
    (2, 3, 6, 2, 4, 2, 1, 4, 3, 1, 1, 1, 12),
    (3, 2, 5, 1, 3, 1, 0, 3, 4, 2, 1, 1, 7),
    (2, 2, 7, 1, 3, 1, 1, 3, 3, 2, 2, 2, 7),
    (1, 4, 4, 3, 2, 2, 0, 2, 2, 2, 0, 1, 8),
]


def placement(grid, window, stride, offset, in_shape, like):
    """0/1 [H, W, Rh, Rw, Hin, Win]: which input pixel each window entry of each position is."""
    (H, W), (Rh, Rw), (_, Hin, Win) = grid, window, in_shape
    iy = (torch.arange(H)[:, None] * stride[0] - offset[0] + torch.arange(Rh)[None, :])  # [H, Rh]
    ix = (torch.arange(W)[:, None] * stride[1] - offset[1] + torch.arange(Rw)[None, :])  # [W, Rw]
    hit_y = (iy[:, :, None] == torch.arange(Hin)).to(like)  # [H, Rh, Hin]
    hit_x = (ix[:, :, None] == torch.arange(Win)).to(like)  # [W, Rw, Win]
    return torch.einsum("hup,wvq->hwuvpq", hit_y, hit_x)


def unit_rows(rows, stride, offset, in_shape):
    """Input-space row of every unit: [n, C, H, W, D] from windows [n, C, H, W, Cin, Rh, Rw]
    (entries outside the input dropped), by explicit placement."""
    n, C, H, W, Cin, Rh, Rw = rows.shape
    place = placement((H, W), (Rh, Rw), stride, offset, in_shape, rows)
    return torch.einsum("nchwiuv,hwuvpq->nchwipq", rows, place).reshape(n, C, H, W, -1)


def conv_case(case, dtype=torch.float64, seed=0):
    n, C, Hp, Cin, Rp, S, P, O, k, s, pad, dil, side = case
    g = torch.Generator().manual_seed(seed)
    in_shape = (Cin, side, side)
    prev = torch.randn(n, C, Hp, Hp, Cin, Rp, Rp, generator=g, dtype=torch.float64)
    prev = prev * window_inside((Hp, Hp), (Rp, Rp), (S, S), (P, P), in_shape, prev)[None, None, :, :, None]
    mask = (torch.rand(n, C, Hp, Hp, generator=g) > 0.3).double() * torch.rand(n, C, Hp, Hp, generator=g).double()
    weight = torch.randn(O, C, k, k, generator=g, dtype=torch.float64)
    args = ((s, s), (pad, pad), (dil, dil), (S, S), (P, P), in_shape)
    return prev.to(dtype), mask.to(dtype), weight.to(dtype), args


def conv_reference(prev, mask, weight, args):
    """Input-space rows of the conv's units: the conv applied (torch) to the masked previous rows."""
    stride, padding, dilation, prev_stride, prev_offset, in_shape = args
    dense = unit_rows(prev.expand(mask.shape[0], *prev.shape[1:]), prev_stride, prev_offset, in_shape)
    n, C, H, W, D = dense.shape
    maps = (dense * mask[..., None]).permute(0, 4, 1, 2, 3).reshape(n * D, C, H, W)
    out = F.conv2d(maps, weight, stride=stride, padding=padding, dilation=dilation)
    return out.reshape(n, D, *out.shape[1:]).permute(0, 2, 3, 4, 1)  # [n, O, Ho, Wo, D]


def out_geometry(args):
    stride, padding, _, prev_stride, prev_offset, _ = args
    return ([s * ps for s, ps in zip(stride, prev_stride)],
            [p * ps + po for p, ps, po in zip(padding, prev_stride, prev_offset)])


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_patch_rows_equal_the_conv_of_the_input_space_rows(case):
    prev, mask, weight, args = conv_case(case)
    out = native.conv_patch_rows(prev, mask, weight, *args)
    stride, offset = out_geometry(args)
    torch.testing.assert_close(unit_rows(out, stride, offset, args[-1]), conv_reference(prev, mask, weight, args),
                               rtol=1e-12, atol=1e-12)
    # window entries outside the input are zero
    inside = window_inside(out.shape[2:4], out.shape[-2:], stride, offset, args[-1], out)[None, None, :, :, None]
    assert (out * (1 - inside)).abs().max() == 0


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_patch_rows_rows_shared_by_the_batch(case):
    """A shared set (Bp = 1), e.g. one kernel per channel expanded over the grid (a stride-0 view)."""
    _, mask, weight, args = conv_case(case)
    g = torch.Generator().manual_seed(1)
    C, Cin, Rp = case[1], case[3], case[4]
    kernel = torch.randn(C, Cin, Rp, Rp, generator=g, dtype=torch.float64)
    prev = kernel[None, :, None, None].expand(1, C, case[2], case[2], Cin, Rp, Rp)
    out = native.conv_patch_rows(prev, mask, weight, *args)
    stride, offset = out_geometry(args)
    # the reference clips the kernel rows to the input first: only in-input entries count
    clipped = prev * window_inside(prev.shape[2:4], (Rp, Rp), args[3], args[4], args[-1], prev)[None, None, :, :, None]
    torch.testing.assert_close(unit_rows(out, stride, offset, args[-1]), conv_reference(clipped, mask, weight, args),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda k, w: native.conv_patch_rows(k[None, :, None, None].expand(prev.shape), mask, w, *args),
        (kernel.requires_grad_(), weight.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("masked", [True, False])
def test_conv_patch_rows_gradcheck(case, masked):
    prev, mask, weight, args = conv_case(case)
    mask = mask if masked else None
    assert torch.autograd.gradcheck(lambda p, w: native.conv_patch_rows(p, mask, w, *args),
                                    (prev.requires_grad_(), weight.requires_grad_()), fast_mode=True)


def linear_case(n=3, O=4, H=3, W=3, Cin=2, R=(5, 4), stride=(2, 2), offset=(1, 2), side=7, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_shape = (Cin, side, side)
    P = torch.randn(n, O, H, W, Cin, *R, generator=g, dtype=torch.float64)
    P = P * window_inside((H, W), R, stride, offset, in_shape, P)[None, None, :, :, None]
    mask = (torch.rand(n, O, H * W, generator=g) > 0.4).double() * torch.rand(n, O, H * W, generator=g).double()
    weight = torch.randn(K, O * H * W, generator=g, dtype=torch.float64)
    return P, mask, weight, ((H, W), (Cin, *R), stride, offset, in_shape)


@pytest.mark.parametrize("kw", [{}, dict(n=2, O=3, H=4, W=2, Cin=1, R=(3, 3), stride=(1, 2), offset=(0, 0), side=5),
                                dict(K=1, offset=(0, 0))])
def test_patch_linear_rows_equal_the_linear_map_of_the_input_space_rows(kw):
    P, mask, weight, args = linear_case(**kw)
    n, O, H, W = P.shape[:4]
    rows = native.patch_linear_rows(P.reshape(n, O, H * W, -1), mask, weight, *args)
    dense = unit_rows(P, args[2], args[3], args[4]).reshape(n, O * H * W, -1)  # [n, O*L, D]
    expected = torch.einsum("ku,bu,bud->bkd", weight, mask.reshape(n, -1), dense)
    torch.testing.assert_close(rows, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [True, False])
def test_patch_linear_rows_gradcheck_and_strided_patches(masked):
    P, mask, weight, args = linear_case()
    n, O, H, W = P.shape[:4]
    mask = mask if masked else None
    flat = P.reshape(n, O, H * W, -1)
    assert torch.autograd.gradcheck(lambda p, w: native.patch_linear_rows(p, mask, w, *args),
                                    (flat.clone().requires_grad_(), weight.clone().requires_grad_()), fast_mode=True)
    # a position-major layout (what a transposed producer gives) reads the same rows
    strided = flat.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(native.patch_linear_rows(strided, mask, weight, *args),
                               native.patch_linear_rows(flat, mask, weight, *args), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_receptive_field_ops(device, dtype):
    prev, mask, weight, args = conv_case(CONV_CASES[0])
    prev, mask, weight = (t.to(device, dtype) for t in (prev, mask, weight))
    lists = [list(a) for a in args]
    torch.library.opcheck(torch.ops.mmr_ext.conv_patch_rows, (prev.requires_grad_(), mask, weight.requires_grad_(), *lists))
    out = torch.ops.mmr_ext.conv_patch_rows(prev, mask, weight, *lists)
    torch.library.opcheck(torch.ops.mmr_ext.conv_patch_rows_backward, (torch.randn_like(out), prev.detach(), mask,
                                                                       weight.detach(), *lists))
    P, m, W, largs = linear_case()
    n, O, H, Wd = P.shape[:4]
    P, m, W = (t.to(device, dtype) for t in (P.reshape(n, O, H * Wd, -1), m, W))
    llists = [list(a) for a in largs]
    torch.library.opcheck(torch.ops.mmr_ext.patch_linear_rows, (P.requires_grad_(), m, W.requires_grad_(), *llists))
    rows = torch.ops.mmr_ext.patch_linear_rows(P, m, W, *llists)
    torch.library.opcheck(torch.ops.mmr_ext.patch_linear_rows_backward, (torch.randn_like(rows), P.detach(), m,
                                                                         W.detach(), *llists))


@pytest.mark.parametrize("change,message", [
    (dict(weight=torch.zeros(4, 2, 3, 3)), "weight must be a conv weight"),
    (dict(mask=torch.zeros(2, 3, 5, 6)), "mask must have shape"),
    (dict(prev=torch.zeros(3, 3, 6, 6, 2, 4, 4)), "one row set per sample"),
    (dict(args_in_shape=(3, 12, 12)), "in_shape must be"),
    (dict(args_stride=(0, 1)), "strides and dilation must be positive"),
])
def test_conv_patch_rows_argument_errors(change, message):
    prev, mask, weight, args = conv_case(CONV_CASES[0], torch.float32)
    prev, mask, weight = change.get("prev", prev), change.get("mask", mask), change.get("weight", weight)
    args = list(args)
    if "args_in_shape" in change:
        args[-1] = change["args_in_shape"]
    if "args_stride" in change:
        args[0] = change["args_stride"]
    with pytest.raises(RuntimeError, match=message):
        native.conv_patch_rows(prev, mask, weight, *args)


def test_patch_linear_rows_argument_errors():
    P, mask, weight, args = linear_case()
    n, O, H, W = P.shape[:4]
    flat = P.reshape(n, O, H * W, -1)
    with pytest.raises(RuntimeError, match=r"weight must be \[K, O \* L\]"):
        native.patch_linear_rows(flat, mask, weight[:, 1:], *args)
    with pytest.raises(RuntimeError, match="window"):
        native.patch_linear_rows(flat, mask, weight, args[0], (2, 5, 3), *args[2:])
    with pytest.raises(RuntimeError, match="grid"):
        native.patch_linear_rows(flat, mask, weight, (2, 3), *args[1:])


def assert_cuda_matches_cpu(op, differentiable, constant, args, tol):
    """op(*differentiable, ...) on CUDA equals CPU in values and in the gradients of differentiable."""
    results = []
    for device in ("cpu", "cuda"):
        inputs = [t.to(device).requires_grad_() for t in differentiable]
        out = op(*inputs, *[None if c is None else c.to(device) for c in constant], *args)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        results.append([out.cpu()] + [g.cpu() for g in grads])
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_cuda_matches_cpu(dtype, tol):
    for case in CONV_CASES:
        prev, mask, weight, args = conv_case(case, dtype)
        assert_cuda_matches_cpu(lambda p, w, m, *a: native.conv_patch_rows(p, m, w, *a), (prev, weight), (mask,),
                                args, tol)
    P, mask, weight, args = linear_case()
    n, O, H, W = P.shape[:4]
    assert_cuda_matches_cpu(lambda p, w, m, *a: native.patch_linear_rows(p, m, w, *a),
                            (P.reshape(n, O, H * W, -1).to(dtype), weight.to(dtype)), (mask.to(dtype),), args, tol)


def test_patch_linear_rows_backward_with_rows_without_gradient():
    """Rows whose incoming gradient is zero (most of them after a top-k selection) are skipped by
    the backward: the gradients still equal the dense reference's."""
    P, mask, weight, args = linear_case(n=3, K=6)
    n, O, H, W = P.shape[:4]
    flat = P.reshape(n, O, H * W, -1).requires_grad_()
    weight.requires_grad_()
    rows = native.patch_linear_rows(flat, mask, weight, *args)
    grad = torch.randn_like(rows)
    grad[0, :4] = 0  # sample 0: two rows with a gradient
    grad[1] = 0  # sample 1: none
    got = torch.autograd.grad(rows, [flat, weight], grad)
    leaf = P.clone().requires_grad_()
    dense = unit_rows(leaf, args[2], args[3], args[4]).reshape(n, O * H * W, -1)
    expected_rows = torch.einsum("ku,bu,bud->bkd", weight, mask.reshape(n, -1), dense)
    expected = torch.autograd.grad(expected_rows, [leaf, weight], grad)
    torch.testing.assert_close(got[0], expected[0].reshape(flat.shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)
    assert got[0][1].abs().max() == 0  # a sample without gradient gets none


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("kept", [0.0, 0.2, 0.7])
def test_conv_patch_rows_backward_with_units_without_gradient(case, kept):
    """Units whose incoming gradient is zero (most of them after a top-k selection) cost nothing in
    the backward (few units of a position: a compacted loop; many: the plain one); the gradients
    still equal the dense reference's."""
    prev, mask, weight, args = conv_case(case)
    prev.requires_grad_()
    weight.requires_grad_()
    out = native.conv_patch_rows(prev, mask, weight, *args)
    g = torch.Generator().manual_seed(2)
    keep = (torch.rand(out.shape[:4], generator=g, dtype=torch.float64) < kept).to(out.dtype)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64) * keep[..., None, None, None]
    got = torch.autograd.grad(out, [prev, weight], grad)
    stride, offset = out_geometry(args)
    expected_rows = conv_reference(prev, mask, weight, args)
    dense_grad = unit_rows(grad, stride, offset, args[-1])
    expected = torch.autograd.grad(expected_rows, [prev, weight], dense_grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
