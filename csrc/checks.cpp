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

PatchGeometry check_patch_linear_rows(const at::Tensor& patches, const std::optional<at::Tensor>& mask,
                                      const at::Tensor& weight, c10::ArrayRef<int64_t> grid,
                                      c10::ArrayRef<int64_t> window, c10::ArrayRef<int64_t> stride,
                                      c10::ArrayRef<int64_t> offset, c10::ArrayRef<int64_t> in_shape) {
  check_floating(patches, "patches");
  check_same(weight, patches, "weight", "patches");
  TORCH_CHECK(patches.dim() == 4, "patches must be 4-D [n, O, L, E], got shape ", patches.sizes());
  TORCH_CHECK(grid.size() == 2 && window.size() == 3 && stride.size() == 2 && offset.size() == 2 &&
                  in_shape.size() == 3,
              "grid, stride, offset must be pairs and window (Cin, Rh, Rw), in_shape (Cin, Hin, Win) triples");
  TORCH_CHECK(grid[0] > 0 && grid[1] > 0 && grid[0] * grid[1] == patches.size(2), "grid (H, W) must hold the ",
              patches.size(2), " positions of patches, got (", grid[0], ", ", grid[1], ")");
  TORCH_CHECK(window[0] > 0 && window[1] > 0 && window[2] > 0 && window[0] * window[1] * window[2] == patches.size(3),
              "window (Cin, Rh, Rw) must hold the ", patches.size(3), " entries of a patch, got (", window[0], ", ",
              window[1], ", ", window[2], ")");
  TORCH_CHECK(in_shape[0] == window[0] && in_shape[1] > 0 && in_shape[2] > 0,
              "in_shape must be (Cin, Hin, Win) with the window's Cin (", window[0], "), got (", in_shape[0], ", ",
              in_shape[1], ", ", in_shape[2], ")");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && offset[0] >= 0 && offset[1] >= 0,
              "stride must be positive and offset non-negative");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == patches.size(1) * patches.size(2),
              "weight must be [K, O * L] = [K, ", patches.size(1) * patches.size(2), "], got shape ", weight.sizes());
  if (mask.has_value()) {
    check_same(*mask, patches, "mask", "patches");
    TORCH_CHECK(mask->dim() == 3 && mask->size(0) == patches.size(0) && mask->size(1) == patches.size(1) &&
                    mask->size(2) == patches.size(2),
                "mask must have shape [", patches.size(0), ", ", patches.size(1), ", ", patches.size(2), "], got ",
                mask->sizes());
  }
  return {grid[0], grid[1], window[0], window[1], window[2], stride[0], stride[1], offset[0], offset[1],
          in_shape[1], in_shape[2]};
}

PatchGeometry check_patch_linear_rows_backward(const at::Tensor& grad, const at::Tensor& patches,
                                               const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                               c10::ArrayRef<int64_t> grid, c10::ArrayRef<int64_t> window,
                                               c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> offset,
                                               c10::ArrayRef<int64_t> in_shape) {
  const PatchGeometry g = check_patch_linear_rows(patches, mask, weight, grid, window, stride, offset, in_shape);
  check_same(grad, patches, "grad", "patches");
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == patches.size(0) && grad.size(1) == weight.size(0) &&
                  grad.size(2) == image_size_of(g),
              "grad must have shape [", patches.size(0), ", ", weight.size(0), ", ", image_size_of(g), "], got ",
              grad.sizes());
  return g;
}

