// AVX2 matvec kernels with the int16-split activations of matvec_vnni.cc, for CPUs without
// AVX-512 VNNI: Q4_0, Q4_1, Q5_0, Q5_1 (one block of 32 per register), Q4_K, Q5_K (one
// sub-block of 32 per register), Q2_K, Q3_K and Q6_K (two sub-blocks of 16 per register).
//
// Same scheme and error bound as matvec_vnni.cc (each activation block of 32 rounded to int16
// steps, split exactly into xi = 256 * hi + lo), with VPMADDUBSW + VPMADDWD instead of
// VPDPBUSD. VPMADDUBSW saturates pairs at 16 bits, so both products must stay below 2^15 / 2:
// u * hi <= 63 * 128 and lo * u <= 255 * 63 hold for weights of at most 6 bits; Q8_0 (8-bit),
// the IQ4 types (8-bit table levels), the grid types (signed grid values) and TQ2_0 therefore
// get an F32 kernel here (matvec_avx2_int8_f32: int8 lanes widened to floats).
//
// Compiled for the AVX2 build only (CMakeLists.txt); table_avx2.cc says which type uses which.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/isa/decode.h"
#include "cpu/isa/kernels.h"
#include "cpu/isa/simd.h"
#include "cpu/kernel_table.h"

#if !defined(PYLLM_ISA_AVX2)
#error "matvec_avx2.cc is part of the AVX2 build only (CMakeLists.txt, PYLLM_ISA_SOURCES_avx2)"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {

// One token: per block of 32 (natural order) hi[32], lo[32], dx, 8 lane corrections, xsum.
struct SplitAct {
  std::vector<int8_t> hi;
  std::vector<uint8_t> lo;
  std::vector<float> dx;
  std::vector<int32_t> hc;  // 8 per block: f_hi * sum(hi) + f_lo * sum(lo) over the lane's 4
  std::vector<float> xsum;
};

void prepare(const float* x, int64_t k, int32_t f_hi, int32_t f_lo, SplitAct& s) {
  const int64_t nb = k / 32;
  s.hi.resize(static_cast<size_t>(k));
  s.lo.resize(static_cast<size_t>(k));
  s.dx.resize(static_cast<size_t>(nb));
  s.hc.resize(static_cast<size_t>(nb * 8));
  s.xsum.resize(static_cast<size_t>(nb));
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + 32 * b;
    __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      sum = _mm256_add_ps(sum, v[i]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float mx = _mm_cvtss_f32(m);
    s.xsum[b] = vsum(sum);
    s.dx[b] = mx / 32767.0f;
    const __m256 id = _mm256_set1_ps(mx > 0.0f ? 32767.0f / mx : 0.0f);
    alignas(32) int32_t xi[32];
    for (int i = 0; i < 4; ++i) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(xi + 8 * i),
                         _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id)));
    }
    int8_t* hi = s.hi.data() + 32 * b;
    uint8_t* lo = s.lo.data() + 32 * b;
    for (int i = 0; i < 32; ++i) {
      hi[i] = static_cast<int8_t>(xi[i] >> 8);
      lo[i] = static_cast<uint8_t>(xi[i] & 255);
    }
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi));
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo));
    const __m256i hs = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, h), ones16);
    const __m256i ls = _mm256_madd_epi16(_mm256_maddubs_epi16(l, ones8), ones16);
    const __m256i hc = _mm256_add_epi32(_mm256_mullo_epi32(hs, _mm256_set1_epi32(f_hi)),
                                        _mm256_mullo_epi32(ls, _mm256_set1_epi32(f_lo)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.hc.data() + 8 * b), hc);
  }
}

std::vector<SplitAct>& token_scratch(int nt) {
  thread_local std::vector<SplitAct> scratch;
  if (static_cast<int>(scratch.size()) < nt) scratch.resize(static_cast<size_t>(nt));
  return scratch;
}

