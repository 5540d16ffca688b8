// Python bindings of mmr_ext._C: validates tensors and dispatches to the CPU or CUDA backend.
#include "ops.h"

#include <torch/extension.h>

#include <vector>

namespace {

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(), " and ",
              b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

mmr::NormSet make_norms(const std::vector<double>& qs) {
  TORCH_CHECK(!qs.empty() && qs.size() <= static_cast<size_t>(mmr::kMaxNorms), "qs must hold 1 to ",
              mmr::kMaxNorms, " dual exponents, got ", qs.size());
  mmr::NormSet norms;
  for (double q : qs) {
    TORCH_CHECK(q >= 1.0, "every q must be >= 1 (or inf), got ", q);
    norms.q[norms.count] = q;
    norms.kind[norms.count] = mmr::norm_kind(q);
    ++norms.count;
  }
  return norms;
}

void check_rows(const at::Tensor& f, const at::Tensor& rows) {
  check_floating(rows, "rows");
  check_same(f, rows, "f", "rows");
  TORCH_CHECK(rows.dim() == 3, "rows must be 3-D [Br, R, D], got shape ", rows.sizes());
  TORCH_CHECK(f.dim() == 2 && f.size(1) == rows.size(1), "f must be 2-D [B, ", rows.size(1),
              "] (one entry per row and sample), got shape ", f.sizes());
  TORCH_CHECK(rows.size(0) == 1 || rows.size(0) == f.size(0), "rows must hold one row set per sample (",
              f.size(0), ") or one shared set, got ", rows.size(0));
}

std::tuple<at::Tensor, at::Tensor> row_distances(const at::Tensor& f, const at::Tensor& rows,
                                                 const std::vector<double>& qs, bool is_signed) {
  check_rows(f, rows);
  const mmr::NormSet q = make_norms(qs);
#ifdef WITH_CUDA
  if (rows.is_cuda()) return mmr::row_distances_cuda(f, rows, q, is_signed);
#endif
  TORCH_CHECK(rows.is_cpu(), "row_distances: no backend for device ", rows.device());
  return mmr::row_distances_cpu(f, rows, q, is_signed);
}

std::tuple<at::Tensor, at::Tensor> row_distances_backward(const at::Tensor& grad, const at::Tensor& f,
                                                          const at::Tensor& rows, const at::Tensor& dist,
                                                          const at::Tensor& norm, const std::vector<double>& qs,
                                                          bool is_signed) {
  check_rows(f, rows);
  const mmr::NormSet q = make_norms(qs);
  check_same(grad, rows, "grad", "rows");
  check_same(dist, rows, "dist", "rows");
  check_same(norm, rows, "norm", "rows");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == q.count && grad.size(1) == f.size(0) && grad.size(2) == f.size(1) &&
                  dist.sizes() == grad.sizes(),
              "grad and dist must have shape [Q, B, R]");
  TORCH_CHECK(norm.dim() == 3 && norm.size(0) == q.count && norm.size(1) == rows.size(0) && norm.size(2) == rows.size(1),
              "norm must have shape [Q, Br, R]");
#ifdef WITH_CUDA
  if (rows.is_cuda()) return mmr::row_distances_backward_cuda(grad, f, rows, dist, norm, q, is_signed);
#endif
  TORCH_CHECK(rows.is_cpu(), "row_distances_backward: no backend for device ", rows.device());
  return mmr::row_distances_backward_cpu(grad, f, rows, dist, norm, q, is_signed);
}

std::tuple<at::Tensor, at::Tensor> topk_hinge(const at::Tensor& dist, int64_t k, double gamma) {
  check_floating(dist, "dist");
  TORCH_CHECK(dist.dim() == 2, "dist must be 2-D [B, N], got shape ", dist.sizes());
  TORCH_CHECK(k >= 1 && k <= dist.size(1), "k must be in [1, ", dist.size(1), "], got ", k);
  TORCH_CHECK(gamma > 0.0, "gamma must be positive, got ", gamma);
#ifdef WITH_CUDA
  if (dist.is_cuda()) return mmr::topk_hinge_cuda(dist, k, gamma);
#endif
  TORCH_CHECK(dist.is_cpu(), "topk_hinge: no backend for device ", dist.device());
  return mmr::topk_hinge_cpu(dist, k, gamma);
}

at::Tensor topk_hinge_backward(const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& index,
                               double gamma) {
  check_same(grad, dist, "grad", "dist");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 2 && index.size(0) == dist.size(0),
              "index must be int64 [B, k]");
#ifdef WITH_CUDA
  if (dist.is_cuda()) return mmr::topk_hinge_backward_cuda(grad, dist, index, gamma);
