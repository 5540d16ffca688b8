// C++ unit tests (ctest) of the shared arithmetic in csrc/geometry.h and of the CPU kernels, called
// through the dispatcher as torch.ops.mmr_ext registered them.
#include "conv_rows.h"
#include "geometry.h"
#include "patch_rows.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void expect_near(double actual, double expected, double tol, const char* what) {
  const bool ok = (std::isinf(expected) && actual == expected) || std::fabs(actual - expected) <= tol;
  if (!ok) {
    std::printf("FAIL %s: got %.17g, expected %.17g\n", what, actual, expected);
    ++failures;
  }
}

double norm_of(const std::vector<double>& v, double q) {
  const mmr::NormKind kind = mmr::norm_kind(q);
  mmr::RowStats<double> st;
  for (double x : v) mmr::stats_update<double>(st, x);
  double general = 0;
  if (kind == mmr::NormKind::General) {
    for (double x : v) general += mmr::general_term<double>(x, st.maxabs, q);
  }
  return mmr::norm_from_stats<double>(kind, st, general, q);
}

// The registered op mmr_ext::<name> with the C++ signature of its schema.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Pair = std::tuple<at::Tensor, at::Tensor>;

void test_norms() {
  const std::vector<double> v = {3.0, -4.0, 0.0, 1.0};
  expect_near(norm_of(v, 1.0), 8.0, 1e-15, "l1 norm");
  expect_near(norm_of(v, 2.0), std::sqrt(26.0), 1e-15, "l2 norm");
  expect_near(norm_of(v, INFINITY), 4.0, 0, "linf norm");
  expect_near(norm_of(v, 3.0), std::cbrt(27.0 + 64.0 + 1.0), 1e-13, "l3 norm");
  // no overflow for huge entries with a large exponent
  expect_near(norm_of({1e200, 1e200}, 4.0), 1e200 * std::pow(2.0, 0.25), 1e186, "scaled general norm");
  expect_near(norm_of({0.0, 0.0}, 3.0), 0.0, 0, "zero general norm");
  // gradient of the l2 norm and the split of the linf subgradient among ties
  expect_near(mmr::norm_grad<double>(mmr::NormKind::L2, 3.0, 5.0, 2.0, 1.0), 0.6, 1e-15, "l2 grad");
  expect_near(mmr::norm_grad<double>(mmr::NormKind::Linf, -4.0, 4.0, 1.0, 2.0), -0.5, 0, "linf grad tie");
  expect_near(mmr::norm_grad<double>(mmr::NormKind::General, 2.0, 0.0, 3.0, 1.0), 0.0, 0, "grad of zero row");
}

void test_distances_and_hinge() {
  expect_near(mmr::hyperplane_distance<double>(-3.0, 2.0), 1.5, 0, "distance");
  expect_near(mmr::hyperplane_distance<double>(1.0, 0.0), INFINITY, 0, "zero row is +inf");
  expect_near(mmr::signed_distance<double>(-3.0, 2.0), -1.5, 0, "signed distance");
  expect_near(mmr::hinge<double>(0.5, 2.0), 0.75, 0, "active hinge");
  expect_near(mmr::hinge<double>(3.0, 2.0), 0.0, 0, "inactive hinge");
  expect_near(mmr::hinge<double>(INFINITY, 2.0), 0.0, 0, "hinge at +inf");
  expect_near(mmr::hinge_grad<double>(0.5, 2.0), -0.5, 0, "hinge grad");
  if (!mmr::ranks_before<double>(1.0, 5, 1.0, 7) || mmr::ranks_before<double>(1.0, 7, 1.0, 5)) {
    std::printf("FAIL ties must be broken by index\n");
    ++failures;
  }
}

void test_cpu_ops() {
  at::Tensor rows = at::tensor({3.0, 4.0, 0.0, 0.0, 1.0, -1.0}, at::kDouble).reshape({1, 3, 2});
  at::Tensor f = at::tensor({5.0, 2.0, -1.0, 10.0, 0.0, 3.0}, at::kDouble).reshape({2, 3});
  auto [dist, norm] = op<Pair(const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>, bool)>(
                          "mmr_ext::row_distances")
                          .call(f, rows, {2.0, 1.0}, false);
  expect_near(norm[0][0][0].item<double>(), 5.0, 1e-15, "shared row norm");
  expect_near(norm[1][0][0].item<double>(), 7.0, 1e-15, "second norm from the same pass");
  expect_near(dist[0][0][0].item<double>(), 1.0, 1e-15, "distance sample 0");
  expect_near(dist[0][1][0].item<double>(), 2.0, 1e-15, "distance sample 1 (shared row)");
  expect_near(dist[0][0][1].item<double>(), INFINITY, 0, "zero row");
  expect_near(dist[0][0][2].item<double>(), 1.0 / std::sqrt(2.0), 1e-15, "abs numerator");
  expect_near(dist[1][1][0].item<double>(), 10.0 / 7.0, 1e-15, "l1 dual distance");

  at::Tensor d = at::tensor({0.5, 0.1, 0.1, 2.0, 0.3}, at::kDouble).reshape({1, 5});
  auto [value, index] = op<Pair(const at::Tensor&, int64_t, double)>("mmr_ext::topk_hinge").call(d, 3, 1.0);
  expect_near(index[0][0].item<int64_t>(), 1, 0, "top-k first index (tie -> smaller index)");
  expect_near(index[0][1].item<int64_t>(), 2, 0, "top-k second index");
  expect_near(index[0][2].item<int64_t>(), 4, 0, "top-k third index");
  expect_near(value[0].item<double>(), (0.9 + 0.9 + 0.7) / 3.0, 1e-15, "top-k hinge mean");
  at::Tensor grad = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
                        "mmr_ext::topk_hinge_backward")
                        .call(at::ones({1}, at::kDouble), d, index, 1.0);
  expect_near(grad[0][1].item<double>(), -1.0 / 3.0, 1e-15, "top-k grad selected");
  expect_near(grad[0][0].item<double>(), 0.0, 0, "top-k grad unselected");
}