// Exact lane sums of u * xi over one block of 32 (u unsigned, at most 6 bits): 8 int32 lanes.
inline __m256i lane_dot(__m256i u, const SplitAct& s, int64_t b) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.hi.data() + 32 * b));
  const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.lo.data() + 32 * b));
  const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u, h), ones16);
  const __m256i p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(l, u), ones16);
  const __m256i hc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.hc.data() + 8 * b));
  return _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(p1, 8), p2), hc);
}

// 32 bits -> 32 bytes: 0x10 where the bit is set (byte i <- bit i).
inline __m256i bits_to_0x10(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
  const __m256i sel = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

inline float hsum8(__m256 v) { return vsum(v); }

// Q4_0, Q4_1, Q5_0, Q5_1: u in the natural order [qs & 15, qs >> 4] (| fifth bit << 4).
template <class Block, bool kHigh, bool kMin, int kOffset>
struct MvLegacy {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
      const int64_t nb = a.k / 32;
      std::vector<SplitAct>& s = token_scratch(NT);
      for (int t = 0; t < NT; ++t) {
        prepare(a.x + (t0 + t) * a.ldx, a.k, -256 * kOffset, -kOffset, s[t]);
      }
      const __m128i m4 = _mm_set1_epi8(0x0F);
      for (int64_t r = r0; r < r1; ++r) {
        const Block* row = reinterpret_cast<const Block*>(a.w + r * a.row_bytes);
        __m256 acc[NT];
        float off[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), off[t] = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          const Block& blk = row[b];
          const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs));
          __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m4),
                                       _mm_and_si128(qs, m4));
          if constexpr (kHigh) {
            uint32_t qh;
            std::memcpy(&qh, blk.qh, 4);
            u = _mm256_or_si256(u, bits_to_0x10(qh));
          }
          const float d = half_to_float(blk.d);
          float m = 0.0f;
          if constexpr (kMin) m = half_to_float(blk.m);
          for (int t = 0; t < NT; ++t) {
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_dot(u, s[t], b)),
                                     _mm256_set1_ps(d * s[t].dx[b]), acc[t]);
            if constexpr (kMin) off[t] += m * s[t].xsum[b];
          }
        }
        for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r] = hsum8(acc[t]) + off[t];
      }
    }
  };
};

// The 8 scales (d * sc_j) and mins (dmin * m_j) of a Q4_K / Q5_K block as floats. Bytes 0-3
// of the packed 12 hold scales 0-3 (+ top bits of scales 4-7), bytes 4-7 mins 0-3 (+ top bits of
// mins 4-7), bytes 8-11 the low nibbles of scales / mins 4-7.
template <class Block>
inline void k4_scales(const Block& blk, float* ds, float* dm) {
  uint32_t w[3];
  std::memcpy(w, blk.scales, 12);
  const uint32_t low6 = 0x3f3f3f3fu, nib = 0x0f0f0f0fu, top2 = 0x03030303u;
  const uint64_t sc = (w[0] & low6) |
                      (static_cast<uint64_t>((w[2] & nib) | (((w[0] >> 6) & top2) << 4)) << 32);
  const uint64_t mn = (w[1] & low6) |
                      (static_cast<uint64_t>(((w[2] >> 4) & nib) | (((w[1] >> 6) & top2) << 4))
                       << 32);
  const __m256 vs = _mm256_cvtepi32_ps(
      _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(sc))));
  const __m256 vm = _mm256_cvtepi32_ps(
      _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(mn))));
  _mm256_store_ps(ds, _mm256_mul_ps(vs, _mm256_set1_ps(half_to_float(blk.d))));
  _mm256_store_ps(dm, _mm256_mul_ps(vm, _mm256_set1_ps(half_to_float(blk.dmin))));
}

