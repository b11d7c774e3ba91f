// Quantizers of the 2-3 bit grid i-quants, which choose each group of 8 (IQ2) or 4 (IQ3)
// magnitudes among a fixed set of grid points and so need a search: IQ2_XXS, IQ2_XS, IQ2_S,
// IQ3_XXS, IQ3_S (IQ1_S and IQ1_M: csrc/quant/iquants_search_iq1.cc; the grid itself:
// csrc/quant/grid_search.h). IQ2_XXS and IQ2_XS need an importance matrix (llama.cpp refuses
// them without one, and so does pyllm); the others take weights from the values alone without
// one, as llama.cpp's. They reproduce llama.cpp's quantizer byte for byte given the same
// importance (tests/test_iquants.py checks SHA-256 figures of its output), so files and their
// quality are interchangeable.
//
// IQ2_XXS, per super-block of 256: each sub-block of 32 gets a scale, each group of 8 a grid
// point (8 magnitudes from {1, 3, 5} in units of the scale) and 8 signs with an even number of
// minus signs (the 8th is implied by the parity of the stored 7). The search works on |x|:
// an odd number of negative values flips the sign of the least important one. A first scale
// comes from a weighted fit of the magnitudes to the levels 0..3, then 13 trial scales around
// it each round every value to its nearest level; a group whose rounded levels are not a grid
// point takes the grid point nearest in weighted squared error among the few points closest to
// it (precomputed: the "neighbours", all points at the two smallest distances from it). The
// trial with the best weighted least-squares fit wins; its scale is refitted to its grid points.
// The 8 sub-block scales are finally stored as 4-bit multiples of max_scale / 31. The other
// types run the same trial search (trial_search) with their own trial count, step, grid and
// refit rule, described at each.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"
#include "quant/exact_fp.h"  // no FMA contraction in this file
#include "quant/grid_search.h"
#include "quant/iquant_grids.h"
#include "quant/search.h"

namespace pyllm {

namespace {

using quant_search::kGroupMaxEps;
using quant_search::make_positive_quants;
using quant_search::nearest_int;

// The magnitudes of a group of 8 into xval and its sign bits, with an even number of minus
// signs as the IQ2 / IQ3_XXS sign tables can store (the 8th sign is the parity of the 7): an
// odd count flips the sign of the least important value (smallest weight * x^2). Returns the
// 7 stored bits.
uint8_t even_signs(const float* x, const float* weight, float* xval) {
  int nflip = 0;
  uint8_t s = 0;
  for (int i = 0; i < 8; ++i) {
    xval[i] = x[i] >= 0.0f ? x[i] : -x[i];
    if (x[i] < 0.0f) {
      ++nflip;
      s = static_cast<uint8_t>(s | (1 << i));
    }
  }
  if (nflip % 2) {
    int imin = 0;
    float min = weight[0] * x[0] * x[0];
    for (int i = 1; i < 8; ++i) {
      const float ax = weight[i] * x[i] * x[i];
      if (ax < min) {
        min = ax;
        imin = i;
      }
    }
    xval[imin] = -xval[imin];
    s = static_cast<uint8_t>(s ^ (1 << imin));
  }
  return static_cast<uint8_t>(s & 127);
}

// The level (0..kMaxQ-1) of n magnitudes at inverse scale id: positions 2 l + 1 nearest to x.
void round_levels(int n, const float* xval, float id, int kMaxQ, int8_t* L) {
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(0.5f * (id * xval[i] - 1.0f));
    L[i] = static_cast<int8_t>(std::max(0, std::min(kMaxQ - 1, l)));
  }
}

// Weighted least-squares terms of n magnitudes against the positions 2 L + 1: returns
// sum w x q and writes sum w q^2 (the best scale is their ratio).
float grid_fit(int n, const float* weight, const float* xval, const int8_t* L, float* sumq2) {
  float sumqx = 0.0f, q2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float q = static_cast<float>(2 * L[i] + 1);
    sumqx += weight[i] * xval[i] * q;
    q2 += weight[i] * q * q;
  }
  *sumq2 = q2;
  return sumqx;
}

