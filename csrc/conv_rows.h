// Host/device geometry of one transposed-convolution step of a row of V (docs/MATH.md §1): the rows of
// a conv layer's output units walked back onto the layer's input, as the reverse (vector-Jacobian)
// order computes them. Shared by the CPU and CUDA kernels of conv_transpose_row_distances.
#pragma once

#include "geometry.h"

#include <cstddef>
#include <cstdint>

namespace mmr {

// A conv layer (groups = 1) read backwards: C output channels on an Ho x Wo grid map onto an
// input of Cin x Hin x Win through a kh x kw kernel with stride, padding and dilation.
struct ConvGeometry {
  int64_t C, Ho, Wo;
  int64_t Cin, Hin, Win;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

MMR_HD int64_t taps_of(const ConvGeometry& g) { return g.Cin * g.kh * g.kw; }
MMR_HD int64_t input_size_of(const ConvGeometry& g) { return g.Cin * g.Hin * g.Win; }

// Adds the taps of output position (y, x), taps [Cin, kh, kw], into the input-space row
// canvas [Cin, Hin, Win] at the elements they read; taps falling into the zero padding are dropped.
// add(pointer, value) performs the addition (plain on the CPU, atomic on the GPU).
template <typename scalar_t, typename Add>
MMR_HD void scatter_taps(const ConvGeometry& g, int64_t y, int64_t x, const scalar_t* taps, scalar_t* canvas, Add add) {
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t oy = y * g.sh - g.ph + i * g.dh;
    if (oy < 0 || oy >= g.Hin) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t ox = x * g.sw - g.pw + j * g.dw;
      if (ox < 0 || ox >= g.Win) continue;
      for (int64_t cin = 0; cin < g.Cin; ++cin) {
        add(canvas + (cin * g.Hin + oy) * g.Win + ox, taps[(cin * g.kh + i) * g.kw + j]);
      }
    }
  }
}

// Where a per-sample activation mask [C, Ho, Wo] of the conv's output grid is read (strides of
// its channel, row and column dimensions); a null mask means all ones.
template <typename scalar_t>
struct GridMask {
  const scalar_t* data = nullptr;
  int64_t sc = 0, sy = 0, sx = 0;
  MMR_HD scalar_t at(int64_t c, int64_t y, int64_t x) const {
    return data == nullptr ? scalar_t(1) : data[c * sc + y * sy + x * sx];
  }
};

// Most taps (Cin x kh x kw) a fused step handles: the CUDA kernel keeps one position's taps in
// registers.
constexpr int64_t kMaxConvTaps = 128;
// Largest input-space row (bytes) the CUDA kernel keeps in a block's shared memory.
constexpr size_t kMaxCanvasBytes = 40 * 1024;

// One channel's share of every tap of a position: taps[tap] += v * w_c[tap], with w_c the conv
// weight of that channel [taps]. A row's value at a tap is the sum of the shares of all channels.
template <typename scalar_t>
MMR_HD void add_channel_taps(scalar_t* __restrict__ taps, scalar_t v, const scalar_t* __restrict__ w_c, int64_t T) {
  for (int64_t tap = 0; tap < T; ++tap) taps[tap] += v * w_c[tap];
}

// A row's contribution at output position (y, x): its entries over the C channels (v, stride
// v_stride), times the activation mask, give the position's taps (the channels' shares summed),
// which are scattered onto the canvas. The CPU and CUDA kernels both run this per position.
template <typename scalar_t, typename Add>
MMR_HD void add_position(const ConvGeometry& g, int64_t y, int64_t x, const scalar_t* v, int64_t v_stride,
                         const GridMask<scalar_t>& mask, const scalar_t* w, int64_t T, scalar_t* taps,
                         scalar_t* canvas, Add add) {
  for (int64_t tap = 0; tap < T; ++tap) taps[tap] = scalar_t(0);
  for (int64_t c = 0; c < g.C; ++c) add_channel_taps<scalar_t>(taps, v[c * v_stride] * mask.at(c, y, x), w + c * T, T);
  scatter_taps<scalar_t>(g, y, x, taps, canvas, add);
}

}  // namespace mmr