// Q4_K, Q5_K: sub-block j of 32 = nibble (j & 1) of qs[32 (j / 2) ..] (| bit j of qh << 4).
template <class Block, bool kHigh>
struct MvK4 {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
      const int64_t nsb = a.k / QK_K;
      std::vector<SplitAct>& s = token_scratch(NT);
      for (int t = 0; t < NT; ++t) prepare(a.x + (t0 + t) * a.ldx, a.k, 0, 0, s[t]);
      const __m256i m4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
      for (int64_t r = r0; r < r1; ++r) {
        const Block* row = reinterpret_cast<const Block*>(a.w + r * a.row_bytes);
        __m256 acc[NT], offv[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), offv[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nsb; ++b) {
          const Block& blk = row[b];
          alignas(32) float ds[8], dm[8];
          k4_scales(blk, ds, dm);
          __m256i qh = _mm256_setzero_si256();
          if constexpr (kHigh) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qh));
          for (int t = 0; t < NT; ++t) {
            offv[t] = _mm256_fmadd_ps(_mm256_load_ps(dm),
                                      _mm256_loadu_ps(s[t].xsum.data() + 8 * b), offv[t]);
          }
          for (int j = 0; j < 8; ++j) {
            const __m256i c =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs + 32 * (j / 2)));
            __m256i u = (j & 1) ? _mm256_and_si256(_mm256_srli_epi16(c, 4), m4)
                                : _mm256_and_si256(c, m4);
            if constexpr (kHigh) {
              const __m256i sel = _mm256_set1_epi8(static_cast<char>(1 << j));
              u = _mm256_or_si256(
                  u, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, sel), sel), bit4));
            }
            const int64_t sb = 8 * b + j;
            for (int t = 0; t < NT; ++t) {
              acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lane_dot(u, s[t], sb)),
                                       _mm256_set1_ps(ds[j] * s[t].dx[sb]), acc[t]);
            }
          }
        }
        for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r] = hsum8(acc[t]) - hsum8(offv[t]);
      }
    }
  };
};

// Q6_K: u = ql nibble | 2 bits of qh << 4, w = d * sc * (u - 32); a register holds 32 elements
// (two sub-blocks of 16, lanes 0-3 and 4-7).
template <int NT>
struct MvQ6_K {
  static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
    const int64_t nsb = a.k / QK_K;
    std::vector<SplitAct>& s = token_scratch(NT);
    for (int t = 0; t < NT; ++t) prepare(a.x + (t0 + t) * a.ldx, a.k, -32 * 256, -32, s[t]);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
    for (int64_t r = r0; r < r1; ++r) {
      const BlockQ6_K* row = reinterpret_cast<const BlockQ6_K*>(a.w + r * a.row_bytes);
      __m256 acc[NT];
      for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nsb; ++b) {
        const BlockQ6_K& blk = row[b];
        const float d = half_to_float(blk.d);
        for (int n = 0; n < 2; ++n) {
          const __m256i la =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.ql + 64 * n));
          const __m256i lb =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.ql + 64 * n + 32));
          const __m256i h =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qh + 32 * n));
          // Element groups of 32 in the order they appear: l, l + 32, l + 64, l + 96.
          __m256i u[4];
          u[0] = _mm256_or_si256(_mm256_and_si256(la, m4),
                                 _mm256_slli_epi16(_mm256_and_si256(h, m3), 4));
          u[1] = _mm256_or_si256(_mm256_and_si256(lb, m4),
                                 _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m3), 4));
          u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4),
                                 _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m3), 4));
          u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4),
                                 _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m3), 4));
          const int8_t* sc = blk.scales + 8 * n;
          for (int g = 0; g < 4; ++g) {
            const __m256 scale = _mm256_blend_ps(_mm256_set1_ps(d * sc[2 * g]),
                                                 _mm256_set1_ps(d * sc[2 * g + 1]), 0xF0);
            const int64_t blk32 = 8 * b + 4 * n + g;  // activation block of these 32 elements
            for (int t = 0; t < NT; ++t) {
              acc[t] = _mm256_fmadd_ps(
                  _mm256_cvtepi32_ps(lane_dot(u[g], s[t], blk32)),
                  _mm256_mul_ps(scale, _mm256_set1_ps(s[t].dx[blk32])), acc[t]);
            }
          }
        }
      }
      for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r] = hsum8(acc[t]);
    }
  }
};

