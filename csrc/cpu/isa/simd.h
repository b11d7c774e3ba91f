// A minimal float-vector vocabulary over which the kernels in this folder are written once and
// compiled per ISA: `vf` holds VN floats (16 on AVX-512, 8 on AVX2, 4 on NEON and on the portable
// "scalar" build, where it is a plain array the compiler may or may not vectorize).
//
// Included only by csrc/cpu/isa/*.cc, which the build compiles once per ISA with PYLLM_ISA_<NAME>.
#pragma once

#include <cstdint>
#include <cstring>

#include "pyllm/fp16.h"

#if defined(PYLLM_ISA_AVX512) || defined(PYLLM_ISA_AVX2)
#include <immintrin.h>
#define PYLLM_X86_SIMD 1
#elif defined(PYLLM_ISA_NEON)
#include <arm_neon.h>
#endif

namespace pyllm {
namespace PYLLM_ISA {

#if defined(PYLLM_ISA_AVX512)
constexpr int VN = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float f) { return _mm512_set1_ps(f); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline vf vload_f16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vf vload_bf16(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#elif defined(PYLLM_ISA_AVX2)
constexpr int VN = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float f) { return _mm256_set1_ps(f); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf vload_f16(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline vf vload_bf16(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
#elif defined(PYLLM_ISA_NEON)
constexpr int VN = 4;
using vf = float32x4_t;
inline vf vzero() { return vdupq_n_f32(0.0f); }
inline vf vset1(float f) { return vdupq_n_f32(f); }
inline vf vload(const float* p) { return vld1q_f32(p); }
inline void vstore(float* p, vf v) { vst1q_f32(p, v); }
inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
inline float vsum(vf a) { return vaddvq_f32(a); }
inline vf vload_f16(const f16_t* p) {
  float t[4];
  for (int i = 0; i < 4; ++i) t[i] = f16_to_f32(p[i]);
  return vld1q_f32(t);
}
inline vf vload_bf16(const bf16_t* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
}
#else
// Portable reference: plain arrays, one rounding per multiply and per add (no fused FMA), so
// the scalar path is the straightforward sum the SIMD paths are checked against.
constexpr int VN = 4;
struct vf {
  float v[VN];
};
inline vf vzero() { return vf{{0.0f, 0.0f, 0.0f, 0.0f}}; }
inline vf vset1(float f) { return vf{{f, f, f, f}}; }
inline vf vload(const float* p) {
  vf r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline void vstore(float* p, vf v) { std::memcpy(p, v.v, sizeof v.v); }
inline vf vadd(vf a, vf b) {
  for (int i = 0; i < VN; ++i) a.v[i] += b.v[i];
  return a;
}
inline vf vmul(vf a, vf b) {
  for (int i = 0; i < VN; ++i) a.v[i] *= b.v[i];
  return a;
}
inline vf vfma(vf a, vf b, vf c) {
  for (int i = 0; i < VN; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline float vsum(vf a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
inline vf vload_f16(const f16_t* p) {
  vf r;
  for (int i = 0; i < VN; ++i) r.v[i] = f16_to_f32(p[i]);
  return r;
}
inline vf vload_bf16(const bf16_t* p) {
  vf r;
  for (int i = 0; i < VN; ++i) r.v[i] = bf16_to_f32(p[i]);
  return r;
}
#endif

// f16 scale of a block -> float (hardware converter where the ISA has one).
inline float half_to_float(f16_t h) {
#if defined(PYLLM_X86_SIMD)
  return _cvtsh_ss(h);
#else
  return f16_to_f32(h);
#endif
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
