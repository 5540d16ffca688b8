// CUDA kernels of topk_hinge and topk_hinge_backward (arithmetic in ../geometry.h, argument checks
// in ../checks.h). Launch shape: one block per sample, whose selection ranks every entry by
// counting (strict total order, so ranks are unique and the selected indices come out sorted and
// deterministic).
#include "../checks.h"
#include "../geometry.h"

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

constexpr int kTopkThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void topk_hinge_kernel(const scalar_t* __restrict__ dist, scalar_t* __restrict__ value,
                                  int64_t* __restrict__ index, int64_t N, int64_t k, acc_t gamma) {
  const int64_t b = blockIdx.x;
  const scalar_t* row = dist + b * N;
  __shared__ acc_t partial[kTopkThreads];
  acc_t total = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const acc_t di = static_cast<acc_t>(row[i]);
    int64_t rank = 0;
    for (int64_t j = 0; j < N && rank < k; ++j) rank += ranks_before<acc_t>(static_cast<acc_t>(row[j]), j, di, i) ? 1 : 0;
    if (rank < k) {
      index[b * k + rank] = i;
      total += hinge<acc_t>(di, gamma);
    }
  }
  partial[threadIdx.x] = total;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) value[b] = static_cast<scalar_t>(partial[0] / static_cast<acc_t>(k));
}

template <typename scalar_t, typename acc_t>
__global__ void topk_hinge_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ dist,
                                           const int64_t* __restrict__ index, scalar_t* __restrict__ grad_dist,
                                           int64_t B, int64_t N, int64_t k, acc_t gamma) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * k) return;
  const int64_t b = t / k;
  const int64_t j = index[t];
  const acc_t g = static_cast<acc_t>(grad[b]) / static_cast<acc_t>(k);
  grad_dist[b * N + j] = static_cast<scalar_t>(g * hinge_grad<acc_t>(static_cast<acc_t>(dist[b * N + j]), gamma));
}

std::tuple<at::Tensor, at::Tensor> topk_hinge_cuda(const at::Tensor& dist_in, int64_t k, double gamma) {
  check_topk_hinge(dist_in, k, gamma);
  const c10::cuda::CUDAGuard guard(dist_in.device());
  const at::Tensor dist = dist_in.contiguous();
  const int64_t B = dist.size(0), N = dist.size(1);
  at::Tensor value = at::empty({B}, dist.options());
  at::Tensor index = at::empty({B, k}, dist.options().dtype(at::kLong));
  if (B == 0) return {value, index};
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "topk_hinge_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    topk_hinge_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(B), kTopkThreads, 0,
                                         at::cuda::getCurrentCUDAStream()>>>(
        dist.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), N, k,
        static_cast<acc_t>(gamma));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {value, index};
}

at::Tensor topk_hinge_backward_cuda(const at::Tensor& grad_in, const at::Tensor& dist_in, const at::Tensor& index_in,
                                    double gamma) {
  check_topk_hinge_backward(grad_in, dist_in, index_in);
  const c10::cuda::CUDAGuard guard(dist_in.device());
  const at::Tensor grad = grad_in.contiguous(), dist = dist_in.contiguous(), index = index_in.contiguous();
  const int64_t B = dist.size(0), N = dist.size(1), k = index.size(1);
  at::Tensor grad_dist = at::zeros_like(dist);
  if (B * k == 0) return grad_dist;
  const int threads = 256;
  const unsigned int blocks = static_cast<unsigned int>((B * k + threads - 1) / threads);
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "topk_hinge_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    topk_hinge_backward_kernel<scalar_t, acc_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), dist.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), grad_dist.data_ptr<scalar_t>(),
        B, N, k, static_cast<acc_t>(gamma));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_dist;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CUDA, m) {
  m.impl("topk_hinge", &topk_hinge_cuda);
  m.impl("topk_hinge_backward", &topk_hinge_backward_cuda);
}

}  // namespace mmr
