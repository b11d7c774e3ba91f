// AVX-512 VNNI matvec (decode) kernels for the grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
// IQ3_S, IQ1_S, IQ1_M) and the ternary types (TQ1_0, TQ2_0), over the int16-split activations of
// matvec_vnni.cc (split_act.h). Their prefill: matmat_vnni_iq.cc.
//
// Why: the F32 kernels (decode_iq.h through matvec_blocks) decode each row of 8 with scalar table
// lookups and float math, far below the memory wall at 2-3.4 bits per weight. Here each group of
// 64 weights is one register of signed int8 grid values from the SIMD expansion of iq_groups.h;
// TQ2_0 (2-bit codes, as Q2_K) and TQ1_0 (base-3 digits by 16-bit multiplies) likewise, as
// unsigned digits. One kernel (MvGrid) for all nine.
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

// Whether F gives unsigned digits (the ternary types, kDigits) rather than signed values.
template <class F, class = void>
struct HasDigits : std::false_type {};
template <class F>
struct HasDigits<F, std::void_t<decltype(F::kDigits)>> : std::bool_constant<F::kDigits> {};

// The kernel: per super-block the scale vector and the format's context (row codes), per group
// of 64 the values and for each token the exact lane dot products, converted and scaled once per
// 64 weights (two accumulators per token: the FMA latency would otherwise bound it).
// Signed values w as MvQ8_0's: w + 128 is the unsigned operand (f_hi = -128 * 256). The ternary
// types' digits t in 0..3 serve as both VPDPBUSD operands; their offset is a lane correction:
// sum (t - 1) xi = 256 sum t hi + sum t lo - 256 sum hi - sum lo (f_hi = -256, f_lo = -1).
template <class F>
struct MvGrid {
  static constexpr bool kDigits = HasDigits<F>::value;
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0) {
      const int64_t nsb = a.k / QK_K;
      std::vector<SplitAct>& s = token_scratch(NT);
      for (int t = 0; t < NT; ++t) {
        prepare(a.x + (t0 + t) * a.ldx, a.k, Order::kNatural, kDigits ? -256 : -128 * 256,
                kDigits ? -1 : 0, s[t]);
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
            __m512i ws, wu;
            if constexpr (kDigits) {
              ws = wu = F::digits(blk, j, ctx);
            } else {
              ws = F::group(blk, j, ctx);
              wu = _mm512_xor_si512(ws, sign);  // w + 128 as unsigned
            }
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

static_assert(MvGrid<Tq1>::kDigits && MvGrid<Tq2>::kDigits && !MvGrid<Iq1s>::kDigits,
              "the ternary formats give digits, the grid formats signed values");

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
    by_groups<MvGrid<Tq1>::K>(a, r0, r1);
  } else if constexpr (T == QType::TQ2_0) {
    by_groups<MvGrid<Tq2>::K>(a, r0, r1);
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
