// Portable, exact conversions between float32 and the two 16-bit float formats GGUF stores:
// IEEE binary16 ("f16") and bfloat16 ("bf16").
//
// Pure integer bit manipulation, so every build (scalar baseline, any compiler, any ISA) produces
// the same bits as the hardware converters and as numpy: f32 -> f16 rounds to nearest even with
// correct subnormals and overflow to inf; f32 -> bf16 uses the same rounding and NaN quieting as
// ggml's fp32_to_bf16 and the gguf package. Widening conversions are exact.
#pragma once

#include <cstdint>
#include <cstring>

#include "pyllm/qtype.h"

namespace pyllm {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// binary16 -> binary32, exact for every bit pattern (NaN payloads are kept).
inline float f16_to_f32(f16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  // Zero or subnormal: the value is mant * 2^-24, which float32 represents exactly.
  const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return f32_from_bits(sign | f32_bits(mag));
}

// binary32 -> binary16, round to nearest even; magnitudes >= 65520 become inf, tiny values become
// subnormals or signed zero. NaN keeps the top 10 payload bits (and stays NaN if they are all
// zero), which is what numpy's astype(float16) does.
inline f16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) {
    if (x == 0x7f800000u) return static_cast<f16_t>(sign | 0x7c00u);
    const uint32_t payload = (x >> 13) & 0x3ffu;
    return static_cast<f16_t>(sign | 0x7c00u | (payload != 0 ? payload : 1u));
  }
  if (x >= 0x477ff000u) return static_cast<f16_t>(sign | 0x7c00u);  // rounds past 65504
  if (x < 0x38800000u) {
    // Below the smallest normal half (2^-14). Adding 0.5f puts the half-subnormal ulp (2^-24)
    // exactly at float's ulp for [0.5, 1), so the FPU's own round-to-nearest-even does the
    // rounding; the low mantissa bits of the sum are then the half's bits.
    const float sum = f32_from_bits(x) + 0.5f;
    return static_cast<f16_t>(sign | (f32_bits(sum) - 0x3f000000u));
  }
  // Normal range: rebias the exponent (127 -> 15, i.e. subtract 112 << 23, written as an add
  // mod 2^32) and add the round-to-nearest-even increment; a mantissa carry bumps the exponent.
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;
  return static_cast<f16_t>(sign | (x >> 13));
}

// bfloat16 -> binary32, exact.
inline float bf16_to_f32(bf16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN is forced quiet (bit 6 of the result set)
// without rounding, exactly as ggml and the gguf package do it.
inline bf16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((x >> 16) | 0x40u);
  return static_cast<bf16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Row conversions (scalar reference; the SIMD kernels have their own vector versions).
inline void f16_to_f32_row(const f16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}
inline void f32_to_f16_row(const float* src, f16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
inline void bf16_to_f32_row(const bf16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}
inline void f32_to_bf16_row(const float* src, bf16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

}  // namespace pyllm
