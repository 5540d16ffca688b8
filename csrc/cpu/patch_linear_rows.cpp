// CPU kernels of patch_linear_rows and its backward (geometry in ../patch_rows.h, argument checks in
// ../checks.h). Per sample and unit position, the Linear layer's weights for the position's active
// units (times their activation slopes) multiply the units' patch rows in one small GEMM, whose
// result is added onto the input-space rows; units with a zero slope are skipped (they contribute
// exactly zero). The backward gathers the incoming gradient of the rows that have one onto each
// window and runs the two transposed GEMMs.
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

// The operands of one sample: patches [n, O, L, E] (any strides, entries contiguous), the optional
// slopes [n, O, L] and the weight in position-major order [L, K, O] (one contiguous block per position).
template <typename scalar_t>
struct Operands {
  const scalar_t* patches;
  int64_t pb, po, pl;
  const scalar_t* mask;
  int64_t mb, mo, ml;
  const scalar_t* weight;
  int64_t K, O, L, E;

  scalar_t slope(int64_t b, int64_t o, int64_t l) const { return mask == nullptr ? scalar_t(1) : mask[b * mb + o * mo + l * ml]; }
  const scalar_t* patch(int64_t b, int64_t o, int64_t l) const { return patches + b * pb + o * po + l * pl; }
};

// weight [K, O * L] as [L, K, O]
at::Tensor position_major(const at::Tensor& weight, int64_t L) {
  return weight.reshape({weight.size(0), -1, L}).permute({2, 0, 1}).contiguous();
}

template <typename scalar_t>
Operands<scalar_t> operands_of(const at::Tensor& patches, const at::Tensor& mask, const at::Tensor& weight) {
  Operands<scalar_t> op{patches.data_ptr<scalar_t>(), patches.stride(0), patches.stride(1), patches.stride(2),
                        nullptr, 0, 0, 0, weight.data_ptr<scalar_t>(), weight.size(1), patches.size(1),
                        patches.size(2), patches.size(3)};
  if (mask.defined()) op = {op.patches, op.pb, op.po, op.pl, mask.data_ptr<scalar_t>(), mask.stride(0),
                            mask.stride(1), mask.stride(2), op.weight, op.K, op.O, op.L, op.E};
  return op;
}

// Scratch of one thread for one position: the active units, their weight columns times the slope
// A [K, active] and their patch rows P [active, E] (contiguous copies: GEMM operands).
template <typename scalar_t>
struct PositionScratch {
  std::vector<int64_t> units;
  std::vector<scalar_t> slopes, A, P, Y;

  explicit PositionScratch(const Operands<scalar_t>& op)
      : A(op.K * op.O), P(op.O * op.E), Y(std::max(op.K, op.O) * op.E) {
    units.reserve(op.O);
    slopes.reserve(op.O);
  }

  // Gathers the active units of (b, l); returns their count.
  int64_t gather(const Operands<scalar_t>& op, int64_t b, int64_t l) {
    units.clear();
    slopes.clear();
    for (int64_t o = 0; o < op.O; ++o) {
      const scalar_t s = op.slope(b, o, l);
      if (s != scalar_t(0)) {
        units.push_back(o);
        slopes.push_back(s);
      }
    }
    const int64_t n = static_cast<int64_t>(units.size());
    const scalar_t* w = op.weight + l * op.K * op.O;  // position-major weight [L, K, O]
    for (int64_t k = 0; k < op.K; ++k) {
      for (int64_t a = 0; a < n; ++a) A[k * n + a] = w[k * op.O + units[a]] * slopes[a];
    }
    for (int64_t a = 0; a < n; ++a) std::copy_n(op.patch(b, units[a], l), op.E, P.data() + a * op.E);
    return n;
  }
};

// Calls visit(window entry pointer, input pixel pointer, count) for every run of in-input entries
// of the window of position (y, x), for row k of a block [K, E] and of input-space rows [K, D].
template <typename scalar_t, typename Block, typename Rows, typename Visit>
MMR_ALWAYS_INLINE void for_window_runs(const PatchGeometry& g, int64_t y, int64_t x, int64_t K, Block* block, Rows* rows, Visit visit) {
  const int64_t D = image_size_of(g), E = window_size_of(g);
  const int64_t oy = y * g.Sh - g.Ph, ox = x * g.Sw - g.Pw;
  const Span us = inside_span(oy, g.Rh, g.Hin), vs = inside_span(ox, g.Rw, g.Win);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t cin = 0; cin < g.Cin; ++cin) {
      for (int64_t u = us.begin; u < us.end; ++u) {
        visit(block + k * E + (cin * g.Rh + u) * g.Rw + vs.begin,
              rows + k * D + (cin * g.Hin + oy + u) * g.Win + ox + vs.begin, vs.end - vs.begin);
      }
    }
  }
}

