// AVX-512 VNNI matvec kernels for every block type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K,
// IQ4_NL, IQ4_XS) that keep 16-bit activation precision while using int8 dot-product
// instructions.
//
// Why: the F32 decode path (kernels.cc) spends ~16 vector instructions per 32 weights on
// widening nibbles to floats, which caps a core at ~4 weights/cycle, below the memory wall for
// 4-bit types. ggml reaches the wall by rounding activations to int8 (Q8_0 / Q8_K), which costs
// ~0.003 KL on a forward pass. Here every activation block of 32 is instead quantized to int16,
//   xi = round(x * 32767 / amax_block),   |x - dx * xi| <= dx / 2,   dx = amax_block / 32767,
// (256x finer than int8) and split exactly into xi = 256 * hi + lo with hi signed and lo
// unsigned bytes, so two VPDPBUSD (u8 x s8) per 64 weights give the exact integer dot product
// sum(q * xi); the weights are not rounded at all. Per-lane integer corrections for the weight
// offsets (Q4_0's -8, Q8_0's sign) are precomputed from the activations, so the only float work
// per 64 weights is one convert and one FMA. Error bound vs the exact product of the dequantized
// weights: sum_blocks (dx_b / 2) * sum_{i in b} |w_i| plus F32 rounding (tests check this bound).
//
// Activations are prepared once per call per thread (cheap: k elements vs n_out * k weights),
// which keeps matmul_part free of barriers.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/isa/decode.h"
#include "cpu/isa/kernels.h"
#include "cpu/isa/simd.h"
#include "cpu/isa/split_act.h"
#include "cpu/kernel_table.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in its headers
#pragma GCC diagnostic ignored "-Wuninitialized"        // (_mm512_cast* leave lanes undefined)
#endif

#if !defined(PYLLM_ISA_AVX512)
#error "matvec_vnni.cc is part of the AVX-512 build only (CMakeLists.txt, PYLLM_ISA_SOURCES_avx512)"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {

// The legacy 4/5-bit types, four blocks A..D per two 64-lane registers (Order::kQuad): the
// low nibbles [A0-15, B0-15, C0-15, D0-15] and the high nibbles [A16-31, ..., D16-31]; both
// registers share one lane pattern of block scales, so the scale work is done once per 128.
//   Q4_0: w = d (u - 8)   Q4_1: w = d u + m   Q5_0: w = d (u - 16)   Q5_1: w = d u + m
// with u the 4-bit nibble, plus for Q5 the fifth bit from qh (bit e of qh for element e).
// The offsets are exact integer lane corrections: sum (u - c) xi = 256 sum u hi + sum u lo
// - 256 c sum hi - c sum lo; the mins use the exact F32 block sums of x. Blocks past the last
// multiple of 4 are computed in F32.
template <class Block, bool kHigh, bool kMin, int kOffset>
struct MvLegacy {
  static constexpr QType kQType =
      kHigh ? (kMin ? QType::Q5_1 : QType::Q5_0) : (kMin ? QType::Q4_1 : QType::Q4_0);

