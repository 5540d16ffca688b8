// Declarations of the native ops of mmr_ext. Each op has a CPU implementation (csrc/cpu) and,
// in CUDA builds, a CUDA implementation (csrc/cuda); bindings.cpp dispatches on the device.
#pragma once

#include "conv_rows.h"
#include "geometry.h"

#include <ATen/core/Tensor.h>

#include <tuple>

namespace mmr {

// The dual norms one row-distance call computes (all from a single pass over each row).
constexpr int kMaxNorms = 8;
struct NormSet {
  int count = 0;
  double q[kMaxNorms];
  NormKind kind[kMaxNorms];
};

// Row distances (docs/MATH.md §2): for rows V [Br, R, D] (Br = B, or 1 when the rows are shared by the
// whole batch), pre-activations or margins f [B, R] and dual exponents q_k,
// dist[k, b, r] = |f[b, r]| / ||V[b, r]||_qk (or f / ||V||_qk when is_signed), +inf for zero rows.
// Returns (dist [Q, B, R], norm [Q, Br, R]); the norms are kept for the backward.
std::tuple<at::Tensor, at::Tensor> row_distances_cpu(const at::Tensor& f, const at::Tensor& rows,
                                                     const NormSet& norms, bool is_signed);
// Gradients of the row distances; rows whose incoming gradient is zero in every sample are skipped
// (zero gradient), so the cost is proportional to the rows a loss actually selected.
std::tuple<at::Tensor, at::Tensor> row_distances_backward_cpu(
    const at::Tensor& grad_dist, const at::Tensor& f, const at::Tensor& rows, const at::Tensor& dist,
    const at::Tensor& norm, const NormSet& norms, bool is_signed);

// Top-k hinge (docs/MATH.md §6): per sample b, the k smallest entries of dist [B, N] (ties broken by
// index), value_b = (1/k) sum_i max(0, 1 - d^i / gamma). Returns (value [B], index [B, k]) with the
// indices in ascending order of distance.
std::tuple<at::Tensor, at::Tensor> topk_hinge_cpu(const at::Tensor& dist, int64_t k, double gamma);
at::Tensor topk_hinge_backward_cpu(const at::Tensor& grad_value, const at::Tensor& dist,
                                   const at::Tensor& index, double gamma);

// Fused last step of rows built in reverse order: rows given on the output grid of a conv layer
// (maps [n, R, C, Ho, Wo], any strides), times the activation mask of that grid (mask [n, C, Ho, Wo],
// any strides; undefined: none), are walked back through the transposed conv (weight
// [C, Cin, kh, kw], geometry g) onto its input and reduced to their dual norms in the same pass;
// dist[k, b, r] = |f[b, r]| / ||row||_qk (+inf for a zero row). The masked maps and the input-space
// rows are never written to memory.
at::Tensor conv_transpose_row_distances_cpu(const at::Tensor& f, const at::Tensor& maps, const at::Tensor& mask,
                                            const at::Tensor& weight, const ConvGeometry& g, const NormSet& norms);

#ifdef WITH_CUDA
at::Tensor conv_transpose_row_distances_cuda(const at::Tensor& f, const at::Tensor& maps, const at::Tensor& mask,
                                             const at::Tensor& weight, const ConvGeometry& g, const NormSet& norms);
std::tuple<at::Tensor, at::Tensor> row_distances_cuda(const at::Tensor& f, const at::Tensor& rows,
                                                      const NormSet& norms, bool is_signed);
std::tuple<at::Tensor, at::Tensor> row_distances_backward_cuda(
    const at::Tensor& grad_dist, const at::Tensor& f, const at::Tensor& rows, const at::Tensor& dist,
    const at::Tensor& norm, const NormSet& norms, bool is_signed);
std::tuple<at::Tensor, at::Tensor> topk_hinge_cuda(const at::Tensor& dist, int64_t k, double gamma);
at::Tensor topk_hinge_backward_cuda(const at::Tensor& grad_value, const at::Tensor& dist,
                                    const at::Tensor& index, double gamma);
#endif

}  // namespace mmr