// An IQ2 grid (magnitudes 8, 25, 43: the levels 0, 1, 2, positions 1, 3, 5) prepared once.
// The magnitudes of a group of 8 into xval and its 8 sign bits as they are (IQ2_S and IQ3_S
// store every sign).
uint8_t plain_signs(const float* x, float* xval) {
  uint8_t s = 0;
  for (int i = 0; i < 8; ++i) {
    xval[i] = x[i] >= 0.0f ? x[i] : -x[i];
    if (x[i] < 0.0f) s = static_cast<uint8_t>(s | (1 << i));
  }
  return s;
}

// Which groups the trial search puts through a last rounding at its winning scale.
enum class Refit {
  kAll,             // every group, always (IQ2_XXS)
  kAllIfOffGrid,    // every group, when any of the winner's groups was off the grid (IQ3_S)
  kOffGridOnly,     // only the winner's groups that were off the grid (IQ2_XS, IQ2_S, IQ3_XXS)
};

// The trial-scale search every IQ2 / IQ3 grid type runs on a sub-block of n magnitudes (groups
// of N, at most 8 groups of a sub-block of at most 32): 2 half + 1 inverse scales
// (2 kMaxQ - 1 + step is) / top, is = -half..half, each rounding every magnitude to its
// nearest level and every group to a grid point (its own levels, or the weighted-nearest of the
// neighbours of those levels); the trial whose points fit the magnitudes best (largest
// (sum w x q)^2 / sum w q^2, i.e. least weighted squared error at the least-squares scale) is
// kept with that scale. Then `refit` groups are rounded again at the winning scale and the
// scale refitted to the final points. `scale` is the answer if no trial fits (all weights 0);
// `off_grid0` what the groups count as then. Writes the levels to L, returns the scale (its
// sign is the sign flip of the whole sub-block when negative).
template <int N, int kBits>
float trial_search(const GridSearch<N, kBits>& g, int n, int kMaxQ, const float* xval,
                   const float* weight, const float* waux, float top, int half, float step,
                   float scale, bool off_grid0, Refit refit, int8_t* L) {
  const int ngroups = n / N;
  int8_t Laux[32];
  bool on_grid[8], on_grid_aux[8];
  for (int k = 0; k < ngroups; ++k) on_grid[k] = !off_grid0;
  float best = 0.0f;
  for (int is = -half; is <= half; ++is) {
    const float id = (2 * kMaxQ - 1 + static_cast<float>(is) * step) / top;
    const float this_scale = 1.0f / id;
    for (int k = 0; k < ngroups; ++k) {
      round_levels(N, xval + N * k, id, kMaxQ, Laux + N * k);
      g.point(xval + N * k, waux + N * k, this_scale, Laux + N * k, &on_grid_aux[k]);
    }
    float sumq2;
    const float sumqx = grid_fit(n, weight, xval, Laux, &sumq2);
    if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
      scale = sumqx / sumq2;
      best = scale * sumqx;
      std::memcpy(L, Laux, static_cast<size_t>(n));
      std::memcpy(on_grid, on_grid_aux, static_cast<size_t>(ngroups) * sizeof(bool));
    }
  }
  bool any_off = false;
  for (int k = 0; k < ngroups; ++k) any_off = any_off || !on_grid[k];
  if ((refit == Refit::kAll || any_off) && scale > 0.0f) {
    const float id = 1.0f / scale;
    for (int k = 0; k < ngroups; ++k) {
      if (refit == Refit::kOffGridOnly && on_grid[k]) continue;
      round_levels(N, xval + N * k, id, kMaxQ, L + N * k);
      bool unused;
      g.point(xval + N * k, waux + N * k, scale, L + N * k, &unused);
    }
    float sumq2;
    const float sumqx = grid_fit(n, weight, xval, L, &sumq2);
    if (sumq2 > 0.0f) scale = sumqx / sumq2;
  }
  return scale;
}

// The sum of squares of a super-block (sigma2 = factor * it / QK_K weighs each value by
// sqrt(sigma2 + x^2) on top of its importance: large values count a little more).
float sum_squares(const float* xbl) {
  float sumx2 = 0.0f;
  for (int i = 0; i < QK_K; ++i) sumx2 += xbl[i] * xbl[i];
  return sumx2;
}

// A 4-bit sub-block scale: the odd multiple 2 l + 1 of d / 2 nearest to scale (id = 1 / d).
int scale4(float id, float scale) {
  return std::max(0, std::min(15, nearest_int(0.5f * (id * scale - 1.0f))));
}

