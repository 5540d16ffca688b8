// Host/device geometry of rows kept on receptive fields (docs/MATH.md §1, §13): the rows of a layer
// after convolutions live on windows of the input, one per unit position, and a Linear layer that
// reads such a layer combines them into input-space rows (the forward order of patch_linear_rows).
// Shared by the CPU and CUDA kernels of patch_linear_rows.
#pragma once

#include "geometry.h"

#include <cstdint>

namespace mmr {

// Unit positions on an H x W grid; the window of position (y, x) is Cin x Rh x Rw and starts at
// input pixel (y * Sh - Ph, x * Sw - Pw) of a Cin x Hin x Win input; window entries outside the
// input are zero in every row (they are never read or written).
struct PatchGeometry {
  int64_t H, W;
  int64_t Cin, Rh, Rw;
  int64_t Sh, Sw, Ph, Pw;
  int64_t Hin, Win;
};

MMR_HD int64_t window_size_of(const PatchGeometry& g) { return g.Cin * g.Rh * g.Rw; }
MMR_HD int64_t positions_of(const PatchGeometry& g) { return g.H * g.W; }
MMR_HD int64_t image_size_of(const PatchGeometry& g) { return g.Cin * g.Hin * g.Win; }

// The window columns [v_begin, v_end) of position column x that fall inside the input.
struct Span {
  int64_t begin, end;
};

MMR_HD Span inside_span(int64_t origin, int64_t size, int64_t limit) {
  const int64_t begin = origin < 0 ? -origin : 0;
  const int64_t end = origin + size > limit ? limit - origin : size;
  return {begin, end > begin ? end : begin};
}

// Input pixel (flat index into Cin x Hin x Win) of window entry (cin, u, v) of position (y, x), or -1
// when it lies outside the input.
MMR_HD int64_t window_pixel(const PatchGeometry& g, int64_t y, int64_t x, int64_t cin, int64_t u, int64_t v) {
  const int64_t iy = y * g.Sh - g.Ph + u, ix = x * g.Sw - g.Pw + v;
  if (iy < 0 || iy >= g.Hin || ix < 0 || ix >= g.Win) return -1;
  return (cin * g.Hin + iy) * g.Win + ix;
}

// The positions along one axis whose windows cover input coordinate i: [first, last] (empty when
// first > last); window coordinate of position p is i + pad - p * stride.
MMR_HD Span covering_positions(int64_t i, int64_t pad, int64_t stride, int64_t size, int64_t count) {
  const int64_t top = i + pad;                   // window coordinate at position 0
  int64_t first = top - (size - 1);              // smallest p * stride allowed
  first = first <= 0 ? 0 : (first + stride - 1) / stride;
  int64_t last = top / stride;                   // largest p with p * stride <= top
  last = last < count - 1 ? last : count - 1;
  return {first, last + 1};
}

// Value of input pixel (cin, iy, ix) of row k: the sum over covering positions (y, x) and units o
// of coef(o, y * W + x) * entry(o, position, window offset). The CUDA kernel runs this per pixel; it
// is the gather form of the scatter the CPU kernel performs with GEMMs.
template <typename acc_t, typename Coef, typename Entry>
MMR_HD acc_t gather_pixel(const PatchGeometry& g, int64_t O, int64_t cin, int64_t iy, int64_t ix, Coef coef,
                          Entry entry) {
  const Span ys = covering_positions(iy, g.Ph, g.Sh, g.Rh, g.H);
  const Span xs = covering_positions(ix, g.Pw, g.Sw, g.Rw, g.W);
  acc_t sum = 0;
  for (int64_t y = ys.begin; y < ys.end; ++y) {
    const int64_t u = iy + g.Ph - y * g.Sh;
    for (int64_t x = xs.begin; x < xs.end; ++x) {
      const int64_t v = ix + g.Pw - x * g.Sw;
      const int64_t l = y * g.W + x, e = (cin * g.Rh + u) * g.Rw + v;
      for (int64_t o = 0; o < O; ++o) sum += static_cast<acc_t>(coef(o, l)) * static_cast<acc_t>(entry(o, l, e));
    }
  }
  return sum;
}

}  // namespace mmr

