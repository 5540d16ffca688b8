// CUDA kernels of row_distances and row_distances_backward (arithmetic in ../geometry.h, argument
// checks in ../checks.h). Launch shape: one warp per row.
#include "../checks.h"
#include "../geometry.h"
#include "reductions.cuh"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

namespace mmr {

namespace {

constexpr int kRowsPerBlock = 8;

unsigned int row_blocks(int64_t R) { return static_cast<unsigned int>((R + kRowsPerBlock - 1) / kRowsPerBlock); }

// Every requested ||row||_q, computed by one warp (all lanes get the results).
template <typename scalar_t, typename acc_t>
__device__ void warp_row_norms(const scalar_t* row, int64_t D, const NormSet& norms, int lane, acc_t* out) {
  RowStats<acc_t> st;
  for (int64_t i = lane; i < D; i += kWarp) stats_update<acc_t>(st, static_cast<acc_t>(row[i]));
  st = warp_stats<acc_t>(st);
  for (int k = 0; k < norms.count; ++k) {
    const acc_t q = static_cast<acc_t>(norms.q[k]);
    acc_t general_sum = 0;
    if (norms.kind[k] == NormKind::General) {
      for (int64_t i = lane; i < D; i += kWarp) general_sum += general_term<acc_t>(static_cast<acc_t>(row[i]), st.maxabs, q);
      general_sum = warp_sum<acc_t>(general_sum);
    }
    out[k] = norm_from_stats<acc_t>(norms.kind[k], st, general_sum, q);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void row_norms_kernel(const scalar_t* __restrict__ rows, scalar_t* __restrict__ norm, int64_t rows_total,
                                 int64_t D, NormSet norms) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (t >= rows_total) return;
  acc_t n[kMaxNorms];
  warp_row_norms<scalar_t, acc_t>(rows + t * D, D, norms, threadIdx.x, n);
  if (threadIdx.x == 0) {
    for (int k = 0; k < norms.count; ++k) norm[k * rows_total + t] = static_cast<scalar_t>(n[k]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void distances_kernel(const scalar_t* __restrict__ f, const scalar_t* __restrict__ norm,
                                 scalar_t* __restrict__ dist, int64_t Q, int64_t B, int64_t Br, int64_t R,
                                 bool is_signed) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= Q * B * R) return;
  const int64_t k = t / (B * R), b = (t / R) % B, r = t % R;
  const acc_t n = static_cast<acc_t>(norm[(k * Br + (Br == 1 ? 0 : b)) * R + r]);
  const acc_t fv = static_cast<acc_t>(f[b * R + r]);
  dist[t] = static_cast<scalar_t>(is_signed ? signed_distance<acc_t>(fv, n) : hyperplane_distance<acc_t>(fv, n));
}

template <typename scalar_t, typename acc_t>
__global__ void row_distances_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ f,
                                              const scalar_t* __restrict__ rows, const scalar_t* __restrict__ dist,
                                              const scalar_t* __restrict__ norm, scalar_t* __restrict__ grad_f,
                                              scalar_t* __restrict__ grad_rows, int64_t B, int64_t Br, int64_t R,
                                              int64_t D, NormSet norms, bool is_signed) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (t >= Br * R) return;
  const int lane = threadIdx.x;
  const int64_t br = t / R, r = t % R;
  const int64_t b_begin = Br == 1 ? 0 : br, b_end = Br == 1 ? B : br + 1;
  acc_t coeff[kMaxNorms], n[kMaxNorms];
  bool any = false, need_ties = false;
  acc_t linf = 0;
  for (int k = 0; k < norms.count; ++k) {
    n[k] = static_cast<acc_t>(norm[k * Br * R + t]);
    coeff[k] = 0;
    if (!(n[k] > acc_t(0))) continue;
    // Each lane owns a subset of the samples, so grad_f entries have a single writer.
    for (int64_t b = b_begin + lane; b < b_end; b += kWarp) {
      const int64_t i = (k * B + b) * R + r;
      const acc_t g = static_cast<acc_t>(grad[i]);
      if (g == acc_t(0)) continue;
      const acc_t fv = static_cast<acc_t>(f[b * R + r]);
      grad_f[b * R + r] = static_cast<scalar_t>(static_cast<acc_t>(grad_f[b * R + r]) +
                                                g * (is_signed ? acc_t(1) : sign_of(fv)) / n[k]);
      coeff[k] -= g * static_cast<acc_t>(dist[i]) / n[k];
    }
    coeff[k] = warp_sum<acc_t>(coeff[k]);
    any = any || coeff[k] != acc_t(0);
    if (coeff[k] != acc_t(0) && norms.kind[k] == NormKind::Linf) {
      need_ties = true;
      linf = n[k];
    }
  }
  if (!any) return;  // outputs were zero-initialised
  const scalar_t* row = rows + t * D;
  acc_t ties = 1;
  if (need_ties) {
    acc_t count = 0;
    for (int64_t i = lane; i < D; i += kWarp) count += abs_val(static_cast<acc_t>(row[i])) == linf ? acc_t(1) : acc_t(0);
    ties = warp_sum<acc_t>(count);
  }
  for (int64_t i = lane; i < D; i += kWarp) {
    const acc_t v = static_cast<acc_t>(row[i]);
    acc_t total = 0;
    for (int k = 0; k < norms.count; ++k) {
      if (coeff[k] != acc_t(0)) total += coeff[k] * norm_grad<acc_t>(norms.kind[k], v, n[k], static_cast<acc_t>(norms.q[k]), ties);
    }
    grad_rows[t * D + i] = static_cast<scalar_t>(total);
  }
}

std::tuple<at::Tensor, at::Tensor> row_distances_cuda(const at::Tensor& f_in, const at::Tensor& rows_in,
                                                      c10::ArrayRef<double> qs, bool is_signed) {
  const NormSet norms = check_row_distances(f_in, rows_in, qs);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor f = f_in.contiguous(), rows = rows_in.contiguous();
  const int64_t B = f.size(0), Br = rows.size(0), R = rows.size(1), D = rows.size(2);
  const int64_t Q = norms.count;
  at::Tensor dist = at::empty({Q, B, R}, f.options());
  at::Tensor norm = at::empty({Q, Br, R}, f.options());
  if (B * R == 0) return {dist, norm};
  const dim3 block(kWarp, kRowsPerBlock);
  const int threads = 256;
  const unsigned int dist_blocks = static_cast<unsigned int>((Q * B * R + threads - 1) / threads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_distances_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    row_norms_kernel<scalar_t, acc_t><<<row_blocks(Br * R), block, 0, stream>>>(
        rows.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(), Br * R, D, norms);
    distances_kernel<scalar_t, acc_t><<<dist_blocks, threads, 0, stream>>>(
        f.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(), dist.data_ptr<scalar_t>(), Q, B, Br, R, is_signed);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dist, norm};
}

std::tuple<at::Tensor, at::Tensor> row_distances_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& rows_in, const at::Tensor& dist_in,
    const at::Tensor& norm_in, c10::ArrayRef<double> qs, bool is_signed) {
  const NormSet norms = check_row_distances_backward(grad_in, f_in, rows_in, dist_in, norm_in, qs);
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor grad = grad_in.contiguous(), f = f_in.contiguous(), rows = rows_in.contiguous();
  const at::Tensor dist = dist_in.contiguous(), norm = norm_in.contiguous();
  const int64_t B = f.size(0), Br = rows.size(0), R = rows.size(1), D = rows.size(2);
  at::Tensor grad_f = at::zeros_like(f);
  at::Tensor grad_rows = at::zeros_like(rows);
  if (Br * R == 0) return {grad_f, grad_rows};
  const dim3 block(kWarp, kRowsPerBlock);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_distances_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    row_distances_backward_kernel<scalar_t, acc_t><<<row_blocks(Br * R), block, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(), dist.data_ptr<scalar_t>(),
        norm.data_ptr<scalar_t>(), grad_f.data_ptr<scalar_t>(), grad_rows.data_ptr<scalar_t>(), B, Br, R, D, norms,
        is_signed);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_f, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CUDA, m) {
  m.impl("row_distances", &row_distances_cuda);
  m.impl("row_distances_backward", &row_distances_backward_cuda);
}

}  // namespace mmr
