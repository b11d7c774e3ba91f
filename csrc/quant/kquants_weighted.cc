// Importance-guided quantizers of the legacy and k-quant types (what llama-quantize --imatrix
// writes for them; byte-identical, checked against SHA-256 figures of ggml_quantize_chunk), and
// the scale searches they share with the grid i-quants (quant/search.h). Q4_0 and Q2_K so far.
//
// An element's squared error is weighted by qw * sqrt(sigma2 + x^2): qw its column's importance
// (the importance matrix's mean square), sigma2 the mean square of the row (Q4_0) or of the
// super-block (Q2_K).
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

}  // namespace pyllm