// An IQ2 grid (magnitudes 8, 25, 43: the levels 0, 1, 2, positions 1, 3, 5) prepared once;
// nwant: how many of the smallest distances its neighbour lists take.
Grid2Search make_grid2(const uint64_t* grid, int size, int nwant) {
  Grid2Search g;
  g.pos.resize(static_cast<size_t>(size));
  for (int j = 0; j < size; ++j) {
    for (int i = 0; i < 8; ++i) {
      const auto v = static_cast<uint8_t>(grid[j] >> (8 * i));
      g.pos[static_cast<size_t>(j)][static_cast<size_t>(i)] =
          static_cast<int8_t>(v == 0x08 ? 1 : v == 0x19 ? 3 : 5);
    }
  }
  g.index(43692, nwant, 2);  // codes with every level <= 2: at most 0b10...10 = 43690
  return g;
}

const Grid2Search& iq2xxs_search() {
  static std::once_flag once;
  static Grid2Search g;
  std::call_once(once, [] { g = make_grid2(kIq2xxsGrid, 256, 2); });
  return g;
}

const Grid2Search& iq2xs_search() {
  static std::once_flag once;
  static Grid2Search g;
  std::call_once(once, [] { g = make_grid2(kIq2xsGrid, 512, 2); });
  return g;
}

// IQ2_S's 1024 points are dense enough that llama.cpp takes only the nearest distance.
const Grid2Search& iq2s_search() {
  static std::once_flag once;
  static Grid2Search g;
  std::call_once(once, [] { g = make_grid2(kIq2sGrid, 1024, 1); });
  return g;
}

// The grid point of a group's final levels (which the search has put on the grid).
template <int N, int kBits>
int grid_index(const GridSearch<N, kBits>& g, const int8_t* L, const char* type) {
  const int index = g.map[static_cast<size_t>(g.code(L))];
  if (index < 0) {
    throw std::logic_error(std::string(type) + ": levels off the grid after the search");
  }
  return index;
}

void quantize_iq2_xxs_block(const float* xbl, const float* qw, const Grid2Search& g,
                            BlockIQ2_XXS* y) {
  constexpr int kMaxQ = 3;
  float scales[QK_K / 32];
  float weight[32], waux[32], xval[32];
  int8_t L[32] = {};
  uint8_t signs[4];
  uint32_t q2[2 * (QK_K / 32)] = {};
  y->d = f32_to_f16(0.0f);
  float max_scale = 0.0f;
  const float sigma2 = sum_squares(xbl) / QK_K;
  for (int ib = 0; ib < QK_K / 32; ++ib) {
    const float* xb = xbl + 32 * ib;
    const float* w32 = qw + 32 * ib;
    for (int i = 0; i < 32; ++i) weight[i] = w32[i] * std::sqrt(sigma2 + xb[i] * xb[i]);
    for (int i = 0; i < 32; ++i) waux[i] = std::sqrt(weight[i]);
    for (int k = 0; k < 4; ++k) {
      signs[k] = even_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k);
    }
    float max = xval[0];
    for (int i = 1; i < 32; ++i) max = std::max(max, xval[i]);
    if (max < kGroupMaxEps) {
      scales[ib] = 0.0f;
      continue;  // all codes 0 (q2 is zero-initialized), signs unused
    }
    // The trials centre on a first weighted fit of the magnitudes to the levels 0..3.
    uint8_t L0[32];
    const float scale0 = make_positive_quants(32, kMaxQ + 1, xval, L0, weight);
    const float eff_max = scale0 * kMaxQ;
    if (eff_max <= 0.0f) {
      scales[ib] = 0.0f;
      continue;
    }
    float scale = trial_search(g, 32, kMaxQ, xval, weight, waux, eff_max, 6, 0.1f, scale0, false,
                               Refit::kAll, L);
    if (scale < 0.0f) {  // the scale is stored unsigned: flip it and the signs
      scale = -scale;
      for (int k = 0; k < 4; ++k) signs[k] = static_cast<uint8_t>(~signs[k] & 127);
    }
    for (int k = 0; k < 4; ++k) {
      const int index = grid_index(g, L + 8 * k, "IQ2_XXS");
      q2[2 * ib] |= static_cast<uint32_t>(index) << (8 * k);
      q2[2 * ib + 1] |= static_cast<uint32_t>(signs[k]) << (7 * k);
    }
    scales[ib] = scale;
    max_scale = std::max(max_scale, scale);
  }
  if (max_scale == 0.0f) {
    std::memset(y->qs, 0, sizeof y->qs);
    return;
  }
  const float d = max_scale / 31.0f;
  y->d = f32_to_f16(d);
  const float id = 1.0f / d;
  for (int ib = 0; ib < QK_K / 32; ++ib) {
    q2[2 * ib + 1] |= static_cast<uint32_t>(scale4(id, scales[ib])) << 28;
  }
  std::memcpy(y->qs, q2, sizeof y->qs);
}