namespace mmr {

// A conv layer (weight [O, C, kh, kw]) applied to rows on receptive fields: the previous layer's
// rows live on an Hp x Wp grid of windows Cin x Rph x Rpw; tap (i, j) of output position (y, x)
// reads the previous unit at (y*sh - ph + i*dh, x*sw - pw + j*dw) (none when outside the grid: the
// conv's zero padding), whose window lies at (i*step_h, j*step_w) inside the output position's
// window Cin x Rh x Rw (step = dilation x the previous grid's cumulative stride). Entries of output
// windows outside the input (out) are zero.
struct ConvPatchGeometry {
  int64_t C, Hp, Wp, Cin, Rph, Rpw;   // previous rows: channels, grid, window
  int64_t O, kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t step_h, step_w;
  PatchGeometry out;                   // output grid and windows in the input
};

MMR_HD int64_t prev_window_size_of(const ConvPatchGeometry& g) { return g.Cin * g.Rph * g.Rpw; }

// Output window entry of previous-window entry (cin, a, b) read through tap (i, j).
MMR_HD int64_t placed_entry(const ConvPatchGeometry& g, int64_t i, int64_t j, int64_t cin, int64_t a, int64_t b) {
  return (cin * g.out.Rh + i * g.step_h + a) * g.out.Rw + j * g.step_w + b;
}

// The previous unit position (yp, xp) that tap (i, j) of output position (y, x) reads; false when
// the tap reads the conv's zero padding.
MMR_HD bool tap_source(const ConvPatchGeometry& g, int64_t y, int64_t x, int64_t i, int64_t j, int64_t* yp,
                       int64_t* xp) {
  *yp = y * g.sh - g.ph + i * g.dh;
  *xp = x * g.sw - g.pw + j * g.dw;
  return *yp >= 0 && *yp < g.Hp && *xp >= 0 && *xp < g.Wp;
}

// The kernel offsets i (along one axis) whose previous window covers output-window coordinate u:
// [first, last), with step the offset of consecutive taps and prev_size the previous window.
MMR_HD Span covering_taps(int64_t u, int64_t step, int64_t prev_size, int64_t k) {
  int64_t first = u - prev_size + 1;
  first = first <= 0 ? 0 : (first + step - 1) / step;
  int64_t last = u / step + 1;
  return {first, last < k ? last : k};
}

// Entry (cin, u, v) of the row of output unit (o, y, x): the sum over the active taps (i, j, c) that
// cover it of weight(o, c, i, j) * slope(c, yp, xp) * prev(c, yp, xp, previous-window entry); zero
// outside the input. The CUDA kernel runs this per entry; it is the gather form of the CPU kernel's
// multiply-adds.
template <typename acc_t, typename Weight, typename Slope, typename Prev>
MMR_HD acc_t conv_row_entry(const ConvPatchGeometry& g, int64_t o, int64_t y, int64_t x, int64_t cin, int64_t u,
                            int64_t v, Weight weight, Slope slope, Prev prev) {
  if (window_pixel(g.out, y, x, cin, u, v) < 0) return acc_t(0);
  const Span is = covering_taps(u, g.step_h, g.Rph, g.kh), js = covering_taps(v, g.step_w, g.Rpw, g.kw);
  acc_t sum = 0;
  for (int64_t i = is.begin; i < is.end; ++i) {
    for (int64_t j = js.begin; j < js.end; ++j) {
      int64_t yp, xp;
      if (!tap_source(g, y, x, i, j, &yp, &xp)) continue;
      const int64_t ep = (cin * g.Rph + u - i * g.step_h) * g.Rpw + v - j * g.step_w;
      for (int64_t c = 0; c < g.C; ++c) {
        const acc_t s = static_cast<acc_t>(slope(c, yp, xp));
        if (s == acc_t(0)) continue;
        sum += static_cast<acc_t>(weight(o, c, i, j)) * s * static_cast<acc_t>(prev(c, yp, xp, ep));
      }
    }
  }
  return sum;
}

}  // namespace mmr
