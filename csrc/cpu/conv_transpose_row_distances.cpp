// CPU kernel of conv_transpose_row_distances (geometry in ../conv_rows.h, dual norms in
// row_norms.h, argument checks in ../checks.h).
#include "../checks.h"
#include "../conv_rows.h"
#include "row_norms.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace mmr {

namespace {

// One row: its taps at every output position scattered onto the canvas [Cin, Hin, Win]. kT > 0
// fixes the tap count at compile time (the common kernels), so the tap loops vectorize.
template <int64_t kT, typename scalar_t>
void row_canvas(const ConvGeometry& g, const scalar_t* row, const int64_t* strides, const GridMask<scalar_t>& mask,
                const scalar_t* w, scalar_t* taps, scalar_t* canvas) {
  const int64_t T = kT > 0 ? kT : taps_of(g);
  std::fill(canvas, canvas + input_size_of(g), scalar_t(0));
  for (int64_t y = 0; y < g.Ho; ++y) {
    for (int64_t x = 0; x < g.Wo; ++x) {
      add_position<scalar_t>(g, y, x, row + y * strides[1] + x * strides[2], strides[0], mask, w, T, taps, canvas,
                             [](scalar_t* at, scalar_t value) { *at += value; });
    }
  }
}

at::Tensor conv_transpose_row_distances_cpu(const at::Tensor& f_in, const at::Tensor& maps,
                                            const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in,
                                            c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
                                            c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> in_shape,
                                            c10::ArrayRef<double> qs) {
  const ConvStep step =
      check_conv_transpose_row_distances(f_in, maps, mask_in, weight_in, stride, padding, dilation, in_shape, qs);
  const ConvGeometry& g = step.geometry;
  const NormSet& norms = step.norms;
  const at::Tensor f = f_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.value_or(at::Tensor());
  const int64_t n = maps.size(0), R = maps.size(1), T = taps_of(g), D = input_size_of(g);
  const int Q = norms.count;
  at::Tensor dist = at::empty({Q, n, R}, f.options());
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "conv_transpose_row_distances_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* mp = maps.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* dp = dist.data_ptr<scalar_t>();
    const int64_t sb = maps.stride(0), sr = maps.stride(1);
    const int64_t strides[3] = {maps.stride(2), maps.stride(3), maps.stride(4)};
    const scalar_t* mask_p = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n * R, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> canvas(D), taps(T);
      acc_t norm[kMaxNorms];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / R, r = t % R;
        const scalar_t* row = mp + b * sb + r * sr;
        GridMask<scalar_t> row_mask;
        if (mask_p != nullptr) row_mask = {mask_p + b * mask.stride(0), mask.stride(1), mask.stride(2), mask.stride(3)};
        switch (T) {  // the kernels of common first layers: 1 or 3 channels, 3x3, 4x4, 5x5
          case 9: row_canvas<9>(g, row, strides, row_mask, wp, taps.data(), canvas.data()); break;
          case 16: row_canvas<16>(g, row, strides, row_mask, wp, taps.data(), canvas.data()); break;
          case 25: row_canvas<25>(g, row, strides, row_mask, wp, taps.data(), canvas.data()); break;
          case 27: row_canvas<27>(g, row, strides, row_mask, wp, taps.data(), canvas.data()); break;
          case 48: row_canvas<48>(g, row, strides, row_mask, wp, taps.data(), canvas.data()); break;
          case 75: row_canvas<75>(g, row, strides, row_mask, wp, taps.data(), canvas.data()); break;
          default: row_canvas<0>(g, row, strides, row_mask, wp, taps.data(), canvas.data());
        }
        row_norms(canvas.data(), D, norms, norm);
        const acc_t fv = static_cast<acc_t>(fp[t]);
        for (int k = 0; k < Q; ++k) dp[k * n * R + t] = static_cast<scalar_t>(hyperplane_distance<acc_t>(fv, norm[k]));
      }
    });
  });
  return dist;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CPU, m) { m.impl("conv_transpose_row_distances", &conv_transpose_row_distances_cpu); }

}  // namespace mmr