  // The four f16 fields (d or m) of blocks A..D -> 4 floats.
  static __m128 four_halves(const Block* b, bool mins) {
    f16_t h[4];
    for (int i = 0; i < 4; ++i) {
      if constexpr (kMin) {
        h[i] = mins ? b[i].m : b[i].d;
      } else {
        h[i] = b[i].d;
      }
    }
    uint64_t packed;
    std::memcpy(&packed, h, 8);
    return _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(packed)));
  }

  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
      const int64_t nb = a.k / 32, nq = nb / 4;
      std::vector<SplitAct>& s = token_scratch(NT);
      for (int t = 0; t < NT; ++t) {
        prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kQuad, -256 * kOffset, -kOffset, s[t]);
      }
      const __m512i m4 = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
      const __m512i pattern = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
      alignas(64) float tail[32];
      for (int64_t r = r0; r < r1; ++r) {
        const Block* row = reinterpret_cast<const Block*>(a.w + r * a.row_bytes);
        __m512 acc[NT];
        __m128 off[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps(), off[t] = _mm_setzero_ps();
        for (int64_t q = 0; q < nq; ++q) {
          const Block* bq = row + 4 * q;
          __m512i z = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bq[0].qs)));
          z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bq[1].qs)), 1);
          z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bq[2].qs)), 2);
          z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bq[3].qs)), 3);
          __m512i ul = _mm512_and_si512(z, m4);
          __m512i uh = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
          if constexpr (kHigh) {
            uint64_t lo_bits = 0, hi_bits = 0;
            for (int i = 0; i < 4; ++i) {
              uint32_t qh;
              std::memcpy(&qh, bq[i].qh, 4);
              lo_bits |= static_cast<uint64_t>(qh & 0xFFFFu) << (16 * i);
              hi_bits |= static_cast<uint64_t>(qh >> 16) << (16 * i);
            }
            ul = _mm512_or_si512(ul, _mm512_maskz_mov_epi8(lo_bits, bit4));
            uh = _mm512_or_si512(uh, _mm512_maskz_mov_epi8(hi_bits, bit4));
          }
          const __m512 wd =
              _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(four_halves(bq, false)));
          __m128 mins = _mm_setzero_ps();
          if constexpr (kMin) mins = four_halves(bq, true);
          const int64_t g = 2 * q;
          for (int t = 0; t < NT; ++t) {
            const __m512 scale = _mm512_mul_ps(wd, _mm512_loadu_ps(s[t].dx.data() + 16 * g));
            const __m512i ll = lane_dot(ul, ul, s[t].hi.data() + 64 * g, s[t].lo.data() + 64 * g,
                                        s[t].hc.data() + 16 * g);
            const __m512i lh = lane_dot(uh, uh, s[t].hi.data() + 64 * g + 64,
                                        s[t].lo.data() + 64 * g + 64, s[t].hc.data() + 16 * g + 16);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ll), scale, acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lh), scale, acc[t]);
            if constexpr (kMin) {
              off[t] = _mm_fmadd_ps(mins, _mm_loadu_ps(s[t].xsum.data() + 4 * q), off[t]);
            }
          }
        }
        float extra[NT] = {};
        for (int64_t b = 4 * nq; b < nb; ++b) {  // the last nb % 4 blocks in F32
          Fmt<kQType>::decode(row + b, tail);
          for (int t = 0; t < NT; ++t) {
            const float* x = a.x + (t0 + t) * a.ldx + 32 * b;
            extra[t] += vsum(vfma(vload(tail + 16), vload(x + 16), vmul(vload(tail), vload(x))));
          }
        }
        for (int t = 0; t < NT; ++t) {
          __m128 o = _mm_add_ps(off[t], _mm_movehl_ps(off[t], off[t]));
          o = _mm_add_ss(o, _mm_movehdup_ps(o));
          a.y[(t0 + t) * a.ldy + r] = vsum(acc[t]) + _mm_cvtss_f32(o) + extra[t];
        }
      }
    }
  };
};

template <int NT>
struct MvQ8_0 {
  static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
    const int64_t nb = a.k / 32, ng = nb / 2;
    std::vector<SplitAct>& s = token_scratch(NT);
    for (int t = 0; t < NT; ++t) {
      // sum w xi = 256 sum (w + 128) hi + sum w lo - 128 * 256 sum hi
      prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kNatural, -128 * 256, 0, s[t]);
    }
    const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
    const __m512i pattern = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    alignas(64) float tail[32];
    for (int64_t r = r0; r < r1; ++r) {
      const BlockQ8_0* row = reinterpret_cast<const BlockQ8_0*>(a.w + r * a.row_bytes);
      __m512 acc[NT];
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t g = 0; g < ng; ++g) {
        const BlockQ8_0& A = row[2 * g];
        const BlockQ8_0& B = row[2 * g + 1];
        const __m512i ws = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.qs))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B.qs)), 1);
        const __m512i wu = _mm512_xor_si512(ws, sign);  // w + 128 as unsigned
        const __m512 wd = two_half_scales(A.d, B.d, pattern);
        for (int t = 0; t < NT; ++t) {
          const __m512i l = lane_dot(wu, ws, s[t].hi.data() + 64 * g, s[t].lo.data() + 64 * g,
                                     s[t].hc.data() + 16 * g);
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l),
                                   _mm512_mul_ps(wd, _mm512_loadu_ps(s[t].dx.data() + 16 * g)),
                                   acc[t]);
        }
      }
      float extra[NT] = {};
      if (nb & 1) {
        Fmt<QType::Q8_0>::decode(row + nb - 1, tail);
        for (int t = 0; t < NT; ++t) {
          const float* x = a.x + (t0 + t) * a.ldx + 32 * (nb - 1);
          extra[t] = vsum(vfma(vload(tail + 16), vload(x + 16), vmul(vload(tail), vload(x))));
        }
      }
      for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r] = vsum(acc[t]) + extra[t];
    }
  }
};