// Q2_K and Q3_K: element 128h + 32j + l is bits 2j, 2j+1 of qs[32h + l] (Q3_K: | bit 4h + j
// of hmask[l] << 2, minus 4); sub-blocks of 16 (lanes 0-3 / 4-7 of a register) have their own
// scale; Q2_K also a min. See MvK2 in matvec_vnni.cc for the layout.
template <bool kQ3>
struct MvK2 {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
      using Block = typename std::conditional<kQ3, BlockQ3_K, BlockQ2_K>::type;
      const int64_t nsb = a.k / QK_K;
      std::vector<SplitAct>& s = token_scratch(NT);
      thread_local std::vector<float> xsum16;  // Q2_K mins: exact sums of 16 activations
      if (!kQ3) xsum16.resize(static_cast<size_t>(NT * (a.k / 16)));
      for (int t = 0; t < NT; ++t) {
        const float* x = a.x + (t0 + t) * a.ldx;
        prepare(x, a.k, kQ3 ? -4 * 256 : 0, kQ3 ? -4 : 0, s[t]);
        if (!kQ3) {
          for (int64_t i = 0; i < a.k / 16; ++i) {
            xsum16[t * (a.k / 16) + i] =
                vsum(_mm256_add_ps(_mm256_loadu_ps(x + 16 * i), _mm256_loadu_ps(x + 16 * i + 8)));
          }
        }
      }
      const __m256i m3 = _mm256_set1_epi8(3), bit2 = _mm256_set1_epi8(4);
      for (int64_t r = r0; r < r1; ++r) {
        const Block* row = reinterpret_cast<const Block*>(a.w + r * a.row_bytes);
        __m256 acc[NT], offv[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps(), offv[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nsb; ++b) {
          const Block& blk = row[b];
          alignas(32) float sc[16];
          __m256i hm = _mm256_setzero_si256();
          if constexpr (kQ3) {
            int8_t s16[16];
            q3k_scales(blk.scales, s16);
            const float d = half_to_float(blk.d);
            for (int i = 0; i < 16; ++i) sc[i] = d * static_cast<float>(s16[i]);
            hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.hmask));
          } else {
            const float d = half_to_float(blk.d), dmin = half_to_float(blk.dmin);
            alignas(32) float mn[16];
            for (int i = 0; i < 16; ++i) {
              sc[i] = d * static_cast<float>(blk.scales[i] & 15);
              mn[i] = dmin * static_cast<float>(blk.scales[i] >> 4);
            }
            for (int t = 0; t < NT; ++t) {
              const float* xs = xsum16.data() + t * (a.k / 16) + 16 * b;
              offv[t] = _mm256_fmadd_ps(_mm256_load_ps(mn), _mm256_loadu_ps(xs), offv[t]);
              offv[t] = _mm256_fmadd_ps(_mm256_load_ps(mn + 8), _mm256_loadu_ps(xs + 8), offv[t]);
            }
          }
          for (int h = 0; h < 2; ++h) {
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs + 32 * h));
            for (int j = 0; j < 4; ++j) {
              __m256i u = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m3);
              if constexpr (kQ3) {
                const __m256i sel = _mm256_set1_epi8(static_cast<char>(1 << (4 * h + j)));
                u = _mm256_or_si256(
                    u, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, sel), sel), bit2));
              }
              const int is = 8 * h + 2 * j;
              const __m256 scale =
                  _mm256_blend_ps(_mm256_set1_ps(sc[is]), _mm256_set1_ps(sc[is + 1]), 0xF0);
              const int64_t blk32 = 8 * b + 4 * h + j;
              for (int t = 0; t < NT; ++t) {
                acc[t] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(lane_dot(u, s[t], blk32)),
                    _mm256_mul_ps(scale, _mm256_set1_ps(s[t].dx[blk32])), acc[t]);
              }
            }
          }
        }
        for (int t = 0; t < NT; ++t) {
          a.y[(t0 + t) * a.ldy + r] = hsum8(acc[t]) - (kQ3 ? 0.0f : hsum8(offv[t]));
        }
      }
    }
  };
};

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

