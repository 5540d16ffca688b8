// Runtime instruction-set dispatch of the hot CPU loops: functions marked MMR_SIMD_CLONES are
// compiled for AVX-512, AVX2+FMA and the baseline, and the loader picks the best one this CPU runs
// (GCC target_clones; other compilers build the baseline only). Everything they call is inlined
// into them (flatten), so that the inner loops are compiled for each instruction set.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MMR_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define MMR_SIMD_CLONES __attribute__((flatten))
#endif

#define MMR_ALWAYS_INLINE inline __attribute__((always_inline))

namespace mmr {

// A vector of `bytes` bytes of scalar_t (GCC / Clang vector extension; 64: one AVX-512 register,
// two AVX2 or four SSE ones), compiled for the instruction set of the function it is inlined into.
template <typename scalar_t, int bytes = 64>
struct Vec {
  typedef scalar_t type __attribute__((vector_size(bytes)));
  static constexpr int64_t lanes = bytes / sizeof(scalar_t);

  static MMR_ALWAYS_INLINE type load(const scalar_t* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static MMR_ALWAYS_INLINE void store(scalar_t* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  // y[0:lanes] += x[0:lanes]
  static MMR_ALWAYS_INLINE void add(scalar_t* y, const scalar_t* x) { store(y, load(y) + load(x)); }
};

// y[0:n] += x[0:n], vectorized for short n too (the runs of a window row): 64-byte vectors, then
// at most one 32- and one 16-byte vector, then scalars.
template <typename scalar_t>
MMR_ALWAYS_INLINE void add_run(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, int64_t n) {
  int64_t i = 0;
  for (; i + Vec<scalar_t, 64>::lanes <= n; i += Vec<scalar_t, 64>::lanes) Vec<scalar_t, 64>::add(y + i, x + i);
  if (i + Vec<scalar_t, 32>::lanes <= n) {
    Vec<scalar_t, 32>::add(y + i, x + i);
    i += Vec<scalar_t, 32>::lanes;
  }
  if (i + Vec<scalar_t, 16>::lanes <= n) {
    Vec<scalar_t, 16>::add(y + i, x + i);
    i += Vec<scalar_t, 16>::lanes;
  }
  for (; i < n; ++i) y[i] += x[i];
}

}  // namespace mmr