// Adds block [K, E] of position (y, x) onto the input-space rows [K, D] of one sample.
template <typename scalar_t>
MMR_ALWAYS_INLINE void add_window(const PatchGeometry& g, int64_t y, int64_t x, int64_t K, const scalar_t* block, scalar_t* rows) {
  for_window_runs<scalar_t>(g, y, x, K, block, rows, [](const scalar_t* src, scalar_t* dst, int64_t count) {
    add_run<scalar_t>(dst, src, count);
  });
}

// The entries of input-space rows [K, D] at the window of position (y, x): block [K, E], 0 outside.
template <typename scalar_t>
MMR_ALWAYS_INLINE void read_window(const PatchGeometry& g, int64_t y, int64_t x, int64_t K, const scalar_t* rows, scalar_t* block) {
  std::fill(block, block + K * window_size_of(g), scalar_t(0));
  for_window_runs<scalar_t>(g, y, x, K, block, rows, [](scalar_t* dst, const scalar_t* src, int64_t count) {
    std::copy_n(src, count, dst);
  });
}

// The input-space rows [K, D] of sample b (zeroed before): per position, the GEMM of the active
// units' weights with their patch rows, added onto the position's window.
template <typename scalar_t>
MMR_ALWAYS_INLINE void sample_rows(const PatchGeometry& g, const Operands<scalar_t>& op, int64_t b,
                                   PositionScratch<scalar_t>& s, scalar_t* rows) {
  for (int64_t l = 0; l < op.L; ++l) {
    const int64_t active = s.gather(op, b, l);
    if (active == 0) continue;
    matmul<scalar_t>(false, false, op.K, op.E, active, s.A.data(), active, s.P.data(), op.E, s.Y.data(), op.E);
    add_window<scalar_t>(g, l / g.W, l % g.W, op.K, s.Y.data(), rows);
  }
}

template <typename scalar_t>
struct SampleRows;

#define MMR_SAMPLE_ROWS(scalar_t)                                                                                 \
  MMR_SIMD_CLONES void sample_rows_##scalar_t(const PatchGeometry& g, const Operands<scalar_t>& op, int64_t b,    \
                                              PositionScratch<scalar_t>& s, scalar_t* rows) {                     \
    sample_rows<scalar_t>(g, op, b, s, rows);                                                                     \
  }                                                                                                               \
  template <>                                                                                                     \
  struct SampleRows<scalar_t> {                                                                                   \
    static constexpr auto run = &sample_rows_##scalar_t;                                                          \
  };

MMR_SAMPLE_ROWS(float)
MMR_SAMPLE_ROWS(double)
#undef MMR_SAMPLE_ROWS

at::Tensor patch_linear_rows_cpu(const at::Tensor& patches_in, const std::optional<at::Tensor>& mask_in,
                                 const at::Tensor& weight_in, c10::ArrayRef<int64_t> grid,
                                 c10::ArrayRef<int64_t> window, c10::ArrayRef<int64_t> stride,
                                 c10::ArrayRef<int64_t> offset, c10::ArrayRef<int64_t> in_shape) {
  const PatchGeometry g = check_patch_linear_rows(patches_in, mask_in, weight_in, grid, window, stride, offset, in_shape);
  const at::Tensor patches = patches_in.stride(3) == 1 ? patches_in : patches_in.contiguous();
  const at::Tensor weight = position_major(weight_in, patches.size(2)), mask = mask_in.value_or(at::Tensor());
  const int64_t n = patches.size(0), K = weight_in.size(0), D = image_size_of(g);
  at::Tensor rows = at::zeros({n, K, D}, patches.options());
  AT_DISPATCH_FLOATING_TYPES(patches.scalar_type(), "patch_linear_rows_cpu", [&] {
    const Operands<scalar_t> op = operands_of<scalar_t>(patches, mask, weight);
    scalar_t* out = rows.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      PositionScratch<scalar_t> s(op);
      for (int64_t b = begin; b < end; ++b) SampleRows<scalar_t>::run(g, op, b, s, out + b * K * D);
    });
  });
  return rows;
}

