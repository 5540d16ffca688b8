"""The operator library torch.ops.mmr_ext: its schemas, torch.library.opcheck of every op (schema,
autograd registration, fake kernel, AOT dispatch), and universal_loss under torch.compile."""
import math

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import mmr_ext
from mmr_ext import native
from oracles import make_model

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled extension missing")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
DTYPES = [torch.float32, torch.float64]
SCHEMAS = {
    "row_distances": "mmr_ext::row_distances(Tensor f, Tensor rows, float[] qs, bool is_signed) "
                     "-> (Tensor dist, Tensor norm)",
    "row_distances_backward": "mmr_ext::row_distances_backward(Tensor grad, Tensor f, Tensor rows, Tensor dist, "
                              "Tensor norm, float[] qs, bool is_signed) -> (Tensor grad_f, Tensor grad_rows)",
    "topk_hinge": "mmr_ext::topk_hinge(Tensor dist, int k, float gamma) -> (Tensor value, Tensor index)",
    "topk_hinge_backward": "mmr_ext::topk_hinge_backward(Tensor grad, Tensor dist, Tensor index, float gamma) "
                           "-> Tensor",
    "conv_transpose_row_distances": "mmr_ext::conv_transpose_row_distances(Tensor f, Tensor maps, Tensor? mask, "
                                    "Tensor weight, int[] stride, int[] padding, int[] dilation, int[] in_shape, "
                                    "float[] qs) -> Tensor",
    "build_info": "mmr_ext::build_info() -> (int max_conv_taps, int max_cuda_canvas_bytes, bool has_cuda)",
}
QS = [1.0, 2.0, math.inf, 3.0]


def test_torch_ops_lists_every_op_with_its_schema():
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.mmr_ext, name).default._schema) == schema


def test_build_info_gives_the_limits_of_the_build():
    assert torch.ops.mmr_ext.build_info() == (native.MAX_CONV_TAPS, native.MAX_CUDA_CANVAS_BYTES, native.HAS_CUDA)
    assert native.MAX_CONV_TAPS > 0 and native.MAX_CUDA_CANVAS_BYTES > 0 and isinstance(native.HAS_CUDA, bool)


def _rows(device, dtype, shared, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)
    rows = torch.randn(1 if shared else 3, 5, 4, generator=g, dtype=torch.float64)
    return f, rows.to(device, dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("is_signed", [False, True])
def test_opcheck_row_distances(device, dtype, shared, is_signed):
    f, rows = _rows(device, dtype, shared, requires_grad=True)
    torch.library.opcheck(torch.ops.mmr_ext.row_distances, (f, rows, QS, is_signed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_opcheck_row_distances_backward(device, dtype, shared):
    f, rows = _rows(device, dtype, shared)
    dist, norm = torch.ops.mmr_ext.row_distances(f, rows, QS, False)
    grad = torch.randn(dist.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    grad[:, :, 1] = 0  # a row no sample selected
    torch.library.opcheck(torch.ops.mmr_ext.row_distances_backward, (grad, f, rows, dist, norm, QS, False))


def _dist(device, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(2)
    dist = torch.rand(4, 9, generator=g, dtype=torch.float64) * 2
    dist[:, 3] = dist[:, 0]  # a tie
    return dist.to(device, dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_topk_hinge(device, dtype):
    torch.library.opcheck(torch.ops.mmr_ext.topk_hinge, (_dist(device, dtype, requires_grad=True), 4, 1.3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_topk_hinge_backward(device, dtype):
    dist = _dist(device, dtype)
    _, index = torch.ops.mmr_ext.topk_hinge(dist, 4, 1.3)
    grad = torch.rand(dist.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device, dtype)
    torch.library.opcheck(torch.ops.mmr_ext.topk_hinge_backward, (grad, dist, index, 1.3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck_conv_transpose_row_distances(device, dtype, masked):
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(2, 3, 4, 5, 5, generator=g, dtype=torch.float64).to(device, dtype)
    weight = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64).to(device, dtype)
    mask = (torch.rand(2, 4, 5, 5, generator=g) > 0.5).to(device, dtype) if masked else None
    f = torch.randn(2, 3, generator=g, dtype=torch.float64).to(device, dtype)
    args = (f, maps, mask, weight, [2, 2], [1, 1], [1, 1], [2, 10, 10], QS)
    torch.library.opcheck(torch.ops.mmr_ext.conv_transpose_row_distances, args)


def test_ops_without_a_derivative_say_so():
    f, rows = _rows("cpu", torch.float64, False)
    dist, norm = torch.ops.mmr_ext.row_distances(f, rows, QS, False)
    grad = torch.ones_like(dist).requires_grad_(True)
    grad_f, _ = torch.ops.mmr_ext.row_distances_backward(grad, f, rows, dist, norm, QS, False)
    with pytest.raises(RuntimeError, match="row_distances_backward has no derivative"):
        grad_f.sum().backward()


def test_universal_loss_under_torch_compile_matches_eager():
    """Forward and backward of universal_loss on a small CNN, compiled (graph breaks allowed), equal
    eager. Backend: AOTAutograd without a code generator (aot_eager) whose graphs are recorded; it
    traces every op through its fake kernel and autograd formula. The default inductor took 30-40 s
    to compile this step here, aot_eager about 4 s."""
    model, x = make_model("paper_cnn")
    y = torch.tensor([0, 1, 2, 1, 0])
    params = list(model.parameters())

    def step(x):
        return mmr_ext.universal_loss(model, x, y, k_boundary=5, gamma=(1.0, 0.15), lam=(1.0, 1.0))

    def loss_and_grads(fn):
        xx = x.clone().requires_grad_(True)
        loss = fn(xx)
        return (loss, *torch.autograd.grad(loss, [xx] + params))

    traced = set()

    def record(graph, example_inputs):
        traced.update(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph.forward)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    for got, want in zip(loss_and_grads(compiled), loss_and_grads(step)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert {f"mmr_ext.{name}.default" for name in SCHEMAS if name != "build_info"} <= traced
