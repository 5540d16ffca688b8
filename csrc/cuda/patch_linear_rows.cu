// CUDA kernels of patch_linear_rows and its backward (geometry in ../patch_rows.h, argument checks
// in ../checks.h). Gather form, no atomics: the forward computes one input pixel of one row per
// thread (gather_pixel: the covering positions and their units); the backward computes one patch
// entry per thread (the Linear layer's weights against the incoming gradient at that pixel) and one
// weight entry per thread (summed over samples and the window).
#include "../checks.h"
#include "../patch_rows.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

namespace mmr {

namespace {

constexpr int kThreads = 256;

unsigned int blocks_for(int64_t count) { return static_cast<unsigned int>((count + kThreads - 1) / kThreads); }

// Strided views of the operands (see csrc/cpu/patch_linear_rows.cpp).
template <typename scalar_t>
struct DeviceOperands {
  const scalar_t* patches;
  int64_t pb, po, pl;
  const scalar_t* mask;
  int64_t mb, mo, ml;
  const scalar_t* weight;
  int64_t K, O, L, E;

  __device__ scalar_t slope(int64_t b, int64_t o, int64_t l) const {
    return mask == nullptr ? scalar_t(1) : mask[b * mb + o * mo + l * ml];
  }
  __device__ scalar_t patch(int64_t b, int64_t o, int64_t l, int64_t e) const { return patches[b * pb + o * po + l * pl + e]; }
};

template <typename scalar_t>
DeviceOperands<scalar_t> device_operands(const at::Tensor& patches, const at::Tensor& mask, const at::Tensor& weight) {
  DeviceOperands<scalar_t> op{patches.data_ptr<scalar_t>(), patches.stride(0), patches.stride(1), patches.stride(2),
                              nullptr, 0, 0, 0, weight.data_ptr<scalar_t>(), weight.size(0), patches.size(1),
                              patches.size(2), patches.size(3)};
  if (mask.defined()) {
    op.mask = mask.data_ptr<scalar_t>();
    op.mb = mask.stride(0);
    op.mo = mask.stride(1);
    op.ml = mask.stride(2);
  }
  return op;
}

template <typename scalar_t, typename acc_t>
__global__ void patch_linear_rows_kernel(DeviceOperands<scalar_t> op, PatchGeometry g, int64_t n,
                                         scalar_t* __restrict__ rows) {
  const int64_t D = image_size_of(g);
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n * op.K * D) return;
  const int64_t d = t % D, k = (t / D) % op.K, b = t / (D * op.K);
  const int64_t cin = d / (g.Hin * g.Win), iy = (d / g.Win) % g.Hin, ix = d % g.Win;
  const scalar_t* w = op.weight + k * op.O * op.L;
  rows[t] = static_cast<scalar_t>(gather_pixel<acc_t>(
      g, op.O, cin, iy, ix, [&](int64_t o, int64_t l) { return w[o * op.L + l] * op.slope(b, o, l); },
      [&](int64_t o, int64_t l, int64_t e) { return op.patch(b, o, l, e); }));
}

template <typename scalar_t, typename acc_t>
__global__ void patch_grad_kernel(DeviceOperands<scalar_t> op, PatchGeometry g, int64_t n,
                                  const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_patches) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n * op.O * op.L * op.E) return;
  const int64_t e = t % op.E, l = (t / op.E) % op.L, o = (t / (op.E * op.L)) % op.O, b = t / (op.E * op.L * op.O);
  const int64_t cin = e / (g.Rh * g.Rw), u = (e / g.Rw) % g.Rh, v = e % g.Rw;
  const int64_t pixel = window_pixel(g, l / g.W, l % g.W, cin, u, v);
  const scalar_t s = op.slope(b, o, l);
  acc_t sum = 0;
  if (pixel >= 0 && s != scalar_t(0)) {
    const int64_t D = image_size_of(g);
    for (int64_t k = 0; k < op.K; ++k) {
      sum += static_cast<acc_t>(op.weight[(k * op.O + o) * op.L + l]) * static_cast<acc_t>(grad[(b * op.K + k) * D + pixel]);
    }
  }
  grad_patches[t] = static_cast<scalar_t>(sum * static_cast<acc_t>(s));
}

