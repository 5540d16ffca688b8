// The CPU row-norm loop of row_norms.h. The statistics are kept in independent lanes of the row's
// own type (separate arrays per statistic, so that the loop vectorizes), then combined in double.
#include "row_norms.h"

#include "simd.h"

namespace mmr {

namespace {

template <typename scalar_t>
MMR_ALWAYS_INLINE void norms_of_row(const scalar_t* __restrict__ row, int64_t D, const NormSet& norms, double* out) {
  constexpr int64_t kLanes = 64 / sizeof(scalar_t);
  scalar_t l1[kLanes] = {}, l2sq[kLanes] = {}, maxabs[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const scalar_t a = abs_val(row[i + j]);
      l1[j] += a;
      l2sq[j] += a * a;
      maxabs[j] = a > maxabs[j] ? a : maxabs[j];
    }
  }
  RowStats<double> st;
  for (; i < D; ++i) stats_update<double>(st, static_cast<double>(row[i]));
  for (int64_t j = 0; j < kLanes; ++j) {
    stats_combine<double>(st, {static_cast<double>(l1[j]), static_cast<double>(l2sq[j]), static_cast<double>(maxabs[j])});
  }
  for (int k = 0; k < norms.count; ++k) {
    double general_sum = 0;
    if (norms.kind[k] == NormKind::General) {
      for (i = 0; i < D; ++i) general_sum += general_term<double>(static_cast<double>(row[i]), st.maxabs, norms.q[k]);
    }
    out[k] = norm_from_stats<double>(norms.kind[k], st, general_sum, norms.q[k]);
  }
}

}  // namespace

MMR_SIMD_CLONES void row_norms(const float* row, int64_t D, const NormSet& norms, double* out) {
  norms_of_row<float>(row, D, norms, out);
}

MMR_SIMD_CLONES void row_norms(const double* row, int64_t D, const NormSet& norms, double* out) {
  norms_of_row<double>(row, D, norms, out);
}

}  // namespace mmr