// Q8_0 in F32 math: 16 int8 quants in an SSE register -> 16 floats in two vectors.
struct W16 {
  vf v[16 / VN];
};

inline W16 widen(__m128i q) {
  W16 w;
  w.v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  w.v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q)));
  return w;
}

inline vf madd(const W16& w, const float* x, vf acc) {
  for (int i = 0; i < 16 / VN; ++i) acc = vfma(w.v[i], vload(x + i * VN), acc);
  return acc;
}

inline __m128i load16(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }

// Elements j and j + 16 of an IQ4 sub-block of 32 (qs[j]'s two nibbles): 16 signed levels each.
inline void iq4_sub_block(const uint8_t* qs, __m128i* lo, __m128i* hi) {
  const __m128i levels = load16(kIq4Levels), m4 = _mm_set1_epi8(0x0F);
  const __m128i q = load16(qs);
  *lo = _mm_shuffle_epi8(levels, _mm_and_si128(q, m4));
  *hi = _mm_shuffle_epi8(levels, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
}

// The sources of MvInt8F32: sub-block b (elements 32 b .. 32 b + 31) of a row as two registers
// of 16 int8 values (elements 0-15, 16-31) and their scales d0, d1 (equal where the type has one
// scale per 32): w = d * value.
template <QType T>
struct Int8Src;

template <>
struct Int8Src<QType::Q8_0> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockQ8_0& blk = reinterpret_cast<const BlockQ8_0*>(row)[b];
    *q0 = load16(blk.qs), *q1 = load16(blk.qs + 16), *d0 = *d1 = half_to_float(blk.d);
  }
};

template <>
struct Int8Src<QType::IQ4_NL> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ4_NL& blk = reinterpret_cast<const BlockIQ4_NL*>(row)[b];
    iq4_sub_block(blk.qs, q0, q1);
    *d0 = *d1 = half_to_float(blk.d);
  }
};

template <>
struct Int8Src<QType::IQ4_XS> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ4_XS* blk = reinterpret_cast<const BlockIQ4_XS*>(row) + b / 8;
    const int j = static_cast<int>(b % 8);
    iq4_sub_block(blk->qs + 16 * j, q0, q1);
    *d0 = *d1 = half_to_float(blk->d) * static_cast<float>(iq4xs_scale(blk, j));
  }
};

// The grid i-quants: 4 rows of 8 signed values per sub-block (iq_signed_row, decode_iq.h; the
// IQ3 grids' rows of 4 in pairs), the scales as their decoders in decode_iq.h compute them.
inline void rows4(const uint64_t (&r)[4], __m128i* q0, __m128i* q1) {
  *q0 = _mm_set_epi64x(static_cast<long long>(r[1]), static_cast<long long>(r[0]));
  *q1 = _mm_set_epi64x(static_cast<long long>(r[3]), static_cast<long long>(r[2]));
}

// The scale of 16 elements of IQ2_XS / IQ2_S: nibble h of scales[ib].
inline float iq2_scale16(float d, const uint8_t* scales, int64_t ib, int h) {
  return iq2_factor(d, (scales[ib] >> (4 * h)) & 0x0F);
}

template <>
struct Int8Src<QType::IQ2_XXS> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ2_XXS* blk = reinterpret_cast<const BlockIQ2_XXS*>(row) + b / 8;
    const int64_t ib = b % 8;
    const uint32_t codes = iq_u32(blk->qs + 4 * ib), meta = iq_u32(blk->qs + 4 * ib + 2);
    uint64_t r[4];
    for (int l = 0; l < 4; ++l) {
      r[l] = iq_signed_row(kIq2xxsGrid[(codes >> (8 * l)) & 0xFF],
                           kIqKsigns[(meta >> (7 * l)) & 0x7F]);
    }
    rows4(r, q0, q1);
    *d0 = *d1 = iq2_factor(half_to_float(blk->d), static_cast<int>(meta >> 28));
  }
};