// The 8 six-bit scales (low 8 bytes of *sc) and 8 mins (*mn) of a Q4_K / Q5_K block, as the
// format packs them in 12 bytes: bytes 0-3 hold scales 0-3 (+ 2 high bits of scales 4-7),
// bytes 4-7 mins 0-3 (+ 2 high bits of mins 4-7), bytes 8-11 the low nibbles of scales/mins 4-7.
inline void unpack_k4_scales(const uint8_t* packed, uint64_t* sc, uint64_t* mn) {
  uint32_t w[3];
  std::memcpy(w, packed, 12);
  const uint32_t low6 = 0x3f3f3f3fu, nib = 0x0f0f0f0fu, top2 = 0x03030303u;
  const uint32_t sc_lo = w[0] & low6, mn_lo = w[1] & low6;
  const uint32_t sc_hi = (w[2] & nib) | (((w[0] >> 6) & top2) << 4);
  const uint32_t mn_hi = ((w[2] >> 4) & nib) | (((w[1] >> 6) & top2) << 4);
  *sc = sc_lo | (static_cast<uint64_t>(sc_hi) << 32);
  *mn = mn_lo | (static_cast<uint64_t>(mn_hi) << 32);
}

// 8 bytes -> 8 floats times f.
inline __m256 bytes8_times(uint64_t bytes, float f) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(f));
}

// Q4_K and Q5_K: w = d sc_j u - dmin m_j per sub-block j of 32, u the nibble (plus, for Q5_K,
// the fifth bit: bit j of qh[l] for element l of sub-block j). A 64-lane register holds chunk
// c = sub-blocks 2c (low nibbles of qs[32c..]) and 2c + 1 (high nibbles), in natural order.
template <class Block, bool kHigh>
struct MvK4 {
template <int NT>
struct K {
  static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
    const int64_t nsb = a.k / QK_K;
    std::vector<SplitAct>& s = token_scratch(NT);
    // sum q xi = 256 sum q hi + sum q lo (q in 0..15 is a valid s8 operand; no corrections)
    for (int t = 0; t < NT; ++t) prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kNatural, 0, 0, s[t]);
    const __m512i m4 = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
    __m512i bit_sel[4];  // chunk j: qh bit 2j for its first 32 elements, bit 2j + 1 after
    for (int j = 0; j < 4; ++j) {
      bit_sel[j] = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << (2 * j))),
                                      _mm256_set1_epi8(static_cast<char>(1 << (2 * j + 1))), 1);
    }
    __m512i pattern[4];  // chunk j covers sub-blocks 2j (lanes 0-7) and 2j+1 (lanes 8-15)
    for (int j = 0; j < 4; ++j) {
      pattern[j] = _mm512_inserti64x4(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const Block* row = reinterpret_cast<const Block*>(a.w + r * a.row_bytes);
      __m512 acc[NT];
      __m256 off[NT];
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps(), off[t] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nsb; ++b) {
        const Block& blk = row[b];
        uint64_t sc, mn;
        unpack_k4_scales(blk.scales, &sc, &mn);
        const __m512 scales = _mm512_castps256_ps512(bytes8_times(sc, half_to_float(blk.d)));
        const __m256 mins = bytes8_times(mn, half_to_float(blk.dmin));
        __m512i qh = _mm512_setzero_si512();
        if constexpr (kHigh) {
          qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qh)));
        }
        for (int t = 0; t < NT; ++t) {
          off[t] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(s[t].xsum.data() + 8 * b), off[t]);
        }
        for (int j = 0; j < 4; ++j) {
          const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs + 32 * j));
          __m512i wq = _mm512_and_si512(
              _mm512_inserti64x4(_mm512_castsi256_si512(c), _mm256_srli_epi16(c, 4), 1), m4);
          if constexpr (kHigh) {
            const __mmask64 hb = _mm512_test_epi8_mask(qh, bit_sel[j]);
            wq = _mm512_mask_add_epi8(wq, hb, wq, bit4);
          }
          const __m512 wd = _mm512_permutexvar_ps(pattern[j], scales);
          const int64_t g = 4 * b + j;  // 64-element group
          for (int t = 0; t < NT; ++t) {
            const __m512i l = lane_dot(wq, wq, s[t].hi.data() + 64 * g, s[t].lo.data() + 64 * g,
                                       s[t].hc.data() + 16 * g);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l),
                                     _mm512_mul_ps(wd, _mm512_loadu_ps(s[t].dx.data() + 16 * g)),
                                     acc[t]);
          }
        }
      }
      for (int t = 0; t < NT; ++t) {
        const __m256 o = off[t];
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(o), _mm256_extractf128_ps(o, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        a.y[(t0 + t) * a.ldy + r] = vsum(acc[t]) - _mm_cvtss_f32(h);
      }
    }
  }
};
};

