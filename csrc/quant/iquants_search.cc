// Quantizers of the grid i-quants, which choose each group of 8 values among a fixed set of
// grid points and so need a search, guided by an importance matrix (llama.cpp refuses them
// without one, and so does pyllm): IQ2_XXS so far. They reproduce llama.cpp's quantizer byte
// for byte given the same importance (tests/test_iquants_grid.py checks SHA-256 figures of its
// output), so files and their quality are interchangeable.
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
// The 8 sub-block scales are finally stored as 4-bit multiples of max_scale / 31.
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"
#include "quant/exact_fp.h"  // no FMA contraction in this file
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

// A grid prepared for the search: each of its points as N odd positions 2 l + 1 (l the level of
// the element), the point of each code sum(l_i << kBits i) (for codes that are not grid
// points: -(1 + offset) of their neighbour list in `neighbours`: a count, then point indices).
template <int N, int kBits>
struct GridSearch {
  std::vector<std::array<int8_t, N>> pos;
  std::vector<int> map;
  std::vector<uint16_t> neighbours;

  int code(const int8_t* L) const {
    int c = 0;
    for (int i = 0; i < N; ++i) c |= L[i] << (kBits * i);
    return c;
  }

  // Fills map and neighbours from pos: for every code off the grid, the points at its nwant
  // smallest squared distances (in position units), nearest first, ties by index.
  void index(int map_size, int nwant) {
    map.assign(static_cast<size_t>(map_size), -1);
    for (size_t j = 0; j < pos.size(); ++j) {
      int8_t L[N];
      for (int i = 0; i < N; ++i) {
        L[i] = static_cast<int8_t>((pos[j][static_cast<size_t>(i)] - 1) / 2);
      }
      map[static_cast<size_t>(code(L))] = static_cast<int>(j);
    }
    std::vector<std::pair<int, int>> dist(pos.size());
    for (int u = 0; u < map_size; ++u) {
      if (map[static_cast<size_t>(u)] >= 0) continue;
      for (size_t j = 0; j < pos.size(); ++j) {
        int d2 = 0;
        for (int i = 0; i < N; ++i) {
          const int p = 2 * ((u >> (kBits * i)) & ((1 << kBits) - 1)) + 1;
          const int diff = pos[j][static_cast<size_t>(i)] - p;
          d2 += diff * diff;
        }
        dist[j] = {d2, static_cast<int>(j)};
      }
      std::sort(dist.begin(), dist.end());
      const size_t start = neighbours.size();
      neighbours.push_back(0);
      int have = 1, d2 = dist[0].first;
      for (const auto& [dj, j] : dist) {
        if (dj > d2) {
          if (have == nwant) break;
          d2 = dj;
          ++have;
        }
        neighbours.push_back(static_cast<uint16_t>(j));
      }
      neighbours[start] = static_cast<uint16_t>(neighbours.size() - start - 1);
      map[static_cast<size_t>(u)] = -static_cast<int>(start) - 1;
    }
  }

  // The grid point of the N levels L (after rounding), or, when they are not one, the neighbour
  // of least weighted squared error against xval at this scale (whose levels replace L).
  // *on_grid says which.
  int point(const float* xval, const float* w, float scale, int8_t* L, bool* on_grid) const {
    const int m = map[static_cast<size_t>(code(L))];
    *on_grid = m >= 0;
    if (m >= 0) return m;
    const uint16_t* nb = neighbours.data() + (-m - 1);
    float best = FLT_MAX;
    int index = -1;
    for (int k = 1; k <= nb[0]; ++k) {
      const auto& p = pos[nb[k]];
      float d2 = 0.0f;
      for (int i = 0; i < N; ++i) {
        const float diff = scale * static_cast<float>(p[static_cast<size_t>(i)]) - xval[i];
        d2 += w[i] * diff * diff;
      }
      if (d2 < best) {
        best = d2;
        index = nb[k];
      }
    }
    if (index < 0) throw std::logic_error("grid search without a neighbour");
    const auto& p = pos[static_cast<size_t>(index)];
    for (int i = 0; i < N; ++i) L[i] = static_cast<int8_t>((p[static_cast<size_t>(i)] - 1) / 2);
    return index;
  }
};

using Grid2Search = GridSearch<8, 2>;  // IQ2 grids: rows of 8, levels 0..2
using Grid3Search = GridSearch<4, 3>;  // IQ3 grids: rows of 4, levels 0..7

