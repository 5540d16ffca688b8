// CPU kernels of conv_patch_rows and its backward (geometry in ../patch_rows.h, argument checks in
// ../checks.h). Forward: per sample, block of output positions and tap (i, j), one GEMM of the
// slope-scaled previous rows of the tap's sources with the tap's weights of all output channels,
// added at the tap's offset inside the block's windows; no multiplication by the zeros outside the
// receptive fields. The backward transposes those GEMMs (weight and previous-row gradients), per
// block over the output units that have a gradient in it.
#include "../checks.h"
#include "../patch_rows.h"
#include "blas.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace mmr {

namespace {

// The operands: previous rows prev [Bp, C, Hp, Wp, E'] (Bp = 1: shared by the samples; windows
// contiguous), slopes [n, C, Hp, Wp] or none, the weight transposed to [C, kh, kw, O].
template <typename scalar_t>
struct ConvPatchOperands {
  const scalar_t* prev;
  int64_t pb, pc, py, px;
  const scalar_t* mask;
  int64_t mb, mc, my, mx;
  const scalar_t* weight_t;

  const scalar_t* prev_row(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return prev + b * pb + c * pc + y * py + x * px;
  }
  scalar_t slope(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return mask == nullptr ? scalar_t(1) : mask[b * mb + c * mc + y * my + x * mx];
  }
};

template <typename scalar_t>
ConvPatchOperands<scalar_t> conv_patch_operands(const at::Tensor& prev, const at::Tensor& mask,
                                                const at::Tensor& weight_t) {
  ConvPatchOperands<scalar_t> op{prev.data_ptr<scalar_t>(), prev.size(0) == 1 ? 0 : prev.stride(0), prev.stride(1),
                                 prev.stride(2), prev.stride(3), nullptr, 0, 0, 0, 0,
                                 weight_t.data_ptr<scalar_t>()};
  if (mask.defined()) {
    op.mask = mask.data_ptr<scalar_t>();
    op.mb = mask.stride(0);
    op.mc = mask.stride(1);
    op.my = mask.stride(2);
    op.mx = mask.stride(3);
  }
  return op;
}

// Calls visit(previous-window entry, output-window entry) for every entry of a previous window.
template <typename Visit>
MMR_ALWAYS_INLINE void for_placed_entries(const ConvPatchGeometry& g, int64_t i, int64_t j, Visit visit) {
  int64_t ep = 0;
  for (int64_t cin = 0; cin < g.Cin; ++cin) {
    for (int64_t a = 0; a < g.Rph; ++a) {
      const int64_t base = placed_entry(g, i, j, cin, a, 0);
      for (int64_t b = 0; b < g.Rpw; ++b, ++ep) visit(ep, base + b);
    }
  }
}

// Calls visit(begin, end) for every run [begin, end) of window entries of position (y, x) that lie
// inside the input (one run per input channel and window row).
template <typename Visit>
MMR_ALWAYS_INLINE void for_inside_runs(const PatchGeometry& w, int64_t y, int64_t x, Visit visit) {
  const Span us = inside_span(y * w.Sh - w.Ph, w.Rh, w.Hin), vs = inside_span(x * w.Sw - w.Pw, w.Rw, w.Win);
  for (int64_t cin = 0; cin < w.Cin; ++cin) {
    for (int64_t u = us.begin; u < us.end; ++u) {
      const int64_t e = (cin * w.Rh + u) * w.Rw;
      visit(e + vs.begin, e + vs.end);
    }
  }
}

// Whether some window entry of position (y, x) lies outside the input.
MMR_ALWAYS_INLINE bool crosses_border(const PatchGeometry& w, int64_t y, int64_t x) {
  const Span us = inside_span(y * w.Sh - w.Ph, w.Rh, w.Hin), vs = inside_span(x * w.Sw - w.Pw, w.Rw, w.Win);
  return us.begin != 0 || us.end != w.Rh || vs.begin != 0 || vs.end != w.Rw;
}

// Per tap (i, j) of a block of output positions, the block's in-grid sources: their positions and
// the slopes times the previous rows, gathered as A^T [C, positions * E'] (row stride `ld`; the
// previous rows are copied whole), the left operand of the tap's GEMM with the weight block [C, O].
template <typename scalar_t>
struct TapOperand {
  std::vector<int64_t> positions;
  std::vector<scalar_t> A;

