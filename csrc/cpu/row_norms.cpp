// The CPU row-norm loop of row_norms.h. The statistics are kept in the lanes of one vector per
// statistic, in the row's own type, then combined in double.
#include "row_norms.h"

#include "simd.h"

namespace mmr {

namespace {

template <typename scalar_t>
MMR_ALWAYS_INLINE void norms_of_row(const scalar_t* __restrict__ row, int64_t D, const NormSet& norms, double* out) {
  using V = Vec<scalar_t>;
  using vec = typename V::type;
  constexpr int64_t kLanes = V::lanes;
  vec l1 = {}, l2sq = {}, maxabs = {};
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) {
    const vec v = V::load(row + i);
    const vec a = v < 0 ? -v : v;
    l1 += a;
    l2sq += a * a;
    maxabs = a > maxabs ? a : maxabs;
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