// An IQ2 grid (magnitudes 8, 25, 43: the levels 0, 1, 2, positions 1, 3, 5) prepared once.
Grid2Search make_grid2(const uint64_t* grid, int size) {
  Grid2Search g;
  g.pos.resize(static_cast<size_t>(size));
  for (int j = 0; j < size; ++j) {
    for (int i = 0; i < 8; ++i) {
      const auto v = static_cast<uint8_t>(grid[j] >> (8 * i));
      g.pos[static_cast<size_t>(j)][static_cast<size_t>(i)] =
          static_cast<int8_t>(v == 0x08 ? 1 : v == 0x19 ? 3 : 5);
    }
  }
  g.index(43692, 2);  // codes with every level <= 2: at most 0b10...10 = 43690
  return g;
}

const Grid2Search& iq2xxs_search() {
  static std::once_flag once;
  static Grid2Search g;
  std::call_once(once, [] { g = make_grid2(kIq2xxsGrid, 256); });
  return g;
}

const Grid2Search& iq2xs_search() {
  static std::once_flag once;
  static Grid2Search g;
  std::call_once(once, [] { g = make_grid2(kIq2xsGrid, 512); });
  return g;
}

int grid_point(const Grid2Search& g, const float* xval, const float* w, float scale, int8_t* L) {
  bool on_grid;
  return g.point(xval, w, scale, L, &on_grid);
}

void quantize_iq2_xxs_block(const float* xbl, const float* qw, const Grid2Search& g,
                            BlockIQ2_XXS* y) {
  constexpr int kMaxQ = 3;
  float scales[QK_K / 32];
  float weight[32], waux[32], xval[32];
  int8_t L[32], Laux[32];
  uint8_t signs[4];
  uint32_t q2[2 * (QK_K / 32)] = {};
  y->d = f32_to_f16(0.0f);
  float max_scale = 0.0f;
  float sumx2 = 0.0f;
  for (int i = 0; i < QK_K; ++i) sumx2 += xbl[i] * xbl[i];
  const float sigma2 = sumx2 / QK_K;
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
    uint8_t L0[32];
    float scale = make_positive_quants(32, kMaxQ + 1, xval, L0, weight);
    const float eff_max = scale * kMaxQ;
    if (eff_max <= 0.0f) {
      scales[ib] = 0.0f;
      continue;
    }
    float best = 0.0f;
    for (int is = -6; is <= 6; ++is) {
      const float id = (2 * kMaxQ - 1 + static_cast<float>(is) * 0.1f) / eff_max;
      const float this_scale = 1.0f / id;
      for (int k = 0; k < 4; ++k) {
        round_levels(8, xval + 8 * k, id, kMaxQ, Laux + 8 * k);
        grid_point(g, xval + 8 * k, waux + 8 * k, this_scale, Laux + 8 * k);
      }
      float sumq2;
      const float sumqx = grid_fit(32, weight, xval, Laux, &sumq2);
      if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
        scale = sumqx / sumq2;
        best = scale * sumqx;
        std::memcpy(L, Laux, 32);
      }
    }
    if (scale > 0.0f) {
      const float id = 1.0f / scale;
      for (int k = 0; k < 4; ++k) {
        round_levels(8, xval + 8 * k, id, kMaxQ, L + 8 * k);
        grid_point(g, xval + 8 * k, waux + 8 * k, scale, L + 8 * k);
      }
      float sumq2;
      const float sumqx = grid_fit(32, weight, xval, L, &sumq2);
      if (sumq2 > 0.0f) scale = sumqx / sumq2;
    }
    if (scale < 0.0f) {  // the scale is stored unsigned: flip it and the signs
      scale = -scale;
      for (int k = 0; k < 4; ++k) signs[k] = static_cast<uint8_t>(~signs[k] & 127);
    }
    for (int k = 0; k < 4; ++k) {
      int code = 0;
      for (int i = 0; i < 8; ++i) code |= L[8 * k + i] << (2 * i);
      const int index = g.map[static_cast<size_t>(code)];
      if (index < 0) throw std::logic_error("IQ2_XXS: levels off the grid after the search");
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
    const int l = std::max(0, std::min(15, nearest_int(0.5f * (id * scales[ib] - 1.0f))));
    q2[2 * ib + 1] |= static_cast<uint32_t>(l) << 28;
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
    g.index(4096, 3);
  });
  return g;
}

