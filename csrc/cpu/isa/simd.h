// A minimal float-vector vocabulary over which the kernels in this folder are written once and
// compiled per ISA: `vf` holds VN floats (16 on AVX-512, 8 on AVX2, 4 on NEON and on the portable
// "scalar" build, where it is a plain array the compiler may or may not vectorize).
//
// Included only by csrc/cpu/isa/*.cc, which the build compiles once per ISA with PYLLM_ISA_<NAME>.
#pragma once

#include <cmath>
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

// e^x for every lane. x86: Cephes-style range reduction x = n ln2 + r, |r| <= ln2 / 2, and a
// degree-6 polynomial for e^r (relative error ~2 ulp; tests/test_ops.py checks SwiGLU, which
// uses it, against float64 on every ISA); inputs are clamped to [-87.3, 88.7], where
// expf under/overflows, with NaN kept (max/min take their second operand when one is NaN). The
// softmax and SwiGLU used libm's scalar expf per element, which at a few thousand positions
// of context cost as much as the whole decode step of a small model. Other ISAs: std::exp.
#if defined(PYLLM_X86_SIMD)
#if defined(PYLLM_ISA_AVX512)
inline vf vexp(vf x) {
  const vf lo = vset1(-87.3f), hi = vset1(88.7f);
  x = _mm512_min_ps(hi, _mm512_max_ps(lo, x));
  const vf n = _mm512_roundscale_ps(vmul(x, vset1(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  const vf y = vadd(vfma(p, vmul(r, r), r), vset1(1.0f));
  return _mm512_scalef_ps(y, n);  // y * 2^n, exact
}
#else
inline vf vexp(vf x) {
  const vf lo = vset1(-87.3f), hi = vset1(88.7f);
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  const vf n = _mm256_round_ps(vmul(x, vset1(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  const vf y = vadd(vfma(p, vmul(r, r), r), vset1(1.0f));
  // 2^n as float bits: (n + 127) << 23; n is in [-126, 128] after the clamp, so split it in
  // two halves to stay within the normal exponent range at both ends.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const vf s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
  const vf s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
  return vmul(vmul(y, s1), s2);
}
#endif
#else
inline vf vexp(vf x) {
  float t[VN];
  vstore(t, x);
  for (int i = 0; i < VN; ++i) t[i] = std::exp(t[i]);
  return vload(t);
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