template <>
struct Int8Src<QType::IQ2_XS> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ2_XS* blk = reinterpret_cast<const BlockIQ2_XS*>(row) + b / 8;
    const int64_t ib = b % 8;
    const uint64_t q4 = iq_u64(blk->qs + 4 * ib);  // the 4 rows' 16-bit codes
    uint64_t r[4];
    for (int l = 0; l < 4; ++l) {
      const auto q = static_cast<uint32_t>(q4 >> (16 * l));
      r[l] = iq_signed_row(kIq2xsGrid[q & 0x1FF], kIqKsigns[(q >> 9) & 0x7F]);
    }
    rows4(r, q0, q1);
    const float d = half_to_float(blk->d);
    *d0 = iq2_scale16(d, blk->scales, ib, 0), *d1 = iq2_scale16(d, blk->scales, ib, 1);
  }
};

template <>
struct Int8Src<QType::IQ2_S> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ2_S* blk = reinterpret_cast<const BlockIQ2_S*>(row) + b / 8;
    const int64_t ib = b % 8;
    uint64_t r[4];
    for (int l = 0; l < 4; ++l) {
      const int64_t k = 4 * ib + l;
      const int idx = blk->qs[k] | (((blk->qh[ib] >> (2 * l)) & 3) << 8);
      r[l] = iq_signed_row(kIq2sGrid[idx], blk->qs[QK_K / 8 + k]);
    }
    rows4(r, q0, q1);
    const float d = half_to_float(blk->d);
    *d0 = iq2_scale16(d, blk->scales, ib, 0), *d1 = iq2_scale16(d, blk->scales, ib, 1);
  }
};

template <>
struct Int8Src<QType::IQ3_XXS> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ3_XXS* blk = reinterpret_cast<const BlockIQ3_XXS*>(row) + b / 8;
    const int64_t ib = b % 8;
    const uint8_t* codes = blk->qs + 8 * ib;
    const uint32_t m = iq_u32(blk->qs + QK_K / 4 + 4 * ib);
    uint64_t r[4];
    for (int l = 0; l < 4; ++l) {
      const uint64_t pair = kIq3xxsGrid[codes[2 * l]] |
                            (static_cast<uint64_t>(kIq3xxsGrid[codes[2 * l + 1]]) << 32);
      r[l] = iq_signed_row(pair, kIqKsigns[(m >> (7 * l)) & 0x7F]);
    }
    rows4(r, q0, q1);
    *d0 = *d1 = half_to_float(blk->d) * (0.5f + static_cast<float>(m >> 28)) * 0.5f;
  }
};

template <>
struct Int8Src<QType::IQ3_S> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ3_S* blk = reinterpret_cast<const BlockIQ3_S*>(row) + b / 8;
    const int64_t ib = b % 8;
    uint64_t r[4];
    for (int l = 0; l < 4; ++l) {
      const int64_t k = 8 * ib + 2 * l;
      const uint32_t lo = kIq3sGrid[blk->qs[k] | (((blk->qh[ib] >> (2 * l)) & 1) << 8)];
      const uint32_t hi = kIq3sGrid[blk->qs[k + 1] | (((blk->qh[ib] >> (2 * l + 1)) & 1) << 8)];
      r[l] = iq_signed_row(lo | (static_cast<uint64_t>(hi) << 32), blk->signs[4 * ib + l]);
    }
    rows4(r, q0, q1);
    const int sc = (blk->scales[ib / 2] >> (4 * (ib % 2))) & 0x0F;
    *d0 = *d1 = half_to_float(blk->d) * static_cast<float>(1 + 2 * sc);
  }
};

