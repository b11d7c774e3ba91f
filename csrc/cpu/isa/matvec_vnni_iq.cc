// AVX-512 VNNI matvec (decode) kernels for the grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
// IQ3_S, IQ1_S, IQ1_M) and the ternary types (TQ1_0, TQ2_0), over the int16-split activations of
// matvec_vnni.cc (split_act.h). Their prefill: matmat_vnni_iq.cc (grid types), passes of 4
// tokens through these kernels (ternary types).
//
// Why: the F32 kernels (decode_iq.h through matvec_blocks) decode each row of 8 with scalar table
// lookups and float math, far below the memory wall at 2-3.4 bits per weight. Here each group of
// 64 weights is one register of signed int8 grid values from the SIMD expansion of iq_groups.h;
// TQ2_0 (2-bit codes, as Q2_K) and TQ1_0 (base-3 digits by 16-bit multiplies) are described at
// their kernels.
//
// Dot products as MvQ8_0 / MvIq4: w signed, sum w xi = 256 sum (w + 128) hi + sum w lo
// - 128 * 256 sum hi (the last term per lane from prepare(), f_hi = -128 * 256).
// int32 ranges per lane (4 elements): |w| <= 62 (IQ3_XXS; IQ2 grids <= 43, IQ3_S <= 15, IQ1
// <= 9; the ternary kernels' unsigned digits <= 3 with corrections of at most 256 * 4 * 128), so
// w + 128 <= 190: 256 * 4 * 190 * 128 < 2^25, 4 * 255 * 62 < 2^16, 128 * 256 * 4 * 128 = 2^24;
// the sum stays far below 2^31 and every VPDPBUSD is exact. Error vs the exact product: only
// the activation rounding (dx / 2 per element) and F32 accumulation, as for the other types.
//
// Only the AVX-512 F/BW/DQ/VL/VNNI + BMI2 instructions of the avx512 build (no VBMI).
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/isa/decode.h"
#include "cpu/isa/iq_groups.h"
#include "cpu/isa/kernels.h"
#include "cpu/isa/simd.h"
#include "cpu/isa/split_act.h"
#include "cpu/kernel_table.h"
#include "quant/iquant_grids.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in its headers
#pragma GCC diagnostic ignored "-Wuninitialized"        // (_mm512_cast* leave lanes undefined)
#endif

#if !defined(PYLLM_ISA_AVX512)
#error "matvec_vnni_iq.cc is part of the AVX-512 build only (CMakeLists.txt)"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {

// The kernel: per super-block the scale vector and the format's context (row codes), per group
// of 64 the signed values and for each token the exact lane dot products, converted and scaled
// once per 64 weights (two accumulators per token: the FMA latency would otherwise bound it).
template <class F>
struct MvGrid {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
      const int64_t nsb = a.k / QK_K;
      std::vector<SplitAct>& s = token_scratch(NT);
      for (int t = 0; t < NT; ++t) {
        prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kNatural, -128 * 256, 0, s[t]);
      }
      const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
      __m512i pattern[4];
      for (int j = 0; j < 4; ++j) pattern[j] = F::pattern(j);
      typename F::Ctx ctx;
      for (int64_t r = r0; r < r1; ++r) {
        const auto* row = reinterpret_cast<const typename F::Block*>(a.w + r * a.row_bytes);
        __m512 acc[2][NT];
        for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nsb; ++b) {
          const auto& blk = row[b];
          const __m512 sc = F::scales(blk);
          F::load(blk, ctx);
          for (int j = 0; j < 4; ++j) {
            const __m512i ws = F::group(blk, j, ctx);
            const __m512i wu = _mm512_xor_si512(ws, sign);  // w + 128 as unsigned
            const __m512 wd = _mm512_permutexvar_ps(pattern[j], sc);
            const int64_t gi = 4 * b + j;
            for (int t = 0; t < NT; ++t) {
              const __m512i l = lane_dot(wu, ws, s[t].hi.data() + 64 * gi,
                                         s[t].lo.data() + 64 * gi, s[t].hc.data() + 16 * gi);
              const __m512 scale = _mm512_mul_ps(wd, _mm512_loadu_ps(s[t].dx.data() + 16 * gi));
              acc[j & 1][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), scale, acc[j & 1][t]);
            }
          }
        }
        for (int t = 0; t < NT; ++t) {
          a.y[(t0 + t) * a.ldy + r] = vsum(_mm512_add_ps(acc[0][t], acc[1][t]));
        }
      }
    }
  };
};

