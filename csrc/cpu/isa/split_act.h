// The int16-split activations of the AVX-512 VNNI decode kernels (matvec_vnni.cc, for the
// legacy / k-quant / IQ4 types, and matvec_vnni_iq.cc, for the grid i-quants and ternary types):
// each block of 32 activations rounded to int16 steps of amax/32767 and split into signed hi and
// unsigned lo bytes, so that two VPDPBUSD per 64 weights give the exact integer dot product (see
// matvec_vnni.cc's header comment), and the loop that runs a kernel over groups of up to 4 tokens.
//
// Included only by those two files (AVX-512 build).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/isa/simd.h"
#include "cpu/kernel_table.h"

#if !defined(PYLLM_ISA_AVX512)
#error "split_act.h is part of the AVX-512 build only"
#endif

namespace pyllm {
namespace PYLLM_ISA {

// One token's activations in split-int16 form, for groups of 64 elements (two blocks of 32).
struct SplitAct {
  std::vector<int8_t> hi;   // 64 per group, in the weight register's byte order
  std::vector<uint8_t> lo;  // 64 per group, same order
  std::vector<float> dx;    // 16 lane scales per group (the dx of the block each lane covers)
  std::vector<int32_t> hc;  // 16 lane corrections per group: f_hi * sum(hi) + f_lo * sum(lo)
                            // over the lane's 4 elements (weight offsets, see each kernel)
  std::vector<float> xsum;  // exact F32 sum of each block of 32 (for the min terms)
};

// Byte order of a 64-element group inside the weight register.
enum class Order {
  kNatural,      // element e at byte e                (Q8_0 pairs, Q4_K chunks)
  kNibbleSplit,  // [A0-15, B0-15, A16-31, B16-31]     (pairs of 32-blocks: [qa, qb, qa>>4, qb>>4])
  kQuad,         // groups 2q, 2q+1 = [A0-15, B0-15, C0-15, D0-15], [A16-31, ..., D16-31] for the
                 // blocks A..D = 4q..4q+3 (4 blocks of nibbles: low nibbles, then high nibbles)
};

// Quantizes 32 floats to int16 steps of amax/32767; writes hi/lo bytes (16 + 16 at two places
// when split) and returns dx.
inline float split_block(const float* x, int8_t* hi0, uint8_t* lo0, int8_t* hi1, uint8_t* lo1,
                         float* sum) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  *sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  const float id = amax > 0.0f ? 32767.0f / amax : 0.0f;
  const __m512 vid = _mm512_set1_ps(id);
  const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, vid));  // round to nearest even
  const __m512i ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, vid));
  const __m512i m255 = _mm512_set1_epi32(255);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi0), _mm512_cvtepi32_epi8(_mm512_srai_epi32(ia, 8)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi1), _mm512_cvtepi32_epi8(_mm512_srai_epi32(ib, 8)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo0), _mm512_cvtepi32_epi8(_mm512_and_si512(ia, m255)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo1), _mm512_cvtepi32_epi8(_mm512_and_si512(ib, m255)));
  return amax / 32767.0f;
}

