// CUDA kernels of conv_patch_rows and its backward (geometry in ../patch_rows.h, argument checks in
// ../checks.h). Gather form, no atomics: one thread per output entry (the active taps covering it),
// one thread per previous-row entry (every output entry it feeds, times the weights and slopes) and
// one thread per weight (summed over samples, positions and the previous window).
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

// Strided views of the operands (see csrc/cpu/conv_patch_rows.cpp); weight [O, C, kh, kw] contiguous.
template <typename scalar_t>
struct DeviceConvOperands {
  const scalar_t* prev;
  int64_t pb, pc, py, px;
  const scalar_t* mask;
  int64_t mb, mc, my, mx;
  const scalar_t* weight;

  __device__ scalar_t slope(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return mask == nullptr ? scalar_t(1) : mask[b * mb + c * mc + y * my + x * mx];
  }
  __device__ scalar_t prev_entry(int64_t b, int64_t c, int64_t y, int64_t x, int64_t e) const {
    return prev[b * pb + c * pc + y * py + x * px + e];
  }
};

template <typename scalar_t>
DeviceConvOperands<scalar_t> device_conv_operands(const at::Tensor& prev, const at::Tensor& mask,
                                                  const at::Tensor& weight) {
  DeviceConvOperands<scalar_t> op{prev.data_ptr<scalar_t>(), prev.size(0) == 1 ? 0 : prev.stride(0), prev.stride(1),
                                  prev.stride(2), prev.stride(3), nullptr, 0, 0, 0, 0, weight.data_ptr<scalar_t>()};
  if (mask.defined()) {
    op.mask = mask.data_ptr<scalar_t>();
    op.mb = mask.stride(0);
    op.mc = mask.stride(1);
    op.my = mask.stride(2);
    op.mx = mask.stride(3);
  }
  return op;
}

template <typename scalar_t, typename acc_t>
__global__ void conv_patch_rows_kernel(DeviceConvOperands<scalar_t> op, ConvPatchGeometry g, int64_t n,
                                       scalar_t* __restrict__ out) {
  const int64_t E = window_size_of(g.out), L = positions_of(g.out);
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n * g.O * L * E) return;
  const int64_t e = t % E, l = (t / E) % L, o = (t / (E * L)) % g.O, b = t / (E * L * g.O);
  const int64_t y = l / g.out.W, x = l % g.out.W;
  const int64_t cin = e / (g.out.Rh * g.out.Rw), u = (e / g.out.Rw) % g.out.Rh, v = e % g.out.Rw;
  const acc_t sum = conv_row_entry<acc_t>(
      g, o, y, x, cin, u, v, [&](int64_t oo, int64_t c, int64_t i, int64_t j) { return op.weight[((oo * g.C + c) * g.kh + i) * g.kw + j]; },
      [&](int64_t c, int64_t yp, int64_t xp) { return op.slope(b, c, yp, xp); },
      [&](int64_t c, int64_t yp, int64_t xp, int64_t ep) { return op.prev_entry(b, c, yp, xp, ep); });
  out[t] = static_cast<scalar_t>(sum);
}

// grad_prev [Bp, C, Hp, Wp, E']: every output entry the previous entry feeds (all samples when the
// previous rows are shared, Bp = 1).
template <typename scalar_t, typename acc_t>
__global__ void prev_grad_kernel(DeviceConvOperands<scalar_t> op, ConvPatchGeometry g, int64_t n, int64_t Bp,
                                 const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_prev) {
  const int64_t Ep = prev_window_size_of(g), E = window_size_of(g.out), L = positions_of(g.out);
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= Bp * g.C * g.Hp * g.Wp * Ep) return;
  const int64_t ep = t % Ep, xp = (t / Ep) % g.Wp, yp = (t / (Ep * g.Wp)) % g.Hp, c = (t / (Ep * g.Wp * g.Hp)) % g.C;
  const int64_t bp = t / (Ep * g.Wp * g.Hp * g.C);
  const int64_t cin = ep / (g.Rph * g.Rpw), a = (ep / g.Rpw) % g.Rph, bb = ep % g.Rpw;
  acc_t sum = 0;
  for (int64_t b = Bp == 1 ? 0 : bp; b < (Bp == 1 ? n : bp + 1); ++b) {
    const scalar_t s = op.slope(b, c, yp, xp);
    if (s == scalar_t(0)) continue;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ny = yp + g.ph - i * g.dh;
      if (ny < 0 || ny % g.sh != 0 || ny / g.sh >= g.out.H) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t nx = xp + g.pw - j * g.dw;
        if (nx < 0 || nx % g.sw != 0 || nx / g.sw >= g.out.W) continue;
        const int64_t y = ny / g.sh, x = nx / g.sw, e = placed_entry(g, i, j, cin, a, bb);
        if (window_pixel(g.out, y, x, cin, i * g.step_h + a, j * g.step_w + bb) < 0) continue;
        const int64_t l = y * g.out.W + x;
        for (int64_t o = 0; o < g.O; ++o) {
          sum += static_cast<acc_t>(op.weight[((o * g.C + c) * g.kh + i) * g.kw + j]) * static_cast<acc_t>(s) *
                 static_cast<acc_t>(grad[((b * g.O + o) * L + l) * E + e]);
        }
      }
    }
  }
  grad_prev[t] = static_cast<scalar_t>(sum);
}

