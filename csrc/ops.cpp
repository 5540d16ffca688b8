// The operator library torch.ops.mmr_ext: every schema, in one place. The kernels register
// themselves per backend (csrc/cpu: CPU, csrc/cuda: CUDA); mmr_ext/native registers the autograd
// formulas and fake kernels.
#include "conv_rows.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace mmr {

namespace {

// The limits of this build that callers plan with, and whether it registered CUDA kernels.
std::tuple<int64_t, int64_t, bool> build_info() {
  const bool has_cuda = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("mmr_ext::row_distances", "")
                            .hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  return {kMaxConvTaps, static_cast<int64_t>(kMaxCanvasBytes), has_cuda};
}

}  // namespace

TORCH_LIBRARY(mmr_ext, m) {
  // Row distances (docs/MATH.md §2): for rows [Br, R, D] (Br = B, or 1 when shared by the batch),
  // f [B, R] and dual exponents qs, dist[k, b, r] = |f[b, r]| / ||rows[b, r]||_qk (is_signed:
  // f / ||.||_qk), +inf for zero rows. Returns (dist [Q, B, R], norm [Q, Br, R]).
  m.def("row_distances(Tensor f, Tensor rows, float[] qs, bool is_signed) -> (Tensor dist, Tensor norm)");
  // Gradients (grad_f, grad_rows) of row_distances; rows whose incoming gradient is zero in every
  // sample are skipped (zero gradient).
  m.def("row_distances_backward(Tensor grad, Tensor f, Tensor rows, Tensor dist, Tensor norm, float[] qs, "
        "bool is_signed) -> (Tensor grad_f, Tensor grad_rows)");
  // Top-k hinge (docs/MATH.md §6): per sample, the k smallest entries of dist [B, N] (ties by index),
  // value = (1/k) sum_i max(0, 1 - d^i / gamma). Returns (value [B], index [B, k] in ascending distance).
  m.def("topk_hinge(Tensor dist, int k, float gamma) -> (Tensor value, Tensor index)");
  m.def("topk_hinge_backward(Tensor grad, Tensor dist, Tensor index, float gamma) -> Tensor");
  // Rows on the output grid of a conv (maps [n, R, C, Ho, Wo], times mask [n, C, Ho, Wo] if given)
  // walked back through the transposed conv onto its input (in_shape) and reduced to their dual
  // norms in one pass, never stored: |f| / ||row||_qk [Q, n, R].
  m.def("conv_transpose_row_distances(Tensor f, Tensor maps, Tensor? mask, Tensor weight, int[] stride, "
        "int[] padding, int[] dilation, int[] in_shape, float[] qs) -> Tensor");
  // Rows of a Linear layer (weight [K, O * L]) after a layer whose rows live on receptive fields:
  // patches [n, O, L, E] (unit o at grid position l, window (Cin, Rh, Rw) of the input starting at
  // (y * Sh - Ph, x * Sw - Pw), entries outside the input zero), times the slopes mask [n, O, L] if
  // given: rows[b, k] = sum_{o, l} weight[k, o * L + l] mask[b, o, l] patches[b, o, l] placed on the
  // input (in_shape). Returns rows [n, K, Cin * Hin * Win].
  m.def("patch_linear_rows(Tensor patches, Tensor? mask, Tensor weight, int[] grid, int[] window, int[] stride, "
        "int[] offset, int[] in_shape) -> Tensor");
  // Gradients (grad_patches [n, O, L, E], grad_weight [K, O * L]) of patch_linear_rows.
  m.def("patch_linear_rows_backward(Tensor grad, Tensor patches, Tensor? mask, Tensor weight, int[] grid, "
        "int[] window, int[] stride, int[] offset, int[] in_shape) -> (Tensor grad_patches, Tensor grad_weight)");
  // Rows of a conv layer (weight [O, C, kh, kw], stride, padding, dilation) on their receptive
  // fields, from the previous layer's rows prev [Bp, C, Hp, Wp, Cin, Rph, Rpw] (windows of the input
  // with cumulative stride prev_stride and offset prev_offset; Bp = 1: shared by the samples) times
  // their slopes mask [n, C, Hp, Wp] if given. Returns [n, O, Ho, Wo, Cin, Rh, Rw] with
  // Rh = (kh - 1) * dilation * prev_stride + Rph; window entries outside in_shape are zero.
  m.def("conv_patch_rows(Tensor prev, Tensor? mask, Tensor weight, int[] stride, int[] padding, int[] dilation, "
        "int[] prev_stride, int[] prev_offset, int[] in_shape) -> Tensor");
  // Gradients (grad_prev [Bp, C, Hp, Wp, Cin, Rph, Rpw], grad_weight [O, C, kh, kw]) of conv_patch_rows.
  m.def("conv_patch_rows_backward(Tensor grad, Tensor prev, Tensor? mask, Tensor weight, int[] stride, "
        "int[] padding, int[] dilation, int[] prev_stride, int[] prev_offset, int[] in_shape) -> "
        "(Tensor grad_prev, Tensor grad_weight)");
  // (most taps per position of the fused conv step, largest CUDA canvas in bytes, CUDA kernels built).
  m.def("build_info() -> (int max_conv_taps, int max_cuda_canvas_bytes, bool has_cuda)", &build_info);
}

}  // namespace mmr