inline void prepare(const float* x, int64_t k, Order order, int32_t f_hi, int32_t f_lo,
                    SplitAct& s) {
  const int64_t nb = k / 32;
  const int64_t ng = order == Order::kQuad ? nb / 4 * 2 : nb / 2;
  s.hi.resize(static_cast<size_t>(ng * 64));
  s.lo.resize(static_cast<size_t>(ng * 64));
  s.dx.resize(static_cast<size_t>(ng * 16));
  s.hc.resize(static_cast<size_t>(ng * 16));
  s.xsum.resize(static_cast<size_t>(nb));
  const __m512i ones = _mm512_set1_epi8(1);
  if (order == Order::kQuad) {
    for (int64_t q = 0; q < ng / 2; ++q) {
      int8_t* hi = s.hi.data() + 128 * q;
      uint8_t* lo = s.lo.data() + 128 * q;
      float d4[4];
      for (int i = 0; i < 4; ++i) {
        d4[i] = split_block(x + 128 * q + 32 * i, hi + 16 * i, lo + 16 * i, hi + 64 + 16 * i,
                            lo + 64 + 16 * i, &s.xsum[4 * q + i]);
      }
      const __m512 lanes = _mm512_permutexvar_ps(
          _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
          _mm512_castps128_ps512(_mm_loadu_ps(d4)));
      _mm512_storeu_ps(s.dx.data() + 32 * q, lanes);
      _mm512_storeu_ps(s.dx.data() + 32 * q + 16, lanes);
    }
  }
  for (int64_t g = 0; g < ng; ++g) {
    int8_t* hi = s.hi.data() + 64 * g;
    uint8_t* lo = s.lo.data() + 64 * g;
    const float* xg = x + 64 * g;
    float dxa, dxb;
    if (order == Order::kQuad) {
      // filled above
    } else if (order == Order::kNatural) {
      dxa = split_block(xg, hi, lo, hi + 16, lo + 16, &s.xsum[2 * g]);
      dxb = split_block(xg + 32, hi + 32, lo + 32, hi + 48, lo + 48, &s.xsum[2 * g + 1]);
      const __m512 lanes = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(dxa), _mm512_set1_ps(dxb));
      _mm512_storeu_ps(s.dx.data() + 16 * g, lanes);
    } else {
      dxa = split_block(xg, hi, lo, hi + 32, lo + 32, &s.xsum[2 * g]);
      dxb = split_block(xg + 32, hi + 16, lo + 16, hi + 48, lo + 48, &s.xsum[2 * g + 1]);
      const __m512 lanes = _mm512_mask_blend_ps(0xF0F0, _mm512_set1_ps(dxa), _mm512_set1_ps(dxb));
      _mm512_storeu_ps(s.dx.data() + 16 * g, lanes);
    }
    // Sums of each lane's 4 hi / lo bytes (VPDPBUSD against ones), times the type's factors.
    const __m512i hsum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(hi));
    const __m512i lsum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(lo), ones);
    const __m512i hc = _mm512_add_epi32(_mm512_mullo_epi32(hsum, _mm512_set1_epi32(f_hi)),
                                        _mm512_mullo_epi32(lsum, _mm512_set1_epi32(f_lo)));
    _mm512_storeu_si512(s.hc.data() + 16 * g, hc);
  }
  // Tail blocks outside the groups: only their sums are needed (they are computed in F32).
  for (int64_t b = 2 * ng; b < nb; ++b) {
    const float* xt = x + 32 * b;
    float t = 0.0f;
    for (int i = 0; i < 32; ++i) t += xt[i];
    s.xsum[b] = t;
  }
}

inline std::vector<SplitAct>& token_scratch(int nt) {
  thread_local std::vector<SplitAct> scratch;
  if (static_cast<int>(scratch.size()) < nt) scratch.resize(static_cast<size_t>(nt));
  return scratch;
}

// Exact integer lane sums of w * xi for one token: 256 * sum(wu * hi) + sum(lo * ws) + hc.
inline __m512i lane_dot(__m512i wu, __m512i ws, const int8_t* hi, const uint8_t* lo,
                        const int32_t* hc) {
  const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, _mm512_loadu_si512(hi));
  const __m512i p2 = _mm512_dpbusd_epi32(_mm512_loadu_si512(hc), _mm512_loadu_si512(lo), ws);
  return _mm512_add_epi32(_mm512_slli_epi32(p1, 8), p2);
}

// The f16 scales of two blocks spread over the lanes given by pattern (4 instructions).
inline __m512 two_half_scales(f16_t a, f16_t b, const __m512i& pattern) {
  const __m128i h = _mm_insert_epi16(_mm_cvtsi32_si128(a), b, 1);
  return _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
}

// Runs K<NT> over the tokens in groups of up to 4 (each group shares one pass over the rows).
template <template <int> class K>
void by_groups(const MatArgs& a, int64_t r0, int64_t r1) {
  static_assert(kMatvecTokens == 4, "the groups below are kMatvecTokens (cpu/matmul.h)");
  for (int64_t t0 = 0; t0 < a.n_tokens; t0 += 4) {
    switch (std::min<int64_t>(4, a.n_tokens - t0)) {
      case 1: K<1>::run(a, r0, r1, t0); break;
      case 2: K<2>::run(a, r0, r1, t0); break;
      case 3: K<3>::run(a, r0, r1, t0); break;
      default: K<4>::run(a, r0, r1, t0); break;
    }
  }
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
