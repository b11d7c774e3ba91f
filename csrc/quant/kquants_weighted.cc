// Importance-guided quantizers of the legacy and k-quant types (what llama-quantize --imatrix
// writes for them; byte-identical, checked against SHA-256 figures of ggml_quantize_chunk), and
// the scale searches they share with the grid i-quants (quant/search.h): Q4_0, Q4_1, Q5_0, Q5_1,
// Q2_K, Q3_K, Q4_K, Q5_K (Q6_K's is its plain quantizer with the weights passed in, kquants.cc).
//
// An element's squared error is weighted by qw * sqrt(sigma2 + x^2): qw its column's importance
// (the importance matrix's mean square), sigma2 the mean square of the row (the legacy types),
// of the super-block (Q2_K) or twice that (Q3_K, Q4_K, Q5_K).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"
#include "quant/exact_fp.h"  // no FMA contraction in this file
#include "quant/search.h"

namespace pyllm {

namespace quant_search {

float make_positive_quants(int n, int nmax, const float* x, uint8_t* L, const float* w) {
  float max = 0.0f;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < kGroupMaxEps) {
    std::memset(L, 0, static_cast<size_t>(n));
    return 0.0f;
  }
  float iscale = static_cast<float>(nmax) / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nearest_int(iscale * x[i]));
  const float scale = 1.0f / iscale;
  float best_mse = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * static_cast<float>(L[i]);
    best_mse += w[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float iscale_is = (0.1f * static_cast<float>(is) + static_cast<float>(nmax)) / max;
    const float scale_is = 1.0f / iscale_is;
    float mse = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, nearest_int(iscale_is * x[i]));
      const float diff = x[i] - scale_is * static_cast<float>(l);
      mse += w[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_is;
    }
  }
  float sumlx = 0.0f, suml2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, nearest_int(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    sumlx += w[i] * x[i] * static_cast<float>(l);
    suml2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float li = static_cast<float>(L[i]);
      float slx = sumlx - w[i] * x[i] * li;
      float sl2 = suml2 - w[i] * li * li;
      if (slx > 0.0f && sl2 > 0.0f) {
        const int nl = std::min(nmax, nearest_int(x[i] * sl2 / slx));
        if (nl != L[i]) {
          slx += w[i] * x[i] * static_cast<float>(nl);
          sl2 += w[i] * static_cast<float>(nl) * static_cast<float>(nl);
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(nl);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (changed == 0) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

float make_symmetric_weighted(int n, int nmax, const float* x, int8_t* L, const float* w) {
  float max = 0.0f, amax = 0.0f;
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
  auto level = [nmax](float v) { return std::max(-nmax, std::min(nmax - 1, nearest_int(v))); };
  float iscale = -static_cast<float>(nmax) / max;
  float sumlx = 0.0f, suml2 = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = level(iscale * x[i]);
    L[i] = static_cast<int8_t>(l + nmax);
    sumlx += w[i] * x[i] * static_cast<float>(l);
    suml2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    sumlx = suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = level(iscale * x[i]);
      sumlx += w[i] * x[i] * static_cast<float>(l);
      suml2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
    }
    if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + level(iscale * x[i]));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

float make_affine_weighted(int n, int nmax, const float* x, const float* w, uint8_t* L,
                           float* neg_min, float rmin, float rdelta, int nstep, bool use_mad) {
  float min = x[0], max = x[0];
  float sum_w = w[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    min = std::min(min, x[i]);
    max = std::max(max, x[i]);
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0.0f) min = 0.0f;
  if (max <= min) {
    std::memset(L, 0, static_cast<size_t>(n));
    *neg_min = -min;
    return 0.0f;
  }
  float iscale = static_cast<float>(nmax) / (max - min);
  float scale = 1.0f / iscale;
  float best = 0.0f;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * static_cast<float>(L[i]) + min - x[i];
    diff = use_mad ? std::fabs(diff) : diff * diff;
    best += w[i] * diff;
  }
  if (nstep < 1) {
    *neg_min = -min;
    return scale;
  }
  uint8_t Laux[QK_K];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * static_cast<float>(is) + static_cast<float>(nmax)) / (max - min);
    float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
    for (int i = 0; i < n; ++i) {
      const int l = std::max(0, std::min(nmax, nearest_int(iscale * (x[i] - min))));
      Laux[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * static_cast<float>(l);
      sum_l2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
      sum_xl += w[i] * static_cast<float>(l) * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0.0f) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0.0f) {
        this_min = 0.0f;
        this_scale = sum_xl / sum_l2;
      }
      float err = 0.0f;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * static_cast<float>(Laux[i]) + this_min - x[i];
        diff = use_mad ? std::fabs(diff) : diff * diff;
        err += w[i] * diff;
      }
      if (err < best) {
        std::memcpy(L, Laux, static_cast<size_t>(n));
        best = err;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *neg_min = -min;
  return scale;
}

}  // namespace quant_search

