// Argument validation of the mmr_ext ops, shared by every backend: each kernel calls its op's check
// first, which raises a clear error naming the argument and returns what the kernel needs.
#pragma once

#include "conv_rows.h"
#include "geometry.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace mmr {

// row_distances(f [B, R], rows [Br, R, D], qs): returns the validated set of dual norms.
NormSet check_row_distances(const at::Tensor& f, const at::Tensor& rows, c10::ArrayRef<double> qs);

// row_distances_backward(grad [Q, B, R], f, rows, dist [Q, B, R], norm [Q, Br, R], qs).
NormSet check_row_distances_backward(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& rows,
                                     const at::Tensor& dist, const at::Tensor& norm, c10::ArrayRef<double> qs);

// topk_hinge(dist [B, N], k in [1, N], gamma > 0).
void check_topk_hinge(const at::Tensor& dist, int64_t k, double gamma);

// topk_hinge_backward(grad [B], dist [B, N], index int64 [B, k]).
void check_topk_hinge_backward(const at::Tensor& grad, const at::Tensor& dist, const at::Tensor& index);

// conv_transpose_row_distances(f [n, R], maps [n, R, C, Ho, Wo], mask [n, C, Ho, Wo] or none,
// weight [C, Cin, kh, kw], stride, padding, dilation, in_shape (Cin, Hin, Win), qs).
struct ConvStep {
  ConvGeometry geometry;
  NormSet norms;
};
ConvStep check_conv_transpose_row_distances(const at::Tensor& f, const at::Tensor& maps,
                                            const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                            c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
                                            c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> in_shape,
                                            c10::ArrayRef<double> qs);

}  // namespace mmr