  // Gathers the sources of tap (i, j) for positions [l_begin, l_end) of sample b; returns their count.
  int64_t gather(const ConvPatchGeometry& g, const ConvPatchOperands<scalar_t>& op, int64_t b, int64_t l_begin,
                 int64_t l_end, int64_t i, int64_t j, int64_t ld) {
    const int64_t Ep = prev_window_size_of(g);
    positions.clear();
    for (int64_t l = l_begin; l < l_end; ++l) {
      int64_t yp, xp;
      if (!tap_source(g, l / g.out.W, l % g.out.W, i, j, &yp, &xp)) continue;
      scalar_t* column = A.data() + static_cast<int64_t>(positions.size()) * Ep;
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t s = op.slope(b, c, yp, xp);
        const scalar_t* __restrict__ row = op.prev_row(b, c, yp, xp);
        scalar_t* __restrict__ dst = column + c * ld;
        for (int64_t ep = 0; ep < Ep; ++ep) dst[ep] = s * row[ep];
      }
      positions.push_back(l);
    }
    return static_cast<int64_t>(positions.size());
  }
};

// Buffers of one thread for the forward: the tap operand, the GEMM result T [positions * E', O] and
// the block's windows, transposed [positions, E, O] (so that a tap adds O-wide vectors).
template <typename scalar_t>
struct RowScratch {
  TapOperand<scalar_t> tap;
  std::vector<scalar_t> T, windows;
  RowScratch(const ConvPatchGeometry& g, int64_t block)
      : T(block * prev_window_size_of(g) * g.O), windows(block * window_size_of(g.out) * g.O) {
    tap.A.resize(block * prev_window_size_of(g) * g.C);
  }
};

// Output positions per block: the block's windows [block, E, O] stay in cache (about 128 KiB of
// them) while every tap adds onto them, and each tap's GEMM has block * E' rows.
inline int64_t position_block(const ConvPatchGeometry& g, int64_t element_size) {
  const int64_t per_position = window_size_of(g.out) * g.O * element_size;
  return std::max<int64_t>(1, std::min<int64_t>(positions_of(g.out), (int64_t(128) << 10) / per_position));
}

// Writes the transposed window [E, O] of position (y, x) as its O rows (row stride `stride`):
// entries outside the input are zero.
template <typename scalar_t>
MMR_ALWAYS_INLINE void write_window(const ConvPatchGeometry& g, int64_t y, int64_t x, const scalar_t* __restrict__ window,
                                    scalar_t* __restrict__ out, int64_t stride) {
  const int64_t O = g.O, E = window_size_of(g.out);
  if (crosses_border(g.out, y, x)) {
    for (int64_t o = 0; o < O; ++o) std::fill(out + o * stride, out + o * stride + E, scalar_t(0));
  }
  for (int64_t o = 0; o < O; ++o) {
    scalar_t* __restrict__ row = out + o * stride;
    const scalar_t* __restrict__ column = window + o;
    for_inside_runs(g.out, y, x, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) row[e] = column[e * O];
    });
  }
}

// The rows of sample b, out [O, Ho*Wo, E]: per block of output positions and per tap (i, j), one
// GEMM [positions * E', C] x [C, O] gives the tap's contribution to the O rows of every position,
// added at the tap's offset inside the windows; no multiplication by the zeros outside the
// receptive fields.
template <typename scalar_t>
MMR_ALWAYS_INLINE void sample_rows(const ConvPatchGeometry& g, const ConvPatchOperands<scalar_t>& op, int64_t b,
                                   scalar_t* __restrict__ out, RowScratch<scalar_t>& buf, int64_t block) {
  const int64_t O = g.O, E = window_size_of(g.out), L = positions_of(g.out), Ep = prev_window_size_of(g);
  for (int64_t l0 = 0; l0 < L; l0 += block) {
    const int64_t l1 = std::min(L, l0 + block);
    scalar_t* __restrict__ windows = buf.windows.data();
    std::fill(windows, windows + (l1 - l0) * E * O, scalar_t(0));
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t count = buf.tap.gather(g, op, b, l0, l1, i, j, block * Ep);
        if (count == 0) continue;
        const scalar_t* w = op.weight_t + (i * g.kw + j) * O;  // [C, O], rows of stride kh * kw * O
        matmul<scalar_t>(true, false, count * Ep, O, g.C, buf.tap.A.data(), block * Ep, w, g.kh * g.kw * O,
                         buf.T.data(), O);
        for (int64_t p = 0; p < count; ++p) {
          scalar_t* window = windows + (buf.tap.positions[p] - l0) * E * O;
          const scalar_t* t = buf.T.data() + p * Ep * O;
          for_placed_entries(g, i, j, [&](int64_t ep, int64_t e) { add_run<scalar_t>(window + e * O, t + ep * O, O); });
        }
      }
    }
    for (int64_t l = l0; l < l1; ++l) write_window<scalar_t>(g, l / g.out.W, l % g.out.W, windows + (l - l0) * E * O, out + l * E, L * E);
  }
}