// ---- IQ3_S ----------------------------------------------------------------------------------
// Per super-block of 256, sub-blocks of 32: each group of 4 magnitudes is a point of the
// 512-point grid (levels 0..7, positions 2 l + 1), 8 explicit signs per 8 values, a 4-bit scale
// per sub-block (odd multiples of d). The search is IQ2_XXS's with 19 trial scales; the grid
// neighbours are those at the three smallest distances. Works without an importance matrix
// (weights x^2), as llama.cpp's.

const Grid3Search& iq3s_search() {
  static std::once_flag once;
  static Grid3Search g;
  std::call_once(once, [] {
    g.pos.resize(512);  // the grid stores each element as its position 2 l + 1
    for (int j = 0; j < 512; ++j) {
      for (int i = 0; i < 4; ++i) {
        g.pos[static_cast<size_t>(j)][static_cast<size_t>(i)] =
            static_cast<int8_t>((kIq3sGrid[j] >> (8 * i)) & 0xFF);
      }
    }
    g.index(4096, 3, 7);
  });
  return g;
}

void quantize_iq3_s_block(const float* xbl, const float* qw, const Grid3Search& g,
                          BlockIQ3_S* y) {
  constexpr int kMaxQ = 8, kBs = 32, kBs4 = kBs / 4, kBs8 = kBs / 8;
  float scales[QK_K / kBs], weight[kBs], waux[kBs], xval[kBs];
  int8_t L[kBs];
  uint8_t block_signs[kBs8];
  std::memset(y, 0, sizeof *y);
  float max_scale = 0.0f;
  const float sigma2 = 2 * sum_squares(xbl) / QK_K;
  for (int ib = 0; ib < QK_K / kBs; ++ib) {
    const float* xb = xbl + kBs * ib;
    for (int i = 0; i < kBs; ++i) {
      weight[i] = qw != nullptr ? qw[kBs * ib + i] * std::sqrt(sigma2 + xb[i] * xb[i])
                                : xb[i] * xb[i];
    }
    for (int i = 0; i < kBs; ++i) waux[i] = std::sqrt(weight[i]);
    for (int k = 0; k < kBs8; ++k) block_signs[k] = plain_signs(xb + 8 * k, xval + 8 * k);
    float max = xval[0];
    for (int i = 1; i < kBs; ++i) max = std::max(max, xval[i]);
    std::memset(L, 0, kBs);
    if (max == 0.0f) {
      // An all-zero sub-block: scale 0, codes 0. (llama.cpp's quantizer skips it without
      // moving on its write positions, which shifts the codes of the sub-blocks after it; pyllm
      // writes every sub-block in its place, so its bytes differ from llama.cpp's only then.)
      scales[ib] = 0.0f;
      continue;
    }
    float scale = trial_search(g, kBs, kMaxQ, xval, weight, waux, max, 9, 0.2f,
                               max / (2 * kMaxQ - 1), true, Refit::kAllIfOffGrid, L);
    if (scale < 0.0f) {  // the scale is stored unsigned: flip it and the signs
      scale = -scale;
      for (int k = 0; k < kBs8; ++k) block_signs[k] = static_cast<uint8_t>(~block_signs[k]);
    }
    for (int k = 0; k < kBs4; ++k) {
      const int index = grid_index(g, L + 4 * k, "IQ3_S");
      y->qs[kBs4 * ib + k] = static_cast<uint8_t>(index & 255);
      const int bit = kBs4 * ib + k;
      y->qh[bit / 8] = static_cast<uint8_t>(y->qh[bit / 8] | ((index >> 8) << (bit % 8)));
    }
    std::memcpy(y->signs + kBs8 * ib, block_signs, kBs8);
    scales[ib] = scale;
    max_scale = std::max(max_scale, scale);
  }
  if (max_scale == 0.0f) return;
  const float d = max_scale / 31.0f;
  y->d = f32_to_f16(d * 1.033f);
  const float id = 1.0f / d;
  for (int ib = 0; ib < QK_K / kBs; ib += 2) {
    y->scales[ib / 2] =
        static_cast<uint8_t>(scale4(id, scales[ib]) | (scale4(id, scales[ib + 1]) << 4));
  }
}

