// The grid search shared by the quantizers of the grid i-quants (csrc/quant/iquants_search.cc:
// IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S; csrc/quant/iquants_search_iq1.cc: IQ1_S, IQ1_M): a
// grid's points as odd positions, the map from rounded levels to a point, and for levels that
// are no point the short list of points nearest to them. Internal to csrc/quant; each includer
// also includes quant/exact_fp.h (no FMA contraction).
#pragma once

#include <array>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace pyllm {

// A grid prepared for the search: each of its points as N odd positions 2 l + 1 (l the level of
// the element), the point of each code sum(l_i << kBits i) (for codes that are not grid
// points: -(1 + offset) of their neighbour list in `neighbours`: a count, then point indices).
template <int N, int kBits>
struct GridSearch {
  static constexpr int kUnreachable = INT_MIN;  // a code with a level above the rounding's range

  std::vector<std::array<int8_t, N>> pos;
  std::vector<int> map;
  std::vector<uint16_t> neighbours;

  int code(const int8_t* L) const {
    int c = 0;
    for (int i = 0; i < N; ++i) c |= L[i] << (kBits * i);
    return c;
  }

  // Fills map and neighbours from pos: for every code off the grid whose levels are all at most
  // max_level (the others never come out of the rounding), the points at its nwant smallest
  // squared distances (in position units), nearest first, ties by index: llama.cpp's lists
  // (it sorts all points by (distance, index); picking the few smallest distances directly
  // gives the same lists in a fraction of the time, which matters for the 2048-point grid).
  void index(int map_size, int nwant, int max_level) {
    map.assign(static_cast<size_t>(map_size), -1);
    for (size_t j = 0; j < pos.size(); ++j) {
      int8_t L[N];
      for (int i = 0; i < N; ++i) {
        L[i] = static_cast<int8_t>((pos[j][static_cast<size_t>(i)] - 1) / 2);
      }
      map[static_cast<size_t>(code(L))] = static_cast<int>(j);
    }
    std::vector<int> d2(pos.size());
    constexpr int kMask = (1 << kBits) - 1;
    for (int u = 0; u < map_size; ++u) {
      if (map[static_cast<size_t>(u)] >= 0) continue;
      int p[N];
      bool reachable = true;
      for (int i = 0; i < N; ++i) {
        const int l = (u >> (kBits * i)) & kMask;
        reachable = reachable && l <= max_level;
        p[i] = 2 * l + 1;
      }
      if (!reachable) {
        map[static_cast<size_t>(u)] = kUnreachable;
        continue;
      }
      for (size_t j = 0; j < pos.size(); ++j) {
        int s = 0;
        for (int i = 0; i < N; ++i) {
          const int diff = pos[j][static_cast<size_t>(i)] - p[i];
          s += diff * diff;
        }
        d2[j] = s;
      }
      const size_t start = neighbours.size();
      neighbours.push_back(0);
      int below = -1;  // the distances taken so far are <= below
      for (int have = 0; have < nwant; ++have) {
        int next = INT_MAX;
        for (const int s : d2) {
          if (s > below && s < next) next = s;
        }
        if (next == INT_MAX) break;
        for (size_t j = 0; j < pos.size(); ++j) {
          if (d2[j] == next) neighbours.push_back(static_cast<uint16_t>(j));
        }
        below = next;
      }
      neighbours[start] = static_cast<uint16_t>(neighbours.size() - start - 1);
      map[static_cast<size_t>(u)] = -static_cast<int>(start) - 1;
    }
  }

  // The neighbour list (count, then indices) of an off-grid code's map entry m < 0.
  const uint16_t* neighbour_list(int m) const {
    if (m == kUnreachable) throw std::logic_error("grid search: levels outside the grid's range");
    return neighbours.data() + (-m - 1);
  }

  // The grid point of the N levels L (after rounding), or, when they are not one, the neighbour
  // of least weighted squared error against xval at this scale (whose levels replace L).
  // *on_grid says which.
  int point(const float* xval, const float* w, float scale, int8_t* L, bool* on_grid) const {
    const int m = map[static_cast<size_t>(code(L))];
    *on_grid = m >= 0;
    if (m >= 0) return m;
    const uint16_t* nb = neighbour_list(m);
    float best = FLT_MAX;
    int index = -1;
    for (int k = 1; k <= nb[0]; ++k) {
      const auto& q = pos[nb[k]];
      float d2 = 0.0f;
      for (int i = 0; i < N; ++i) {
        const float diff = scale * static_cast<float>(q[static_cast<size_t>(i)]) - xval[i];
        d2 += w[i] * diff * diff;
      }
      if (d2 < best) {
        best = d2;
        index = nb[k];
      }
    }
    if (index < 0) throw std::logic_error("grid search without a neighbour");
    set_levels(index, L);
    return index;
  }

  void set_levels(int index, int8_t* L) const {
    const auto& q = pos[static_cast<size_t>(index)];
    for (int i = 0; i < N; ++i) L[i] = static_cast<int8_t>((q[static_cast<size_t>(i)] - 1) / 2);
  }
};

using Grid2Search = GridSearch<8, 2>;  // IQ2 / IQ1 grids: rows of 8, levels 0..2
using Grid3Search = GridSearch<4, 3>;  // IQ3 grids: rows of 4, levels 0..7

}  // namespace pyllm