// Buffers of one thread for the backward, per block of output positions: the tap operand (as in
// the forward), the incoming gradient of the m units that have one in the block, transposed to
// G [positions, E, m], one tap's share of it GT [positions * E', m], those units' weights
// [C, kh, kw, m] (when m < O), and a tap's weight gradient [C, m] and operand gradient
// [C, positions * E']. Units without a gradient in a block cost nothing.
template <typename scalar_t>
struct GradScratch {
  TapOperand<scalar_t> tap;
  std::vector<scalar_t> G, GT, weight, grad_weight, grad_operand;
  std::vector<int64_t> units;
  GradScratch(const ConvPatchGeometry& g, int64_t block)
      : G(block * window_size_of(g.out) * g.O), GT(block * prev_window_size_of(g) * g.O),
        weight(g.C * g.kh * g.kw * g.O), grad_weight(g.C * g.O), grad_operand(g.C * block * prev_window_size_of(g)) {
    tap.A.resize(g.C * block * prev_window_size_of(g));
    units.reserve(g.O);
  }
};

// The units o with a nonzero incoming gradient at an in-input entry of a position of [l0, l1).
template <typename scalar_t>
MMR_ALWAYS_INLINE void units_with_gradient(const ConvPatchGeometry& g, const scalar_t* grad_out, int64_t l0, int64_t l1,
                                           std::vector<int64_t>& units) {
  const PatchGeometry& w = g.out;
  const int64_t E = window_size_of(w), L = positions_of(w);
  units.clear();
  for (int64_t o = 0; o < g.O; ++o) {
    bool any = false;
    for (int64_t l = l0; l < l1 && !any; ++l) {
      const scalar_t* row = grad_out + (o * L + l) * E;
      for_inside_runs(w, l / w.W, l % w.W, [&](int64_t begin, int64_t end) {
        any = any || std::any_of(row + begin, row + end, [](scalar_t v) { return v != scalar_t(0); });
      });
    }
    if (any) units.push_back(o);
  }
}

// G [positions, E, m]: the incoming gradient of `units` at the windows of [l0, l1), transposed;
// zero at entries outside the input (the forward sets them to zero: they pass no gradient).
template <typename scalar_t>
MMR_ALWAYS_INLINE void transposed_gradient(const ConvPatchGeometry& g, const scalar_t* grad_out, int64_t l0, int64_t l1,
                                           const std::vector<int64_t>& units, scalar_t* __restrict__ G) {
  const PatchGeometry& w = g.out;
  const int64_t E = window_size_of(w), L = positions_of(w), m = static_cast<int64_t>(units.size());
  std::fill(G, G + (l1 - l0) * E * m, scalar_t(0));
  for (int64_t l = l0; l < l1; ++l) {
    scalar_t* window = G + (l - l0) * E * m;
    for (int64_t k = 0; k < m; ++k) {
      const scalar_t* __restrict__ row = grad_out + (units[k] * L + l) * E;
      for_inside_runs(w, l / w.W, l % w.W, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) window[e * m + k] = row[e];
      });
    }
  }
}