using quant_search::make_affine_weighted;
using quant_search::make_positive_quants;
using quant_search::make_symmetric_weighted;
using quant_search::nearest_int;

void quantize_row_q4_0_weighted(const float* x, BlockQ4_0* y, int64_t n, const float* qw) {
  float sum_x2 = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
  const float sigma2 = sum_x2 / static_cast<float>(n);
  float weight[QK4_0];
  int8_t L[QK4_0];
  for (int64_t ib = 0; ib < n / QK4_0; ++ib) {
    const float* xb = x + QK4_0 * ib;
    const float* w = qw + QK4_0 * ib;
    for (int j = 0; j < QK4_0; ++j) weight[j] = w[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
    const float d = make_symmetric_weighted(QK4_0, 8, xb, L, weight);
    y[ib].d = f32_to_f16(d);
    for (int j = 0; j < 16; ++j) {
      y[ib].qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
    }
  }
}

void quantize_row_q2_K_weighted(const float* x, BlockQ2_K* y, int64_t n, const float* qw) {
  uint8_t L[QK_K], Ls[QK_K / 16], Lm[QK_K / 16];
  float mins[QK_K / 16], scales[QK_K / 16], sw[QK_K / 16], weight[16];
  for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
    std::fill(sw, sw + QK_K / 16, 0.0f);
    float sumx2 = 0.0f;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    const float sigma2 = sumx2 / QK_K;
    for (int j = 0; j < QK_K / 16; ++j) {
      const float* w = qw + QK_K * i + 16 * j;
      for (int l = 0; l < 16; ++l) {
        weight[l] = w[l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
      }
      for (int l = 0; l < 16; ++l) sw[j] += weight[l];
      scales[j] = make_affine_weighted(16, 3, x + 16 * j, weight, L + 16 * j, &mins[j], -0.9f,
                                       0.05f, 36, false);
    }
    float dm = make_positive_quants(QK_K / 16, 15, scales, Ls, sw);
    float mm = make_positive_quants(QK_K / 16, 15, mins, Lm, sw);
    y[i].d = f32_to_f16(dm);
    y[i].dmin = f32_to_f16(mm);
    dm = f16_to_f32(y[i].d);
    mm = f16_to_f32(y[i].dmin);
    for (int j = 0; j < QK_K / 16; ++j) {
      y[i].scales[j] = static_cast<uint8_t>(Ls[j] | (Lm[j] << 4));
    }
    // the quants again, for the stored (rounded) scales and mins
    for (int j = 0; j < QK_K / 16; ++j) {
      const float d = dm * static_cast<float>(y[i].scales[j] & 0xF);
      if (d == 0.0f) continue;
      const float m = mm * static_cast<float>(y[i].scales[j] >> 4);
      for (int ii = 0; ii < 16; ++ii) {
        const int l = nearest_int((x[16 * j + ii] + m) / d);
        L[16 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(3, l)));
      }
    }
    for (int j = 0; j < QK_K; j += 128) {
      for (int l = 0; l < 32; ++l) {
        y[i].qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) |
                                                  (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
      }
    }
  }
}

// Q4_K (nmax 15) and Q5_K (nmax 31): per sub-block of 32 an affine fit (scale, min) under the
// weights, then the 8 scales and 8 mins as 6-bit multiples of two super-scales fitted by
// make_positive_quants with each sub-block's total weight; the quants again for the stored
// scales. L gets the final quants (0..nmax) of the super-block.
void affine_k_weighted(const float* x, const float* qw, int nmax, f16_t* d_out, f16_t* dmin_out,
                       uint8_t* scales_out, uint8_t* L) {
  float weights[32], sw[QK_K / 32], mins[QK_K / 32], scales[QK_K / 32];
  uint8_t Ls[QK_K / 32], Lm[QK_K / 32];
  float sum_x2 = 0.0f;
  for (int l = 0; l < QK_K; ++l) sum_x2 += x[l] * x[l];
  const float sigma2 = 2 * sum_x2 / QK_K;
  for (int j = 0; j < QK_K / 32; ++j) {
    for (int l = 0; l < 32; ++l) {
      weights[l] = qw[32 * j + l] * std::sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]);
    }
    float sumw = 0.0f;
    for (int l = 0; l < 32; ++l) sumw += weights[l];
    sw[j] = sumw;
    scales[j] = make_affine_weighted(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], -0.9f,
                                     0.05f, 36, false);
  }
  const float d_block = make_positive_quants(QK_K / 32, 63, scales, Ls, sw);
  const float m_block = make_positive_quants(QK_K / 32, 63, mins, Lm, sw);
  for (int j = 0; j < QK_K / 32; ++j) {
    const uint8_t ls = std::min<uint8_t>(63, Ls[j]), lm = std::min<uint8_t>(63, Lm[j]);
    if (j < 4) {
      scales_out[j] = ls;
      scales_out[j + 4] = lm;
    } else {
      scales_out[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
      scales_out[j - 4] = static_cast<uint8_t>(scales_out[j - 4] | ((ls >> 4) << 6));
      scales_out[j] = static_cast<uint8_t>(scales_out[j] | ((lm >> 4) << 6));
    }
  }
  *d_out = f32_to_f16(d_block);
  *dmin_out = f32_to_f16(m_block);
  for (int j = 0; j < QK_K / 32; ++j) {
    uint8_t sc, m;
    get_scale_min_k4(j, scales_out, &sc, &m);
    const float d = f16_to_f32(*d_out) * static_cast<float>(sc);
    if (d == 0.0f) continue;
    const float dm = f16_to_f32(*dmin_out) * static_cast<float>(m);
    for (int ii = 0; ii < 32; ++ii) {
      const int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    }
  }
}