// TQ2_0: w = d (q - 1), q a 2-bit code: byte 32 c + j, bits 2 p, is element 128 c + 32 p + j,
// so group 2 c + h (elements 128 c + 64 h ..) is the 32 bytes of half c shifted by 4 h (first
// 32 elements) and 4 h + 2 (last 32), as in MvK2. q in 0..3 serves as both VPDPBUSD operands;
// the offset is a lane correction: sum (q - 1) xi = 256 sum q hi + sum q lo - 256 sum hi
// - sum lo (prepare's f_hi = -256, f_lo = -1). One scale d per 256: wd = d dx.
template <int NT>
struct MvTq2 {
  static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
    const int64_t nsb = a.k / QK_K;
    std::vector<SplitAct>& s = token_scratch(NT);
    for (int t = 0; t < NT; ++t) {
      prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kNatural, -256, -1, s[t]);
    }
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i shifts[2];
    for (int h = 0; h < 2; ++h) {
      shifts[h] = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<short>(4 * h)),
                                     _mm256_set1_epi16(static_cast<short>(4 * h + 2)), 1);
    }
    for (int64_t r = r0; r < r1; ++r) {
      const BlockTQ2_0* row = reinterpret_cast<const BlockTQ2_0*>(a.w + r * a.row_bytes);
      __m512 acc[2][NT];
      for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nsb; ++b) {
        const BlockTQ2_0& blk = row[b];
        const __m512 d = _mm512_set1_ps(half_to_float(blk.d));
        for (int c = 0; c < 2; ++c) {
          const __m512i q = _mm512_broadcast_i64x4(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs + 32 * c)));
          for (int h = 0; h < 2; ++h) {
            const __m512i u = _mm512_and_si512(_mm512_srlv_epi16(q, shifts[h]), m3);
            const int64_t gi = 4 * b + 2 * c + h;
            for (int t = 0; t < NT; ++t) {
              const __m512i l = lane_dot(u, u, s[t].hi.data() + 64 * gi,
                                         s[t].lo.data() + 64 * gi, s[t].hc.data() + 16 * gi);
              const __m512 scale = _mm512_mul_ps(d, _mm512_loadu_ps(s[t].dx.data() + 16 * gi));
              acc[h][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), scale, acc[h][t]);
            }
          }
        }
      }
      for (int t = 0; t < NT; ++t) {
        a.y[(t0 + t) * a.ldy + r] = vsum(_mm512_add_ps(acc[0][t], acc[1][t]));
      }
    }
  }
};