// The gradients of sample b: grad_out [O, Ho*Wo, E] in; grad_weight_t [C, kh, kw, O] and
// grad_prev [C, Hp, Wp, E'] accumulated. Per block of positions and tap (i, j), the forward's
// GEMM transposed twice: weight gradient [C, m] = A^T [C, positions * E'] x GT [positions * E', m],
// operand gradient [C, positions * E'] = W [C, m] x GT^T, added (times the slopes) onto the
// previous rows of the tap's sources.
template <typename scalar_t>
MMR_ALWAYS_INLINE void sample_grads(const ConvPatchGeometry& g, const ConvPatchOperands<scalar_t>& op, int64_t b,
                                    const scalar_t* __restrict__ grad_out, scalar_t* __restrict__ grad_weight_t,
                                    scalar_t* __restrict__ grad_prev, GradScratch<scalar_t>& buf, int64_t block) {
  const int64_t O = g.O, E = window_size_of(g.out), L = positions_of(g.out), Ep = prev_window_size_of(g);
  const int64_t taps = g.C * g.kh * g.kw, ld = block * Ep;
  for (int64_t l0 = 0; l0 < L; l0 += block) {
    const int64_t l1 = std::min(L, l0 + block);
    units_with_gradient<scalar_t>(g, grad_out, l0, l1, buf.units);
    const int64_t m = static_cast<int64_t>(buf.units.size());
    if (m == 0) continue;
    transposed_gradient<scalar_t>(g, grad_out, l0, l1, buf.units, buf.G.data());
    const scalar_t* weights = op.weight_t;  // [C, kh, kw, m]: all units, or the m with a gradient
    if (m < O) {
      for (int64_t tap = 0; tap < taps; ++tap) {
        for (int64_t k = 0; k < m; ++k) buf.weight[tap * m + k] = op.weight_t[tap * O + buf.units[k]];
      }
      weights = buf.weight.data();
    }
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t count = buf.tap.gather(g, op, b, l0, l1, i, j, ld);
        if (count == 0) continue;
        for (int64_t p = 0; p < count; ++p) {
          const scalar_t* window = buf.G.data() + (buf.tap.positions[p] - l0) * E * m;
          scalar_t* t = buf.GT.data() + p * Ep * m;
          for_placed_entries(g, i, j, [&](int64_t ep, int64_t e) { std::copy_n(window + e * m, m, t + ep * m); });
        }
        const int64_t M = count * Ep, tap = i * g.kw + j;
        const scalar_t* w = weights + tap * m;  // [C, m], rows of stride kh * kw * m
        matmul<scalar_t>(false, false, g.C, m, M, buf.tap.A.data(), ld, buf.GT.data(), m, buf.grad_weight.data(), m);
        for (int64_t c = 0; c < g.C; ++c) {
          scalar_t* dst = grad_weight_t + (c * g.kh * g.kw + tap) * O;
          const scalar_t* src = buf.grad_weight.data() + c * m;
          for (int64_t k = 0; k < m; ++k) dst[buf.units[k]] += src[k];
        }
        matmul<scalar_t>(false, true, g.C, M, m, w, g.kh * g.kw * m, buf.GT.data(), m, buf.grad_operand.data(), ld);
        for (int64_t p = 0; p < count; ++p) {
          const int64_t l = buf.tap.positions[p];
          int64_t yp, xp;
          tap_source(g, l / g.out.W, l % g.out.W, i, j, &yp, &xp);
          for (int64_t c = 0; c < g.C; ++c) {
            const scalar_t s = op.slope(b, c, yp, xp);
            if (s == scalar_t(0)) continue;
            scalar_t* __restrict__ gp = grad_prev + ((c * g.Hp + yp) * g.Wp + xp) * Ep;
            const scalar_t* __restrict__ src = buf.grad_operand.data() + c * ld + p * Ep;
            for (int64_t ep = 0; ep < Ep; ++ep) gp[ep] += s * src[ep];
          }
        }
      }
    }
  }
}

template <typename scalar_t>
struct SampleKernels;

#define MMR_SAMPLE_KERNELS(scalar_t)                                                                              \
  MMR_SIMD_CLONES void sample_rows_##scalar_t(const ConvPatchGeometry& g, const ConvPatchOperands<scalar_t>& op,  \
                                              int64_t b, scalar_t* out, RowScratch<scalar_t>& buf, int64_t block) { \
    sample_rows<scalar_t>(g, op, b, out, buf, block);                                                             \
  }                                                                                                               \
  MMR_SIMD_CLONES void sample_grads_##scalar_t(const ConvPatchGeometry& g, const ConvPatchOperands<scalar_t>& op, \
                                               int64_t b, const scalar_t* grad_out, scalar_t* grad_weight_t,      \
                                               scalar_t* grad_prev, GradScratch<scalar_t>& buf, int64_t block) {  \
    sample_grads<scalar_t>(g, op, b, grad_out, grad_weight_t, grad_prev, buf, block);                             \
  }                                                                                                               \
  template <>                                                                                                     \
  struct SampleKernels<scalar_t> {                                                                                \
    static constexpr auto rows = &sample_rows_##scalar_t;                                                         \
    static constexpr auto grads = &sample_grads_##scalar_t;                                                       \
  };

MMR_SAMPLE_KERNELS(float)
MMR_SAMPLE_KERNELS(double)
#undef MMR_SAMPLE_KERNELS

at::Tensor transposed_weight(const at::Tensor& weight) { return weight.permute({1, 2, 3, 0}).contiguous(); }