void quantize_iq3_s_block(const float* xbl, const float* qw, const Grid3Search& g,
                          BlockIQ3_S* y) {
  constexpr int kMaxQ = 8, kBs = 32, kBs4 = kBs / 4, kBs8 = kBs / 8;
  float scales[QK_K / kBs], weight[kBs], waux[kBs], xval[kBs];
  int8_t L[kBs], Laux[kBs];
  bool on_grid[kBs4], on_grid_aux[kBs4];
  uint8_t block_signs[kBs8];
  std::memset(y, 0, sizeof *y);
  float max_scale = 0.0f;
  float sumx2 = 0.0f;
  for (int i = 0; i < QK_K; ++i) sumx2 += xbl[i] * xbl[i];
  const float sigma2 = 2 * sumx2 / QK_K;
  for (int ib = 0; ib < QK_K / kBs; ++ib) {
    const float* xb = xbl + kBs * ib;
    for (int i = 0; i < kBs; ++i) {
      weight[i] = qw != nullptr ? qw[kBs * ib + i] * std::sqrt(sigma2 + xb[i] * xb[i])
                                : xb[i] * xb[i];
    }
    for (int i = 0; i < kBs; ++i) waux[i] = std::sqrt(weight[i]);
    for (int k = 0; k < kBs8; ++k) {
      uint8_t s = 0;
      for (int i = 0; i < 8; ++i) {
        const float v = xb[8 * k + i];
        xval[8 * k + i] = v >= 0.0f ? v : -v;
        if (v < 0.0f) s = static_cast<uint8_t>(s | (1 << i));
      }
      block_signs[k] = s;
    }
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
    float best = 0.0f;
    float scale = max / (2 * kMaxQ - 1);
    for (int k = 0; k < kBs4; ++k) on_grid[k] = false;
    for (int is = -9; is <= 9; ++is) {
      const float id = (2 * kMaxQ - 1 + static_cast<float>(is) * 0.2f) / max;
      const float this_scale = 1.0f / id;
      for (int k = 0; k < kBs4; ++k) {
        round_levels(4, xval + 4 * k, id, kMaxQ, Laux + 4 * k);
        g.point(xval + 4 * k, waux + 4 * k, this_scale, Laux + 4 * k, &on_grid_aux[k]);
      }
      float sumq2;
      const float sumqx = grid_fit(kBs, weight, xval, Laux, &sumq2);
      if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
        scale = sumqx / sumq2;
        best = scale * sumqx;
        std::memcpy(L, Laux, kBs);
        std::memcpy(on_grid, on_grid_aux, sizeof on_grid);
      }
    }
    int off_grid = 0;
    for (int k = 0; k < kBs4; ++k) off_grid += on_grid[k] ? 0 : 1;
    if (off_grid > 0 && scale > 0.0f) {
      const float id = 1.0f / scale;
      for (int k = 0; k < kBs4; ++k) {
        round_levels(4, xval + 4 * k, id, kMaxQ, L + 4 * k);
        bool unused;
        g.point(xval + 4 * k, waux + 4 * k, scale, L + 4 * k, &unused);
      }
      float sumq2;
      const float sumqx = grid_fit(kBs, weight, xval, L, &sumq2);
      if (sumq2 > 0.0f) scale = sumqx / sumq2;
    }
    if (scale < 0.0f) {  // the scale is stored unsigned: flip it and the signs
      scale = -scale;
      for (int k = 0; k < kBs8; ++k) block_signs[k] = static_cast<uint8_t>(~block_signs[k]);
    }
    for (int k = 0; k < kBs4; ++k) {
      int code = 0;
      for (int i = 0; i < 4; ++i) code |= L[4 * k + i] << (3 * i);
      const int index = g.map[static_cast<size_t>(code)];
      if (index < 0) throw std::logic_error("IQ3_S: levels off the grid after the search");
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
    const int l1 = std::max(0, std::min(15, nearest_int(0.5f * (id * scales[ib] - 1.0f))));
    const int l2 = std::max(0, std::min(15, nearest_int(0.5f * (id * scales[ib + 1] - 1.0f))));
    y->scales[ib / 2] = static_cast<uint8_t>(l1 | (l2 << 4));
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
    g.index(4096, 2);
  });
  return g;
}

