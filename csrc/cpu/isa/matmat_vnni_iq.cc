// AVX-512 VNNI matmat (prefill) panels for the grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS,
// IQ3_S, IQ1_S, IQ1_M) and the ternary types (TQ1_0, TQ2_0), multiplied by the int16 register
// tile of matmat_tile.h.
//
// Why: these types' weights are small integers (the signed values of iq_groups.h, |u| <= 62)
// times one float scale per 256, 32 or 16 elements, exactly what the tile multiplies. Their decode
// kernel run over passes of 4 tokens re-expands every grid row once per 4 tokens (27.5 t/s pp64
// on a 1.1B IQ2_XXS at one thread, llama.cpp 172); a panel expands each row once per k-chunk for
// all tokens. Panels from the scalar float decoder were slower still (15 t/s): the expansion has
// to be the SIMD one.
//
// A panel is built 16 rows (one half of the tile's 32) and one super-block at a time: each row's
// 4 groups of 64 values and its 16 chunk scales go to a small buffer, then a 16 x 16 transpose of
// 32-bit words turns "64 bytes of one row" into "4 bytes of each of 16 rows", the operand form
// of put_signed (matmat_tile.h); the scales are transposed the same way. Values and scales are
// those of the decode kernels, so the panel holds the reference's dequantized weights exactly
// (value times scale), and the error bound is the tile's (activation rounding only).
#include <algorithm>
#include <cstdint>

#include "cpu/isa/iq_groups.h"
#include "cpu/isa/kernels.h"
#include "cpu/isa/matmat_tile.h"
#include "cpu/isa/simd.h"
#include "cpu/kernel_table.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in its headers
#pragma GCC diagnostic ignored "-Wuninitialized"        // (_mm512_cast* leave lanes undefined)
#endif

#if !defined(PYLLM_ISA_AVX512)
#error "matmat_vnni_iq.cc is part of the AVX-512 build only (CMakeLists.txt)"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {

