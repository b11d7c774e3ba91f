// AVX-512 helpers shared by the kernels that read the rows16 layout (pyllm/repack.h): the
// matvec kernels (matvec_r16.cc) and the matmat panel packers (matmat_vnni.cc). Each loads or
// decodes one vector of 16 rows, one row per 32-bit lane. Like simd.h, included only by
// csrc/cpu/isa/*.cc (compiled once per ISA); empty except in the AVX-512 compilation.
#pragma once

#include <cstdint>

#if defined(PYLLM_ISA_AVX512)
#include <immintrin.h>

namespace pyllm {
namespace PYLLM_ISA {

// 16 f16 / u8 / s8 header fields (one per row) as floats.
inline __m512 f16x16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 u8x16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 s8x16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Q6_K: the chunks A = ql[64 h + 4 c ..], B = ql[64 h + 32 + 4 c ..], H = qh[32 h + 4 c ..] of
// 16 rows -> the 6-bit codes (0..63, bias 32 not removed) of elements 128 h + 32 m + 4 c ..
// in q[m], m < 4: (low & 0x0F) | (high & 0x30), one ternary-logic op for the or-and.
inline void q6k_codes(__m512i A, __m512i B, __m512i H, __m512i* q) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  q[0] = _mm512_ternarylogic_epi32(_mm512_and_si512(A, m4), _mm512_slli_epi16(H, 4), m30, 0xF8);
  q[1] = _mm512_ternarylogic_epi32(_mm512_and_si512(B, m4), _mm512_slli_epi16(H, 2), m30, 0xF8);
  q[2] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(A, 4), m4), H, m30, 0xF8);
  q[3] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(B, 4), m4),
                                   _mm512_srli_epi16(H, 2), m30, 0xF8);
}

}  // namespace PYLLM_ISA
}  // namespace pyllm

#endif  // PYLLM_ISA_AVX512
