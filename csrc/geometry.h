// Per-element arithmetic of mmr_ext shared by the CPU and the CUDA backends (docs/MATH.md §2, §6).
// Everything here is a host/device inline function so that the CPU tests exercise the very
// arithmetic the GPU kernels run.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define MMR_HD __host__ __device__ __forceinline__
#else
#define MMR_HD inline
#endif

namespace mmr {

// Which dual norm a kernel computes; general q uses the max-scaled power sum.
enum class NormKind : int { L1 = 0, L2 = 1, Linf = 2, General = 3 };

inline NormKind norm_kind(double q) {
  if (std::isinf(q)) return NormKind::Linf;
  if (q == 1.0) return NormKind::L1;
  if (q == 2.0) return NormKind::L2;
  return NormKind::General;
}

// The dual norms one row-distance call computes (all from a single pass over each row).
constexpr int kMaxNorms = 8;
struct NormSet {
  int count = 0;
  double q[kMaxNorms];
  NormKind kind[kMaxNorms];
};

template <typename acc_t>
MMR_HD acc_t abs_val(acc_t v) { return fabs(v); }  // branch-free (signs of rows are random)

template <typename acc_t>
MMR_HD acc_t sign_of(acc_t v) { return v > acc_t(0) ? acc_t(1) : (v < acc_t(0) ? acc_t(-1) : acc_t(0)); }

// One pass over a row gathers what every dual norm needs: sum |v| (q = 1), sum v^2 (q = 2) and
// max |v| (q = inf, and the scale of the general q-norm, whose power sum needs a second pass).
template <typename acc_t>
struct RowStats {
  acc_t l1 = 0, l2sq = 0, maxabs = 0;
};

template <typename acc_t>
MMR_HD void stats_update(RowStats<acc_t>& s, acc_t v) {
  const acc_t a = abs_val(v);
  s.l1 += a;
  s.l2sq += a * a;
  s.maxabs = a > s.maxabs ? a : s.maxabs;  // maps onto a max instruction (fmax is a libm call)
}

template <typename acc_t>
MMR_HD void stats_combine(RowStats<acc_t>& s, const RowStats<acc_t>& o) {
  s.l1 += o.l1;
  s.l2sq += o.l2sq;
  s.maxabs = o.maxabs > s.maxabs ? o.maxabs : s.maxabs;
}

// Second-pass term of the general q-norm: (|v| / row_max)^q, summed over the row.
template <typename acc_t>
MMR_HD acc_t general_term(acc_t v, acc_t row_max, acc_t q) {
  return row_max > acc_t(0) ? pow(abs_val(v) / row_max, q) : acc_t(0);
}

// ||row||_q from the row statistics (and, for general q, the scaled power sum).
template <typename acc_t>
MMR_HD acc_t norm_from_stats(NormKind kind, const RowStats<acc_t>& s, acc_t general_sum, acc_t q) {
  switch (kind) {
    case NormKind::L1: return s.l1;
    case NormKind::L2: return sqrt(s.l2sq);
    case NormKind::Linf: return s.maxabs;
    default: return s.maxabs > acc_t(0) ? s.maxabs * pow(general_sum, acc_t(1) / q) : acc_t(0);
  }
}

// d ||v||_q / d v_i for one element. ties_at_max is the number of entries attaining the max
// (Linf: the subgradient is split evenly among them, as torch.linalg.vector_norm does).
template <typename acc_t>
MMR_HD acc_t norm_grad(NormKind kind, acc_t v, acc_t norm, acc_t q, acc_t ties_at_max) {
  if (!(norm > acc_t(0))) return acc_t(0);
  switch (kind) {
    case NormKind::L1: return sign_of(v);
    case NormKind::L2: return v / norm;
    case NormKind::Linf: return abs_val(v) == norm ? sign_of(v) / ties_at_max : acc_t(0);
    default: return sign_of(v) * pow(abs_val(v) / norm, q - acc_t(1));
  }
}

// lp-distance |f| / ||w||_q of a point with pre-activation f to the hyperplane of a row with dual
// norm `norm`. A zero row defines no hyperplane: +inf, never NaN.
template <typename acc_t>
MMR_HD acc_t hyperplane_distance(acc_t f, acc_t norm) {
  return norm > acc_t(0) ? abs_val(f) / norm : acc_t(INFINITY);
}

// Signed variant for decision hyperplanes: margin / ||w||_q (+inf for a zero row).
template <typename acc_t>
MMR_HD acc_t signed_distance(acc_t margin, acc_t norm) {
  return norm > acc_t(0) ? margin / norm : acc_t(INFINITY);
}

// Hinge max(0, 1 - d / gamma) of docs/MATH.md §6 and its derivative in d.
template <typename acc_t>
MMR_HD acc_t hinge(acc_t d, acc_t gamma) {
  const acc_t h = acc_t(1) - d / gamma;
  return h > acc_t(0) ? h : acc_t(0);
}

template <typename acc_t>
MMR_HD acc_t hinge_grad(acc_t d, acc_t gamma) {
  return d < gamma ? -acc_t(1) / gamma : acc_t(0);
}

// Strict total order used by top-k selection: smaller distance first, ties by smaller index.
template <typename acc_t>
MMR_HD bool ranks_before(acc_t a, long ia, acc_t b, long ib) {
  return a < b || (a == b && ia < ib);
}

}  // namespace mmr
