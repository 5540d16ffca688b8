// Argument validation of the mmr_ext ops (declared in checks.h), shared by the CPU and CUDA kernels.
#include "checks.h"

#include <c10/util/Exception.h>

namespace mmr {

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

NormSet norm_set(c10::ArrayRef<double> qs) {
  TORCH_CHECK(!qs.empty() && qs.size() <= static_cast<size_t>(kMaxNorms), "qs must hold 1 to ", kMaxNorms,
              " dual exponents, got ", qs.size());
  NormSet norms;
  for (double q : qs) {
    TORCH_CHECK(q >= 1.0, "every q must be >= 1 (or inf), got ", q);
    norms.q[norms.count] = q;
    norms.kind[norms.count] = norm_kind(q);
    ++norms.count;
  }
  return norms;
}

}  // namespace

NormSet check_row_distances(const at::Tensor& f, const at::Tensor& rows, c10::ArrayRef<double> qs) {
  check_floating(rows, "rows");
  check_same(f, rows, "f", "rows");
  TORCH_CHECK(rows.dim() == 3, "rows must be 3-D [Br, R, D], got shape ", rows.sizes());
  TORCH_CHECK(f.dim() == 2 && f.size(1) == rows.size(1), "f must be 2-D [B, ", rows.size(1),
              "] (one entry per row and sample), got shape ", f.sizes());
  TORCH_CHECK(rows.size(0) == 1 || rows.size(0) == f.size(0), "rows must hold one row set per sample (",
              f.size(0), ") or one shared set, got ", rows.size(0));
  return norm_set(qs);
}

NormSet check_row_distances_backward(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& rows,
                                     const at::Tensor& dist, const at::Tensor& norm, c10::ArrayRef<double> qs) {
  const NormSet norms = check_row_distances(f, rows, qs);
  check_same(grad, rows, "grad", "rows");
  check_same(dist, rows, "dist", "rows");
  check_same(norm, rows, "norm", "rows");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == norms.count && grad.size(1) == f.size(0) &&
                  grad.size(2) == f.size(1) && dist.sizes() == grad.sizes(),
              "grad and dist must have shape [Q, B, R]");
  TORCH_CHECK(norm.dim() == 3 && norm.size(0) == norms.count && norm.size(1) == rows.size(0) &&
                  norm.size(2) == rows.size(1),
              "norm must have shape [Q, Br, R]");
  return norms;
}

void check_topk_hinge(const at::Tensor& dist, int64_t k, double gamma) {
  check_floating(dist, "dist");
  TORCH_CHECK(dist.dim() == 2, "dist must be 2-D [B, N], got shape ", dist.sizes());
  TORCH_CHECK(k >= 1 && k <= dist.size(1), "k must be in [1, ", dist.size(1), "], got ", k);
  TORCH_CHECK(gamma > 0.0, "gamma must be positive, got ", gamma);
}

void check_topk_hinge_backward(const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& index) {
  check_same(grad, dist, "grad", "dist");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 2 && index.size(0) == dist.size(0),
              "index must be int64 [B, k]");
}

ConvStep check_conv_transpose_row_distances(const at::Tensor& f, const at::Tensor& maps,
                                            const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                            c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
                                            c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> in_shape,
                                            c10::ArrayRef<double> qs) {
  check_floating(maps, "maps");
  check_same(f, maps, "f", "maps");
  check_same(weight, maps, "weight", "maps");
  TORCH_CHECK(maps.dim() == 5, "maps must be 5-D [n, R, C, Ho, Wo], got shape ", maps.sizes());
  TORCH_CHECK(f.dim() == 2 && f.size(0) == maps.size(0) && f.size(1) == maps.size(1), "f must have shape [",
              maps.size(0), ", ", maps.size(1), "], got ", f.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == maps.size(2), "weight must be a conv weight [", maps.size(2),
              ", Cin, kh, kw], got shape ", weight.sizes());
  if (mask.has_value()) {
    check_same(*mask, maps, "mask", "maps");
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == maps.size(0) && mask->size(1) == maps.size(2) &&
                    mask->size(2) == maps.size(3) && mask->size(3) == maps.size(4),
                "mask must have shape [", maps.size(0), ", ", maps.size(2), ", ", maps.size(3), ", ", maps.size(4),
                "] (per sample, the maps' grid), got ", mask->sizes());
  }
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && in_shape.size() == 3,
              "stride, padding, dilation must be pairs and in_shape a triple (Cin, Hin, Win)");
  TORCH_CHECK(in_shape[0] == weight.size(1), "in_shape[0] must equal weight.size(1) (", weight.size(1), "), got ",
              in_shape[0]);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 &&
                  padding[1] >= 0,
              "stride and dilation must be positive and padding non-negative");
  const ConvGeometry g{maps.size(2), maps.size(3), maps.size(4), in_shape[0], in_shape[1], in_shape[2],
                       weight.size(2), weight.size(3), stride[0], stride[1], padding[0], padding[1],
                       dilation[0], dilation[1]};
  TORCH_CHECK(taps_of(g) <= kMaxConvTaps, "a fused step handles at most ", kMaxConvTaps,
              " taps (Cin x kh x kw), got ", taps_of(g));
  return {g, norm_set(qs)};
}

}  // namespace mmr
