// CPU backend of the row-distance and top-k hinge ops (arithmetic in ../geometry.h).
#include "../geometry.h"
#include "../ops.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace mmr {

namespace {

// ||row||_q of one contiguous row, accumulated in acc_t.
template <typename scalar_t, typename acc_t>
acc_t row_norm(const scalar_t* row, int64_t D, NormKind kind, acc_t q) {
  acc_t acc = 0;
  for (int64_t i = 0; i < D; ++i) acc = norm_accumulate<acc_t>(kind, acc, static_cast<acc_t>(row[i]));
  acc_t general_sum = 0;
  if (kind == NormKind::General) {
    for (int64_t i = 0; i < D; ++i) general_sum += general_term<acc_t>(static_cast<acc_t>(row[i]), acc, q);
  }
  return norm_finalize<acc_t>(kind, acc, general_sum, q);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> row_distances_cpu(const at::Tensor& f_in, const at::Tensor& rows_in,
                                                     double q, bool is_signed) {
  const at::Tensor f = f_in.contiguous();
  const at::Tensor rows = rows_in.contiguous();
  const int64_t B = f.size(0), Br = rows.size(0), R = rows.size(1), D = rows.size(2);
  at::Tensor dist = at::empty({B, R}, f.options());
  at::Tensor norm = at::empty({Br, R}, f.options());
  const NormKind kind = norm_kind(q);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_distances_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* rp = rows.data_ptr<scalar_t>();
    const scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* dp = dist.data_ptr<scalar_t>();
    scalar_t* np = norm.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
    at::parallel_for(0, Br * R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        np[t] = static_cast<scalar_t>(row_norm<scalar_t, acc_t>(rp + t * D, D, kind, static_cast<acc_t>(q)));
      }
    });
    // Distances of every sample; a shared row set (Br == 1) serves the whole batch.
    at::parallel_for(0, B * R, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / R, r = t % R;
        const acc_t n = static_cast<acc_t>(np[(Br == 1 ? 0 : b) * R + r]);
        const acc_t fv = static_cast<acc_t>(fp[t]);
        dp[t] = static_cast<scalar_t>(is_signed ? signed_distance<acc_t>(fv, n) : hyperplane_distance<acc_t>(fv, n));
      }
    });
  });
  return {dist, norm};
}

std::tuple<at::Tensor, at::Tensor> row_distances_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& rows_in, const at::Tensor& dist_in,
    const at::Tensor& norm_in, double q, bool is_signed) {
  const at::Tensor grad = grad_in.contiguous(), f = f_in.contiguous(), rows = rows_in.contiguous();
  const at::Tensor dist = dist_in.contiguous(), norm = norm_in.contiguous();
  const int64_t B = f.size(0), Br = rows.size(0), R = rows.size(1), D = rows.size(2);
  at::Tensor grad_f = at::zeros_like(f);
  at::Tensor grad_rows = at::zeros_like(rows);
  const NormKind kind = norm_kind(q);
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
      for (int64_t t = begin; t < end; ++t) {
        const int64_t br = t / R, r = t % R;
        const acc_t n = static_cast<acc_t>(np[t]);
        if (!(n > acc_t(0))) continue;  // zero row: +inf distance, zero gradient
        // d = |f| / n (or f / n): dd/df = sign(f) / n (or 1 / n), dd/dn = -d / n, summed over the
        // samples that share this row.
        acc_t coeff = 0;
        const int64_t b_begin = Br == 1 ? 0 : br, b_end = Br == 1 ? B : br + 1;
        for (int64_t b = b_begin; b < b_end; ++b) {
          const acc_t g = static_cast<acc_t>(gp[b * R + r]);
          if (g == acc_t(0)) continue;
          const acc_t fv = static_cast<acc_t>(fp[b * R + r]);
          gfp[b * R + r] = static_cast<scalar_t>(g * (is_signed ? acc_t(1) : sign_of(fv)) / n);
          coeff -= g * static_cast<acc_t>(dp[b * R + r]) / n;
        }
        if (coeff == acc_t(0)) continue;
        const scalar_t* row = rp + t * D;
        acc_t ties = 1;
        if (kind == NormKind::Linf) {
          ties = 0;
          for (int64_t i = 0; i < D; ++i) ties += abs_val(static_cast<acc_t>(row[i])) == n ? acc_t(1) : acc_t(0);
        }
        scalar_t* out = grp + t * D;
        for (int64_t i = 0; i < D; ++i) {
          out[i] = static_cast<scalar_t>(coeff * norm_grad<acc_t>(kind, static_cast<acc_t>(row[i]), n,
                                                                  static_cast<acc_t>(q), ties));
        }
      }
    });
  });
  return {grad_f, grad_rows};
}

std::tuple<at::Tensor, at::Tensor> topk_hinge_cpu(const at::Tensor& dist_in, int64_t k, double gamma) {
  const at::Tensor dist = dist_in.contiguous();
  const int64_t B = dist.size(0), N = dist.size(1);
  at::Tensor value = at::empty({B}, dist.options());
  at::Tensor index = at::empty({B, k}, dist.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "topk_hinge_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* dp = dist.data_ptr<scalar_t>();
    scalar_t* vp = value.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(N);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = dp + b * N;
        std::iota(order.begin(), order.end(), int64_t(0));
        std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int64_t a, int64_t c) {
          return ranks_before<acc_t>(static_cast<acc_t>(row[a]), a, static_cast<acc_t>(row[c]), c);
        });
        acc_t total = 0;
        for (int64_t i = 0; i < k; ++i) {
          ip[b * k + i] = order[i];
          total += hinge<acc_t>(static_cast<acc_t>(row[order[i]]), static_cast<acc_t>(gamma));
        }
        vp[b] = static_cast<scalar_t>(total / static_cast<acc_t>(k));
      }
    });
  });
  return {value, index};
}

at::Tensor topk_hinge_backward_cpu(const at::Tensor& grad_in, const at::Tensor& dist_in,
                                   const at::Tensor& index_in, double gamma) {
  const at::Tensor grad = grad_in.contiguous(), dist = dist_in.contiguous(), index = index_in.contiguous();
  const int64_t B = dist.size(0), N = dist.size(1), k = index.size(1);
  at::Tensor grad_dist = at::zeros_like(dist);
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "topk_hinge_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* dp = dist.data_ptr<scalar_t>();
    const int64_t* ip = index.data_ptr<int64_t>();
    scalar_t* out = grad_dist.data_ptr<scalar_t>();
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t g = static_cast<acc_t>(gp[b]) / static_cast<acc_t>(k);
        for (int64_t i = 0; i < k; ++i) {
          const int64_t j = ip[b * k + i];
          out[b * N + j] = static_cast<scalar_t>(g * hinge_grad<acc_t>(static_cast<acc_t>(dp[b * N + j]),
                                                                        static_cast<acc_t>(gamma)));
        }
      }
    });
  });
  return grad_dist;
}

}  // namespace mmr
