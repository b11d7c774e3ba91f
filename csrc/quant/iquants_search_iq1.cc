// Quantizers of the 1.5-1.75 bit grid i-quants IQ1_S and IQ1_M (the IQ2 / IQ3 ones are in
// csrc/quant/iquants_search.cc), byte-identical with llama.cpp's given the same importance
// (tests/test_iquants.py checks SHA-256 figures of ggml_quantize_chunk's output).
//
// Both store each group of 8 values as a point of a 2048-point grid of {-1, 0, 1}^8, shifted as
// a whole by +-0.125 (one shift sign per group of 32 in IQ1_S, per group of 8 in IQ1_M), times a
// 3-bit sub-block scale (odd multiples of d). With only three levels a sub-block's best
// unconstrained rounding can be found exactly: sorted by value, the levels split the values
// into three runs (the lowest get -1, the middle 0, the top +1), so trying every pair of split
// points with prefix sums of w x and w gives every rounding's weighted least-squares scale and
// fit in O(n^2). The best split's groups of 8 that are no grid point take the grid point of
// least weighted squared error among the few nearest to them (the neighbours, all points at the
// three smallest distances), and the scale is refitted to the points chosen.
//
// IQ1_S requires an importance matrix (llama.cpp asserts one: ggml_quantize_requires_imatrix);
// IQ1_M takes weights x^2 without one, as llama.cpp's does.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"
#include "quant/exact_fp.h"  // no FMA contraction in this file
#include "quant/grid_search.h"
#include "quant/iquant_grids.h"
#include "quant/search.h"

