// CPU kernels of row_distances and row_distances_backward (arithmetic in ../geometry.h, dual norms
// in row_norms.h, argument checks in ../checks.h).
#include "../checks.h"
#include "../geometry.h"
#include "row_norms.h"
#include "simd.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace mmr {

namespace {

// out[0:D] += c * d||row||_q / d row for one norm whose kind is fixed at compile time (the switch
// of norm_grad folds away and the loop vectorizes).
template <NormKind kKind, typename scalar_t>
MMR_ALWAYS_INLINE void add_norm_grad(scalar_t* __restrict__ out, const scalar_t* __restrict__ row, int64_t D, scalar_t c,
                                     scalar_t n, scalar_t q, scalar_t ties) {
  for (int64_t i = 0; i < D; ++i) out[i] += c * norm_grad<scalar_t>(kKind, row[i], n, q, ties);
}

// The number of entries of row[0:D] whose magnitude is maxabs.
template <typename scalar_t>
MMR_ALWAYS_INLINE int64_t ties_at(const scalar_t* __restrict__ row, int64_t D, scalar_t maxabs) {
  int64_t count = 0;
  for (int64_t i = 0; i < D; ++i) count += (row[i] == maxabs) | (row[i] == -maxabs);
  return count;
}

// The gradient of one row, out[0:D] = sum_k coeff[k] d||row||_qk / d row (out zeroed first); the
// l-infinity subgradient is split among the entries at the max (counted when a coefficient of an
// l-infinity norm is nonzero).
template <typename scalar_t, typename acc_t>
MMR_ALWAYS_INLINE void row_gradient(scalar_t* out, const scalar_t* row, int64_t D, const NormSet& norms,
                                    const acc_t* coeff, const acc_t* n) {
  acc_t ties = 1;
  for (int k = 0; k < norms.count; ++k) {
    if (coeff[k] != acc_t(0) && norms.kind[k] == NormKind::Linf) {
      ties = static_cast<acc_t>(ties_at<scalar_t>(row, D, static_cast<scalar_t>(n[k])));
    }
  }
  std::fill(out, out + D, scalar_t(0));
  for (int k = 0; k < norms.count; ++k) {
    if (coeff[k] == acc_t(0)) continue;
    const scalar_t c = static_cast<scalar_t>(coeff[k]), nk = static_cast<scalar_t>(n[k]);
    const scalar_t q = static_cast<scalar_t>(norms.q[k]), t = static_cast<scalar_t>(ties);
    switch (norms.kind[k]) {
      case NormKind::L1: add_norm_grad<NormKind::L1, scalar_t>(out, row, D, c, nk, q, t); break;
      case NormKind::L2: add_norm_grad<NormKind::L2, scalar_t>(out, row, D, c, nk, q, t); break;
      case NormKind::Linf: add_norm_grad<NormKind::Linf, scalar_t>(out, row, D, c, nk, q, t); break;
      default: add_norm_grad<NormKind::General, scalar_t>(out, row, D, c, nk, q, t);
    }
  }
}

template <typename scalar_t>
struct RowGradient;

#define MMR_ROW_GRADIENT(scalar_t)                                                                              \
  MMR_SIMD_CLONES void row_gradient_##scalar_t(scalar_t* out, const scalar_t* row, int64_t D, const NormSet& norms, \
                                               const double* coeff, const double* n) {                         \
    row_gradient<scalar_t, double>(out, row, D, norms, coeff, n);                                               \
  }                                                                                                             \
  template <>                                                                                                   \
  struct RowGradient<scalar_t> {                                                                                \
    static constexpr auto run = &row_gradient_##scalar_t;                                                       \
  };

MMR_ROW_GRADIENT(float)
MMR_ROW_GRADIENT(double)
#undef MMR_ROW_GRADIENT

// dist[0:R] = |f| / norm (or f / norm when signed), element by element.
template <typename scalar_t>
MMR_ALWAYS_INLINE void distance_row(scalar_t* __restrict__ dist, const scalar_t* __restrict__ f,
                                    const scalar_t* __restrict__ norm, int64_t R, bool is_signed) {
  using acc_t = at::acc_type<scalar_t, false>;
  if (is_signed) {
    for (int64_t r = 0; r < R; ++r) dist[r] = static_cast<scalar_t>(signed_distance<acc_t>(f[r], norm[r]));
  } else {
    for (int64_t r = 0; r < R; ++r) dist[r] = static_cast<scalar_t>(hyperplane_distance<acc_t>(f[r], norm[r]));
  }
}

template <typename scalar_t>
struct DistanceRow;

#define MMR_DISTANCE_ROW(scalar_t)                                                                                \
  MMR_SIMD_CLONES void distance_row_##scalar_t(scalar_t* dist, const scalar_t* f, const scalar_t* norm, int64_t R, \
                                               bool is_signed) {                                                  \
    distance_row<scalar_t>(dist, f, norm, R, is_signed);                                                          \
  }                                                                                                               \
  template <>                                                                                                     \
  struct DistanceRow<scalar_t> {                                                                                  \
    static constexpr auto run = &distance_row_##scalar_t;                                                         \
  };