// v[i] = 16 words of row i -> v[c] = word c of rows 0..15 (lane i: row i).
inline void transpose16(__m512i* v) {
  __m512i u[16], w[16];
  for (int i = 0; i < 16; i += 2) {  // lane L: rows i, i + 1 of words 4 L, 4 L + 1 (lo) / + 2, 3
    u[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    u[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // w[i + c]: lane L holds word 4 L + c of rows i .. i + 3
    w[i] = _mm512_unpacklo_epi64(u[i], u[i + 2]);
    w[i + 1] = _mm512_unpackhi_epi64(u[i], u[i + 2]);
    w[i + 2] = _mm512_unpacklo_epi64(u[i + 1], u[i + 3]);
    w[i + 3] = _mm512_unpackhi_epi64(u[i + 1], u[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes over w[c], w[4 + c], ...
    const __m512i x0 = _mm512_shuffle_i32x4(w[c], w[4 + c], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(w[c], w[4 + c], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(w[8 + c], w[12 + c], 0x44);
    const __m512i x3 = _mm512_shuffle_i32x4(w[8 + c], w[12 + c], 0xEE);
    v[c] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    v[4 + c] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    v[8 + c] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    v[12 + c] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
}

// For a format F: the lane of F::scales(block) that holds the scale of elements 16 q .. 16 q + 15
// (q < 16), read off F::pattern (lane 4 m of group j's pattern covers chunk 4 j + m).
template <class F>
__m512i chunk_lanes() {
  alignas(64) int32_t pat[16], idx[16];
  for (int j = 0; j < 4; ++j) {
    _mm512_store_si512(pat, F::pattern(j));
    for (int m = 0; m < 4; ++m) idx[4 * j + m] = pat[4 * m];
  }
  return _mm512_load_si512(idx);
}

// kSubs: scales per group of 32 (2 for the formats with a scale per 16).
template <class F, int kSubsT>
struct GridPanel {
  static constexpr bool kOffset = false;
  static constexpr int kSubs = kSubsT;
  static void pack(const MatArgs& a, int64_t o0, int nr, int64_t k0, int64_t kc, int32_t* pairs,
                   float* scales, float* offsets) {
    using Block = typename F::Block;
    static const PairCtl ctl;
    static const __m512i lanes = chunk_lanes<F>();
    alignas(64) int8_t vals[4][16][64];  // [group of 64][row][element]
    alignas(64) float sc[16][16];        // [row][chunk of 16]
    typename F::Ctx ctx;
    const int ngroups = static_cast<int>(kc / 32);
    (void)offsets;  // none (kOffset): the tile does not read them
    for (int half = 0; half < 2; ++half) {
      const int rows = std::min(16, nr - 16 * half);
      if (rows <= 0) {  // rows past the matrix (a 16-row tail panel)
        for (int64_t p = 0; p < kc / 2; ++p) {
          _mm512_storeu_si512(pairs + p * R + 16 * half, _mm512_setzero_si512());
        }
        for (int g = 0; g < ngroups * kSubs; ++g) put16(scales, g, half, _mm512_setzero_ps());
        continue;
      }
      for (int64_t b = 0; b < kc / QK_K; ++b) {
        for (int r = 0; r < 16; ++r) {
          if (r >= rows) {
            _mm512_store_ps(sc[r], _mm512_setzero_ps());
            for (int j = 0; j < 4; ++j) _mm512_store_si512(vals[j][r], _mm512_setzero_si512());
            continue;
          }
          const Block& blk = reinterpret_cast<const Block*>(
              a.w + (o0 + 16 * half + r) * a.row_bytes)[k0 / QK_K + b];
          F::load(blk, ctx);
          _mm512_store_ps(sc[r], _mm512_permutexvar_ps(lanes, F::scales(blk)));
          for (int j = 0; j < 4; ++j) _mm512_store_si512(vals[j][r], F::group(blk, j, ctx));
        }
        const int g0 = static_cast<int>(8 * b);  // first group of 32 of the super-block
        for (int j = 0; j < 4; ++j) {
          __m512i v[16];
          for (int r = 0; r < 16; ++r) v[r] = _mm512_load_si512(vals[j][r]);
          transpose16(v);  // v[c]: elements 64 j + 4 c .. + 3 of each row
          for (int c = 0; c < 16; ++c) {
            put_signed(ctl, v[c], pairs, g0 + 2 * j + c / 8, 2 * (c % 8), half);
          }
        }
        __m512i s[16];
        for (int r = 0; r < 16; ++r) s[r] = _mm512_castps_si512(_mm512_load_ps(sc[r]));
        transpose16(s);  // s[q]: the scale of chunk q of each row
        for (int q = 0; q < 16; q += 2 / kSubs) {
          put16(scales, kSubs * g0 + q * kSubs / 2, half, _mm512_castsi512_ps(s[q]));
        }
      }
    }
  }
};

}  // namespace

template <QType T>
void matmat_vnni_iq(const MatArgs& a, int64_t r0, int64_t r1) {
  if constexpr (T == QType::IQ2_XXS) {
    matmat16<GridPanel<Tabled<Iq2xxs>, 1>>(a, r0, r1);
  } else if constexpr (T == QType::IQ2_XS) {
    matmat16<GridPanel<Tabled<Iq2xs>, 2>>(a, r0, r1);
  } else if constexpr (T == QType::IQ2_S) {
    matmat16<GridPanel<Tabled<Iq2s>, 2>>(a, r0, r1);
  } else if constexpr (T == QType::IQ3_XXS) {
    matmat16<GridPanel<Tabled<Iq3xxs>, 1>>(a, r0, r1);
  } else if constexpr (T == QType::IQ3_S) {
    matmat16<GridPanel<Tabled<Iq3s>, 1>>(a, r0, r1);
  } else if constexpr (T == QType::IQ1_S) {
    matmat16<GridPanel<Iq1s, 1>>(a, r0, r1);
  } else if constexpr (T == QType::IQ1_M) {
    matmat16<GridPanel<Iq1m, 2>>(a, r0, r1);
  } else if constexpr (T == QType::TQ1_0) {
    matmat16<GridPanel<Tq1, 1>>(a, r0, r1);
  } else if constexpr (T == QType::TQ2_0) {
    matmat16<GridPanel<Tq2, 1>>(a, r0, r1);
  } else {
    static_assert(kNoKernelFor<T>, "no VNNI i-quant matmat for this type");
  }
}

PYLLM_KERNEL_FOR(matmat_vnni_iq, IQ2_XXS)
PYLLM_KERNEL_FOR(matmat_vnni_iq, IQ2_XS)
PYLLM_KERNEL_FOR(matmat_vnni_iq, IQ2_S)
PYLLM_KERNEL_FOR(matmat_vnni_iq, IQ3_XXS)
PYLLM_KERNEL_FOR(matmat_vnni_iq, IQ3_S)
PYLLM_KERNEL_FOR(matmat_vnni_iq, IQ1_S)
PYLLM_KERNEL_FOR(matmat_vnni_iq, IQ1_M)
PYLLM_KERNEL_FOR(matmat_vnni_iq, TQ1_0)
PYLLM_KERNEL_FOR(matmat_vnni_iq, TQ2_0)

}  // namespace PYLLM_ISA
}  // namespace pyllm