void quantize_iq3_xxs_block(const float* xbl, const float* qw, const Grid3Search& g,
                            BlockIQ3_XXS* y) {
  constexpr int kMaxQ = 8;
  constexpr float kEps = 1e-8f;
  float scales[QK_K / 32], weight[32], waux[32], xval[32];
  int8_t L[32], Laux[32];
  bool on_grid[8], on_grid_aux[8];
  uint8_t signs[4];
  uint8_t q3[QK_K / 4 + QK_K / 8] = {};  // the 64 grid indices, then 8 words of signs + scale
  y->d = f32_to_f16(0.0f);
  float max_scale = 0.0f;
  float sumx2 = 0.0f;
  for (int i = 0; i < QK_K; ++i) sumx2 += xbl[i] * xbl[i];
  const float sigma2 = 2 * sumx2 / QK_K;
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
    float best = 0.0f;
    float scale = max / (2 * kMaxQ - 1);
    for (int k = 0; k < 8; ++k) on_grid[k] = true;
    for (int is = -15; is <= 15; ++is) {
      const float id = (2 * kMaxQ - 1 + static_cast<float>(is) * 0.2f) / max;
      const float this_scale = 1.0f / id;
      for (int k = 0; k < 8; ++k) {
        round_levels(4, xval + 4 * k, id, kMaxQ, Laux + 4 * k);
        g.point(xval + 4 * k, waux + 4 * k, this_scale, Laux + 4 * k, &on_grid_aux[k]);
      }
      float sumq2;
      const float sumqx = grid_fit(32, weight, xval, Laux, &sumq2);
      if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
        scale = sumqx / sumq2;
        best = scale * sumqx;
        std::memcpy(L, Laux, 32);
        std::memcpy(on_grid, on_grid_aux, sizeof on_grid);
      }
    }
    int off_grid = 0;
    for (int k = 0; k < 8; ++k) off_grid += on_grid[k] ? 0 : 1;
    if (off_grid > 0 && scale > 0.0f) {
      const float id = 1.0f / scale;
      for (int k = 0; k < 8; ++k) {
        if (on_grid[k]) continue;
        round_levels(4, xval + 4 * k, id, kMaxQ, L + 4 * k);
        bool unused;
        g.point(xval + 4 * k, waux + 4 * k, scale, L + 4 * k, &unused);
      }
      float sumq2;
      const float sumqx = grid_fit(32, weight, xval, L, &sumq2);
      if (sumq2 > 0.0f) scale = sumqx / sumq2;
    }
    if (scale < 0.0f) {
      scale = -scale;
      for (int k = 0; k < 4; ++k) signs[k] = static_cast<uint8_t>(~signs[k] & 127);
    }
    for (int k = 0; k < 8; ++k) {
      const int index = g.map[static_cast<size_t>(g.code(L + 4 * k))];
      if (index < 0) throw std::logic_error("IQ3_XXS: levels off the grid after the search");
      q3[8 * ib + k] = static_cast<uint8_t>(index);
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
    const int l = std::max(0, std::min(15, nearest_int(0.5f * (id * scales[ib] - 1.0f))));
    uint32_t ss;
    std::memcpy(&ss, q3 + QK_K / 4 + 4 * ib, 4);
    ss |= static_cast<uint32_t>(l) << 28;
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
  int8_t L[16], Laux[16];
  bool on_grid[2], on_grid_aux[2];
  uint8_t signs[2];
  uint16_t q2[QK_K / 8] = {};
  y->d = f32_to_f16(0.0f);
  std::memset(y->scales, 0, sizeof y->scales);
  float max_scale = 0.0f;
  float sumx2 = 0.0f;
  for (int i = 0; i < QK_K; ++i) sumx2 += xbl[i] * xbl[i];
  const float sigma2 = sumx2 / QK_K;
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
    float best = 0.0f;
    float scale = max / (2 * kMaxQ - 1);
    on_grid[0] = on_grid[1] = true;
    for (int is = -9; is <= 9; ++is) {
      const float id = (2 * kMaxQ - 1 + static_cast<float>(is) * 0.1f) / max;
      const float this_scale = 1.0f / id;
      for (int k = 0; k < 2; ++k) {
        round_levels(8, xval + 8 * k, id, kMaxQ, Laux + 8 * k);
        g.point(xval + 8 * k, waux + 8 * k, this_scale, Laux + 8 * k, &on_grid_aux[k]);
      }
      float sumq2;
      const float sumqx = grid_fit(16, weight, xval, Laux, &sumq2);
      if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
        scale = sumqx / sumq2;
        best = scale * sumqx;
        std::memcpy(L, Laux, 16);
        on_grid[0] = on_grid_aux[0];
        on_grid[1] = on_grid_aux[1];
      }
    }
    if ((!on_grid[0] || !on_grid[1]) && scale > 0.0f) {
      const float id = 1.0f / scale;
      for (int k = 0; k < 2; ++k) {
        if (on_grid[k]) continue;
        round_levels(8, xval + 8 * k, id, kMaxQ, L + 8 * k);
        bool unused;
        g.point(xval + 8 * k, waux + 8 * k, scale, L + 8 * k, &unused);
      }
      float sumq2;
      const float sumqx = grid_fit(16, weight, xval, L, &sumq2);
      if (sumq2 > 0.0f) scale = sumqx / sumq2;
    }
    if (scale < 0.0f) {
      scale = -scale;
      for (int k = 0; k < 2; ++k) signs[k] = static_cast<uint8_t>(~signs[k] & 127);
    }
    for (int k = 0; k < 2; ++k) {
      const int index = g.map[static_cast<size_t>(g.code(L + 8 * k))];
      if (index < 0) throw std::logic_error("IQ2_XS: levels off the grid after the search");
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
    const int l = std::max(0, std::min(15, nearest_int(0.5f * (id * scales[ib] - 1.0f))));
    y->scales[ib / 2] = static_cast<uint8_t>(ib % 2 == 0 ? l : (y->scales[ib / 2] | (l << 4)));
  }
  std::memcpy(y->qs, q2, sizeof y->qs);
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