std::tuple<at::Tensor, at::Tensor> patch_linear_rows_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& patches_in, const std::optional<at::Tensor>& mask_in,
    const at::Tensor& weight_in, c10::ArrayRef<int64_t> grid, c10::ArrayRef<int64_t> window,
    c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> offset, c10::ArrayRef<int64_t> in_shape) {
  const PatchGeometry g = check_patch_linear_rows_backward(grad_in, patches_in, mask_in, weight_in, grid, window,
                                                           stride, offset, in_shape);
  const at::Tensor patches = patches_in.stride(3) == 1 ? patches_in : patches_in.contiguous();
  const at::Tensor weight = position_major(weight_in, patches.size(2)), grad = grad_in.contiguous();
  const at::Tensor mask = mask_in.value_or(at::Tensor());
  const int64_t n = patches.size(0), K = weight_in.size(0), D = image_size_of(g);
  at::Tensor grad_patches = at::zeros(patches.sizes(), patches.options());
  at::Tensor grad_weight = at::zeros(weight_in.sizes(), weight_in.options());
  AT_DISPATCH_FLOATING_TYPES(patches.scalar_type(), "patch_linear_rows_backward_cpu", [&] {
    const Operands<scalar_t> op = operands_of<scalar_t>(patches, mask, weight);
    const int64_t O = op.O, L = op.L, E = op.E, OL = O * L;
    const int threads = at::get_num_threads();
    // per-thread weight gradients (position-major), summed at the end
    std::vector<std::vector<scalar_t>> partial(threads);
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* gpatch = grad_patches.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t>& gw = partial[at::get_thread_num()];
      if (gw.empty()) gw.assign(K * OL, scalar_t(0));
      PositionScratch<scalar_t> s(op);
      std::vector<scalar_t> window_grad(K * E), unit_grad(K * O), rows_grad(K * D), rows_A(K * O);
      std::vector<int64_t> rows_with_grad;
      for (int64_t b = begin; b < end; ++b) {
        // only the rows with a nonzero incoming gradient contribute (after a top-k selection, few)
        rows_with_grad.clear();
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* src = gp + (b * K + k) * D;
          if (std::any_of(src, src + D, [](scalar_t v) { return v != scalar_t(0); })) {
            std::copy_n(src, D, rows_grad.data() + rows_with_grad.size() * D);
            rows_with_grad.push_back(k);
          }
        }
        const int64_t R = static_cast<int64_t>(rows_with_grad.size());
        if (R == 0) continue;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t active = s.gather(op, b, l);
          if (active == 0) continue;
          // the slope-scaled weights A of the rows with a gradient
          for (int64_t r = 0; r < R; ++r) {
            std::copy_n(s.A.data() + rows_with_grad[r] * active, active, rows_A.data() + r * active);
          }
          read_window<scalar_t>(g, l / g.W, l % g.W, R, rows_grad.data(), window_grad.data());
          // d rows / d patches: A^T [active, R] @ window_grad [R, E]
          matmul<scalar_t>(true, false, active, E, R, rows_A.data(), active, window_grad.data(), E, s.Y.data(), E);
          for (int64_t a = 0; a < active; ++a) {
            std::copy_n(s.Y.data() + a * E, E, gpatch + ((b * O + s.units[a]) * L + l) * E);
          }
          // d rows / d weight: window_grad [R, E] @ P^T [E, active], times the slopes
          matmul<scalar_t>(false, true, R, active, E, window_grad.data(), E, s.P.data(), E, unit_grad.data(), active);
          for (int64_t r = 0; r < R; ++r) {
            scalar_t* dst = gw.data() + (l * K + rows_with_grad[r]) * O;
            for (int64_t a = 0; a < active; ++a) dst[s.units[a]] += unit_grad[r * active + a] * s.slopes[a];
          }
        }
      }
    });
    // the parts are position-major [L, K, O]; grad_weight is [K, O * L]
    scalar_t* gwp = grad_weight.data_ptr<scalar_t>();
    for (const auto& part : partial) {
      if (part.empty()) continue;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t o = 0; o < O; ++o) gwp[k * OL + o * L + l] += part[(l * K + k) * O + o];
        }
      }
    }
  });
  return {grad_patches, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CPU, m) {
  m.impl("patch_linear_rows", &patch_linear_rows_cpu);
  m.impl("patch_linear_rows_backward", &patch_linear_rows_backward_cpu);
}

}  // namespace mmr