#endif
  TORCH_CHECK(dist.is_cpu(), "topk_hinge_backward: no backend for device ", dist.device());
  return mmr::topk_hinge_backward_cpu(grad, dist, index, gamma);
}

at::Tensor conv_transpose_row_distances(const at::Tensor& f, const at::Tensor& maps,
                                        const c10::optional<at::Tensor>& mask_in, const at::Tensor& weight,
                                        std::vector<int64_t> stride, std::vector<int64_t> padding,
                                        std::vector<int64_t> dilation, std::vector<int64_t> in_shape,
                                        const std::vector<double>& qs) {
  check_floating(maps, "maps");
  check_same(f, maps, "f", "maps");
  check_same(weight, maps, "weight", "maps");
  TORCH_CHECK(maps.dim() == 5, "maps must be 5-D [n, R, C, Ho, Wo], got shape ", maps.sizes());
  TORCH_CHECK(f.dim() == 2 && f.size(0) == maps.size(0) && f.size(1) == maps.size(1), "f must have shape [",
              maps.size(0), ", ", maps.size(1), "], got ", f.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == maps.size(2), "weight must be a conv weight [", maps.size(2),
              ", Cin, kh, kw], got shape ", weight.sizes());
  const at::Tensor mask = mask_in.has_value() ? *mask_in : at::Tensor();
  if (mask.defined()) {
    check_same(mask, maps, "mask", "maps");
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == maps.size(0) && mask.size(1) == maps.size(2) &&
                    mask.size(2) == maps.size(3) && mask.size(3) == maps.size(4),
                "mask must have shape [", maps.size(0), ", ", maps.size(2), ", ", maps.size(3), ", ", maps.size(4),
                "] (per sample, the maps' grid), got ", mask.sizes());
  }
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && in_shape.size() == 3,
              "stride, padding, dilation must be pairs and in_shape a triple (Cin, Hin, Win)");
  TORCH_CHECK(in_shape[0] == weight.size(1), "in_shape[0] must equal weight.size(1) (", weight.size(1), "), got ",
              in_shape[0]);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 &&
                  padding[1] >= 0, "stride and dilation must be positive and padding non-negative");
  const mmr::ConvGeometry g{maps.size(2), maps.size(3), maps.size(4), in_shape[0], in_shape[1], in_shape[2],
                            weight.size(2), weight.size(3), stride[0], stride[1], padding[0], padding[1],
                            dilation[0], dilation[1]};
  TORCH_CHECK(mmr::taps_of(g) <= mmr::kMaxConvTaps, "a fused step handles at most ", mmr::kMaxConvTaps,
              " taps (Cin x kh x kw), got ", mmr::taps_of(g));
  const mmr::NormSet q = make_norms(qs);
#ifdef WITH_CUDA
  if (maps.is_cuda()) return mmr::conv_transpose_row_distances_cuda(f, maps, mask, weight, g, q);
#endif
  TORCH_CHECK(maps.is_cpu(), "conv_transpose_row_distances: no backend for device ", maps.device());
  return mmr::conv_transpose_row_distances_cpu(f, maps, mask, weight, g, q);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Native kernels of mmr_ext (row dual-norm distances, fused transposed-conv rows, top-k hinge).";
  m.def("row_distances", &row_distances,
        "Row distances |f| / ||row||_q (signed: f / ||row||_q) and row norms for several dual exponents q",
        py::arg("f"), py::arg("rows"), py::arg("qs"), py::arg("is_signed"));
  m.def("row_distances_backward", &row_distances_backward, "Backward of row_distances", py::arg("grad"),
        py::arg("f"), py::arg("rows"), py::arg("dist"), py::arg("norm"), py::arg("qs"), py::arg("is_signed"));
  m.def("topk_hinge", &topk_hinge, "Per-sample mean hinge over the k smallest distances, and their indices",
        py::arg("dist"), py::arg("k"), py::arg("gamma"));
  m.def("topk_hinge_backward", &topk_hinge_backward, "Backward of topk_hinge", py::arg("grad"), py::arg("dist"),
        py::arg("index"), py::arg("gamma"));
  m.def("conv_transpose_row_distances", &conv_transpose_row_distances,
        "Distances to rows walked back through a transposed conv onto its input, norms fused (rows never stored)",
        py::arg("f"), py::arg("maps"), py::arg("mask"), py::arg("weight"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("in_shape"), py::arg("qs"));
  m.attr("MAX_CONV_TAPS") = mmr::kMaxConvTaps;
  m.attr("MAX_CUDA_CANVAS_BYTES") = mmr::kMaxCanvasBytes;
  m.def("has_cuda", &has_cuda, "Whether this build contains the CUDA backend");
}