void quantize_row_q4_K_weighted(const float* x, BlockQ4_K* y, int64_t n, const float* qw) {
  uint8_t L[QK_K];
  for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
    affine_k_weighted(x, qw + QK_K * i, 15, &y[i].d, &y[i].dmin, y[i].scales, L);
    uint8_t* q = y[i].qs;
    for (int j = 0; j < QK_K; j += 64, q += 32) {
      for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    }
  }
}

void quantize_row_q5_K_weighted(const float* x, BlockQ5_K* y, int64_t n, const float* qw) {
  uint8_t L[QK_K];
  for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
    affine_k_weighted(x, qw + QK_K * i, 31, &y[i].d, &y[i].dmin, y[i].scales, L);
    uint8_t* qh = y[i].qh;
    uint8_t* ql = y[i].qs;
    std::memset(qh, 0, QK_K / 8);
    uint8_t m1 = 1, m2 = 2;
    for (int n0 = 0; n0 < QK_K; n0 += 64, ql += 32) {
      for (int j = 0; j < 32; ++j) {
        int l1 = L[n0 + j], l2 = L[n0 + j + 32];
        if (l1 > 15) {
          l1 -= 16;
          qh[j] = static_cast<uint8_t>(qh[j] | m1);
        }
        if (l2 > 15) {
          l2 -= 16;
          qh[j] = static_cast<uint8_t>(qh[j] | m2);
        }
        ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
      m1 = static_cast<uint8_t>(m1 << 2);
      m2 = static_cast<uint8_t>(m2 << 2);
    }
  }
}

// Row statistics of the legacy types: each element's weight qw * sqrt(sigma2 + x^2) with sigma2
// the mean square of the whole row.
float row_sigma2(const float* x, int64_t n) {
  float sum_x2 = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
  return sum_x2 / static_cast<float>(n);
}

void block_weights(const float* xb, const float* qw, float sigma2, float* weight) {
  for (int j = 0; j < 32; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + xb[j] * xb[j]);
}

// The fifth bits of 32 codes (element j at bit j of the block's qh).
uint32_t fifth_bits(const uint8_t* L) {
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    qh |= ((static_cast<uint32_t>(L[j]) & 0x10u) >> 4) << j;
    qh |= ((static_cast<uint32_t>(L[j + 16]) & 0x10u) >> 4) << (j + 16);
  }
  return qh;
}

void quantize_row_q4_1_weighted(const float* x, BlockQ4_1* y, int64_t n, const float* qw) {
  const float sigma2 = row_sigma2(x, n);
  float weight[32], neg_min;
  uint8_t L[32];
  for (int64_t ib = 0; ib < n / 32; ++ib) {
    block_weights(x + 32 * ib, qw + 32 * ib, sigma2, weight);
    const float d = make_affine_weighted(32, 15, x + 32 * ib, weight, L, &neg_min, -0.9f, 0.05f,
                                         36, false);
    y[ib].d = f32_to_f16(d);
    y[ib].m = f32_to_f16(-neg_min);
    for (int j = 0; j < 16; ++j) y[ib].qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
  }
}