at::Tensor conv_patch_rows_cpu(const at::Tensor& prev_in, const std::optional<at::Tensor>& mask_in,
                               const at::Tensor& weight, c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
                               c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> prev_stride,
                               c10::ArrayRef<int64_t> prev_offset, c10::ArrayRef<int64_t> in_shape) {
  const ConvPatchGeometry g = check_conv_patch_rows(prev_in, mask_in, weight, stride, padding, dilation, prev_stride,
                                                    prev_offset, in_shape);
  const at::Tensor prev = contiguous_windows(prev_in), mask = mask_in.value_or(at::Tensor());
  const at::Tensor weight_t = transposed_weight(weight);
  const int64_t n = mask.defined() ? mask.size(0) : prev.size(0);
  const int64_t E = window_size_of(g.out), L = positions_of(g.out);
  at::Tensor out = at::empty({n, g.O, g.out.H, g.out.W, g.Cin, g.out.Rh, g.out.Rw}, prev.options());
  AT_DISPATCH_FLOATING_TYPES(prev.scalar_type(), "conv_patch_rows_cpu", [&] {
    const ConvPatchOperands<scalar_t> op = conv_patch_operands<scalar_t>(prev, mask, weight_t);
    scalar_t* outp = out.data_ptr<scalar_t>();
    const int64_t block = position_block(g, sizeof(scalar_t));
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      RowScratch<scalar_t> buf(g, block);
      for (int64_t b = begin; b < end; ++b) SampleKernels<scalar_t>::rows(g, op, b, outp + b * g.O * L * E, buf, block);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv_patch_rows_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& prev_in, const std::optional<at::Tensor>& mask_in,
    const at::Tensor& weight, c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
    c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> prev_stride, c10::ArrayRef<int64_t> prev_offset,
    c10::ArrayRef<int64_t> in_shape) {
  const ConvPatchGeometry g = check_conv_patch_rows_backward(grad_in, prev_in, mask_in, weight, stride, padding,
                                                             dilation, prev_stride, prev_offset, in_shape);
  const at::Tensor prev = contiguous_windows(prev_in), mask = mask_in.value_or(at::Tensor());
  const at::Tensor weight_t = transposed_weight(weight), grad = grad_in.contiguous();
  const int64_t n = grad.size(0), Bp = prev.size(0);
  const int64_t E = window_size_of(g.out), L = positions_of(g.out);
  const int64_t prev_numel = g.C * g.Hp * g.Wp * prev_window_size_of(g), taps = g.C * g.kh * g.kw;
  at::Tensor grad_prev = at::zeros({Bp, g.C, g.Hp, g.Wp, g.Cin, g.Rph, g.Rpw}, prev.options());
  at::Tensor grad_weight_t = at::zeros({g.C, g.kh, g.kw, g.O}, prev.options());
  AT_DISPATCH_FLOATING_TYPES(prev.scalar_type(), "conv_patch_rows_backward_cpu", [&] {
    const ConvPatchOperands<scalar_t> op = conv_patch_operands<scalar_t>(prev, mask, weight_t);
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* gprev = grad_prev.data_ptr<scalar_t>();
    // per-thread weight gradients (and, for rows shared by the samples, previous-row gradients)
    const int threads = at::get_num_threads();
    const int64_t block = position_block(g, sizeof(scalar_t));
    std::vector<std::vector<scalar_t>> weight_parts(threads), prev_parts(Bp == 1 ? threads : 0);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      const int t = at::get_thread_num();
      weight_parts[t].resize(taps * g.O, scalar_t(0));
      if (Bp == 1) prev_parts[t].resize(prev_numel, scalar_t(0));
      GradScratch<scalar_t> buf(g, block);
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* gprev_b = Bp == 1 ? prev_parts[t].data() : gprev + b * prev_numel;
        SampleKernels<scalar_t>::grads(g, op, b, gp + b * g.O * L * E, weight_parts[t].data(), gprev_b, buf, block);
      }
    });
    scalar_t* gw = grad_weight_t.data_ptr<scalar_t>();
    for (const auto& part : weight_parts) {
      for (size_t i = 0; i < part.size(); ++i) gw[i] += part[i];
    }
    for (const auto& part : prev_parts) {
      for (size_t i = 0; i < part.size(); ++i) gprev[i] += part[i];
    }
  });
  return {grad_prev, grad_weight_t.permute({3, 0, 1, 2}).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CPU, m) {
  m.impl("conv_patch_rows", &conv_patch_rows_cpu);
  m.impl("conv_patch_rows_backward", &conv_patch_rows_backward_cpu);
}

}  // namespace mmr