// ---- IQ3_XXS --------------------------------------------------------------------------------
// As IQ3_S but the 256-point grid (neighbours at the two smallest distances), IQ2_XXS's signs
// (7 stored bits, an even count: an odd one flips the least important value), 31 trial scales,
// only the groups off the grid refitted, and a 1.0125 fudge on d (llama.cpp's).

const Grid3Search& iq3xxs_search() {
  static std::once_flag once;
  static Grid3Search g;
  std::call_once(once, [] {
    static const uint8_t kMagnitudes[8] = {0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3e};
    g.pos.resize(256);
    for (int j = 0; j < 256; ++j) {
      for (int i = 0; i < 4; ++i) {
        const auto v = static_cast<uint8_t>(kIq3xxsGrid[j] >> (8 * i));
        const int l = static_cast<int>(std::find(kMagnitudes, kMagnitudes + 8, v) - kMagnitudes);
        if (l == 8) throw std::logic_error("IQ3_XXS grid value outside its levels");
        g.pos[static_cast<size_t>(j)][static_cast<size_t>(i)] = static_cast<int8_t>(2 * l + 1);
      }
    }
    g.index(4096, 2, 7);
  });
  return g;
}

void quantize_iq3_xxs_block(const float* xbl, const float* qw, const Grid3Search& g,
                            BlockIQ3_XXS* y) {
  constexpr int kMaxQ = 8;
  constexpr float kEps = 1e-8f;
  float scales[QK_K / 32], weight[32], waux[32], xval[32];
  int8_t L[32];
  uint8_t signs[4];
  uint8_t q3[QK_K / 4 + QK_K / 8] = {};  // the 64 grid indices, then 8 words of signs + scale
  y->d = f32_to_f16(0.0f);
  float max_scale = 0.0f;
  const float sigma2 = 2 * sum_squares(xbl) / QK_K;
  for (int ib = 0; ib < QK_K / 32; ++ib) {
    const float* xb = xbl + 32 * ib;
    for (int i = 0; i < 32; ++i) {
      weight[i] = qw != nullptr ? qw[32 * ib + i] * std::sqrt(sigma2 + xb[i] * xb[i])
                                : xb[i] * xb[i];
    }
    for (int i = 0; i < 32; ++i) waux[i] = std::sqrt(weight[i]);
    for (int k = 0; k < 4; ++k) {
      signs[k] = even_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k);
    }
    float max = xval[0];
    for (int i = 1; i < 32; ++i) max = std::max(max, xval[i]);
    std::memset(L, 0, 32);
    if (max < kEps) {
      scales[ib] = 0.0f;
      continue;
    }
    float scale = trial_search(g, 32, kMaxQ, xval, weight, waux, max, 15, 0.2f,
                               max / (2 * kMaxQ - 1), false, Refit::kOffGridOnly, L);
    if (scale < 0.0f) {
      scale = -scale;
      for (int k = 0; k < 4; ++k) signs[k] = static_cast<uint8_t>(~signs[k] & 127);
    }
    for (int k = 0; k < 8; ++k) {
      q3[8 * ib + k] = static_cast<uint8_t>(grid_index(g, L + 4 * k, "IQ3_XXS"));
    }
    const uint32_t ss = static_cast<uint32_t>(signs[0]) | (static_cast<uint32_t>(signs[1]) << 7) |
                        (static_cast<uint32_t>(signs[2]) << 14) |
                        (static_cast<uint32_t>(signs[3]) << 21);
    std::memcpy(q3 + QK_K / 4 + 4 * ib, &ss, 4);
    scales[ib] = scale;
    max_scale = std::max(max_scale, scale);
  }
  if (max_scale == 0.0f) {
    std::memset(y->qs, 0, sizeof y->qs);
    return;
  }
  const float d = max_scale / 31.0f;
  y->d = f32_to_f16(d * 1.0125f);
  const float id = 1.0f / d;
  for (int ib = 0; ib < QK_K / 32; ++ib) {
    uint32_t ss;
    std::memcpy(&ss, q3 + QK_K / 4 + 4 * ib, 4);
    ss |= static_cast<uint32_t>(scale4(id, scales[ib])) << 28;
    std::memcpy(q3 + QK_K / 4 + 4 * ib, &ss, 4);
  }
  std::memcpy(y->qs, q3, sizeof y->qs);
}

