// Scalar reference quantization and dequantization of the i-quants (IQ4_NL, IQ4_XS so far).
// Dequantization is the specification the kernels are checked against: bit-exact with the gguf
// package's numpy code (each product a separately rounded float32 operation in its order: the
// sub-block scale d * (ls - 32) first, then times the level). Quantization follows llama.cpp's
// (what llama-quantize writes, with or without an importance matrix): per sub-block of 32, a
// scale from the largest-magnitude value, refined by weighted least squares over 15 trial
// scales (weights: the squared values, or the importance matrix's, see quantize_iq4); IQ4_XS
// then stores each sub-block scale as a 6-bit multiple of -max_scale / 32 and re-picks the
// codes for the rounded scale.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"
#include "quant/exact_fp.h"  // no FMA contraction in this file

namespace pyllm {

void dequantize_row_iq4_nl(const BlockIQ4_NL* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK4_NL; ++i, y += QK4_NL) {
    const float d = f16_to_f32(x[i].d);
    for (int j = 0; j < QK4_NL / 2; ++j) {
      y[j] = d * static_cast<float>(kIq4Levels[x[i].qs[j] & 0x0F]);
      y[j + QK4_NL / 2] = d * static_cast<float>(kIq4Levels[x[i].qs[j] >> 4]);
    }
  }
}

void dequantize_row_iq4_xs(const BlockIQ4_XS* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const float d = f16_to_f32(x[i].d);
    const uint8_t* qs = x[i].qs;
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32, qs += 16) {
      const int ls = ((x[i].scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0F) |
                     (((x[i].scales_h >> (2 * ib)) & 3) << 4);
      const float dl = d * static_cast<float>(ls - 32);
      for (int j = 0; j < 16; ++j) {
        y[j] = dl * static_cast<float>(kIq4Levels[qs[j] & 0x0F]);
        y[j + 16] = dl * static_cast<float>(kIq4Levels[qs[j] >> 4]);
      }
    }
  }
}

namespace {

// The level nearest to x (ties to the upper one, as llama.cpp's search): a binary search of
// the sorted table.
int nearest_level(float x) {
  if (x <= kIq4Levels[0]) return 0;
  if (x >= kIq4Levels[15]) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (x < kIq4Levels[mid]) hi = mid;
    else lo = mid;
  }
  return x - kIq4Levels[hi - 1] < kIq4Levels[hi] - x ? hi - 1 : hi;
}

