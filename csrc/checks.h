// Argument validation of the mmr_ext ops, shared by every backend: each kernel calls its op's check
// first, which raises a clear error naming the argument and returns what the kernel needs.
#pragma once

#include "conv_rows.h"
#include "geometry.h"
#include "patch_rows.h"

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

// patch_linear_rows(patches [n, O, L, E], mask [n, O, L] or none, weight [K, O * L], grid (H, W) with
// H * W = L, window (Cin, Rh, Rw) with Cin * Rh * Rw = E, stride, offset, in_shape (Cin, Hin, Win)).
PatchGeometry check_patch_linear_rows(const at::Tensor& patches, const std::optional<at::Tensor>& mask,
                                      const at::Tensor& weight, c10::ArrayRef<int64_t> grid,
                                      c10::ArrayRef<int64_t> window, c10::ArrayRef<int64_t> stride,
                                      c10::ArrayRef<int64_t> offset, c10::ArrayRef<int64_t> in_shape);

// patch_linear_rows_backward(grad [n, K, Cin * Hin * Win], then the arguments of the forward).
PatchGeometry check_patch_linear_rows_backward(const at::Tensor& grad, const at::Tensor& patches,
                                               const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                               c10::ArrayRef<int64_t> grid, c10::ArrayRef<int64_t> window,
                                               c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> offset,
                                               c10::ArrayRef<int64_t> in_shape);

// conv_patch_rows(prev [Bp, C, Hp, Wp, Cin, Rph, Rpw], mask [n, C, Hp, Wp] or none (Bp = 1 or n),
// weight [O, C, kh, kw], stride, padding, dilation of the conv, prev_stride and prev_offset of the
// previous windows in the input, in_shape (Cin, Hin, Win)).
ConvPatchGeometry check_conv_patch_rows(const at::Tensor& prev, const std::optional<at::Tensor>& mask,
                                        const at::Tensor& weight, c10::ArrayRef<int64_t> stride,
                                        c10::ArrayRef<int64_t> padding, c10::ArrayRef<int64_t> dilation,
                                        c10::ArrayRef<int64_t> prev_stride, c10::ArrayRef<int64_t> prev_offset,
                                        c10::ArrayRef<int64_t> in_shape);

// conv_patch_rows_backward(grad [n, O, Ho, Wo, Cin, Rh, Rw], then the arguments of the forward).
ConvPatchGeometry check_conv_patch_rows_backward(const at::Tensor& grad, const at::Tensor& prev,
                                                 const std::optional<at::Tensor>& mask, const at::Tensor& weight,
                                                 c10::ArrayRef<int64_t> stride, c10::ArrayRef<int64_t> padding,
                                                 c10::ArrayRef<int64_t> dilation, c10::ArrayRef<int64_t> prev_stride,
                                                 c10::ArrayRef<int64_t> prev_offset, c10::ArrayRef<int64_t> in_shape);

// prev with each window (its last three dimensions) contiguous; other dimensions keep their strides
// (a row set expanded over positions or samples is not copied).
at::Tensor contiguous_windows(const at::Tensor& prev);

}  // namespace mmr