template <int NT>
struct MvQ6_K {
  static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
    const int64_t nsb = a.k / QK_K;
    std::vector<SplitAct>& s = token_scratch(NT);
    // w = d * sc * (u - 32), u in 0..63: sum (u - 32) xi = 256 sum u hi + sum u lo
    //                                                      - 32 * 256 sum hi - 32 sum lo
    for (int t = 0; t < NT; ++t) {
      prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kNatural, -32 * 256, -32, s[t]);
    }
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    // The 2 high bits of element e (and e + 32) of a 64-element chunk come from qh[e mod 32]
    // at bit pairs (0, 2) for the low-nibble chunk and (4, 6) for the high-nibble chunk.
    const __m512i shl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i shr = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    __m512i pattern[4];  // chunk c covers the 16-element sub-blocks 4c .. 4c + 3
    for (int c = 0; c < 4; ++c) {
      pattern[c] = _mm512_set_epi32(4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 2,
                                    4 * c + 2, 4 * c + 2, 4 * c + 2, 4 * c + 1, 4 * c + 1,
                                    4 * c + 1, 4 * c + 1, 4 * c, 4 * c, 4 * c, 4 * c);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const BlockQ6_K* row = reinterpret_cast<const BlockQ6_K*>(a.w + r * a.row_bytes);
      __m512 acc[NT];
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nsb; ++b) {
        const BlockQ6_K& blk = row[b];
        const __m512 sc = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.scales)))),
            _mm512_set1_ps(half_to_float(blk.d)));
        for (int n = 0; n < 2; ++n) {
          const __m512i ql = _mm512_loadu_si512(blk.ql + 64 * n);
          const __m512i qh = _mm512_broadcast_i64x4(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qh + 32 * n)));
          __m512i u[2];
          u[0] = _mm512_or_si512(_mm512_and_si512(ql, m4),
                                 _mm512_and_si512(_mm512_sllv_epi16(qh, shl), m30));
          u[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                 _mm512_and_si512(_mm512_srlv_epi16(qh, shr), m30));
          for (int h = 0; h < 2; ++h) {
            const int c = 2 * n + h;       // chunk within the super-block
            const int64_t g = 4 * b + c;   // 64-element group of the row
            const __m512 wd = _mm512_permutexvar_ps(pattern[c], sc);
            for (int t = 0; t < NT; ++t) {
              const __m512i l = lane_dot(u[h], u[h], s[t].hi.data() + 64 * g,
                                         s[t].lo.data() + 64 * g, s[t].hc.data() + 16 * g);
              acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l),
                                       _mm512_mul_ps(wd, _mm512_loadu_ps(s[t].dx.data() + 16 * g)),
                                       acc[t]);
            }
          }
        }
      }
      for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r] = vsum(acc[t]);
    }
  }
};

