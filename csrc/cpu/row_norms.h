// Dual norms of one row on the CPU: the single-pass statistics loop shared by the CPU kernels.
#pragma once

#include "../geometry.h"

#include <cstdint>

namespace mmr {

// ||row||_q for every requested q from one statistics pass (plus one pass per general q).
template <typename scalar_t, typename acc_t>
void row_norms(const scalar_t* row, int64_t D, const NormSet& norms, acc_t* out) {
  // Independent lanes in the row's own type break the dependency chains of the sums and vectorize;
  // the lanes are combined in acc_t.
  constexpr int64_t kLanes = 16;
  RowStats<scalar_t> lane[kLanes];
  int64_t i = 0;
  for (; i + kLanes <= D; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) stats_update<scalar_t>(lane[j], row[i + j]);
  }
  for (; i < D; ++i) stats_update<scalar_t>(lane[0], row[i]);
  RowStats<acc_t> st;
  for (int64_t j = 0; j < kLanes; ++j) {
    stats_combine<acc_t>(st, {static_cast<acc_t>(lane[j].l1), static_cast<acc_t>(lane[j].l2sq),
                              static_cast<acc_t>(lane[j].maxabs)});
  }
  for (int k = 0; k < norms.count; ++k) {
    acc_t general_sum = 0;
    const acc_t q = static_cast<acc_t>(norms.q[k]);
    if (norms.kind[k] == NormKind::General) {
      for (i = 0; i < D; ++i) general_sum += general_term<acc_t>(static_cast<acc_t>(row[i]), st.maxabs, q);
    }
    out[k] = norm_from_stats<acc_t>(norms.kind[k], st, general_sum, q);
  }
}

}  // namespace mmr
