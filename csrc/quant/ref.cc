// Scalar reference quantize/dequantize for the float types (F32, F16, BF16) and the legacy
// 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the Q8_1 activation type).
//
// These routines are the specification: dequantization is bit-exact with the gguf package's numpy
// code, and quantization of F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 reproduces its bytes exactly. That
// fixes the arithmetic: every product and sum is a separately rounded float32 operation in the
// same order as the reference (one operation per statement, so no compiler contracts a*b+c into
// an FMA), max/min ties go to the first element, and the zero block uses an inverse scale of 0.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"
#include "quant/exact_fp.h"  // no FMA contraction in this file

namespace pyllm {

namespace {

// trunc(v) clamped to [0, hi], as numpy's trunc().astype(uint8).clip(0, hi) gives for every
// finite v the formats can produce; NaN maps to 0 instead of being undefined behaviour.
inline uint8_t trunc_clamp(float v, int hi) {
  if (!(v >= 0.0f)) return 0;
  if (v >= static_cast<float>(hi)) return static_cast<uint8_t>(hi);
  return static_cast<uint8_t>(static_cast<int>(v));
}

// Round half away from zero (C roundf; the gguf package's np_roundf), saturated to int8, NaN -> 0.
// Computed as trunc + (fraction >= 0.5), both exact in float32, so it needs no libm call and
// vectorizes at the baseline ISA.
inline int8_t round_i8(float v) {
  const float a = std::fabs(v);
  if (!(a < 128.0f)) {
    if (a != a) return 0;
    return v > 0.0f ? int8_t{127} : int8_t{-128};
  }
  const int t = static_cast<int>(a);
  const int r = t + (a - static_cast<float>(t) >= 0.5f ? 1 : 0);
  if (v < 0.0f) return static_cast<int8_t>(-r);
  return static_cast<int8_t>(r > 127 ? 127 : r);
}

// The element of largest magnitude, keeping its sign; the first one wins a tie (numpy argmax).
inline float signed_absmax(const float* x, int n) {
  float amax = std::fabs(x[0]);
  float max = x[0];  // an all-zero block keeps x[0], so its sign (+0 / -0) is x[0]'s, as in numpy
  for (int j = 1; j < n; ++j) {
    const float a = std::fabs(x[j]);
    if (a > amax) {
      amax = a;
      max = x[j];
    }
  }
  return max;
}

inline float inverse_or_zero(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

}  // namespace

// ---- float types ----------------------------------------------------------------------------

void dequantize_row_f32(const float* x, float* y, int64_t n) {
  std::memcpy(y, x, static_cast<size_t>(n) * sizeof(float));
}
void quantize_row_f32(const float* x, float* y, int64_t n) {
  std::memcpy(y, x, static_cast<size_t>(n) * sizeof(float));
}
void dequantize_row_f16(const f16_t* x, float* y, int64_t n) { f16_to_f32_row(x, y, n); }
void quantize_row_f16(const float* x, f16_t* y, int64_t n) { f32_to_f16_row(x, y, n); }
void dequantize_row_bf16(const bf16_t* x, float* y, int64_t n) { bf16_to_f32_row(x, y, n); }
void quantize_row_bf16(const float* x, bf16_t* y, int64_t n) { f32_to_bf16_row(x, y, n); }

// ---- Q4_0: x = d * (q - 8), d = max / -8 where max is the signed largest-magnitude value --------

void quantize_row_q4_0(const float* x, BlockQ4_0* y, int64_t n) {
  const int64_t nb = n / QK4_0;
  for (int64_t i = 0; i < nb; ++i, x += QK4_0) {
    const float d = signed_absmax(x, QK4_0) / -8.0f;
    const float id = inverse_or_zero(d);
    y[i].d = f32_to_f16(d);
    for (int j = 0; j < QK4_0 / 2; ++j) {
      const float s0 = x[j] * id;
      const float s1 = x[j + QK4_0 / 2] * id;
      const uint8_t q0 = trunc_clamp(s0 + 8.5f, 15);
      const uint8_t q1 = trunc_clamp(s1 + 8.5f, 15);
      y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

void dequantize_row_q4_0(const BlockQ4_0* x, float* y, int64_t n) {
  const int64_t nb = n / QK4_0;
  for (int64_t i = 0; i < nb; ++i, y += QK4_0) {
    const float d = f16_to_f32(x[i].d);
    for (int j = 0; j < QK4_0 / 2; ++j) {
      y[j] = d * static_cast<float>((x[i].qs[j] & 0x0F) - 8);
      y[j + QK4_0 / 2] = d * static_cast<float>((x[i].qs[j] >> 4) - 8);
    }
  }
}

// ---- Q4_1: x = d * q + m, d = (max - min) / 15, m = min ---------------------------------------

void quantize_row_q4_1(const float* x, BlockQ4_1* y, int64_t n) {
  const int64_t nb = n / QK4_1;
  for (int64_t i = 0; i < nb; ++i, x += QK4_1) {
    float min = x[0];
    float max = x[0];
    for (int j = 1; j < QK4_1; ++j) {
      min = x[j] < min ? x[j] : min;
      max = x[j] > max ? x[j] : max;
    }
    const float d = (max - min) / 15.0f;
    const float id = inverse_or_zero(d);
    y[i].d = f32_to_f16(d);
    y[i].m = f32_to_f16(min);
    for (int j = 0; j < QK4_1 / 2; ++j) {
      const float s0 = (x[j] - min) * id;
      const float s1 = (x[j + QK4_1 / 2] - min) * id;
      const uint8_t q0 = trunc_clamp(s0 + 0.5f, 15);
      const uint8_t q1 = trunc_clamp(s1 + 0.5f, 15);
      y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
  }
}

void dequantize_row_q4_1(const BlockQ4_1* x, float* y, int64_t n) {
  const int64_t nb = n / QK4_1;
  for (int64_t i = 0; i < nb; ++i, y += QK4_1) {
    const float d = f16_to_f32(x[i].d);
    const float m = f16_to_f32(x[i].m);
    for (int j = 0; j < QK4_1 / 2; ++j) {
      const float p0 = d * static_cast<float>(x[i].qs[j] & 0x0F);
      const float p1 = d * static_cast<float>(x[i].qs[j] >> 4);
      y[j] = p0 + m;
      y[j + QK4_1 / 2] = p1 + m;
    }
  }
}

// ---- Q5_0: like Q4_0 with 5-bit quants (q - 16), the fifth bits packed in qh (bit j = elem j) ----

void quantize_row_q5_0(const float* x, BlockQ5_0* y, int64_t n) {
  const int64_t nb = n / QK5_0;
  for (int64_t i = 0; i < nb; ++i, x += QK5_0) {
    const float d = signed_absmax(x, QK5_0) / -16.0f;
    const float id = inverse_or_zero(d);
    y[i].d = f32_to_f16(d);
    uint32_t qh = 0;
    for (int j = 0; j < QK5_0 / 2; ++j) {
      const float s0 = x[j] * id;
      const float s1 = x[j + QK5_0 / 2] * id;
      const uint8_t q0 = trunc_clamp(s0 + 16.5f, 31);
      const uint8_t q1 = trunc_clamp(s1 + 16.5f, 31);
      y[i].qs[j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
      qh |= static_cast<uint32_t>(q0 >> 4) << j;
      qh |= static_cast<uint32_t>(q1 >> 4) << (j + QK5_0 / 2);
    }
    for (int b = 0; b < 4; ++b) y[i].qh[b] = static_cast<uint8_t>(qh >> (8 * b));
  }
}

void dequantize_row_q5_0(const BlockQ5_0* x, float* y, int64_t n) {
  const int64_t nb = n / QK5_0;
  for (int64_t i = 0; i < nb; ++i, y += QK5_0) {
    const float d = f16_to_f32(x[i].d);
    const uint32_t qh = static_cast<uint32_t>(x[i].qh[0]) | (static_cast<uint32_t>(x[i].qh[1]) << 8) |
                        (static_cast<uint32_t>(x[i].qh[2]) << 16) | (static_cast<uint32_t>(x[i].qh[3]) << 24);
    for (int j = 0; j < QK5_0 / 2; ++j) {
      const int h0 = static_cast<int>((qh >> j) & 1u) << 4;
      const int h1 = static_cast<int>((qh >> (j + QK5_0 / 2)) & 1u) << 4;
      y[j] = d * static_cast<float>(((x[i].qs[j] & 0x0F) | h0) - 16);
      y[j + QK5_0 / 2] = d * static_cast<float>(((x[i].qs[j] >> 4) | h1) - 16);
    }
  }
}

// ---- Q5_1: like Q4_1 with 5-bit quants, d = (max - min) / 31 ------------------------------------

void quantize_row_q5_1(const float* x, BlockQ5_1* y, int64_t n) {
  const int64_t nb = n / QK5_1;
  for (int64_t i = 0; i < nb; ++i, x += QK5_1) {
    float min = x[0];
    float max = x[0];
    for (int j = 1; j < QK5_1; ++j) {
      min = x[j] < min ? x[j] : min;
      max = x[j] > max ? x[j] : max;
    }
    const float d = (max - min) / 31.0f;
    const float id = inverse_or_zero(d);
    y[i].d = f32_to_f16(d);
    y[i].m = f32_to_f16(min);
    uint32_t qh = 0;
    for (int j = 0; j < QK5_1 / 2; ++j) {
      const float s0 = (x[j] - min) * id;
      const float s1 = (x[j + QK5_1 / 2] - min) * id;
      const uint8_t q0 = trunc_clamp(s0 + 0.5f, 31);
      const uint8_t q1 = trunc_clamp(s1 + 0.5f, 31);
      y[i].qs[j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
      qh |= static_cast<uint32_t>(q0 >> 4) << j;
      qh |= static_cast<uint32_t>(q1 >> 4) << (j + QK5_1 / 2);
    }
    for (int b = 0; b < 4; ++b) y[i].qh[b] = static_cast<uint8_t>(qh >> (8 * b));
  }
}

void dequantize_row_q5_1(const BlockQ5_1* x, float* y, int64_t n) {
  const int64_t nb = n / QK5_1;
  for (int64_t i = 0; i < nb; ++i, y += QK5_1) {
    const float d = f16_to_f32(x[i].d);
    const float m = f16_to_f32(x[i].m);
    const uint32_t qh = static_cast<uint32_t>(x[i].qh[0]) | (static_cast<uint32_t>(x[i].qh[1]) << 8) |
                        (static_cast<uint32_t>(x[i].qh[2]) << 16) | (static_cast<uint32_t>(x[i].qh[3]) << 24);
    for (int j = 0; j < QK5_1 / 2; ++j) {
      const int h0 = static_cast<int>((qh >> j) & 1u) << 4;
      const int h1 = static_cast<int>((qh >> (j + QK5_1 / 2)) & 1u) << 4;
      const float p0 = d * static_cast<float>((x[i].qs[j] & 0x0F) | h0);
      const float p1 = d * static_cast<float>((x[i].qs[j] >> 4) | h1);
      y[j] = p0 + m;
      y[j + QK5_1 / 2] = p1 + m;
    }
  }
}

// ---- Q8_0: x = d * q, d = amax / 127, q = round-half-away(x / d) --------------------------------

void quantize_row_q8_0(const float* x, BlockQ8_0* y, int64_t n) {
  const int64_t nb = n / QK8_0;
  for (int64_t i = 0; i < nb; ++i, x += QK8_0) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_0; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = inverse_or_zero(d);
    y[i].d = f32_to_f16(d);
    for (int j = 0; j < QK8_0; ++j) y[i].qs[j] = round_i8(x[j] * id);
  }
}

void dequantize_row_q8_0(const BlockQ8_0* x, float* y, int64_t n) {
  const int64_t nb = n / QK8_0;
  for (int64_t i = 0; i < nb; ++i, y += QK8_0) {
    const float d = f16_to_f32(x[i].d);
    for (int j = 0; j < QK8_0; ++j) y[j] = d * static_cast<float>(x[i].qs[j]);
  }
}

// ---- Q8_1 (activations for Q4_1/Q5_1 dots): Q8_0's quants plus s = d * sum(q), so the weight
// block's min contributes m * s with one multiply per block pair -------------------------------

void quantize_row_q8_1(const float* x, BlockQ8_1* y, int64_t n) {
  const int64_t nb = n / QK8_1;
  for (int64_t i = 0; i < nb; ++i, x += QK8_1) {
    float amax = 0.0f;
    for (int j = 0; j < QK8_1; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = inverse_or_zero(d);
    int sum = 0;
    for (int j = 0; j < QK8_1; ++j) {
      y[i].qs[j] = round_i8(x[j] * id);
      sum += y[i].qs[j];
    }
    y[i].d = f32_to_f16(d);
    y[i].s = f32_to_f16(static_cast<float>(sum) * d);
  }
}

void dequantize_row_q8_1(const BlockQ8_1* x, float* y, int64_t n) {
  const int64_t nb = n / QK8_1;
  for (int64_t i = 0; i < nb; ++i, y += QK8_1) {
    const float d = f16_to_f32(x[i].d);
    for (int j = 0; j < QK8_1; ++j) y[j] = d * static_cast<float>(x[i].qs[j]);
  }
}

}  // namespace pyllm