// Q2_K and Q3_K: 2-bit quants, 16 sub-blocks of 16. Element 128h + 32j + l (h = half, j =
// shift step 0..3, l = 0..31) is bits 2j, 2j+1 of qs[32h + l]; Q3_K adds a third bit
// (hmask[l] bit 4h + j, the value is then (q | bit << 2) - 4, scale d * (sc6 - 32)); Q2_K has
// w = d * (sc & 15) * q - dmin * (sc >> 4). A 64-lane register holds j = 2c', 2c' + 1 of one
// half: the same 32 qs bytes shifted by 4c' and 4c' + 2. Its 16-lane groups are sub-blocks
// 4c .. 4c + 3 (c = 2h + c'), the same lane pattern as Q6_K.
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
        // Q3_K: sum (u - 4) xi = 256 sum u hi + sum u lo - 4 * 256 sum hi - 4 sum lo
        prepare(x, a.k, Order::kNatural, kQ3 ? -4 * 256 : 0, kQ3 ? -4 : 0, s[t]);
        if (!kQ3) {
          for (int64_t i = 0; i < a.k / 16; ++i) {
            xsum16[t * (a.k / 16) + i] = _mm512_reduce_add_ps(_mm512_loadu_ps(x + 16 * i));
          }
        }
      }
      const __m512i m3 = _mm512_set1_epi8(3), bit2 = _mm512_set1_epi8(4);
      __m512i shifts[2], hsel[4], pattern[4];
      for (int c = 0; c < 2; ++c) {
        shifts[c] = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<short>(4 * c)),
                                       _mm256_set1_epi16(static_cast<short>(4 * c + 2)), 1);
      }
      for (int c = 0; c < 4; ++c) {  // chunk c = 2h + c': hmask bits 4h + 2c', 4h + 2c' + 1
        const int b0 = 4 * (c / 2) + 2 * (c % 2);
        hsel[c] = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << b0)),
                                     _mm256_set1_epi8(static_cast<char>(1 << (b0 + 1))), 1);
        pattern[c] = _mm512_set_epi32(4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 2,
                                      4 * c + 2, 4 * c + 2, 4 * c + 2, 4 * c + 1, 4 * c + 1,
                                      4 * c + 1, 4 * c + 1, 4 * c, 4 * c, 4 * c, 4 * c);
      }
      for (int64_t r = r0; r < r1; ++r) {
        const Block* row = reinterpret_cast<const Block*>(a.w + r * a.row_bytes);
        __m512 acc[NT], off[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps(), off[t] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nsb; ++b) {
          const Block& blk = row[b];
          __m512 sc, mn = _mm512_setzero_ps();
          __m512i hm = _mm512_setzero_si512();
          if constexpr (kQ3) {
            // 16 six-bit scales: low nibbles from bytes 0-7 (scales 0-7 low, 8-15 high
            // nibble), top 2 bits from bytes 8-11 (bit pair j / 4 of byte 8 + j % 4).
            uint64_t lo8;
            uint32_t top;
            std::memcpy(&lo8, blk.scales, 8);
            std::memcpy(&top, blk.scales + 8, 4);
            const uint64_t nib = 0x0F0F0F0F0F0F0F0Full, two = 0x03030303u;
            const uint64_t top01 = ((top & two) | (static_cast<uint64_t>((top >> 2) & two) << 32));
            const uint64_t top23 = (((top >> 4) & two) |
                                    (static_cast<uint64_t>((top >> 6) & two) << 32));
            const uint64_t s0 = (lo8 & nib) | (top01 << 4);
            const uint64_t s1 = ((lo8 >> 4) & nib) | (top23 << 4);
            const __m512i v = _mm512_cvtepu8_epi32(_mm_set_epi64x(static_cast<long long>(s1),
                                                                  static_cast<long long>(s0)));
            sc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(32))),
                               _mm512_set1_ps(half_to_float(blk.d)));
            hm = _mm512_broadcast_i64x4(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.hmask)));
          } else {
            const __m512i raw = _mm512_cvtepu8_epi32(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.scales)));
            sc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(raw, _mm512_set1_epi32(15))),
                               _mm512_set1_ps(half_to_float(blk.d)));
            mn = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 4)),
                               _mm512_set1_ps(half_to_float(blk.dmin)));
            for (int t = 0; t < NT; ++t) {
              const float* xs = xsum16.data() + t * (a.k / 16) + 16 * b;
              off[t] = _mm512_fmadd_ps(mn, _mm512_loadu_ps(xs), off[t]);
            }
          }
          for (int h = 0; h < 2; ++h) {
            const __m512i q = _mm512_broadcast_i64x4(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs + 32 * h)));
            for (int cp = 0; cp < 2; ++cp) {
              const int c = 2 * h + cp;
              __m512i u = _mm512_and_si512(_mm512_srlv_epi16(q, shifts[cp]), m3);
              if constexpr (kQ3) {
                u = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(hm, hsel[c]), u, bit2);
              }
              const int64_t g = 4 * b + c;
              const __m512 wd = _mm512_permutexvar_ps(pattern[c], sc);
              for (int t = 0; t < NT; ++t) {
                const __m512i l = lane_dot(u, u, s[t].hi.data() + 64 * g, s[t].lo.data() + 64 * g,
                                           s[t].hc.data() + 16 * g);
                acc[t] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(l),
                    _mm512_mul_ps(wd, _mm512_loadu_ps(s[t].dx.data() + 16 * g)), acc[t]);
              }
            }
          }
        }
        for (int t = 0; t < NT; ++t) {
          a.y[(t0 + t) * a.ldy + r] = vsum(acc[t]) - (kQ3 ? 0.0f : vsum(off[t]));
        }
      }
    }
  };
};