namespace pyllm {

namespace {

using quant_search::nearest_int;

// The grid points' values g + shift for the levels 0, 1, 2 (g = -1, 0, 1) under each shift sign.
constexpr float kShiftPlus[3] = {-1 + kIq1Delta, kIq1Delta, 1 + kIq1Delta};
constexpr float kShiftMinus[3] = {-1 - kIq1Delta, -kIq1Delta, 1 - kIq1Delta};

// The IQ1 grid (int8 values -1, 0, 1: levels 0, 1, 2, positions 1, 3, 5), neighbours at the
// three smallest distances, prepared once.
const Grid2Search& iq1_search() {
  static std::once_flag once;
  static Grid2Search g;
  std::call_once(once, [] {
    g.pos.resize(2048);
    for (int j = 0; j < 2048; ++j) {
      for (int i = 0; i < 8; ++i) {
        const auto v = static_cast<int8_t>(static_cast<uint8_t>(kIq1sGrid[j] >> (8 * i)));
        g.pos[static_cast<size_t>(j)][static_cast<size_t>(i)] = static_cast<int8_t>(2 * v + 3);
      }
    }
    g.index(43692, 3, 2);
  });
  return g;
}

// The order of n values, ascending, equal values in index order. llama.cpp sorts (value,
// index) pairs with qsort comparing the values only, so ties fall as glibc's qsort leaves them:
// a merge sort for arrays this small, i.e. stable, which is what this reproduces.
void sort_order(const float* x, int n, int* idx) {
  for (int i = 0; i < n; ++i) idx[i] = i;
  std::stable_sort(idx, idx + n, [x](int a, int b) { return x[a] < x[b]; });
}

// The grid point for the levels L of a group (8 values x, weights w, at scale, shifted values
// xg) that are off the grid (map entry m < 0): the neighbour of least weighted squared error;
// its levels replace L. (If every neighbour's error overflows, llama.cpp scans the whole grid,
// with an indexing slip that reads past the group; pyllm scans it correctly. Finite errors
// never get there.)
int iq1_neighbour(const Grid2Search& g, int m, const float* x, const float* w, float scale,
                  const float* xg, int8_t* L) {
  const uint16_t* nb = g.neighbour_list(m);
  auto error = [&](int j) {
    const auto& p = g.pos[static_cast<size_t>(j)];
    float d2 = 0.0f;
    for (int i = 0; i < 8; ++i) {
      const float q = xg[(p[static_cast<size_t>(i)] - 1) / 2];
      const float diff = scale * q - x[i];
      d2 += w[i] * diff * diff;
    }
    return d2;
  };
  float best = FLT_MAX;
  int index = -1;
  for (int k = 1; k <= nb[0]; ++k) {
    const float d2 = error(nb[k]);
    if (d2 < best) {
      best = d2;
      index = nb[k];
    }
  }
  for (int j = 0; index < 0 && j < static_cast<int>(g.pos.size()); ++j) {
    const float d2 = error(j);
    if (d2 < best) {
      best = d2;
      index = j;
    }
  }
  if (index < 0) throw std::runtime_error("IQ1: no grid point fits (overflowing values)");
  g.set_levels(index, L);
  return index;
}

// Adds one group's weighted least-squares terms at grid point `index` (8 values x, weights w,
// the point's shifted values xg times mult): sum w q x and sum w q^2, for refitting a scale to
// the chosen points.
void add_group_fit(const Grid2Search& g, int index, const float* xg, float mult, const float* x,
                   const float* w, float* sumqx, float* sumq2) {
  const auto& p = g.pos[static_cast<size_t>(index)];
  for (int j = 0; j < 8; ++j) {
    const float q = xg[(p[static_cast<size_t>(j)] - 1) / 2] * mult;
    *sumqx += w[j] * q * x[j];
    *sumq2 += w[j] * q * q;
  }
}

// ---- IQ1_S ----------------------------------------------------------------------------------
// Per sub-block of 32: one shift sign for all of it, 4 grid points, a 3-bit scale; d =
// max scale / 15, stored times 1.125 (llama.cpp's fudge).

void quantize_iq1_s_block(const float* xbl, const float* qw, const Grid2Search& g,
                          BlockIQ1_S* y) {
  constexpr int kBs = 32;
  constexpr float kEps = 1e-12f;
  float scales[QK_K / kBs], weight[kBs], sumx[kBs + 1], sumw[kBs + 1];
  int8_t shifts[QK_K / kBs], L[kBs];
  int idx[kBs];
  std::memset(y, 0, sizeof *y);
  float max_scale = 0.0f;
  float sumx2 = 0.0f;
  for (int i = 0; i < QK_K; ++i) sumx2 += xbl[i] * xbl[i];
  const float sigma2 = 2 * sumx2 / QK_K;
  for (int ib = 0; ib < QK_K / kBs; ++ib) {
    const float* xb = xbl + kBs * ib;
    const float* w = qw + kBs * ib;
    for (int i = 0; i < kBs; ++i) weight[i] = w[i] * std::sqrt(sigma2 + xb[i] * xb[i]);
    float max = std::fabs(xb[0]);
    for (int i = 1; i < kBs; ++i) max = std::max(max, std::fabs(xb[i]));
    scales[ib] = 0.0f;
    shifts[ib] = 1;
    if (max < kEps) continue;
    sort_order(xb, kBs, idx);
    sumx[0] = sumw[0] = 0.0f;
    for (int j = 0; j < kBs; ++j) {
      const int i = idx[j];
      sumx[j + 1] = sumx[j] + weight[i] * xb[i];
      sumw[j + 1] = sumw[j] + weight[i];
    }
    // Runs [0, i1) -> level 0, [i1, i2) -> 1, [i2, 32) -> 2 of the sorted values, under either
    // shift; the fit (sum w x q)^2 / sum w q^2 picks the split, the shift and the scale (whose
    // sign may come out negative: the mirrored rounding).
    float best = -FLT_MAX, scale = max;
    int best1 = -1, best2 = -1, best_shift = 0;
    auto consider = [&](int i1, int i2, const float* v, int shift) {
      const float sumqx = (sumx[i1] - sumx[0]) * v[0] + (sumx[i2] - sumx[i1]) * v[1] +
                          (sumx[kBs] - sumx[i2]) * v[2];
      const float sumq2 = (sumw[i1] - sumw[0]) * v[0] * v[0] +
                          (sumw[i2] - sumw[i1]) * v[1] * v[1] +
                          (sumw[kBs] - sumw[i2]) * v[2] * v[2];
      if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
        scale = sumqx / sumq2;
        best = scale * sumqx;
        best1 = i1;
        best2 = i2;
        best_shift = shift;
      }
    };
    for (int i1 = 0; i1 <= kBs; ++i1) {
      for (int i2 = i1; i2 <= kBs; ++i2) {
        consider(i1, i2, kShiftPlus, 1);
        consider(i1, i2, kShiftMinus, -1);
      }
    }
    if (best1 < 0) continue;  // every weight 0: all codes 0, scale 0
    for (int j = 0; j < kBs; ++j) {
      L[idx[j]] = static_cast<int8_t>(j < best1 ? 0 : j < best2 ? 1 : 2);
    }
    if (scale < 0.0f) {  // mirror: level l -> 2 - l flips the values and the shift
      for (int j = 0; j < kBs; ++j) L[j] = static_cast<int8_t>(2 - L[j]);
      scale = -scale;
      best_shift = -best_shift;
    }
    const float* xg = best_shift == 1 ? kShiftPlus : kShiftMinus;
    int index[kBs / 8];
    bool all_on_grid = true;
    for (int k = 0; k < kBs / 8; ++k) {
      const int m = g.map[static_cast<size_t>(g.code(L + 8 * k))];
      if (m >= 0) {
        index[k] = m;
        continue;
      }
      all_on_grid = false;
      index[k] = iq1_neighbour(g, m, xb + 8 * k, weight + 8 * k, scale, xg, L + 8 * k);
    }
    if (!all_on_grid) {
      float sumqx = 0.0f, sumq2 = 0.0f;
      for (int k = 0; k < kBs / 8; ++k) {
        add_group_fit(g, index[k], xg, 1.0f, xb + 8 * k, weight + 8 * k, &sumqx, &sumq2);
      }
      if (sumqx > 0.0f && sumq2 > 0.0f) scale = sumqx / sumq2;
    }
    uint16_t h = 0;
    for (int k = 0; k < kBs / 8; ++k) {
      y->qs[(kBs / 8) * ib + k] = static_cast<uint8_t>(index[k] & 255);
      h = static_cast<uint16_t>(h | ((index[k] >> 8) << (3 * k)));
    }
    y->qh[ib] = h;
    scales[ib] = scale;
    shifts[ib] = static_cast<int8_t>(best_shift);
    max_scale = std::max(max_scale, scale);
  }
  if (max_scale == 0.0f) return;
  const float d = max_scale / 15;
  y->d = f32_to_f16(d * 1.125f);
  const float id = 1.0f / d;
  for (int ib = 0; ib < QK_K / kBs; ++ib) {
    int l = std::max(0, std::min(7, nearest_int(0.5f * (id * scales[ib] - 1.0f))));
    if (shifts[ib] == -1) l |= 8;
    y->qh[ib] = static_cast<uint16_t>(y->qh[ib] | (l << 12));
  }
}

// ---- IQ1_M ----------------------------------------------------------------------------------
// Per sub-block of 16: a shift sign per group of 8 (so the split search scores 4 sign pairs),
// 2 grid points, a 3-bit scale. The block's d is not max scale / 15 but refitted at the end by
// weighted least squares over the whole block to the chosen points and 3-bit scales, stored
// times 1.1125 (llama.cpp's fudge) spread over the top nibbles of the scale words.

void quantize_iq1_m_block(const float* xbl, const float* qw, const Grid2Search& g,
                          BlockIQ1_M* y) {
  constexpr int kBs = 16;
  constexpr float kEps = 1e-7f;
  // qh bits of the shift signs of the two groups for the sign pairs (+,+), (+,-), (-,+), (-,-)
  constexpr uint8_t kMasks[4] = {0x00, 0x80, 0x08, 0x88};
  float scales[QK_K / kBs], weight[kBs];
  int8_t shifts[QK_K / kBs], L[kBs];
  int idx[kBs];
  std::memset(y, 0, sizeof *y);
  float max_scale = 0.0f;
  float sumx2 = 0.0f;
  for (int i = 0; i < QK_K; ++i) sumx2 += xbl[i] * xbl[i];
  const float sigma2 = 2 * sumx2 / QK_K;
  auto weigh = [&](int ib) {
    const float* xb = xbl + kBs * ib;
    for (int i = 0; i < kBs; ++i) {
      weight[i] = qw != nullptr ? qw[kBs * ib + i] * std::sqrt(sigma2 + xb[i] * xb[i])
                                : xb[i] * xb[i];
    }
  };
  // the shifted values of group k (0, 1) under sign pair s
  auto shifted = [](int s, int k) {
    return (k == 0 ? s < 2 : s % 2 == 0) ? kShiftPlus : kShiftMinus;
  };
  for (int ib = 0; ib < QK_K / kBs; ++ib) {
    const float* xb = xbl + kBs * ib;
    weigh(ib);
    float max = std::fabs(xb[0]);
    for (int i = 1; i < kBs; ++i) max = std::max(max, std::fabs(xb[i]));
    scales[ib] = 0.0f;
    shifts[ib] = 0;
    if (max < kEps) continue;
    sort_order(xb, kBs, idx);
    // Prefix sums per group (a value adds to its own group's sums only), since each group may
    // take the other shift. As the three shifted values are 1 apart, a split's sum w x q is
    // v2 * (sum w x) - P(i1) - P(i2), and sum w q^2 is affine in the prefix weights likewise.
    float px[2][kBs + 1], pw[2][kBs + 1];
    px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0.0f;
    for (int j = 0; j < kBs; ++j) {
      const int i = idx[j];
      const int h = i < kBs / 2 ? 0 : 1;
      px[h][j + 1] = px[h][j] + weight[i] * xb[i];
      px[1 - h][j + 1] = px[1 - h][j];
      pw[h][j + 1] = pw[h][j] + weight[i];
      pw[1 - h][j + 1] = pw[1 - h][j];
    }
    const float txs[2] = {px[0][kBs], px[1][kBs]};
    const float tws[2] = {pw[0][kBs], pw[1][kBs]};
    const float p2 = kShiftPlus[2], m2 = kShiftMinus[2];
    const float cp1 = kShiftPlus[0] * kShiftPlus[0] - kShiftPlus[1] * kShiftPlus[1];
    const float cp2 = kShiftPlus[1] * kShiftPlus[1] - kShiftPlus[2] * kShiftPlus[2];
    const float cm1 = kShiftMinus[0] * kShiftMinus[0] - kShiftMinus[1] * kShiftMinus[1];
    const float cm2 = kShiftMinus[1] * kShiftMinus[1] - kShiftMinus[2] * kShiftMinus[2];
    float best = -FLT_MAX, scale = max;
    int best1 = -1, best2 = -1, best_k = -1;
    for (int i1 = 0; i1 <= kBs; ++i1) {
      for (int i2 = i1; i2 <= kBs; ++i2) {
        float qx_p[2], qx_m[2], q2_p[2], q2_m[2];
        for (int h = 0; h < 2; ++h) {
          const float sx = px[h][i1] + px[h][i2];
          qx_p[h] = txs[h] * p2 - sx;
          qx_m[h] = txs[h] * m2 - sx;
          q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
          q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
        }
        const float sumqx[4] = {qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1],
                                qx_m[0] + qx_m[1]};
        const float sumq2[4] = {q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1],
                                q2_m[0] + q2_m[1]};
        for (int k = 0; k < 4; ++k) {
          if (sumq2[k] > 0.0f && sumqx[k] * sumqx[k] > best * sumq2[k]) {
            scale = sumqx[k] / sumq2[k];
            best = scale * sumqx[k];
            best1 = i1;
            best2 = i2;
            best_k = k;
          }
        }
      }
    }
    if (best1 < 0) continue;
    for (int j = 0; j < kBs; ++j) {
      L[idx[j]] = static_cast<int8_t>(j < best1 ? 0 : j < best2 ? 1 : 2);
    }
    if (scale < 0.0f) {  // mirror: levels 2 - l, both shift signs flipped
      for (int j = 0; j < kBs; ++j) L[j] = static_cast<int8_t>(2 - L[j]);
      scale = -scale;
      best_k = 3 - best_k;
    }
    int index[2];
    bool all_on_grid = true;
    for (int k = 0; k < 2; ++k) {
      const int m = g.map[static_cast<size_t>(g.code(L + 8 * k))];
      if (m >= 0) {
        index[k] = m;
        continue;
      }
      all_on_grid = false;
      index[k] = iq1_neighbour(g, m, xb + 8 * k, weight + 8 * k, scale, shifted(best_k, k),
                               L + 8 * k);
    }
    if (!all_on_grid) {
      float sumqx = 0.0f, sumq2 = 0.0f;
      for (int k = 0; k < 2; ++k) {
        add_group_fit(g, index[k], shifted(best_k, k), 1.0f, xb + 8 * k, weight + 8 * k, &sumqx,
                      &sumq2);
      }
      if (sumqx > 0.0f && sumq2 > 0.0f) scale = sumqx / sumq2;
    }
    y->qs[2 * ib] = static_cast<uint8_t>(index[0] & 255);
    y->qs[2 * ib + 1] = static_cast<uint8_t>(index[1] & 255);
    y->qh[ib] = static_cast<uint8_t>((index[0] >> 8) | ((index[1] >> 8) << 4));
    scales[ib] = scale;
    shifts[ib] = static_cast<int8_t>(best_k);
    max_scale = std::max(max_scale, scale);
  }
  if (max_scale == 0.0f) return;
  uint16_t sc[4] = {0, 0, 0, 0};
  float d = max_scale / 15;
  const float id = 1.0f / d;
  // The final d: least squares over every sub-block (the all-zero ones too, at grid point 0)
  // against the chosen points times their 3-bit scales 2 l + 1.
  float sumqx = 0.0f, sumq2 = 0.0f;
  for (int ib = 0; ib < QK_K / kBs; ++ib) {
    const int l = std::max(0, std::min(7, nearest_int(0.5f * (id * scales[ib] - 1.0f))));
    sc[ib / 4] = static_cast<uint16_t>(sc[ib / 4] | (l << (3 * (ib % 4))));
    y->qh[ib] = static_cast<uint8_t>(y->qh[ib] | kMasks[shifts[ib]]);
    const float* xb = xbl + kBs * ib;
    weigh(ib);
    for (int k = 0; k < 2; ++k) {
      const int index = y->qs[2 * ib + k] | ((y->qh[ib] << (8 - 4 * k)) & 0x700);
      add_group_fit(g, index, shifted(shifts[ib], k), static_cast<float>(2 * l + 1), xb + 8 * k,
                    weight + 8 * k, &sumqx, &sumq2);
    }
  }
  if (sumq2 > 0.0f) d = sumqx / sumq2;
  const uint16_t s = f32_to_f16(d * 1.1125f);
  sc[0] = static_cast<uint16_t>(sc[0] | ((s & 0x000f) << 12));
  sc[1] = static_cast<uint16_t>(sc[1] | ((s & 0x00f0) << 8));
  sc[2] = static_cast<uint16_t>(sc[2] | ((s & 0x0f00) << 4));
  sc[3] = static_cast<uint16_t>(sc[3] | (s & 0xf000));
  for (int w = 0; w < 4; ++w) {  // little-endian words
    y->scales[2 * w] = static_cast<uint8_t>(sc[w] & 255);
    y->scales[2 * w + 1] = static_cast<uint8_t>(sc[w] >> 8);
  }
}

}  // namespace

void quantize_row_iq1_s_weighted(const float* x, BlockIQ1_S* y, int64_t n, const float* qw) {
  if (qw == nullptr) {
    throw std::invalid_argument("IQ1_S can only be quantized with an importance matrix");
  }
  const Grid2Search& g = iq1_search();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    quantize_iq1_s_block(x + QK_K * i, qw + QK_K * i, g, y + i);
  }
}

void quantize_row_iq1_m_weighted(const float* x, BlockIQ1_M* y, int64_t n, const float* qw) {
  const Grid2Search& g = iq1_search();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    quantize_iq1_m_block(x + QK_K * i, qw != nullptr ? qw + QK_K * i : nullptr, g, y + i);
  }
}

void quantize_row_iq1_m(const float* x, BlockIQ1_M* y, int64_t n) {
  quantize_row_iq1_m_weighted(x, y, n, nullptr);
}

}  // namespace pyllm