// ---- IQ2_XS ---------------------------------------------------------------------------------
// IQ2_XXS's search per sub-block of 16 (two groups of 8; a 4-bit scale per 16) over the
// 512-point grid: a first scale max / 5, 19 trial scales, the off-grid groups refitted; each
// group stored as a 16-bit word, 9-bit index and 7 sign bits.
void quantize_iq2_xs_block(const float* xbl, const float* qw, const Grid2Search& g,
                           BlockIQ2_XS* y) {
  constexpr int kMaxQ = 3;
  float scales[QK_K / 16], weight[16], waux[16], xval[16];
  int8_t L[16];
  uint8_t signs[2];
  uint16_t q2[QK_K / 8] = {};
  y->d = f32_to_f16(0.0f);
  std::memset(y->scales, 0, sizeof y->scales);
  float max_scale = 0.0f;
  const float sigma2 = sum_squares(xbl) / QK_K;
  for (int ib = 0; ib < QK_K / 16; ++ib) {
    const float* xb = xbl + 16 * ib;
    for (int i = 0; i < 16; ++i) weight[i] = qw[16 * ib + i] * std::sqrt(sigma2 + xb[i] * xb[i]);
    for (int i = 0; i < 16; ++i) waux[i] = std::sqrt(weight[i]);
    for (int k = 0; k < 2; ++k) {
      signs[k] = even_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k);
    }
    float max = xval[0];
    for (int i = 1; i < 16; ++i) max = std::max(max, xval[i]);
    std::memset(L, 0, 16);
    if (max < kGroupMaxEps) {
      scales[ib] = 0.0f;
      continue;
    }
    float scale = trial_search(g, 16, kMaxQ, xval, weight, waux, max, 9, 0.1f,
                               max / (2 * kMaxQ - 1), false, Refit::kOffGridOnly, L);
    if (scale < 0.0f) {
      scale = -scale;
      for (int k = 0; k < 2; ++k) signs[k] = static_cast<uint8_t>(~signs[k] & 127);
    }
    for (int k = 0; k < 2; ++k) {
      const int index = grid_index(g, L + 8 * k, "IQ2_XS");
      q2[2 * ib + k] = static_cast<uint16_t>(index | (signs[k] << 9));
    }
    scales[ib] = scale;
    max_scale = std::max(max_scale, scale);
  }
  if (max_scale == 0.0f) {
    std::memset(y->qs, 0, sizeof y->qs);
    return;
  }
  const float d = max_scale / 31.0f;
  y->d = f32_to_f16(d);
  const float id = 1.0f / d;
  for (int ib = 0; ib < QK_K / 16; ++ib) {
    const int l = scale4(id, scales[ib]);
    y->scales[ib / 2] = static_cast<uint8_t>(ib % 2 == 0 ? l : (y->scales[ib / 2] | (l << 4)));
  }
  std::memcpy(y->qs, q2, sizeof y->qs);
}