// IQ1_S / IQ1_M: w = dl (g + delta), g in {-1, 0, 1}, delta = +-1/8, as the integers 8 g +- 1
// times dl / 8 (exact: a power-of-two scaling). Two rows of 8 per register: 8 g by a 16-bit
// shift and a byte mask, then +1 or -1 per byte (delta's sign per 32 or per row).
inline __m128i iq1_values(uint64_t row0, uint64_t row1, __m128i plus_minus) {
  const __m128i g = _mm_set_epi64x(static_cast<long long>(row1), static_cast<long long>(row0));
  const __m128i g8 = _mm_and_si128(_mm_slli_epi16(g, 3), _mm_set1_epi8(static_cast<char>(0xF8)));
  return _mm_add_epi8(g8, plus_minus);
}

inline __m128i iq1_shift(bool minus0, bool minus1) {
  return _mm_set_epi64x(minus1 ? -1 : 0x0101010101010101ll, minus0 ? -1 : 0x0101010101010101ll);
}

template <>
struct Int8Src<QType::IQ1_S> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ1_S* blk = reinterpret_cast<const BlockIQ1_S*>(row) + b / 8;
    const int64_t ib = b % 8;
    const uint16_t h = iq_u16(blk->qh + ib);
    uint64_t r[4];
    for (int l = 0; l < 4; ++l) r[l] = kIq1sGrid[blk->qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8)];
    const bool minus = (h & 0x8000) != 0;
    *q0 = iq1_values(r[0], r[1], iq1_shift(minus, minus));
    *q1 = iq1_values(r[2], r[3], iq1_shift(minus, minus));
    *d0 = *d1 = half_to_float(blk->d) * static_cast<float>(2 * ((h >> 12) & 7) + 1) * 0.125f;
  }
};

template <>
struct Int8Src<QType::IQ1_M> {
  // elements 16 h .. 16 h + 15 of the sub-block: its sub-block s of 16, rows 2 s, 2 s + 1
  static __m128i half(const BlockIQ1_M* blk, int64_t s) {
    const int n0 = blk->qh[s] & 0x0F, n1 = blk->qh[s] >> 4;
    return iq1_values(kIq1sGrid[blk->qs[2 * s] | ((n0 & 7) << 8)],
                      kIq1sGrid[blk->qs[2 * s + 1] | ((n1 & 7) << 8)],
                      iq1_shift((n0 & 8) != 0, (n1 & 8) != 0));
  }
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockIQ1_M* blk = reinterpret_cast<const BlockIQ1_M*>(row) + b / 8;
    const int64_t ib = b % 8;
    // four 16-bit words: 3-bit scales at bits 3 i of the low 12, d in the tops
    const uint64_t sc = iq_u64(blk->scales);
    const auto dbits = static_cast<f16_t>(((sc >> 12) & 0x000F) | ((sc >> 24) & 0x00F0) |
                                          ((sc >> 36) & 0x0F00) | ((sc >> 48) & 0xF000));
    const float d = half_to_float(dbits) * 0.125f;
    const auto word = static_cast<uint32_t>(sc >> (16 * (ib / 2)));  // scales 2 ib, 2 ib + 1
    const int shift = 6 * static_cast<int>(ib % 2);
    *q0 = half(blk, 2 * ib), *q1 = half(blk, 2 * ib + 1);
    *d0 = d * static_cast<float>(2 * ((word >> shift) & 7) + 1);
    *d1 = d * static_cast<float>(2 * ((word >> (shift + 3)) & 7) + 1);
  }
};

// TQ2_0: sub-block b is the 2-bit fields p = b % 4 of the 32 bytes of half c = b / 4 (see
// BlockTQ2_0), minus 1.
template <>
struct Int8Src<QType::TQ2_0> {
  static void get(const uint8_t* row, int64_t b, __m128i* q0, __m128i* q1, float* d0, float* d1) {
    const BlockTQ2_0* blk = reinterpret_cast<const BlockTQ2_0*>(row) + b / 8;
    const int64_t c = (b % 8) / 4, p = b % 4;
    const __m128i m3 = _mm_set1_epi8(3), one = _mm_set1_epi8(1);
    const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(2 * p));
    *q0 = _mm_sub_epi8(_mm_and_si128(_mm_srl_epi16(load16(blk->qs + 32 * c), shift), m3), one);
    *q1 = _mm_sub_epi8(_mm_and_si128(_mm_srl_epi16(load16(blk->qs + 32 * c + 16), shift), m3),
                       one);
    *d0 = *d1 = half_to_float(blk->d);
  }
};

