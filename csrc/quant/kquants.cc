// Reference quantize/dequantize of the k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and of Q8_K, the
// activation type their dot products take.
//
// A k-quant block covers 256 weights as 16 or 8 sub-blocks, each with its own scale (and min),
// and the sub-block scales are themselves quantized against one or two f16 super-scales. The
// quantizers search for good sub-block scales the way llama.cpp's reference quantizers do (no
// importance matrix): a few trial inverse scales around nmax/max, each followed by a weighted
// least-squares fit of scale (and min), keeping the fit with the smallest weighted error; Q3_K
// additionally refines individual quants coordinate-wise. The dequantizers follow the gguf
// package's arithmetic exactly (same float32 products in the same order), so they are bit-exact.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"
#include "quant/exact_fp.h"  // no FMA contraction in this file
#include "quant/search.h"

namespace pyllm {

namespace {

// Below this magnitude a group is treated as all-zero (avoids dividing by denormal maxima).
constexpr float kGroupMaxEps = 1e-15f;

// Round to nearest, ties to even, for |v| < 2^22: adding 1.5 * 2^23 moves the integer part into
// the low mantissa bits. Never undefined behaviour, even for NaN/inf (results are then clamped).
inline int nearest_int(float v) {
  const float biased = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &biased, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

inline int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Symmetric quantization of n values to integers in [-nmax, nmax - 1] (stored offset by +nmax in
// L), weighted by x^2. Tries inverse scales -(nmax + 0.1 k) / max for k in [-9, 9] and keeps the
// least-squares scale of the best one. Returns the scale (0 for an all-zero group).
float make_symmetric_quants(int n, int nmax, const float* x, int8_t* L) {
  float w[QK_K];
  for (int i = 0; i < n; ++i) w[i] = x[i] * x[i];
  return quant_search::make_symmetric_weighted(n, nmax, x, L, w);
}

// Symmetric quantization for Q3_K's sub-blocks: start from -nmax/max, then repeatedly move single
// quants to the value that best fits the current least-squares scale while that lowers the
// x^2-weighted error (at most 5 sweeps). L is offset by +nmax. Returns the scale.
float make_symmetric_quants_refined(int n, int nmax, const float* x, int8_t* L) {
  float max = 0.0f;
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    std::memset(L, 0, static_cast<size_t>(n));
    return 0.0f;
  }
  const float iscale = -static_cast<float>(nmax) / max;
  float sumlx = 0.0f;
  float suml2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int sweep = 0; sweep < 5; ++sweep) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      // The fit without element i; if it still correlates positively, re-pick i's quant for it.
      float slx = sumlx - w * x[i] * static_cast<float>(L[i]);
      if (slx > 0.0f) {
        float sl2 = suml2 - w * static_cast<float>(L[i]) * static_cast<float>(L[i]);
        const int nl = clamp_int(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
        if (nl != L[i]) {
          slx += w * x[i] * static_cast<float>(nl);
          sl2 += w * static_cast<float>(nl) * static_cast<float>(nl);
          // Accept when the new fit explains more: slx^2/sl2 > sumlx^2/suml2.
          if (sl2 > 0.0f && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(nl);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (changed == 0) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Q3_K packs 16 six-bit scales: low nibbles in bytes 0..7 (scale j < 8 low, j >= 8 high nibble of
// byte j - 8), top two bits of scale j in byte 8 + j % 4 at bit 2 * (j / 4).
inline int q3k_scale(const uint8_t* s, int j) {
  const int low = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
  const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (low | (high << 4)) - 32;
}

// Packs four 2-bit planes: byte l of each 32-byte group of a 128-element chunk holds elements
// l, l + 32, l + 64, l + 96 at bit offsets 0, 2, 4, 6.
inline void pack_2bit(const uint8_t* L, uint8_t* qs) {
  for (int j = 0; j < QK_K; j += 128) {
    for (int l = 0; l < 32; ++l) {
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) |
                                           (L[j + l + 96] << 6));
    }
  }
}

// Q4_K / Q5_K: 6-bit scale ls and min lm of sub-block j into the 12-byte scales array.
inline void put_scale_min_k4(int j, int ls, int lm, uint8_t* s) {
  if (j < 4) {
    s[j] = static_cast<uint8_t>(ls);
    s[j + 4] = static_cast<uint8_t>(lm);
  } else {
    s[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
    s[j - 4] = static_cast<uint8_t>(s[j - 4] | ((ls >> 4) << 6));
    s[j] = static_cast<uint8_t>(s[j] | ((lm >> 4) << 6));
  }
}

// Shared part of Q4_K and Q5_K: choose the 8 sub-block scales/mins of one 256-value block, store
// them (d, dmin, scales[12]) and write the final quants (0..nmax) into L.
void quantize_affine_k_block(const float* x, int nmax, float rmin, int nstep, f16_t* d_out,
                             f16_t* dmin_out, uint8_t* packed_scales, uint8_t* L) {
  float scales[QK_K / 32];
  float mins[QK_K / 32];
  float weights[32];
  float max_scale = 0.0f;
  float max_min = 0.0f;
  for (int j = 0; j < QK_K / 32; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0.0f;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    // Weight large-magnitude values more, but never give a value zero weight.
    const float av_x = std::sqrt(sum_x2 / 32.0f);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
    scales[j] = quant_search::make_affine_weighted(32, nmax, xs, weights, L + 32 * j, &mins[j],
                                                   rmin, 0.1f, nstep, false);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
  std::memset(packed_scales, 0, K_SCALE_SIZE);
  for (int j = 0; j < QK_K / 32; ++j) {
    const int ls = clamp_int(nearest_int(inv_scale * scales[j]), 0, 63);
    const int lm = clamp_int(nearest_int(inv_min * mins[j]), 0, 63);
    put_scale_min_k4(j, ls, lm, packed_scales);
  }
  *d_out = f32_to_f16(max_scale / 63.0f);
  *dmin_out = f32_to_f16(max_min / 63.0f);
  // Re-quantize against the scales as they were actually stored (rounded to 6 bits and f16).
  const float d_all = f16_to_f32(*d_out);
  const float dmin_all = f16_to_f32(*dmin_out);
  for (int j = 0; j < QK_K / 32; ++j) {
    uint8_t sc;
    uint8_t m;
    get_scale_min_k4(j, packed_scales, &sc, &m);
    const float d = d_all * static_cast<float>(sc);
    if (d == 0.0f) continue;
    const float dm = dmin_all * static_cast<float>(m);
    for (int ii = 0; ii < 32; ++ii) {
      L[32 * j + ii] = static_cast<uint8_t>(clamp_int(nearest_int((x[32 * j + ii] + dm) / d), 0, nmax));
    }
  }
}

}  // namespace

// ---- Q2_K: x = d * sc * q - dmin * m, 16 sub-blocks of 16, 4-bit sc and m, 2-bit q --------------

void quantize_row_q2_K(const float* x, BlockQ2_K* y, int64_t n) {
  const int64_t nb = n / QK_K;
  constexpr float kQ4Scale = 15.0f;
  uint8_t L[QK_K];
  float weights[16];
  float mins[QK_K / 16];
  float scales[QK_K / 16];
  for (int64_t i = 0; i < nb; ++i, x += QK_K) {
    float max_scale = 0.0f;
    float max_min = 0.0f;
    for (int j = 0; j < QK_K / 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
      scales[j] = quant_search::make_affine_weighted(16, 3, x + 16 * j, weights, L + 16 * j,
                                                     &mins[j], -0.5f, 0.1f, 15, true);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    std::memset(y[i].scales, 0, sizeof y[i].scales);
    if (max_scale > 0.0f) {
      const float iscale = kQ4Scale / max_scale;
      for (int j = 0; j < QK_K / 16; ++j) {
        y[i].scales[j] = static_cast<uint8_t>(clamp_int(nearest_int(iscale * scales[j]), 0, 15));
      }
      y[i].d = f32_to_f16(max_scale / kQ4Scale);
    } else {
      y[i].d = 0;
    }
    if (max_min > 0.0f) {
      const float iscale = kQ4Scale / max_min;
      for (int j = 0; j < QK_K / 16; ++j) {
        const int l = clamp_int(nearest_int(iscale * mins[j]), 0, 15);
        y[i].scales[j] = static_cast<uint8_t>(y[i].scales[j] | (l << 4));
      }
      y[i].dmin = f32_to_f16(max_min / kQ4Scale);
    } else {
      y[i].dmin = 0;
    }
    const float d_all = f16_to_f32(y[i].d);
    const float dmin_all = f16_to_f32(y[i].dmin);
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = d_all * static_cast<float>(y[i].scales[j] & 0xF);
      if (d == 0.0f) continue;
      const float dm = dmin_all * static_cast<float>(y[i].scales[j] >> 4);
      for (int ii = 0; ii < 16; ++ii) {
        L[16 * j + ii] = static_cast<uint8_t>(clamp_int(nearest_int((x[16 * j + ii] + dm) / d), 0, 3));
      }
    }
    pack_2bit(L, y[i].qs);
  }
}

void dequantize_row_q2_K(const BlockQ2_K* x, float* y, int64_t n) {
  const int64_t nb = n / QK_K;
  for (int64_t i = 0; i < nb; ++i) {
    const float d = f16_to_f32(x[i].d);
    const float dmin = f16_to_f32(x[i].dmin);
    const uint8_t* q = x[i].qs;
    int is = 0;
    for (int chunk = 0; chunk < QK_K; chunk += 128, q += 32) {
      for (int shift = 0; shift < 8; shift += 2) {
        for (int half = 0; half < 2; ++half, ++is) {
          const float dl = d * static_cast<float>(x[i].scales[is] & 0xF);
          const float ml = dmin * static_cast<float>(x[i].scales[is] >> 4);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const float p = dl * static_cast<float>((q[l] >> shift) & 3);
            *y++ = p - ml;
          }
        }
      }
    }
  }
}

// ---- Q3_K: x = d * (sc - 32) * (q - 4), 16 sub-blocks of 16, 6-bit sc, 3-bit q (2 low bits in
// qs, the high bit in hmask; a set hmask bit means "no -4 offset") --------------------------------

void quantize_row_q3_K(const float* x, BlockQ3_K* y, int64_t n) {
  const int64_t nb = n / QK_K;
  int8_t L[QK_K];
  float scales[QK_K / 16];
  for (int64_t i = 0; i < nb; ++i, x += QK_K) {
    float max_scale = 0.0f;
    float amax = 0.0f;
    for (int j = 0; j < QK_K / 16; ++j) {
      scales[j] = make_symmetric_quants_refined(16, 4, x + 16 * j, L + 16 * j);
      const float a = std::fabs(scales[j]);
      if (a > amax) {
        amax = a;
        max_scale = scales[j];
      }
    }
    std::memset(y[i].scales, 0, sizeof y[i].scales);
    if (max_scale != 0.0f) {
      const float iscale = -32.0f / max_scale;
      for (int j = 0; j < QK_K / 16; ++j) {
        const int l = clamp_int(nearest_int(iscale * scales[j]), -32, 31) + 32;
        if (j < 8) {
          y[i].scales[j] = static_cast<uint8_t>(l & 0xF);
        } else {
          y[i].scales[j - 8] = static_cast<uint8_t>(y[i].scales[j - 8] | ((l & 0xF) << 4));
        }
        y[i].scales[8 + j % 4] = static_cast<uint8_t>(y[i].scales[8 + j % 4] | ((l >> 4) << (2 * (j / 4))));
      }
      y[i].d = f32_to_f16(1.0f / iscale);
    } else {
      y[i].d = 0;
    }
    const float d_all = f16_to_f32(y[i].d);
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = d_all * static_cast<float>(q3k_scale(y[i].scales, j));
      if (d == 0.0f) continue;
      for (int ii = 0; ii < 16; ++ii) {
        L[16 * j + ii] = static_cast<int8_t>(clamp_int(nearest_int(x[16 * j + ii] / d), -4, 3) + 4);
      }
    }
    // Split each 3-bit quant: bit 2 goes to hmask (element j -> byte j % 32, bit j / 32).
    std::memset(y[i].hmask, 0, sizeof y[i].hmask);
    uint8_t low[QK_K];
    for (int j = 0; j < QK_K; ++j) {
      int l = L[j];
      if (l > 3) {
        y[i].hmask[j % 32] = static_cast<uint8_t>(y[i].hmask[j % 32] | (1 << (j / 32)));
        l -= 4;
      }
      low[j] = static_cast<uint8_t>(l);
    }
    pack_2bit(low, y[i].qs);
  }
}

void dequantize_row_q3_K(const BlockQ3_K* x, float* y, int64_t n) {
  const int64_t nb = n / QK_K;
  for (int64_t i = 0; i < nb; ++i) {
    const float d_all = f16_to_f32(x[i].d);
    const uint8_t* q = x[i].qs;
    const uint8_t* hm = x[i].hmask;
    int is = 0;
    int bit = 0;
    for (int chunk = 0; chunk < QK_K; chunk += 128, q += 32) {
      for (int shift = 0; shift < 8; shift += 2, ++bit) {
        for (int half = 0; half < 2; ++half, ++is) {
          const float dl = d_all * static_cast<float>(q3k_scale(x[i].scales, is));
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int v = ((q[l] >> shift) & 3) - (((hm[l] >> bit) & 1) ? 0 : 4);
            *y++ = dl * static_cast<float>(v);
          }
        }
      }
    }
  }
}

// ---- Q4_K: x = d * sc * q - dmin * m, 8 sub-blocks of 32, 6-bit sc and m, 4-bit q ---------------

void quantize_row_q4_K(const float* x, BlockQ4_K* y, int64_t n) {
  const int64_t nb = n / QK_K;
  uint8_t L[QK_K];
  for (int64_t i = 0; i < nb; ++i, x += QK_K) {
    quantize_affine_k_block(x, 15, -1.0f, 20, &y[i].d, &y[i].dmin, y[i].scales, L);
    // Each 64-element chunk: 32 bytes, element l in the low nibble, element l + 32 in the high.
    uint8_t* q = y[i].qs;
    for (int j = 0; j < QK_K; j += 64, q += 32) {
      for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    }
  }
}

void dequantize_row_q4_K(const BlockQ4_K* x, float* y, int64_t n) {
  const int64_t nb = n / QK_K;
  for (int64_t i = 0; i < nb; ++i) {
    const float d = f16_to_f32(x[i].d);
    const float dmin = f16_to_f32(x[i].dmin);
    const uint8_t* q = x[i].qs;
    for (int j = 0; j < QK_K / 32; j += 2, q += 32) {
      uint8_t sc;
      uint8_t m;
      get_scale_min_k4(j, x[i].scales, &sc, &m);
      const float d1 = d * static_cast<float>(sc);
      const float m1 = dmin * static_cast<float>(m);
      get_scale_min_k4(j + 1, x[i].scales, &sc, &m);
      const float d2 = d * static_cast<float>(sc);
      const float m2 = dmin * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) {
        const float p = d1 * static_cast<float>(q[l] & 0xF);
        *y++ = p - m1;
      }
      for (int l = 0; l < 32; ++l) {
        const float p = d2 * static_cast<float>(q[l] >> 4);
        *y++ = p - m2;
      }
    }
  }
}

// ---- Q5_K: Q4_K with 5-bit q; the fifth bits of chunk c (64 elements) are bits 2c and 2c + 1 of
// qh[l] for elements l and l + 32 -------------------------------------------------------------------

void quantize_row_q5_K(const float* x, BlockQ5_K* y, int64_t n) {
  const int64_t nb = n / QK_K;
  uint8_t L[QK_K];
  for (int64_t i = 0; i < nb; ++i, x += QK_K) {
    quantize_affine_k_block(x, 31, -0.5f, 15, &y[i].d, &y[i].dmin, y[i].scales, L);
    std::memset(y[i].qh, 0, sizeof y[i].qh);
    uint8_t* ql = y[i].qs;
    int bit = 0;
    for (int j = 0; j < QK_K; j += 64, ql += 32, bit += 2) {
      for (int l = 0; l < 32; ++l) {
        int l1 = L[j + l];
        int l2 = L[j + l + 32];
        if (l1 > 15) {
          l1 -= 16;
          y[i].qh[l] = static_cast<uint8_t>(y[i].qh[l] | (1 << bit));
        }
        if (l2 > 15) {
          l2 -= 16;
          y[i].qh[l] = static_cast<uint8_t>(y[i].qh[l] | (2 << bit));
        }
        ql[l] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
    }
  }
}

void dequantize_row_q5_K(const BlockQ5_K* x, float* y, int64_t n) {
  const int64_t nb = n / QK_K;
  for (int64_t i = 0; i < nb; ++i) {
    const float d = f16_to_f32(x[i].d);
    const float dmin = f16_to_f32(x[i].dmin);
    const uint8_t* ql = x[i].qs;
    const uint8_t* qh = x[i].qh;
    int bit = 0;
    for (int j = 0; j < QK_K / 32; j += 2, ql += 32, bit += 2) {
      uint8_t sc;
      uint8_t m;
      get_scale_min_k4(j, x[i].scales, &sc, &m);
      const float d1 = d * static_cast<float>(sc);
      const float m1 = dmin * static_cast<float>(m);
      get_scale_min_k4(j + 1, x[i].scales, &sc, &m);
      const float d2 = d * static_cast<float>(sc);
      const float m2 = dmin * static_cast<float>(m);
      for (int l = 0; l < 32; ++l) {
        const int v = (ql[l] & 0xF) | (((qh[l] >> bit) & 1) << 4);
        const float p = d1 * static_cast<float>(v);
        *y++ = p - m1;
      }
      for (int l = 0; l < 32; ++l) {
        const int v = (ql[l] >> 4) | (((qh[l] >> (bit + 1)) & 1) << 4);
        const float p = d2 * static_cast<float>(v);
        *y++ = p - m2;
      }
    }
  }
}

// ---- Q6_K: x = d * sc * (q - 32), 16 sub-blocks of 16, signed 8-bit sc, 6-bit q (4 low bits in
// ql, 2 high bits in qh) ---------------------------------------------------------------------------

void quantize_row_q6_K(const float* x, BlockQ6_K* y, int64_t n) {
  quantize_row_q6_K_weighted(x, y, n, nullptr);
}

// qw: the importance of each element's column (an importance matrix), or nullptr. With one, each
// sub-block's scale search weights the squared errors by it (llama.cpp's: by qw itself, not
// qw * sqrt(sigma2 + x^2) as its other types do), else by x^2.
void quantize_row_q6_K_weighted(const float* x, BlockQ6_K* y, int64_t n, const float* qw) {
  const int64_t nb = n / QK_K;
  int8_t L[QK_K];
  float scales[QK_K / 16];
  for (int64_t i = 0; i < nb; ++i, x += QK_K) {
    float max_scale = 0.0f;
    float max_abs_scale = 0.0f;
    for (int ib = 0; ib < QK_K / 16; ++ib) {
      scales[ib] = qw != nullptr
                       ? quant_search::make_symmetric_weighted(16, 32, x + 16 * ib, L + 16 * ib,
                                                               qw + QK_K * i + 16 * ib)
                       : make_symmetric_quants(16, 32, x + 16 * ib, L + 16 * ib);
      const float a = std::fabs(scales[ib]);
      if (a > max_abs_scale) {
        max_abs_scale = a;
        max_scale = scales[ib];
      }
    }
    if (max_abs_scale < kGroupMaxEps) {
      std::memset(&y[i], 0, sizeof y[i]);
      continue;
    }
    const float iscale = -128.0f / max_scale;
    y[i].d = f32_to_f16(1.0f / iscale);
    for (int ib = 0; ib < QK_K / 16; ++ib) {
      y[i].scales[ib] = static_cast<int8_t>(clamp_int(nearest_int(iscale * scales[ib]), -128, 127));
    }
    const float d_all = f16_to_f32(y[i].d);
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = d_all * static_cast<float>(y[i].scales[j]);
      if (d == 0.0f) continue;
      for (int ii = 0; ii < 16; ++ii) {
        L[16 * j + ii] = static_cast<int8_t>(clamp_int(nearest_int(x[16 * j + ii] / d), -32, 31) + 32);
      }
    }
    // Per 128-element chunk: ql[l] = elements l (low) and l + 64 (high nibble), ql[l + 32] =
    // elements l + 32 and l + 96; qh[l] holds the top 2 bits of l, l + 32, l + 64, l + 96.
    uint8_t* ql = y[i].ql;
    uint8_t* qh = y[i].qh;
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
      for (int l = 0; l < 32; ++l) {
        const int q1 = L[j + l];
        const int q2 = L[j + l + 32];
        const int q3 = L[j + l + 64];
        const int q4 = L[j + l + 96];
        ql[l] = static_cast<uint8_t>((q1 & 0xF) | ((q3 & 0xF) << 4));
        ql[l + 32] = static_cast<uint8_t>((q2 & 0xF) | ((q4 & 0xF) << 4));
        qh[l] = static_cast<uint8_t>((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
      }
    }
  }
}

void dequantize_row_q6_K(const BlockQ6_K* x, float* y, int64_t n) {
  const int64_t nb = n / QK_K;
  for (int64_t i = 0; i < nb; ++i) {
    const float d = f16_to_f32(x[i].d);
    const uint8_t* ql = x[i].ql;
    const uint8_t* qh = x[i].qh;
    const int8_t* sc = x[i].scales;
    for (int chunk = 0; chunk < QK_K; chunk += 128, ql += 64, qh += 32, sc += 8, y += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = (d * static_cast<float>(sc[is])) * static_cast<float>(q1);
        y[l + 32] = (d * static_cast<float>(sc[is + 2])) * static_cast<float>(q2);
        y[l + 64] = (d * static_cast<float>(sc[is + 4])) * static_cast<float>(q3);
        y[l + 96] = (d * static_cast<float>(sc[is + 6])) * static_cast<float>(q4);
      }
    }
  }
}

// ---- Q8_K (activations for k-quant dots): x = d * q with d = max / -127 in float32, plus the
// sum of each 16-quant group so dots can apply the weights' mins without touching the quants ----

void quantize_row_q8_K(const float* x, BlockQ8_K* y, int64_t n) {
  const int64_t nb = n / QK_K;
  for (int64_t i = 0; i < nb; ++i, x += QK_K) {
    float max = 0.0f;
    float amax = 0.0f;
    for (int j = 0; j < QK_K; ++j) {
      const float ax = std::fabs(x[j]);
      if (ax > amax) {
        amax = ax;
        max = x[j];
      }
    }
    if (amax == 0.0f) {
      y[i].d = 0.0f;
      std::memset(y[i].qs, 0, sizeof y[i].qs);
      std::memset(y[i].bsums, 0, sizeof y[i].bsums);
      continue;
    }
    const float iscale = -127.0f / max;
    for (int j = 0; j < QK_K; ++j) {
      y[i].qs[j] = static_cast<int8_t>(clamp_int(nearest_int(iscale * x[j]), -127, 127));
    }
    for (int g = 0; g < QK_K / 16; ++g) {
      int sum = 0;
      for (int l = 0; l < 16; ++l) sum += y[i].qs[16 * g + l];
      y[i].bsums[g] = static_cast<int16_t>(sum);
    }
    y[i].d = 1.0f / iscale;
  }
}

void dequantize_row_q8_K(const BlockQ8_K* x, float* y, int64_t n) {
  const int64_t nb = n / QK_K;
  for (int64_t i = 0; i < nb; ++i, y += QK_K) {
    for (int j = 0; j < QK_K; ++j) y[j] = x[i].d * static_cast<float>(x[i].qs[j]);
  }
}

}  // namespace pyllm