MMR_DISTANCE_ROW(float)
MMR_DISTANCE_ROW(double)
#undef MMR_DISTANCE_ROW

std::tuple<at::Tensor, at::Tensor> row_distances_cpu(const at::Tensor& f_in, const at::Tensor& rows_in,
                                                     c10::ArrayRef<double> qs, bool is_signed) {
  const NormSet norms = check_row_distances(f_in, rows_in, qs);
  const at::Tensor f = f_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const int64_t B = f.size(0), Br = rows.size(0), R = rows.size(1), D = rows.size(2);
  const int Q = norms.count;
  at::Tensor dist = at::empty({Q, B, R}, f.options());
  at::Tensor norm = at::empty({Q, Br, R}, f.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_distances_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* rp = rows.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* dp = dist.data_ptr<scalar_t>();
    scalar_t* np = norm.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
    at::parallel_for(0, Br * R, grain, [&](int64_t begin, int64_t end) {
      acc_t n[kMaxNorms];
      for (int64_t t = begin; t < end; ++t) {
        row_norms(rp + t * D, D, norms, n);
        for (int k = 0; k < Q; ++k) np[k * Br * R + t] = static_cast<scalar_t>(n[k]);
      }
    });
    // Distances of every sample, one (norm, sample) row at a time; a shared row set (Br == 1)
    // serves the whole batch.
    at::parallel_for(0, Q * B, std::max<int64_t>(1, 4096 / std::max<int64_t>(R, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t k = t / B, b = t % B;
        DistanceRow<scalar_t>::run(dp + t * R, fp + b * R, np + (k * Br + (Br == 1 ? 0 : b)) * R, R, is_signed);
      }
    });
  });
  return {dist, norm};
}

std::tuple<at::Tensor, at::Tensor> row_distances_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& rows_in, const at::Tensor& dist_in,
    const at::Tensor& norm_in, c10::ArrayRef<double> qs, bool is_signed) {
  const NormSet norms = check_row_distances_backward(grad_in, f_in, rows_in, dist_in, norm_in, qs);
  const at::Tensor grad = grad_in.contiguous(), f = f_in.contiguous(), rows = rows_in.contiguous();
  const at::Tensor dist = dist_in.contiguous(), norm = norm_in.contiguous();
  const int64_t B = f.size(0), Br = rows.size(0), R = rows.size(1), D = rows.size(2);
  const int Q = norms.count;
  at::Tensor grad_f = at::zeros_like(f);
  at::Tensor grad_rows = at::empty_like(rows);  // every row is written below
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_distances_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* rp = rows.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const scalar_t* dp = dist.data_ptr<scalar_t>();
    const scalar_t* np = norm.data_ptr<scalar_t>();
    scalar_t* gfp = grad_f.data_ptr<scalar_t>();
    scalar_t* grp = grad_rows.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
    at::parallel_for(0, Br * R, grain, [&](int64_t begin, int64_t end) {
      acc_t coeff[kMaxNorms], n[kMaxNorms];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t br = t / R, r = t % R;
        const int64_t b_begin = Br == 1 ? 0 : br, b_end = Br == 1 ? B : br + 1;
        bool any = false;
        for (int k = 0; k < Q; ++k) {
          n[k] = static_cast<acc_t>(np[k * Br * R + t]);
          coeff[k] = 0;
          if (!(n[k] > acc_t(0))) continue;  // zero row: +inf distance, zero gradient
          // d = |f| / n (or f / n): dd/df = sign(f) / n (or 1 / n), dd/dn = -d / n, summed over the
          // samples that share this row.
          for (int64_t b = b_begin; b < b_end; ++b) {
            const int64_t i = (k * B + b) * R + r;
            const acc_t g = static_cast<acc_t>(gp[i]);
            if (g == acc_t(0)) continue;
            const acc_t fv = static_cast<acc_t>(fp[b * R + r]);
            gfp[b * R + r] = static_cast<scalar_t>(static_cast<acc_t>(gfp[b * R + r]) +
                                                   g * (is_signed ? acc_t(1) : sign_of(fv)) / n[k]);
            coeff[k] -= g * static_cast<acc_t>(dp[i]) / n[k];
          }
          any = any || coeff[k] != acc_t(0);
        }
        if (!any) {
          std::fill(grp + t * D, grp + (t + 1) * D, scalar_t(0));
          continue;
        }
        RowGradient<scalar_t>::run(grp + t * D, rp + t * D, D, norms, coeff, n);
      }
    });
  });
  return {grad_f, grad_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CPU, m) {
  m.impl("row_distances", &row_distances_cpu);
  m.impl("row_distances_backward", &row_distances_backward_cpu);
}

}  // namespace mmr