// TQ1_0: w = d (t - 1), t a base-3 digit: element 32 p + j (p < 5) of qs[j] (j < 32), 160 + 16 p
// + j of qs[32 + j], 240 + 4 p + j of qh[j], t = ((byte * 3^p mod 256) * 3) >> 8. A group's 64
// bytes are the source bytes in element order (broadcasts of qs[0..31], qs[32..47], qh) and its
// word multipliers 3^p (uniform over >= 4 bytes); the two byte products come from 16-bit
// multiplies of the even and the odd bytes, t = mulhi_epu16(y_byte << 8, 3). Digits 0..2 as
// both VPDPBUSD operands with TQ2_0's lane correction for the offset 1.
template <int NT>
struct MvTq1 {
  static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
    const int64_t nsb = a.k / QK_K;
    std::vector<SplitAct>& s = token_scratch(NT);
    for (int t = 0; t < NT; ++t) {
      prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kNatural, -256, -1, s[t]);
    }
    alignas(64) int16_t mul[4][32];
    for (int i = 0; i < 32; ++i) {  // word i = bytes 2 i, 2 i + 1 of the group
      mul[0][i] = i < 16 ? 1 : 3;
      mul[1][i] = i < 16 ? 9 : 27;
      mul[2][i] = i < 16 ? 81 : (i < 24 ? 1 : 3);
      static constexpr int16_t kLast[8] = {1, 1, 3, 3, 9, 9, 27, 27};
      mul[3][i] = i < 8 ? 9 : (i < 16 ? 27 : (i < 24 ? 81 : kLast[i - 24]));
    }
    __m512i m[4];
    for (int g = 0; g < 4; ++g) m[g] = _mm512_load_si512(mul[g]);
    const __m512i hi_bytes = _mm512_set1_epi16(static_cast<short>(0xFF00));
    const __m512i lo_bytes = _mm512_set1_epi16(0x00FF), three = _mm512_set1_epi16(3);
    for (int64_t r = r0; r < r1; ++r) {
      const BlockTQ1_0* row = reinterpret_cast<const BlockTQ1_0*>(a.w + r * a.row_bytes);
      __m512 acc[2][NT];
      for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nsb; ++b) {
        const BlockTQ1_0& blk = row[b];
        const __m512 d = _mm512_set1_ps(half_to_float(blk.d));
        const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs));
        const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.qs + 32));
        const __m512i b01 = _mm512_broadcast_i64x4(q0);
        const __m512i src[4] = {
            b01, b01,
            _mm512_inserti64x4(_mm512_castsi256_si512(q0), _mm256_broadcastsi128_si256(q1), 1),
            _mm512_inserti32x4(_mm512_broadcast_i32x4(q1),
                               _mm_set1_epi32(static_cast<int>(load_u32(blk.qh))), 3)};
        for (int g = 0; g < 4; ++g) {
          const __m512i x = src[g];
          const __m512i y = _mm512_or_si512(
              _mm512_and_si512(_mm512_mullo_epi16(x, m[g]), lo_bytes),
              _mm512_and_si512(_mm512_mullo_epi16(_mm512_and_si512(x, hi_bytes), m[g]), hi_bytes));
          const __m512i u = _mm512_or_si512(
              _mm512_mulhi_epu16(_mm512_slli_epi16(y, 8), three),
              _mm512_slli_epi16(_mm512_mulhi_epu16(_mm512_and_si512(y, hi_bytes), three), 8));
          const int64_t gi = 4 * b + g;
          for (int t = 0; t < NT; ++t) {
            const __m512i l = lane_dot(u, u, s[t].hi.data() + 64 * gi, s[t].lo.data() + 64 * gi,
                                       s[t].hc.data() + 16 * gi);
            const __m512 scale = _mm512_mul_ps(d, _mm512_loadu_ps(s[t].dx.data() + 16 * gi));
            acc[g & 1][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), scale, acc[g & 1][t]);
          }
        }
      }
      for (int t = 0; t < NT; ++t) {
        a.y[(t0 + t) * a.ldy + r] = vsum(_mm512_add_ps(acc[0][t], acc[1][t]));
      }
    }
  }
};

}  // namespace

template <QType T>
void matvec_vnni_iq(const MatArgs& a, int64_t r0, int64_t r1) {
  if constexpr (T == QType::IQ2_XXS) {
    by_groups<MvGrid<Tabled<Iq2xxs>>::K>(a, r0, r1);
  } else if constexpr (T == QType::IQ2_XS) {
    by_groups<MvGrid<Tabled<Iq2xs>>::K>(a, r0, r1);
  } else if constexpr (T == QType::IQ2_S) {
    by_groups<MvGrid<Tabled<Iq2s>>::K>(a, r0, r1);
  } else if constexpr (T == QType::IQ3_XXS) {
    by_groups<MvGrid<Tabled<Iq3xxs>>::K>(a, r0, r1);
  } else if constexpr (T == QType::IQ3_S) {
    by_groups<MvGrid<Tabled<Iq3s>>::K>(a, r0, r1);
  } else if constexpr (T == QType::IQ1_S) {
    by_groups<MvGrid<Iq1s>::K>(a, r0, r1);
  } else if constexpr (T == QType::IQ1_M) {
    by_groups<MvGrid<Iq1m>::K>(a, r0, r1);
  } else if constexpr (T == QType::TQ1_0) {
    by_groups<MvTq1>(a, r0, r1);
  } else if constexpr (T == QType::TQ2_0) {
    by_groups<MvTq2>(a, r0, r1);
  } else {
    static_assert(kNoKernelFor<T>, "no VNNI i-quant matvec for this type");
  }
}

PYLLM_KERNEL_FOR(matvec_vnni_iq, IQ2_XXS)
PYLLM_KERNEL_FOR(matvec_vnni_iq, IQ2_XS)
PYLLM_KERNEL_FOR(matvec_vnni_iq, IQ2_S)
PYLLM_KERNEL_FOR(matvec_vnni_iq, IQ3_XXS)
PYLLM_KERNEL_FOR(matvec_vnni_iq, IQ3_S)
PYLLM_KERNEL_FOR(matvec_vnni_iq, IQ1_S)
PYLLM_KERNEL_FOR(matvec_vnni_iq, IQ1_M)
PYLLM_KERNEL_FOR(matvec_vnni_iq, TQ1_0)
PYLLM_KERNEL_FOR(matvec_vnni_iq, TQ2_0)

}  // namespace PYLLM_ISA
}  // namespace pyllm