// IQ4_NL and IQ4_XS: w = s * level[u], u a nibble in the layout of Q4_0 (so four blocks of 32
// per two registers, Order::kQuad), level a signed byte found by VPSHUFB in the 16-entry table.
// As for Q8_0, the levels are signed: sum level xi = 256 sum (level + 128) hi + sum level lo
// - 128 * 256 sum hi. IQ4_NL has one f16 scale per block of 32; IQ4_XS the scale
// d * (ls_j - 32) per sub-block j of 32, whose 64 nibble bytes per quad are contiguous.
template <bool kXs>
struct MvIq4 {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
      const int64_t nb = a.k / 32, nq = nb / 4;
      std::vector<SplitAct>& s = token_scratch(NT);
      for (int t = 0; t < NT; ++t) {
        prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kQuad, -128 * 256, 0, s[t]);
      }
      const __m512i m4 = _mm512_set1_epi8(0x0F), sign = _mm512_set1_epi8(static_cast<char>(0x80));
      const __m512i levels =
          _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Levels)));
      const __m512i pattern = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
      const __m512i pattern_hi = _mm512_add_epi32(pattern, _mm512_set1_epi32(4));
      alignas(64) float tail[32];
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = a.w + r * a.row_bytes;
        __m512 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
        __m512 scales8 = _mm512_setzero_ps();  // IQ4_XS: the 8 sub-block scales of a block
        for (int64_t q = 0; q < nq; ++q) {
          __m512i z;
          __m512 wd;
          if constexpr (kXs) {
            const BlockIQ4_XS* blk = reinterpret_cast<const BlockIQ4_XS*>(row) + q / 2;
            if ((q & 1) == 0) {
              alignas(32) int32_t ls[8];
              for (int j = 0; j < 8; ++j) ls[j] = iq4xs_scale(blk, j);
              scales8 = _mm512_castps256_ps512(
                  _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(ls))),
                                _mm256_set1_ps(half_to_float(blk->d))));
            }
            z = _mm512_loadu_si512(blk->qs + 64 * (q & 1));
            wd = _mm512_permutexvar_ps((q & 1) ? pattern_hi : pattern, scales8);
          } else {
            const BlockIQ4_NL* bq = reinterpret_cast<const BlockIQ4_NL*>(row) + 4 * q;
            z = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bq[0].qs)));
            z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bq[1].qs)), 1);
            z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bq[2].qs)), 2);
            z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bq[3].qs)), 3);
            uint64_t packed = 0;
            for (int i = 0; i < 4; ++i) packed |= static_cast<uint64_t>(bq[i].d) << (16 * i);
            wd = _mm512_permutexvar_ps(pattern, _mm512_castps128_ps512(_mm_cvtph_ps(
                                                    _mm_cvtsi64_si128(static_cast<long long>(packed)))));
          }
          const __m512i sl = _mm512_shuffle_epi8(levels, _mm512_and_si512(z, m4));
          const __m512i sh = _mm512_shuffle_epi8(levels, _mm512_and_si512(_mm512_srli_epi16(z, 4), m4));
          const __m512i ul = _mm512_xor_si512(sl, sign), uh = _mm512_xor_si512(sh, sign);
          const int64_t g = 2 * q;
          for (int t = 0; t < NT; ++t) {
            const __m512 scale = _mm512_mul_ps(wd, _mm512_loadu_ps(s[t].dx.data() + 16 * g));
            const __m512i ll = lane_dot(ul, sl, s[t].hi.data() + 64 * g, s[t].lo.data() + 64 * g,
                                        s[t].hc.data() + 16 * g);
            const __m512i lh = lane_dot(uh, sh, s[t].hi.data() + 64 * g + 64,
                                        s[t].lo.data() + 64 * g + 64, s[t].hc.data() + 16 * g + 16);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ll), scale, acc[t]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lh), scale, acc[t]);
          }
        }
        float extra[NT] = {};
        if constexpr (!kXs) {
          for (int64_t b = 4 * nq; b < nb; ++b) {  // the last nb % 4 blocks in F32
            Fmt<QType::IQ4_NL>::decode(reinterpret_cast<const BlockIQ4_NL*>(row) + b, tail);
            for (int t = 0; t < NT; ++t) {
              const float* x = a.x + (t0 + t) * a.ldx + 32 * b;
              extra[t] += vsum(vfma(vload(tail + 16), vload(x + 16), vmul(vload(tail), vload(x))));
            }
          }
        }
        for (int t = 0; t < NT; ++t) a.y[(t0 + t) * a.ldy + r] = vsum(acc[t]) + extra[t];
      }
    }
  };
};

}  // namespace

