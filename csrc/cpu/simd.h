// Runtime instruction-set dispatch of the hot CPU loops: functions marked MMR_SIMD_CLONES are
// compiled for AVX-512, AVX2+FMA and the baseline, and the loader picks the best one this CPU runs
// (GCC target_clones; other compilers build the baseline only). Everything they call is inlined
// into them (flatten), so that the inner loops are compiled for each instruction set.
#pragma once

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MMR_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define MMR_SIMD_CLONES __attribute__((flatten))
#endif

#define MMR_ALWAYS_INLINE inline __attribute__((always_inline))

namespace mmr {

// y[0:n] += a * x[0:n]
template <typename scalar_t>
MMR_ALWAYS_INLINE void axpy(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, scalar_t a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// y[0:n] += x[0:n]
template <typename scalar_t>
MMR_ALWAYS_INLINE void add(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

// sum x[0:n] * y[0:n], in independent lanes so that the loop vectorizes
template <typename scalar_t>
MMR_ALWAYS_INLINE scalar_t dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  constexpr int64_t kLanes = 16;
  scalar_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += x[i + j] * y[i + j];
  }
  scalar_t sum = 0;
  for (; i < n; ++i) sum += x[i] * y[i];
  for (int64_t j = 0; j < kLanes; ++j) sum += lane[j];
  return sum;
}

}  // namespace mmr