// One output unit (c, y, x) of a conv walked back: its row on the input is the kernel w[c] placed
// at (y*sh - ph, x*sw - pw) with dilation, cut at the borders (written out from the definition).
void test_conv_transpose_step() {
  const mmr::ConvGeometry g{2, 3, 4, 2, 5, 6, 3, 2, 2, 1, 1, 0, 1, 2};  // C Ho Wo Cin Hin Win kh kw sh sw ph pw dh dw
  const int64_t T = mmr::taps_of(g);
  std::vector<double> w(g.C * T);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.25 * static_cast<double>(i) - 3.0;
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t y = 0; y < g.Ho; ++y) {
      for (int64_t x = 0; x < g.Wo; ++x) {
        std::vector<double> taps(T, 0.0), canvas(mmr::input_size_of(g), 0.0), expected(canvas.size(), 0.0);
        mmr::add_channel_taps<double>(taps.data(), 2.0, w.data() + c * T, T);
        mmr::scatter_taps<double>(g, y, x, taps.data(), canvas.data(), [](double* at, double v) { *at += v; });
        for (int64_t cin = 0; cin < g.Cin; ++cin) {
          for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t j = 0; j < g.kw; ++j) {
              const int64_t oy = y * g.sh - g.ph + i * g.dh, ox = x * g.sw - g.pw + j * g.dw;
              if (oy >= 0 && oy < g.Hin && ox >= 0 && ox < g.Win) {
                expected[(cin * g.Hin + oy) * g.Win + ox] += 2.0 * w[c * T + (cin * g.kh + i) * g.kw + j];
              }
            }
          }
        }
        for (size_t i = 0; i < canvas.size(); ++i) expect_near(canvas[i], expected[i], 0, "placed kernel");
      }
    }
  }
  // the op: a one-hot map's distance is |f| over the norm of the placed (border-cut) kernel
  at::Tensor maps = at::zeros({1, 1, g.C, g.Ho, g.Wo}, at::kDouble);
  maps[0][0][1][0][0] = 1.0;
  at::Tensor weight = at::from_blob(w.data(), {g.C, g.Cin, g.kh, g.kw}, at::kDouble).clone();
  at::Tensor f = at::full({1, 1}, -3.0, at::kDouble);
  using IntList = c10::ArrayRef<int64_t>;
  at::Tensor dist = op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                  const at::Tensor&, IntList, IntList, IntList, IntList, c10::ArrayRef<double>)>(
                        "mmr_ext::conv_transpose_row_distances")
                        .call(f, maps, std::nullopt, weight, {g.sh, g.sw}, {g.ph, g.pw}, {g.dh, g.dw},
                              {g.Cin, g.Hin, g.Win}, {1.0});
  double l1 = 0;  // (y, x) = (0, 0): rows i >= 1 and all columns j (0 and 2) are inside
  for (int64_t cin = 0; cin < g.Cin; ++cin) {
    for (int64_t i = 1; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) l1 += std::fabs(w[T + (cin * g.kh + i) * g.kw + j]);
    }
  }
  expect_near(dist[0][0][0].item<double>(), 3.0 / l1, 1e-15, "fused step distance");
}