template <typename scalar_t, typename acc_t>
__global__ void weight_grad_kernel(DeviceOperands<scalar_t> op, PatchGeometry g, int64_t n,
                                   const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_weight) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= op.K * op.O * op.L) return;
  const int64_t l = t % op.L, o = (t / op.L) % op.O, k = t / (op.L * op.O);
  const int64_t D = image_size_of(g), y = l / g.W, x = l % g.W;
  acc_t sum = 0;
  for (int64_t b = 0; b < n; ++b) {
    const scalar_t s = op.slope(b, o, l);
    if (s == scalar_t(0)) continue;
    acc_t dot = 0;
    for (int64_t e = 0; e < op.E; ++e) {
      const int64_t pixel = window_pixel(g, y, x, e / (g.Rh * g.Rw), (e / g.Rw) % g.Rh, e % g.Rw);
      if (pixel >= 0) dot += static_cast<acc_t>(grad[(b * op.K + k) * D + pixel]) * static_cast<acc_t>(op.patch(b, o, l, e));
    }
    sum += dot * static_cast<acc_t>(s);
  }
  grad_weight[t] = static_cast<scalar_t>(sum);
}

at::Tensor patch_linear_rows_cuda(const at::Tensor& patches_in, const std::optional<at::Tensor>& mask_in,
                                  const at::Tensor& weight_in, c10::ArrayRef<int64_t> grid,
                                  c10::ArrayRef<int64_t> window, c10::ArrayRef<int64_t> stride,
                                  c10::ArrayRef<int64_t> offset, c10::ArrayRef<int64_t> in_shape) {
  const PatchGeometry g = check_patch_linear_rows(patches_in, mask_in, weight_in, grid, window, stride, offset, in_shape);
  const c10::cuda::CUDAGuard guard(patches_in.device());
  const at::Tensor patches = patches_in.stride(3) == 1 ? patches_in : patches_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), mask = mask_in.value_or(at::Tensor());
  const int64_t n = patches.size(0), K = weight.size(0), D = image_size_of(g);
  at::Tensor rows = at::empty({n, K, D}, patches.options());
  if (rows.numel() == 0) return rows;
  AT_DISPATCH_FLOATING_TYPES(patches.scalar_type(), "patch_linear_rows_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    patch_linear_rows_kernel<scalar_t, acc_t><<<blocks_for(rows.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        device_operands<scalar_t>(patches, mask, weight), g, n, rows.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return rows;
}

std::tuple<at::Tensor, at::Tensor> patch_linear_rows_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& patches_in, const std::optional<at::Tensor>& mask_in,
    const at::Tensor& weight_in, c10::ArrayRef<int64_t> grid, c10::ArrayRef<int64_t> window,
    c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> offset, c10::ArrayRef<int64_t> in_shape) {
  const PatchGeometry g = check_patch_linear_rows_backward(grad_in, patches_in, mask_in, weight_in, grid, window,
                                                           stride, offset, in_shape);
  const c10::cuda::CUDAGuard guard(patches_in.device());
  const at::Tensor patches = patches_in.stride(3) == 1 ? patches_in : patches_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), grad = grad_in.contiguous(), mask = mask_in.value_or(at::Tensor());
  const int64_t n = patches.size(0);
  at::Tensor grad_patches = at::empty(patches.sizes(), patches.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  AT_DISPATCH_FLOATING_TYPES(patches.scalar_type(), "patch_linear_rows_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const DeviceOperands<scalar_t> op = device_operands<scalar_t>(patches, mask, weight);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (grad_patches.numel() > 0) {
      patch_grad_kernel<scalar_t, acc_t><<<blocks_for(grad_patches.numel()), kThreads, 0, stream>>>(
          op, g, n, grad.data_ptr<scalar_t>(), grad_patches.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grad_weight.numel() > 0) {
      weight_grad_kernel<scalar_t, acc_t><<<blocks_for(grad_weight.numel()), kThreads, 0, stream>>>(
          op, g, n, grad.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_patches, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CUDA, m) {
  m.impl("patch_linear_rows", &patch_linear_rows_cuda);
  m.impl("patch_linear_rows_backward", &patch_linear_rows_backward_cuda);
}

}  // namespace mmr
