// Warp-level reductions shared by the CUDA kernels of mmr_ext.
#pragma once

#include "../geometry.h"

namespace mmr {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ RowStats<acc_t> warp_stats(RowStats<acc_t> s) {
  for (int off = kWarp / 2; off > 0; off /= 2) {
    RowStats<acc_t> o;
    o.l1 = __shfl_xor_sync(0xffffffffu, s.l1, off);
    o.l2sq = __shfl_xor_sync(0xffffffffu, s.l2sq, off);
    o.maxabs = __shfl_xor_sync(0xffffffffu, s.maxabs, off);
    stats_combine<acc_t>(s, o);
  }
  return s;
}

}  // namespace mmr