void quantize_row_q5_0_weighted(const float* x, BlockQ5_0* y, int64_t n, const float* qw) {
  const float sigma2 = row_sigma2(x, n);
  float weight[32];
  int8_t L[32];
  for (int64_t ib = 0; ib < n / 32; ++ib) {
    block_weights(x + 32 * ib, qw + 32 * ib, sigma2, weight);
    y[ib].d = f32_to_f16(make_symmetric_weighted(32, 16, x + 32 * ib, L, weight));
    const uint8_t* u = reinterpret_cast<const uint8_t*>(L);
    for (int j = 0; j < 16; ++j) {
      y[ib].qs[j] = static_cast<uint8_t>((u[j] & 0x0F) | ((u[j + 16] & 0x0F) << 4));
    }
    const uint32_t qh = fifth_bits(u);
    std::memcpy(y[ib].qh, &qh, 4);
  }
}

void quantize_row_q5_1_weighted(const float* x, BlockQ5_1* y, int64_t n, const float* qw) {
  const float sigma2 = row_sigma2(x, n);
  float weight[32], neg_min;
  uint8_t L[32];
  for (int64_t ib = 0; ib < n / 32; ++ib) {
    block_weights(x + 32 * ib, qw + 32 * ib, sigma2, weight);
    const float d = make_affine_weighted(32, 31, x + 32 * ib, weight, L, &neg_min, -0.9f, 0.05f,
                                         36, false);
    y[ib].d = f32_to_f16(d);
    y[ib].m = f32_to_f16(-neg_min);
    for (int j = 0; j < 16; ++j) {
      y[ib].qs[j] = static_cast<uint8_t>((L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4));
    }
    const uint32_t qh = fifth_bits(L);
    std::memcpy(y[ib].qh, &qh, 4);
  }
}

// Q3_K: a symmetric fit (levels -4..3) per sub-block of 16 under the weights (sigma2 twice the
// super-block's mean square), the 16 scales as 6-bit signed multiples of one super-scale fitted
// with each sub-block's total weight, then the quants again for the stored scales.
void quantize_row_q3_K_weighted(const float* x, BlockQ3_K* y, int64_t n, const float* qw) {
  int8_t L[QK_K], Ls[QK_K / 16];
  float scales[QK_K / 16], weight[16], sw[QK_K / 16];
  for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
    float sumx2 = 0.0f;
    for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
    const float sigma2 = 2 * sumx2 / QK_K;
    for (int j = 0; j < QK_K / 16; ++j) {
      const float* w = qw + QK_K * i + 16 * j;
      for (int l = 0; l < 16; ++l) {
        weight[l] = w[l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
      }
      float sumw = 0.0f;
      for (int l = 0; l < 16; ++l) sumw += weight[l];
      sw[j] = sumw;
      scales[j] = make_symmetric_weighted(16, 4, x + 16 * j, L + 16 * j, weight);
    }
    std::memset(y[i].scales, 0, 12);
    const float d_block = make_symmetric_weighted(QK_K / 16, 32, scales, Ls, sw);
    for (int j = 0; j < QK_K / 16; ++j) {
      int l = Ls[j];
      if (j < 8) {
        y[i].scales[j] = static_cast<uint8_t>(l & 0xF);
      } else {
        y[i].scales[j - 8] = static_cast<uint8_t>(y[i].scales[j - 8] | ((l & 0xF) << 4));
      }
      l >>= 4;
      y[i].scales[j % 4 + 8] = static_cast<uint8_t>(y[i].scales[j % 4 + 8] | (l << (2 * (j / 4))));
    }
    y[i].d = f32_to_f16(d_block);
    for (int j = 0; j < QK_K / 16; ++j) {
      int sc = j < 8 ? y[i].scales[j] & 0xF : y[i].scales[j - 8] >> 4;
      sc = (sc | (((y[i].scales[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
      const float d = f16_to_f32(y[i].d) * static_cast<float>(sc);
      if (d == 0.0f) continue;
      for (int ii = 0; ii < 16; ++ii) {
        const int l = nearest_int(x[16 * j + ii] / d);
        L[16 * j + ii] = static_cast<int8_t>(std::max(-4, std::min(3, l)) + 4);
      }
    }
    std::memset(y[i].hmask, 0, QK_K / 8);
    int m = 0;
    uint8_t hm = 1;
    for (int j = 0; j < QK_K; ++j) {  // the high bit of element j: bit j / 32 of hmask[j % 32]
      if (L[j] > 3) {
        y[i].hmask[m] = static_cast<uint8_t>(y[i].hmask[m] | hm);
        L[j] = static_cast<int8_t>(L[j] - 4);
      }
      if (++m == QK_K / 8) {
        m = 0;
        hm = static_cast<uint8_t>(hm << 1);
      }
    }
    for (int j = 0; j < QK_K; j += 128) {
      for (int l = 0; l < 32; ++l) {
        y[i].qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) |
                                                  (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
      }
    }
  }
}

}  // namespace pyllm