template <QType T>
void matvec_vnni(const MatArgs& a, int64_t r0, int64_t r1) {
  if constexpr (T == QType::Q4_0) {
    by_groups<MvLegacy<BlockQ4_0, false, false, 8>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q4_1) {
    by_groups<MvLegacy<BlockQ4_1, false, true, 0>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q5_0) {
    by_groups<MvLegacy<BlockQ5_0, true, false, 16>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q5_1) {
    by_groups<MvLegacy<BlockQ5_1, true, true, 0>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q8_0) {
    by_groups<MvQ8_0>(a, r0, r1);
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
  } else if constexpr (T == QType::IQ4_NL) {
    by_groups<MvIq4<false>::K>(a, r0, r1);
  } else if constexpr (T == QType::IQ4_XS) {
    by_groups<MvIq4<true>::K>(a, r0, r1);
  } else {
    static_assert(kNoKernelFor<T>, "no VNNI matvec for this type");
  }
}

PYLLM_KERNEL_FOR(matvec_vnni, Q4_0)
PYLLM_KERNEL_FOR(matvec_vnni, Q4_1)
PYLLM_KERNEL_FOR(matvec_vnni, Q5_0)
PYLLM_KERNEL_FOR(matvec_vnni, Q5_1)
PYLLM_KERNEL_FOR(matvec_vnni, Q8_0)
PYLLM_KERNEL_FOR(matvec_vnni, Q2_K)
PYLLM_KERNEL_FOR(matvec_vnni, Q3_K)
PYLLM_KERNEL_FOR(matvec_vnni, Q4_K)
PYLLM_KERNEL_FOR(matvec_vnni, Q5_K)
PYLLM_KERNEL_FOR(matvec_vnni, Q6_K)
PYLLM_KERNEL_FOR(matvec_vnni, IQ4_NL)
PYLLM_KERNEL_FOR(matvec_vnni, IQ4_XS)

}  // namespace PYLLM_ISA
}  // namespace pyllm
