// CPU kernels of topk_hinge and topk_hinge_backward (arithmetic in ../geometry.h, argument checks
// in ../checks.h).
#include "../checks.h"
#include "../geometry.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

namespace mmr {

namespace {

std::tuple<at::Tensor, at::Tensor> topk_hinge_cpu(const at::Tensor& dist_in, int64_t k, double gamma) {
  check_topk_hinge(dist_in, k, gamma);
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
      // (distance, index) pairs, selected and sorted in place: the comparisons read contiguous
      // memory instead of the row through an index
      std::vector<std::pair<acc_t, int64_t>> order(N);
      const auto before = [](const std::pair<acc_t, int64_t>& a, const std::pair<acc_t, int64_t>& c) {
        return ranks_before<acc_t>(a.first, a.second, c.first, c.second);
      };
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* row = dp + b * N;
        for (int64_t i = 0; i < N; ++i) order[i] = {static_cast<acc_t>(row[i]), i};
        // linear-time selection of the k smallest, then a sort of those k only (k is often N/5)
        std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
        std::sort(order.begin(), order.begin() + k, before);
        acc_t total = 0;
        for (int64_t i = 0; i < k; ++i) {
          ip[b * k + i] = order[i].second;
          total += hinge<acc_t>(order[i].first, static_cast<acc_t>(gamma));
        }
        vp[b] = static_cast<scalar_t>(total / static_cast<acc_t>(k));
      }
    });
  });
  return {value, index};
}

at::Tensor topk_hinge_backward_cpu(const at::Tensor& grad_in, const at::Tensor& dist_in,
                                   const at::Tensor& index_in, double gamma) {
  check_topk_hinge_backward(grad_in, dist_in, index_in);
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

}  // namespace

TORCH_LIBRARY_IMPL(mmr_ext, CPU, m) {
  m.impl("topk_hinge", &topk_hinge_cpu);
  m.impl("topk_hinge_backward", &topk_hinge_backward_cpu);
}

}  // namespace mmr
