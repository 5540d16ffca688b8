// Dual norms of one row on the CPU: the single-pass statistics loop shared by the CPU kernels,
// compiled per instruction set (row_norms.cpp).
#pragma once

#include "../geometry.h"

#include <cstdint>

namespace mmr {

// out[k] = ||row||_q for every requested q (norms.q[k]), from one statistics pass over the row
// (plus one pass per general q).
void row_norms(const float* row, int64_t D, const NormSet& norms, double* out);
void row_norms(const double* row, int64_t D, const NormSet& norms, double* out);

}  // namespace mmr