// Round to nearest, ties to even, through the float's mantissa (|f| < 2^22): llama.cpp's.
int round_int(float f) {
  const float v = f + 12582912.f;
  int32_t i;
  std::memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

constexpr float kEps = 1e-15f;  // a sub-block below this magnitude is all zero
constexpr int kTries = 7;       // trial scales on each side of the first guess

// One super-block of n (32 for IQ4_NL, 256 for IQ4_XS) into d, the codes L (one per element)
// and, for n > 32, the 6-bit sub-block scales; the codes packed into q4 at the end.
// qw: the importance of each of the n elements (an importance matrix's mean squares for their
// columns), or nullptr. Each element's error is weighted by x^2, or with an importance matrix
// by qw * sqrt(sigma2 + x^2), sigma2 twice the mean square of the super-block (llama.cpp's).
void quantize_iq4(int n, const float* x, f16_t* dh, uint8_t* q4, uint16_t* scales_h,
                  uint8_t* scales_l, const float* qw) {
  uint8_t L[QK_K];
  float scales[QK_K / 32];
  float weight[32];
  std::memset(L, 0, sizeof(L));
  *dh = f32_to_f16(0.0f);
  float sigma2 = 0.0f;
  if (qw != nullptr) {
    for (int j = 0; j < n; ++j) sigma2 += x[j] * x[j];
    sigma2 *= 2.0f / static_cast<float>(n);
  }
  float max_scale = 0.0f, amax_scale = 0.0f;
  for (int ib = 0; ib < n / 32; ++ib) {
    const float* xb = x + 32 * ib;
    uint8_t* Lb = L + 32 * ib;
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j) {
      weight[j] = qw != nullptr ? qw[32 * ib + j] * std::sqrt(sigma2 + xb[j] * xb[j])
                                : xb[j] * xb[j];
      const float ax = std::fabs(xb[j]);
      if (ax > amax) {
        amax = ax;
        max = xb[j];
      }
    }
    if (amax < kEps) {
      scales[ib] = 0.0f;
      continue;
    }
    float d = -max / kIq4Levels[0];
    float id = 1.0f / d;
    float sumqx = 0.0f, sumq2 = 0.0f;
    for (int j = 0; j < 32; ++j) {
      const int l = nearest_level(id * xb[j]);
      Lb[j] = static_cast<uint8_t>(l);
      const float q = kIq4Levels[l];
      const float wq = weight[j] * q;
      sumqx += wq * xb[j];
      sumq2 += wq * q;
    }
    d = sumq2 > 0.0f ? sumqx / sumq2 : 0.0f;
    float best = d * sumqx;
    for (int t = -kTries; t <= kTries; ++t) {
      id = (static_cast<float>(t) + kIq4Levels[0]) / max;
      sumqx = sumq2 = 0.0f;
      for (int j = 0; j < 32; ++j) {
        const float q = kIq4Levels[nearest_level(id * xb[j])];
        const float wq = weight[j] * q;
        sumqx += wq * xb[j];
        sumq2 += wq * q;
      }
      if (sumq2 > 0.0f && sumqx * sumqx > best * sumq2) {
        d = sumqx / sumq2;
        best = d * sumqx;
      }
    }
    scales[ib] = d;
    if (std::fabs(d) > amax_scale) {
      amax_scale = std::fabs(d);
      max_scale = d;
    }
  }
  if (n > 32) {
    *scales_h = 0;
    const float d = -max_scale / 32;
    *dh = f32_to_f16(d);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int ib = 0; ib < n / 32; ++ib) {
      int l = round_int(id * scales[ib]);
      l = l < -32 ? -32 : l > 31 ? 31 : l;
      const float dl = d * static_cast<float>(l);
      const float idl = dl != 0.0f ? 1.0f / dl : 0.0f;
      for (int j = 0; j < 32; ++j) {
        L[32 * ib + j] = static_cast<uint8_t>(nearest_level(idl * x[32 * ib + j]));
      }
      l += 32;
      const uint8_t lo = static_cast<uint8_t>(l & 0x0F), hi = static_cast<uint8_t>(l >> 4);
      if (ib % 2 == 0) scales_l[ib / 2] = lo;
      else scales_l[ib / 2] = static_cast<uint8_t>(scales_l[ib / 2] | (lo << 4));
      *scales_h = static_cast<uint16_t>(*scales_h | (hi << (2 * ib)));
    }
  } else {
    *dh = f32_to_f16(scales[0]);
    const float id = scales[0] != 0.0f ? 1.0f / scales[0] : 0.0f;
    for (int j = 0; j < 32; ++j) L[j] = static_cast<uint8_t>(nearest_level(id * x[j]));
  }
  for (int i = 0; i < n / 32; ++i) {
    for (int j = 0; j < 16; ++j) {
      q4[16 * i + j] = static_cast<uint8_t>(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
    }
  }
}

}  // namespace

void quantize_row_iq4_nl(const float* x, BlockIQ4_NL* y, int64_t n) {
  quantize_row_iq4_nl_weighted(x, y, n, nullptr);
}

void quantize_row_iq4_xs(const float* x, BlockIQ4_XS* y, int64_t n) {
  quantize_row_iq4_xs_weighted(x, y, n, nullptr);
}

void quantize_row_iq4_nl_weighted(const float* x, BlockIQ4_NL* y, int64_t n, const float* qw) {
  for (int64_t i = 0; i < n / QK4_NL; ++i) {
    quantize_iq4(QK4_NL, x + QK4_NL * i, &y[i].d, y[i].qs, nullptr, nullptr,
                 qw != nullptr ? qw + QK4_NL * i : nullptr);
  }
}

void quantize_row_iq4_xs_weighted(const float* x, BlockIQ4_XS* y, int64_t n, const float* qw) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    quantize_iq4(QK_K, x + QK_K * i, &y[i].d, y[i].qs, &y[i].scales_h, y[i].scales_l,
                 qw != nullptr ? qw + QK_K * i : nullptr);
  }
}

}  // namespace pyllm