// ---- IQ2_S ----------------------------------------------------------------------------------
// IQ2_XS's search and scales per sub-block of 16 over the 1024-point grid (a 10-bit index per
// group of 8), with the signs stored as they are (8 bits, no parity trick) and so no flipped
// value; llama.cpp's weights are those of the IQ3 types (sigma2 twice the mean square), its
// sub-blocks below 1e-8 all zero, its d fudged by 0.9875. Without an importance matrix the
// weights are sigma2 / 4 + x^2, as llama.cpp's (it quantizes IQ2_S without one too).
void quantize_iq2_s_block(const float* xbl, const float* qw, const Grid2Search& g,
                          BlockIQ2_S* y) {
  constexpr int kMaxQ = 3;
  constexpr float kEps = 1e-8f;
  float scales[QK_K / 16], weight[16], waux[16], xval[16];
  int8_t L[16];
  uint8_t signs[2];
  std::memset(y, 0, sizeof *y);
  float max_scale = 0.0f;
  const float sigma2 = 2 * sum_squares(xbl) / QK_K;
  for (int ib = 0; ib < QK_K / 16; ++ib) {
    const float* xb = xbl + 16 * ib;
    for (int i = 0; i < 16; ++i) {
      weight[i] = qw != nullptr ? qw[16 * ib + i] * std::sqrt(sigma2 + xb[i] * xb[i])
                                : 0.25f * sigma2 + xb[i] * xb[i];
    }
    for (int i = 0; i < 16; ++i) waux[i] = std::sqrt(weight[i]);
    for (int k = 0; k < 2; ++k) signs[k] = plain_signs(xb + 8 * k, xval + 8 * k);
    float max = xval[0];
    for (int i = 1; i < 16; ++i) max = std::max(max, xval[i]);
    std::memset(L, 0, 16);
    if (max < kEps) {
      scales[ib] = 0.0f;
      continue;
    }
    float scale = trial_search(g, 16, kMaxQ, xval, weight, waux, max, 9, 0.1f,
                               max / (2 * kMaxQ - 1), false, Refit::kOffGridOnly, L);
    if (scale < 0.0f) {
      scale = -scale;
      for (int k = 0; k < 2; ++k) signs[k] = static_cast<uint8_t>(~signs[k]);
    }
    for (int k = 0; k < 2; ++k) {
      const int index = grid_index(g, L + 8 * k, "IQ2_S");
      const int i8 = 2 * ib + k;
      y->qs[i8] = static_cast<uint8_t>(index & 255);
      y->qh[i8 / 4] = static_cast<uint8_t>(y->qh[i8 / 4] | ((index >> 8) << (2 * (i8 % 4))));
      y->qs[QK_K / 8 + i8] = signs[k];
    }
    scales[ib] = scale;
    max_scale = std::max(max_scale, scale);
  }
  if (max_scale == 0.0f) return;
  const float d = max_scale / 31.0f;
  y->d = f32_to_f16(d * 0.9875f);
  const float id = 1.0f / d;
  for (int ib = 0; ib < QK_K / 16; ib += 2) {
    y->scales[ib / 2] =
        static_cast<uint8_t>(scale4(id, scales[ib]) | (scale4(id, scales[ib + 1]) << 4));
  }
}

}  // namespace

void quantize_row_iq2_xs_weighted(const float* x, BlockIQ2_XS* y, int64_t n, const float* qw) {
  if (qw == nullptr) {
    throw std::invalid_argument("IQ2_XS can only be quantized with an importance matrix");
  }
  const Grid2Search& g = iq2xs_search();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    quantize_iq2_xs_block(x + QK_K * i, qw + QK_K * i, g, y + i);
  }
}

void quantize_row_iq2_s_weighted(const float* x, BlockIQ2_S* y, int64_t n, const float* qw) {
  const Grid2Search& g = iq2s_search();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    quantize_iq2_s_block(x + QK_K * i, qw != nullptr ? qw + QK_K * i : nullptr, g, y + i);
  }
}

void quantize_row_iq2_s(const float* x, BlockIQ2_S* y, int64_t n) {
  quantize_row_iq2_s_weighted(x, y, n, nullptr);
}

void quantize_row_iq3_xxs_weighted(const float* x, BlockIQ3_XXS* y, int64_t n, const float* qw) {
  const Grid3Search& g = iq3xxs_search();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    quantize_iq3_xxs_block(x + QK_K * i, qw != nullptr ? qw + QK_K * i : nullptr, g, y + i);
  }
}

void quantize_row_iq3_xxs(const float* x, BlockIQ3_XXS* y, int64_t n) {
  quantize_row_iq3_xxs_weighted(x, y, n, nullptr);
}

void quantize_row_iq3_s_weighted(const float* x, BlockIQ3_S* y, int64_t n, const float* qw) {
  const Grid3Search& g = iq3s_search();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    quantize_iq3_s_block(x + QK_K * i, qw != nullptr ? qw + QK_K * i : nullptr, g, y + i);
  }
}

void quantize_row_iq3_s(const float* x, BlockIQ3_S* y, int64_t n) {
  quantize_row_iq3_s_weighted(x, y, n, nullptr);
}

void quantize_row_iq2_xxs_weighted(const float* x, BlockIQ2_XXS* y, int64_t n, const float* qw) {
  if (qw == nullptr) {
    throw std::invalid_argument("IQ2_XXS can only be quantized with an importance matrix");
  }
  const Grid2Search& g = iq2xxs_search();
  for (int64_t i = 0; i < n / QK_K; ++i) {
    quantize_iq2_xxs_block(x + QK_K * i, qw + QK_K * i, g, y + i);
  }
}

}  // namespace pyllm