// The gather form of the CUDA kernel of patch_linear_rows (gather_pixel over covering positions)
// equals the CPU kernel's scatter of GEMM blocks.
void test_patch_linear_gather_matches_cpu_op() {
  const mmr::PatchGeometry g{3, 2, 2, 5, 4, 2, 2, 1, 2, 7, 6};  // H W Cin Rh Rw Sh Sw Ph Pw Hin Win
  const int64_t n = 2, O = 3, K = 4, L = g.H * g.W, E = g.Cin * g.Rh * g.Rw;
  at::manual_seed(0);
  at::Tensor patches = at::randn({n, O, L, E}, at::kDouble);
  at::Tensor mask = at::rand({n, O, L}, at::kDouble).gt(0.3).to(at::kDouble);
  at::Tensor weight = at::randn({K, O * L}, at::kDouble);
  const double* P = patches.data_ptr<double>();
  const double* M = mask.data_ptr<double>();
  const double* W = weight.data_ptr<double>();
  // window entries outside the input must be zero in the patches (the engine's invariant)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t e = 0; e < E; ++e) {
          const int64_t pixel = mmr::window_pixel(g, l / g.W, l % g.W, e / (g.Rh * g.Rw), (e / g.Rw) % g.Rh, e % g.Rw);
          if (pixel < 0) patches[b][o][l][e] = 0.0;
        }
      }
    }
  }
  using IntList = c10::ArrayRef<int64_t>;
  at::Tensor rows = op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, IntList,
                                  IntList, IntList, IntList, IntList)>("mmr_ext::patch_linear_rows")
             .call(patches, mask, weight, {g.H, g.W}, {g.Cin, g.Rh, g.Rw}, {g.Sh, g.Sw}, {g.Ph, g.Pw},
                   {g.Cin, g.Hin, g.Win});
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t cin = 0; cin < g.Cin; ++cin) {
        for (int64_t iy = 0; iy < g.Hin; ++iy) {
          for (int64_t ix = 0; ix < g.Win; ++ix) {
            const double gathered = mmr::gather_pixel<double>(
                g, O, cin, iy, ix, [&](int64_t o, int64_t l) { return W[k * O * L + o * L + l] * M[(b * O + o) * L + l]; },
                [&](int64_t o, int64_t l, int64_t e) { return P[((b * O + o) * L + l) * E + e]; });
            expect_near(rows[b][k][(cin * g.Hin + iy) * g.Win + ix].item<double>(), gathered, 1e-12,
                        "patch_linear_rows gather form");
          }
        }
      }
    }
  }
}

// The gather form of the CUDA kernel of conv_patch_rows (conv_row_entry) equals the CPU kernel.
void test_conv_row_gather_matches_cpu_op() {
  at::manual_seed(1);
  const int64_t n = 2, C = 3, Hp = 5, Cin = 2, Rp = 3, O = 4, k = 3;
  at::Tensor prev = at::randn({n, C, Hp, Hp, Cin, Rp, Rp}, at::kDouble);
  at::Tensor mask = at::rand({n, C, Hp, Hp}, at::kDouble).gt(0.3).to(at::kDouble);
  at::Tensor weight = at::randn({O, C, k, k}, at::kDouble);
  using IntList = c10::ArrayRef<int64_t>;
  const std::vector<int64_t> stride{2, 1}, padding{1, 1}, dilation{1, 2}, prev_stride{2, 2}, prev_offset{1, 0},
      in_shape{Cin, 10, 9};
  at::Tensor out = op<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, IntList,
                                 IntList, IntList, IntList, IntList, IntList)>("mmr_ext::conv_patch_rows")
                       .call(prev, mask, weight, stride, padding, dilation, prev_stride, prev_offset, in_shape);
  mmr::ConvPatchGeometry g{};
  g.C = C; g.Hp = Hp; g.Wp = Hp; g.Cin = Cin; g.Rph = Rp; g.Rpw = Rp; g.O = O; g.kh = k; g.kw = k;
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1]; g.dh = dilation[0]; g.dw = dilation[1];
  g.step_h = g.dh * prev_stride[0];
  g.step_w = g.dw * prev_stride[1];
  g.out = {out.size(2), out.size(3), Cin, out.size(5), out.size(6), g.sh * prev_stride[0], g.sw * prev_stride[1],
           g.ph * prev_stride[0] + prev_offset[0], g.pw * prev_stride[1] + prev_offset[1], in_shape[1], in_shape[2]};
  auto P = prev.accessor<double, 7>();
  auto M = mask.accessor<double, 4>();
  auto W = weight.accessor<double, 4>();
  auto R = out.accessor<double, 7>();
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t y = 0; y < g.out.H; ++y) {
        for (int64_t x = 0; x < g.out.W; ++x) {
          for (int64_t cin = 0; cin < Cin; ++cin) {
            for (int64_t u = 0; u < g.out.Rh; ++u) {
              for (int64_t v = 0; v < g.out.Rw; ++v) {
                const double gathered = mmr::conv_row_entry<double>(
                    g, o, y, x, cin, u, v, [&](int64_t oo, int64_t c, int64_t i, int64_t j) { return W[oo][c][i][j]; },
                    [&](int64_t c, int64_t yp, int64_t xp) { return M[b][c][yp][xp]; },
                    [&](int64_t c, int64_t yp, int64_t xp, int64_t ep) {
                      return P[b][c][yp][xp][ep / (Rp * Rp)][(ep / Rp) % Rp][ep % Rp];
                    });
                expect_near(R[b][o][y][x][cin][u][v], gathered, 1e-12, "conv_patch_rows gather form");
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  test_norms();
  test_distances_and_hinge();
  test_cpu_ops();
  test_conv_transpose_step();
  test_patch_linear_gather_matches_cpu_op();
  test_conv_row_gather_matches_cpu_op();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all C++ geometry tests passed\n");
  return 0;
}
