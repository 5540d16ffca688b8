// CUDA kernel of conv_transpose_row_distances (geometry in ../conv_rows.h, dual norms in
// ../geometry.h, argument checks in ../checks.h). Launch shape: one block per row; the row's
// input-space canvas lives in shared memory, each thread scatters the taps of some output positions
// into it (atomic adds), then the block reduces the canvas to its norm statistics. The rows never
// reach global memory.
#include "../checks.h"
#include "../conv_rows.h"
#include "reductions.cuh"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace mmr {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

// Block-wide combination of the threads' statistics (every thread gets the result).
template <typename acc_t>
__device__ RowStats<acc_t> block_stats(RowStats<acc_t> s, RowStats<acc_t>* scratch) {
  s = warp_stats<acc_t>(s);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  RowStats<acc_t> total;
  for (int w = 0; w < kWarps; ++w) stats_combine<acc_t>(total, scratch[w]);
  __syncthreads();
  return total;
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  v = warp_sum<acc_t>(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void conv_transpose_row_distances_kernel(const scalar_t* __restrict__ f, const scalar_t* __restrict__ maps,
                                                    GridMask<scalar_t> mask, int64_t mask_sb,
                                                    const scalar_t* __restrict__ w, scalar_t* __restrict__ dist,
                                                    int64_t n, int64_t R, int64_t sb, int64_t sr, int64_t sc,
                                                    int64_t sy, int64_t sx, ConvGeometry g, NormSet norms) {
  extern __shared__ unsigned char shared_bytes[];
  scalar_t* canvas = reinterpret_cast<scalar_t*>(shared_bytes);
  __shared__ RowStats<acc_t> stats_scratch[kWarps];
  __shared__ acc_t sum_scratch[kWarps];
  const int64_t t = blockIdx.x, b = t / R, r = t % R;
  const int64_t D = input_size_of(g), T = taps_of(g);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) canvas[i] = scalar_t(0);
  __syncthreads();
  const scalar_t* row = maps + b * sb + r * sr;
  if (mask.data != nullptr) mask.data += b * mask_sb;
  scalar_t taps[kMaxConvTaps];
  for (int64_t l = threadIdx.x; l < g.Ho * g.Wo; l += blockDim.x) {
    const int64_t y = l / g.Wo, x = l % g.Wo;
    add_position<scalar_t>(g, y, x, row + y * sy + x * sx, sc, mask, w, T, taps, canvas,
                           [](scalar_t* at, scalar_t value) { atomicAdd(at, value); });
  }
  __syncthreads();
  RowStats<acc_t> st;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) stats_update<acc_t>(st, static_cast<acc_t>(canvas[i]));
  st = block_stats<acc_t>(st, stats_scratch);
  const acc_t fv = static_cast<acc_t>(f[t]);
  for (int k = 0; k < norms.count; ++k) {
    const acc_t q = static_cast<acc_t>(norms.q[k]);
    acc_t general_sum = 0;
    if (norms.kind[k] == NormKind::General) {
      for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
        general_sum += general_term<acc_t>(static_cast<acc_t>(canvas[i]), st.maxabs, q);
      }
      general_sum = block_sum<acc_t>(general_sum, sum_scratch);
    }
    if (threadIdx.x == 0) {
      dist[k * n * R + t] = static_cast<scalar_t>(hyperplane_distance<acc_t>(fv, norm_from_stats<acc_t>(norms.kind[k], st, general_sum, q)));
    }
  }
}

at::Tensor conv_transpose_row_distances_cuda(const at::Tensor& f_in, const at::Tensor& maps,
                                             const std::optional<at::Tensor>& mask_in, const at::Tensor& weight_in,
                                             c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
                                             c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> in_shape,
                                             c10::ArrayRef<double> qs) {
  const ConvStep step =
      check_conv_transpose_row_distances(f_in, maps, mask_in, weight_in, stride, padding, dilation, in_shape, qs);
  const ConvGeometry& g = step.geometry;
  const NormSet& norms = step.norms;
  const c10::cuda::CUDAGuard guard(maps.device());
  const at::Tensor f = f_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.value_or(at::Tensor());
  const int64_t n = maps.size(0), R = maps.size(1);
  at::Tensor dist = at::empty({norms.count, n, R}, f.options());
  if (n * R == 0) return dist;
  const size_t canvas_bytes = static_cast<size_t>(input_size_of(g)) * maps.element_size();
  TORCH_CHECK(canvas_bytes <= kMaxCanvasBytes, "conv_transpose_row_distances on CUDA keeps a row in shared memory: at most ",
              kMaxCanvasBytes, " bytes, got ", canvas_bytes, " (Cin x Hin x Win = ", input_size_of(g), ")");
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "conv_transpose_row_distances_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    GridMask<scalar_t> grid_mask;
    int64_t mask_sb = 0;
    if (mask.defined()) {
      grid_mask = {mask.data_ptr<scalar_t>(), mask.stride(1), mask.stride(2), mask.stride(3)};
      mask_sb = mask.stride(0);
    }
    conv_transpose_row_distances_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(n * R), kThreads, canvas_bytes, at::cuda::getCurrentCUDAStream()>>>(
            f.data_ptr<scalar_t>(), maps.data_ptr<scalar_t>(), grid_mask, mask_sb, weight.data_ptr<scalar_t>(),
            dist.data_ptr<scalar_t>(),
            n, R, maps.stride(0), maps.stride(1), maps.stride(2), maps.stride(3), maps.stride(4), g, norms);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dist;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CUDA, m) { m.impl("conv_transpose_row_distances", &conv_transpose_row_distances_cuda); }

}  // namespace mmr