// grad_weight [O, C, kh, kw]: summed over samples, output positions and the previous window.
template <typename scalar_t, typename acc_t>
__global__ void conv_weight_grad_kernel(DeviceConvOperands<scalar_t> op, ConvPatchGeometry g, int64_t n,
                                        const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_weight) {
  const int64_t E = window_size_of(g.out), L = positions_of(g.out);
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= g.O * g.C * g.kh * g.kw) return;
  const int64_t j = t % g.kw, i = (t / g.kw) % g.kh, c = (t / (g.kw * g.kh)) % g.C, o = t / (g.kw * g.kh * g.C);
  acc_t sum = 0;
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t y = l / g.out.W, x = l % g.out.W;
      int64_t yp, xp;
      if (!tap_source(g, y, x, i, j, &yp, &xp)) continue;
      const scalar_t s = op.slope(b, c, yp, xp);
      if (s == scalar_t(0)) continue;
      acc_t dot = 0;
      for (int64_t cin = 0; cin < g.Cin; ++cin) {
        for (int64_t a = 0; a < g.Rph; ++a) {
          for (int64_t bb = 0; bb < g.Rpw; ++bb) {
            if (window_pixel(g.out, y, x, cin, i * g.step_h + a, j * g.step_w + bb) < 0) continue;
            const int64_t ep = (cin * g.Rph + a) * g.Rpw + bb, e = placed_entry(g, i, j, cin, a, bb);
            dot += static_cast<acc_t>(op.prev_entry(b, c, yp, xp, ep)) *
                   static_cast<acc_t>(grad[((b * g.O + o) * L + l) * E + e]);
          }
        }
      }
      sum += dot * static_cast<acc_t>(s);
    }
  }
  grad_weight[t] = static_cast<scalar_t>(sum);
}

at::Tensor conv_patch_rows_cuda(const at::Tensor& prev_in, const std::optional<at::Tensor>& mask_in,
                                const at::Tensor& weight_in, c10::ArrayRef<int64_t> stride,
                                c10::ArrayRef<int64_t> padding, c10::ArrayRef<int64_t> dilation,
                                c10::ArrayRef<int64_t> prev_stride, c10::ArrayRef<int64_t> prev_offset,
                                c10::ArrayRef<int64_t> in_shape) {
  const ConvPatchGeometry g = check_conv_patch_rows(prev_in, mask_in, weight_in, stride, padding, dilation, prev_stride,
                                                    prev_offset, in_shape);
  const c10::cuda::CUDAGuard guard(prev_in.device());
  const at::Tensor prev = contiguous_windows(prev_in), weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.value_or(at::Tensor());
  const int64_t n = mask.defined() ? mask.size(0) : prev.size(0);
  at::Tensor out = at::empty({n, g.O, g.out.H, g.out.W, g.Cin, g.out.Rh, g.out.Rw}, prev.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(prev.scalar_type(), "conv_patch_rows_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    conv_patch_rows_kernel<scalar_t, acc_t><<<blocks_for(out.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        device_conv_operands<scalar_t>(prev, mask, weight), g, n, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv_patch_rows_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& prev_in, const std::optional<at::Tensor>& mask_in,
    const at::Tensor& weight_in, c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
    c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> prev_stride, c10::ArrayRef<int64_t> prev_offset,
    c10::ArrayRef<int64_t> in_shape) {
  const ConvPatchGeometry g = check_conv_patch_rows_backward(grad_in, prev_in, mask_in, weight_in, stride, padding,
                                                             dilation, prev_stride, prev_offset, in_shape);
  const c10::cuda::CUDAGuard guard(prev_in.device());
  const at::Tensor prev = contiguous_windows(prev_in), weight = weight_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor mask = mask_in.value_or(at::Tensor());
  const int64_t n = grad.size(0), Bp = prev.size(0);
  at::Tensor grad_prev = at::empty({Bp, g.C, g.Hp, g.Wp, g.Cin, g.Rph, g.Rpw}, prev.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  AT_DISPATCH_FLOATING_TYPES(prev.scalar_type(), "conv_patch_rows_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const DeviceConvOperands<scalar_t> op = device_conv_operands<scalar_t>(prev, mask, weight);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (grad_prev.numel() > 0) {
      prev_grad_kernel<scalar_t, acc_t><<<blocks_for(grad_prev.numel()), kThreads, 0, stream>>>(
          op, g, n, Bp, grad.data_ptr<scalar_t>(), grad_prev.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (grad_weight.numel() > 0) {
      conv_weight_grad_kernel<scalar_t, acc_t><<<blocks_for(grad_weight.numel()), kThreads, 0, stream>>>(
          op, g, n, grad.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_prev, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CUDA, m) {
  m.impl("conv_patch_rows", &conv_patch_rows_cuda);
  m.impl("conv_patch_rows_backward", &conv_patch_rows_backward_cuda);
}

}  // namespace mmr