// Q8_0, IQ4_NL, IQ4_XS, the grid types and TQ2_0: 8-bit values (the quants, the i-quants'
// table levels or signed grid values) per sub-block of 32 with one or two scales, widened to
// F32. The grid types' F32 decoders (matvec_blocks) spend ~10 scalar instructions a weight
// (IQ2_XXS 0.09 GB/s per core); here a row of 8 is one table word, a sign word and a few SIMD
// instructions.
template <QType T>
struct MvInt8F32 {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
      const int64_t nb = a.k / 32;
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = a.w + r * a.row_bytes;
        vf acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = vzero();
        for (int64_t b = 0; b < nb; ++b) {
          __m128i q0, q1;
          float dl0 = 0.0f, dl1 = 0.0f;
          Int8Src<T>::get(row, b, &q0, &q1, &dl0, &dl1);
          const W16 lo = widen(q0), hi = widen(q1);
          const vf d0 = vset1(dl0), d1 = vset1(dl1);
          for (int t = 0; t < NT; ++t) {
            const float* x = a.x + (t0 + t) * a.ldx + 32 * b;
            acc[t] = vfma(madd(lo, x, vzero()), d0, vfma(madd(hi, x + 16, vzero()), d1, acc[t]));
          }
        }
        for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r] = vsum(acc[t]);
      }
    }
  };
};

}  // namespace

template <QType T>
void matvec_avx2_int16(const MatArgs& a, int64_t r0, int64_t r1) {
  if constexpr (T == QType::Q4_0) {
    by_groups<MvLegacy<BlockQ4_0, false, false, 8>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q4_1) {
    by_groups<MvLegacy<BlockQ4_1, false, true, 0>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q5_0) {
    by_groups<MvLegacy<BlockQ5_0, true, false, 16>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q5_1) {
    by_groups<MvLegacy<BlockQ5_1, true, true, 0>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q2_K) {
    by_groups<MvK2<false>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q3_K) {
    by_groups<MvK2<true>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q4_K) {
    by_groups<MvK4<BlockQ4_K, false>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q5_K) {
    by_groups<MvK4<BlockQ5_K, true>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q6_K) {
    by_groups<MvQ6_K>(a, r0, r1);
  } else {
    static_assert(kNoKernelFor<T>, "no AVX2 int16 matvec for this type");
  }
}

PYLLM_KERNEL_FOR(matvec_avx2_int16, Q4_0)
PYLLM_KERNEL_FOR(matvec_avx2_int16, Q4_1)
PYLLM_KERNEL_FOR(matvec_avx2_int16, Q5_0)
PYLLM_KERNEL_FOR(matvec_avx2_int16, Q5_1)
PYLLM_KERNEL_FOR(matvec_avx2_int16, Q2_K)
PYLLM_KERNEL_FOR(matvec_avx2_int16, Q3_K)
PYLLM_KERNEL_FOR(matvec_avx2_int16, Q4_K)
PYLLM_KERNEL_FOR(matvec_avx2_int16, Q5_K)
PYLLM_KERNEL_FOR(matvec_avx2_int16, Q6_K)

template <QType T>
void matvec_avx2_int8_f32(const MatArgs& a, int64_t r0, int64_t r1) {
  by_groups<MvInt8F32<T>::template K>(a, r0, r1);
}

PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, Q8_0)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ4_NL)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ4_XS)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ2_XXS)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ2_XS)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ2_S)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ3_XXS)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ3_S)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ1_S)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, IQ1_M)
PYLLM_KERNEL_FOR(matvec_avx2_int8_f32, TQ2_0)

}  // namespace PYLLM_ISA
}  // namespace pyllm
