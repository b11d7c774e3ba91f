// Scale searches shared by the quantizers of csrc/quant (the k-quants, with and without an
// importance matrix, and the grid i-quants): the same arithmetic as llama.cpp's, step for step,
// so that the bytes they choose are llama.cpp's. Defined in csrc/quant/kquants_weighted.cc.
// Internal to csrc/quant; each includer also includes quant/exact_fp.h (no FMA contraction).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pyllm::quant_search {

constexpr float kGroupMaxEps = 1e-15f;  // a group below this magnitude is all zero

// Round to nearest, ties to even, through the float's mantissa (|v| < 2^22): llama.cpp's.
inline int nearest_int(float v) {
  const float biased = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &biased, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

// Levels 0..nmax for x >= 0 with a weighted least-squares scale: a first guess nmax / max, 8
// trial scales around it kept by weighted squared error, then up to 5 passes moving single
// levels while the fit improves. Returns the scale (0 for an all-zero group).
float make_positive_quants(int n, int nmax, const float* x, uint8_t* L, const float* w);

// Symmetric levels in [-nmax, nmax - 1] (stored + nmax in L) weighted by w: inverse scales
// -(nmax + 0.1 k) / max for k in [-9, 9] (the signed largest value), keeping the weighted
// least-squares scale of the best. Returns the scale.
float make_symmetric_weighted(int n, int nmax, const float* x, int8_t* L, const float* w);

// Affine levels 0..nmax, x ~ scale * L + min with min <= 0, weighted by w: the min/max grid,
// then nstep + 1 inverse scales (rmin + rdelta k + nmax) / (max - min), each fitted by
// weighted least squares (scale and min), keeping the smallest weighted error (absolute with
// use_mad, else squared). Returns the scale; *neg_min gets -min.
float make_affine_weighted(int n, int nmax, const float* x, const float* w, uint8_t* L,
                           float* neg_min, float rmin, float rdelta, int nstep, bool use_mad);

}  // namespace pyllm::quant_search