ConvPatchGeometry check_conv_patch_rows(const at::Tensor& prev, const std::optional<at::Tensor>& mask,
                                        const at::Tensor& weight, c10::ArrayRef<int64_t> stride,
                                        c10::ArrayRef<int64_t> padding, c10::ArrayRef<int64_t> dilation,
                                        c10::ArrayRef<int64_t> prev_stride, c10::ArrayRef<int64_t> prev_offset,
                                        c10::ArrayRef<int64_t> in_shape) {
  check_floating(prev, "prev");
  check_same(weight, prev, "weight", "prev");
  TORCH_CHECK(prev.dim() == 7, "prev must be 7-D [Bp, C, Hp, Wp, Cin, Rph, Rpw], got shape ", prev.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == prev.size(1), "weight must be a conv weight [O, ", prev.size(1),
              ", kh, kw], got shape ", weight.sizes());
  int64_t n = prev.size(0);
  if (mask.has_value()) {
    check_same(*mask, prev, "mask", "prev");
    TORCH_CHECK(mask->dim() == 4 && mask->size(1) == prev.size(1) && mask->size(2) == prev.size(2) &&
                    mask->size(3) == prev.size(3),
                "mask must have shape [n, ", prev.size(1), ", ", prev.size(2), ", ", prev.size(3), "], got ",
                mask->sizes());
    n = mask->size(0);
  }
  TORCH_CHECK(prev.size(0) == 1 || prev.size(0) == n, "prev must hold one row set per sample (", n,
              ") or one shared set, got ", prev.size(0));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && prev_stride.size() == 2 &&
                  prev_offset.size() == 2 && in_shape.size() == 3,
              "stride, padding, dilation, prev_stride, prev_offset must be pairs and in_shape a triple");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 && prev_stride[0] > 0 &&
                  prev_stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 && prev_offset[0] >= 0 &&
                  prev_offset[1] >= 0,
              "strides and dilation must be positive, padding and offsets non-negative");
  TORCH_CHECK(in_shape[0] == prev.size(4) && in_shape[1] > 0 && in_shape[2] > 0, "in_shape must be (",
              prev.size(4), ", Hin, Win), got (", in_shape[0], ", ", in_shape[1], ", ", in_shape[2], ")");
  ConvPatchGeometry g{};
  g.C = prev.size(1);
  g.Hp = prev.size(2);
  g.Wp = prev.size(3);
  g.Cin = prev.size(4);
  g.Rph = prev.size(5);
  g.Rpw = prev.size(6);
  g.O = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.step_h = g.dh * prev_stride[0];
  g.step_w = g.dw * prev_stride[1];
  const int64_t Ho = (g.Hp + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  const int64_t Wo = (g.Wp + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "the conv's output grid is empty (", Ho, " x ", Wo, ")");
  g.out = {Ho, Wo, g.Cin, (g.kh - 1) * g.step_h + g.Rph, (g.kw - 1) * g.step_w + g.Rpw, g.sh * prev_stride[0],
           g.sw * prev_stride[1], g.ph * prev_stride[0] + prev_offset[0], g.pw * prev_stride[1] + prev_offset[1],
           in_shape[1], in_shape[2]};
  return g;
}

ConvPatchGeometry check_conv_patch_rows_backward(const at::Tensor& grad, const at::Tensor& prev,
                                                 const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                                 c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
                                                 c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> prev_stride,
                                                 c10::ArrayRef<int64_t> prev_offset, c10::ArrayRef<int64_t> in_shape) {
  const ConvPatchGeometry g =
      check_conv_patch_rows(prev, mask, weight, stride, padding, dilation, prev_stride, prev_offset, in_shape);
  check_same(grad, prev, "grad", "prev");
  const int64_t n = mask.has_value() ? mask->size(0) : prev.size(0);
  TORCH_CHECK(grad.dim() == 7 && grad.size(0) == n && grad.size(1) == g.O && grad.size(2) == g.out.H &&
                  grad.size(3) == g.out.W && grad.size(4) == g.Cin && grad.size(5) == g.out.Rh &&
                  grad.size(6) == g.out.Rw,
              "grad must have the shape of the rows [", n, ", ", g.O, ", ", g.out.H, ", ", g.out.W, ", ", g.Cin, ", ",
              g.out.Rh, ", ", g.out.Rw, "], got ", grad.sizes());
  return g;
}

at::Tensor contiguous_windows(const at::Tensor& prev) {
  const bool windows_contiguous =
      prev.stride(6) == 1 && prev.stride(5) == prev.size(6) && prev.stride(4) == prev.size(5) * prev.size(6);
  return windows_contiguous ? prev : prev.contiguous();
}

}  // namespace mmr
