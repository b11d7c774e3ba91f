// The grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) and the ternary types
// (TQ1_0, TQ2_0) as AVX-512 registers:
// each group of 64 weights of a super-block (two sub-blocks of 32, natural element order) becomes
// one register of signed int8 grid values with a few SIMD instructions, and each super-block a
// vector of per-lane float scales (lane l of group j: elements 64 j + 4 l .. + 3). Used by the
// decode kernels (matvec_vnni_iq.cc) and the prefill panels (matmat_vnni_iq.cc).
//
//   - grid rows: gathers are slow (~8 cycles per 8 rows on Zen 4), so every grid row is re-coded
//     once into a 16-bit word (CodeTable) and the 32 rows of a super-block's half are looked up
//     at once with VPERMI2W (64 words per instruction, then a blend tree over the index bits
//     above 6; the tables stay in registers / L1). A word expands to bytes with VPSHUFB:
//       rows of 8 (IQ2 grids, magnitudes {8, 25, 43}): 2 bits per element, element i at bits
//       2 i; a shuffle spreads each code byte to its 4 output bytes, VPSRLVW + AND leave element
//       i in bits 0-1 of even bytes / 2-3 of odd ones, a 16-entry VPSHUFB table gives magnitudes;
//       rows of 4 (IQ3 grids, 8 magnitudes each): a 3-bit level index per element in a nibble,
//       element order 0, 2, 1, 3 so that (x | x << 12) & 0x0F0F0F0F puts element i in byte i.
//     The lookups' index words are permuted first so that each group's rows land where its
//     expansion wants them (no per-group cross-lane shuffle for rows of 8).
//   - signs: a 64-bit mask (bit e: element e negative), applied by one masked subtract from 0.
//     IQ2_XXS / IQ2_XS / IQ3_XXS store 7-bit sign indices whose 8th bit is the parity of the 7
//     (llama.cpp's ksigns table): PDEP spreads the eight 7-bit fields of a group to the bytes of
//     a word and a SWAR parity fold adds the 8th bits, no table; IQ2_S / IQ3_S store the bits.
//   - scale: the integer grid value times a per-lane float (IQ2: d (0.5 + s) / 4, per 32 for
//     IQ2_XXS and per 16 = 4 lanes for IQ2_XS / IQ2_S; IQ3_XXS: d (0.5 + s) / 2; IQ3_S:
//     d (1 + 2 s)) is the dequantized weight as the reference (csrc/quant/iquants_grid.cc).
//   - IQ1_S / IQ1_M (2048-row grid: one gather per group; the shift +-1/8 made integer by
//     scaling by 8) and the ternary types (digits) are described at their formats.
// |value| <= 62 (IQ3_XXS; IQ2 grids <= 43, IQ3_S <= 15, IQ1 <= 9).
//
// Only the AVX-512 F/BW/DQ/VL/VNNI + BMI2 instructions of the avx512 build (no VBMI: CPUs with
// VNNI and BF16 but without VBMI exist). Included only by those two files.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/isa/decode_iq.h"
#include "cpu/isa/simd.h"
#include "pyllm/qtype.h"
#include "quant/iquant_grids.h"

#if !defined(PYLLM_ISA_AVX512)
#error "iq_groups.h is part of the AVX-512 build only"
#endif

namespace pyllm {
namespace PYLLM_ISA {
namespace {  // NOLINT(google-build-namespaces): one copy per includer

// Eight 7-bit sign indices (bits 7 l .. 7 l + 6 of s56 for row l) -> the 64 sign bits of the
// 8 rows: byte l = index l | parity(index l) << 7 (= kIqKsigns[index l]).
inline __mmask64 ksigns_mask(uint64_t s56) {
  const uint64_t x = _pdep_u64(s56, 0x7F7F7F7F7F7F7F7Full);
  uint64_t p = x ^ (x >> 4);  // bit 0 of each byte: the xor of its bits 0..7 (no carry-in from
  p ^= p >> 2;                // the next byte reaches bit 0: it needs a shift of 8)
  p ^= p >> 1;
  return _cvtu64_mask64(x | ((p & 0x0101010101010101ull) << 7));
}

// The sign indices of two sub-block words (4 x 7 bits in the low 28 bits of each).
inline __mmask64 ksigns_mask2(uint32_t wa, uint32_t wb) {
  return ksigns_mask((wa & 0x0FFFFFFFull) | (static_cast<uint64_t>(wb & 0x0FFFFFFF) << 28));
}

// Lane patterns: the 16 lanes of group j (elements 64 j + 4 l .. + 3 in lane l) -> index of
// the lane's scale in the block's scale vector.
inline __m512i halves_pattern(int a, int b) {  // lanes 0-7 -> a, lanes 8-15 -> b
  return _mm512_inserti64x4(_mm512_set1_epi32(a), _mm256_set1_epi32(b), 1);
}
inline __m512i quarters_pattern(int j) {  // lanes 4 m .. 4 m + 3 -> 4 j + m (scales per 16)
  return _mm512_set_epi32(4 * j + 3, 4 * j + 3, 4 * j + 3, 4 * j + 3, 4 * j + 2, 4 * j + 2,
                          4 * j + 2, 4 * j + 2, 4 * j + 1, 4 * j + 1, 4 * j + 1, 4 * j + 1,
                          4 * j, 4 * j, 4 * j, 4 * j);
}

// 16 4-bit scales (8 bytes, low nibble first) -> 16 floats (s + 0.5) * f.
inline __m512 nibble_scales16(const uint8_t* p, float f) {
  const uint64_t v = iq_u64(p);
  const __m128i lo = _mm_cvtsi64_si128(static_cast<long long>(v & 0x0F0F0F0F0F0F0F0Full));
  const __m128i hi = _mm_cvtsi64_si128(static_cast<long long>((v >> 4) & 0x0F0F0F0F0F0F0F0Full));
  const __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
  return _mm512_mul_ps(_mm512_add_ps(s, _mm512_set1_ps(0.5f)), _mm512_set1_ps(f));
}

// ---- grid rows as 16-bit codes ----------------------------------------------------------------
template <int kRows, int kPerRow>
struct CodeTable {
  alignas(64) uint16_t w[kRows];
  template <class Row, size_t kLevels>
  CodeTable(const Row* grid, const uint8_t (&levels)[kLevels]) {
    static constexpr int kNibble[4] = {0, 8, 4, 12};
    for (int r = 0; r < kRows; ++r) {
      uint16_t code = 0;
      for (int i = 0; i < kPerRow; ++i) {
        const uint8_t v = static_cast<uint8_t>(static_cast<uint64_t>(grid[r]) >> (8 * i));
        int li = 0;
        while (li + 1 < static_cast<int>(kLevels) && levels[li] != v) ++li;
        code = static_cast<uint16_t>(code | (li << (kPerRow == 8 ? 2 * i : kNibble[i])));
      }
      w[r] = code;
    }
  }
};

constexpr uint8_t kIq2Levels[3] = {8, 25, 43};  // the magnitudes of all three IQ2 grids
constexpr uint8_t kIq3xxsLevels[8] = {4, 12, 20, 28, 36, 44, 52, 62};
constexpr uint8_t kIq3sLevels[8] = {1, 3, 5, 7, 9, 11, 13, 15};

// The codes of the 32 rows whose indices are the words of idx (< kRows).
template <int kRows>
inline __m512i lookup32(__m512i idx, const uint16_t* tbl) {
  constexpr int kN = kRows / 64;
  __m512i r[kN];
  for (int k = 0; k < kN; ++k) {
    r[k] = _mm512_permutex2var_epi16(_mm512_load_si512(tbl + 64 * k), idx,
                                     _mm512_load_si512(tbl + 64 * k + 32));
  }
  int n = kN;
  for (int bit = 6; n > 1; ++bit, n /= 2) {
    const __m512i sel = _mm512_set1_epi16(static_cast<short>(1 << bit));
    const __mmask32 hi = _mm512_test_epi16_mask(idx, sel);
    for (int m = 0; m < n / 2; ++m) r[m] = _mm512_mask_mov_epi16(r[2 * m], hi, r[2 * m + 1]);
  }
  return r[0];
}

// Rows of 8. The 32 index words of a super-block are permuted so that 128-bit lane L holds
// rows 8 g + 2 L and 8 g + 2 L + 1 of every group g at words 2 g, 2 g + 1; group g's output
// lane L (its rows 2 L, 2 L + 1) then needs only bytes 4 g .. 4 g + 3 of the same lane.
struct Rows8 {
  __m512i arrange, spread[4], shift, mask, levels;
  Rows8() {
    alignas(64) int16_t ar[32];
    for (int L = 0; L < 4; ++L) {
      for (int w = 0; w < 8; ++w) {
        ar[8 * L + w] = static_cast<int16_t>(8 * (w / 2) + 2 * L + w % 2);
      }
    }
    arrange = _mm512_load_si512(ar);
    alignas(64) int8_t ctrl[64];
    for (int g = 0; g < 4; ++g) {
      for (int p = 0; p < 64; ++p) {  // byte q of a lane: row q / 8 of its pair, element q % 8
        const int q = p % 16;
        ctrl[p] = static_cast<int8_t>(4 * g + 2 * (q / 8) + (q % 8) / 4);
      }
      spread[g] = _mm512_load_si512(ctrl);
    }
    // word of elements i, i + 1 (i even): shift 2 (i % 4) puts them at bits 0-1 / 2-3
    shift = _mm512_set1_epi32(0x00040000);
    mask = _mm512_set1_epi16(0x0C03);  // even bytes: element i (bits 0-1), odd: i + 1 (bits 2-3)
    alignas(16) int8_t lv[16] = {};
    for (int l = 0; l < 3; ++l) lv[l] = lv[4 * l] = static_cast<int8_t>(kIq2Levels[l]);
    levels = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lv)));
  }
  template <int kRows>
  __m512i codes(__m512i idx, const uint16_t* tbl) const {
    return lookup32<kRows>(_mm512_permutexvar_epi16(arrange, idx), tbl);
  }
  __m512i magnitudes(__m512i codes, int g) const {
    const __m512i b = _mm512_shuffle_epi8(codes, spread[g]);
    return _mm512_shuffle_epi8(levels, _mm512_and_si512(_mm512_srlv_epi16(b, shift), mask));
  }
};

// Rows of 4: 64 rows per super-block, looked up as two halves of 32 (groups 0-1, 2-3). Each
// half's index words are permuted so that lane L holds rows 4 L .. 4 L + 3 of its first group
// at words 0-3 and of its second group at words 4-7: VPUNPCKL/HWD then widens a group's 16
// codes to dwords in natural order.
struct Rows4 {
  __m512i arrange, levels;
  explicit Rows4(const uint8_t (&lv)[8]) {
    alignas(64) int16_t ar[32];
    for (int L = 0; L < 4; ++L) {
      for (int w = 0; w < 8; ++w) {
        ar[8 * L + w] = static_cast<int16_t>(16 * (w / 4) + 4 * L + w % 4);
      }
    }
    arrange = _mm512_load_si512(ar);
    levels = _mm512_broadcast_i32x4(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lv)));
  }
  template <int kRows>
  __m512i codes(__m512i idx, const uint16_t* tbl) const {
    return lookup32<kRows>(_mm512_permutexvar_epi16(arrange, idx), tbl);
  }
  __m512i magnitudes(__m512i codes, int g) const {  // codes of the half holding group g
    const __m512i x = (g & 1) ? _mm512_unpackhi_epi16(codes, _mm512_setzero_si512())
                              : _mm512_unpacklo_epi16(codes, _mm512_setzero_si512());
    const __m512i n = _mm512_and_si512(_mm512_or_si512(x, _mm512_slli_epi32(x, 12)),
                                       _mm512_set1_epi32(0x0F0F0F0F));
    return _mm512_shuffle_epi8(levels, n);
  }
};

// Each format: Block; kRows (grid rows); kHalves (1: 32 rows of 8, 2: 64 rows of 4);
// table(); index(blk, h) -> the grid indices of rows 32 h .. 32 h + 31 as words; scales(blk) ->
// a float vector whose lanes pattern(j) are the scales of group j's lanes; signs(blk, j).

// IQ2_XXS: sub-block ib = qs bytes 8 ib .. + 3 (4 row indices into the 256-row grid), bytes
// 8 ib + 4 .. + 7 (4 7-bit sign indices, the scale s in bits 28-31).
struct Iq2xxs {
  using Block = BlockIQ2_XXS;
  using Rows = Rows8;
  static constexpr int kRows = 256, kHalves = 1;
  static const uint16_t* table() {
    static const CodeTable<kRows, 8> t(kIq2xxsGrid, kIq2Levels);
    return t.w;
  }
  static __m512i index(const Block& b, int) {  // the low dword of each sub-block's 8 bytes
    return _mm512_cvtepu8_epi16(_mm512_cvtepi64_epi32(_mm512_loadu_si512(b.qs)));
  }
  static __m512i pattern(int j) { return halves_pattern(4 * j + 1, 4 * j + 3); }
  static __m512 scales(const Block& b) {  // lane 2 ib + 1: sub-block ib (its meta word)
    const __m512i meta = _mm512_srli_epi32(_mm512_loadu_si512(b.qs), 28);
    return _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(meta), _mm512_set1_ps(0.5f)),
                         _mm512_set1_ps(half_to_float(b.d) * 0.25f));
  }
  static __mmask64 signs(const Block& b, int j) {
    return ksigns_mask2(iq_u32(b.qs + 8 * j + 2), iq_u32(b.qs + 8 * j + 6));
  }
};

// IQ2_XS: qs[k] (16 bits) per row of 8: a 9-bit index into the 512-row grid, a 7-bit sign
// index above it; 4-bit scales per 16.
struct Iq2xs {
  using Block = BlockIQ2_XS;
  using Rows = Rows8;
  static constexpr int kRows = 512, kHalves = 1;
  static const uint16_t* table() {
    static const CodeTable<kRows, 8> t(kIq2xsGrid, kIq2Levels);
    return t.w;
  }
  static __m512i index(const Block& b, int) {
    return _mm512_and_si512(_mm512_loadu_si512(b.qs), _mm512_set1_epi16(511));
  }
  static __m512i pattern(int j) { return quarters_pattern(j); }
  static __m512 scales(const Block& b) {
    return nibble_scales16(b.scales, half_to_float(b.d) * 0.25f);
  }
  static __mmask64 signs(const Block& b, int j) {
    const uint64_t top7 = 0xFE00FE00FE00FE00ull;
    return ksigns_mask(_pext_u64(iq_u64(b.qs + 8 * j), top7) |
                       (_pext_u64(iq_u64(b.qs + 8 * j + 4), top7) << 28));
  }
};

// IQ2_S: qs[k] the low 8 bits of row k's index into the 1024-row grid, bits 2 (k % 4) of
// qh[k / 4] the top 2; qs[32 + k] row k's 8 sign bits; scales as IQ2_XS.
struct Iq2s {
  using Block = BlockIQ2_S;
  using Rows = Rows8;
  static constexpr int kRows = 1024, kHalves = 1;
  static const uint16_t* table() {
    static const CodeTable<kRows, 8> t(kIq2sGrid, kIq2Levels);
    return t.w;
  }
  static __m512i index(const Block& b, int) {
    const uint64_t qh = iq_u64(b.qh);  // row k's 2 bits at bits 2 k (k < 32)
    const __m256i top = _mm256_set_epi64x(
        static_cast<long long>(_pdep_u64(qh >> 48, 0x0303030303030303ull)),
        static_cast<long long>(_pdep_u64(qh >> 32, 0x0303030303030303ull)),
        static_cast<long long>(_pdep_u64(qh >> 16, 0x0303030303030303ull)),
        static_cast<long long>(_pdep_u64(qh, 0x0303030303030303ull)));
    const __m512i lo =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs)));
    return _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_cvtepu8_epi16(top), 8));
  }
  static __m512i pattern(int j) { return quarters_pattern(j); }
  static __m512 scales(const Block& b) {
    return nibble_scales16(b.scales, half_to_float(b.d) * 0.25f);
  }
  static __mmask64 signs(const Block& b, int j) {
    return _cvtu64_mask64(iq_u64(b.qs + 32 + 8 * j));
  }
};

// IQ3_XXS: qs[0..63] one index per 4 elements into the 256-row grid of 4; then per sub-block
// ib a word: 4 7-bit sign indices (one per 8 elements), the scale s in bits 28-31.
struct Iq3xxs {
  using Block = BlockIQ3_XXS;
  using Rows = Rows4;
  static constexpr int kRows = 256, kHalves = 2;
  static const uint16_t* table() {
    static const CodeTable<kRows, 4> t(kIq3xxsGrid, kIq3xxsLevels);
    return t.w;
  }
  static __m512i index(const Block& b, int h) {
    return _mm512_cvtepu8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * h)));
  }
  static __m512i pattern(int j) { return halves_pattern(2 * j, 2 * j + 1); }
  static __m512 scales(const Block& b) {  // lane ib: sub-block ib
    const __m256i meta = _mm256_srli_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + QK_K / 4)), 28);
    const __m256 s = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(meta), _mm256_set1_ps(0.5f)),
                                   _mm256_set1_ps(half_to_float(b.d) * 0.5f));
    return _mm512_castps256_ps512(s);
  }
  static __mmask64 signs(const Block& b, int j) {  // the words of sub-blocks 2 j, 2 j + 1
    return ksigns_mask2(iq_u32(b.qs + QK_K / 4 + 8 * j), iq_u32(b.qs + QK_K / 4 + 8 * j + 4));
  }
};

// IQ3_S: qs[k] the low 8 bits of the index of elements 4 k .. + 3 into the 512-row grid of 4,
// bit k % 8 of qh[k / 8] the ninth; signs[] one bit per element; scale d (1 + 2 s) per 32.
struct Iq3s {
  using Block = BlockIQ3_S;
  using Rows = Rows4;
  static constexpr int kRows = 512, kHalves = 2;
  static const uint16_t* table() {
    static const CodeTable<kRows, 4> t(kIq3sGrid, kIq3sLevels);
    return t.w;
  }
  static __m512i index(const Block& b, int h) {
    const __m512i lo =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * h)));
    return _mm512_mask_add_epi16(lo, _cvtu32_mask32(iq_u32(b.qh + 4 * h)), lo,
                                 _mm512_set1_epi16(256));
  }
  static __m512i pattern(int j) { return halves_pattern(2 * j, 2 * j + 1); }
  static __m512 scales(const Block& b) {  // lane ib: sub-block ib
    const uint32_t v = iq_u32(b.scales), nib = 0x0F0F0F0Fu;
    const __m128i s8 = _mm_unpacklo_epi8(_mm_cvtsi32_si128(static_cast<int>(v & nib)),
                                         _mm_cvtsi32_si128(static_cast<int>((v >> 4) & nib)));
    const __m256i s = _mm256_cvtepu8_epi32(s8);  // 8 scales, sub-block order
    const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(s, s),
                                                         _mm256_set1_epi32(1)));
    return _mm512_castps256_ps512(_mm256_mul_ps(f, _mm256_set1_ps(half_to_float(b.d))));
  }
  static __mmask64 signs(const Block& b, int j) {
    return _cvtu64_mask64(iq_u64(b.signs + 8 * j));
  }
};

template <class F>
const typename F::Rows& rows_expander() {
  if constexpr (std::is_same<typename F::Rows, Rows8>::value) {
    static const Rows8 r;
    return r;
  } else if constexpr (std::is_same<F, Iq3xxs>::value) {
    static const Rows4 r(kIq3xxsLevels);
    return r;
  } else {
    static const Rows4 r(kIq3sLevels);
    return r;
  }
}

// A table format F as the kernel sees it: load(blk, ctx) looks up the super-block's row codes,
// group(blk, j, ctx) gives the 64 signed int8 values of elements 64 j .. 64 j + 63.
template <class F>
struct Tabled : F {
  using Block = typename F::Block;
  struct Ctx {
    typename F::Rows rows = rows_expander<F>();
    const uint16_t* tbl = F::table();
    __m512i codes[F::kHalves];
  };
  static void load(const Block& b, Ctx& c) {
    for (int h = 0; h < F::kHalves; ++h) {
      c.codes[h] = c.rows.template codes<F::kRows>(F::index(b, h), c.tbl);
    }
  }
  static __m512i group(const Block& b, int j, const Ctx& c) {
    const __m512i g = c.rows.magnitudes(c.codes[F::kHalves == 1 ? 0 : j / 2], j);
    return _mm512_mask_sub_epi8(g, F::signs(b, j), _mm512_setzero_si512(), g);
  }
};

// IQ1_S and IQ1_M: w = dl (g + delta), g in {-1, 0, 1} from the 2048-row grid, delta = +-1/8;
// as integers w8 = 8 g +- 1 in {-9, -7, -1, 1, 7, 9} with the scale dl / 8. The grid (16 KB,
// 2048 rows) is too big for register lookups: one gather of 8 rows per group (L1-resident).
// 8 g: a 16-bit shift by 3 and AND 0xF8 (the bits a byte's -1 spills into its neighbour are
// cleared); the shift: +1, or -1 where the delta sign bit is set (per 32 for IQ1_S, per row of
// 8 for IQ1_M).
inline __m512i iq1_values(__m512i idx, uint64_t minus) {
  const __m512i g = _mm512_i64gather_epi64(idx, kIq1sGrid, 8);
  const __m512i g8 =
      _mm512_and_si512(_mm512_slli_epi16(g, 3), _mm512_set1_epi8(static_cast<char>(0xF8)));
  const __m512i one = _mm512_set1_epi8(1);
  return _mm512_mask_sub_epi8(_mm512_add_epi8(g8, one), _cvtu64_mask64(minus), g8, one);
}

// IQ1_S: qs[k] the low 8 bits of row k's index, qh[ib] per sub-block: bits 3 l the top 3 bits
// of its row l, bits 12-14 the scale s (dl = d (2 s + 1)), bit 15 the delta sign.
struct Iq1s {
  using Block = BlockIQ1_S;
  struct Ctx {};
  static void load(const Block&, Ctx&) {}
  static __m512i pattern(int j) { return halves_pattern(2 * j, 2 * j + 1); }
  static __m512 scales(const Block& b) {  // lane ib: sub-block ib
    const __m256i h =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qh)));
    const __m256i sc = _mm256_and_si256(_mm256_srli_epi32(h, 12), _mm256_set1_epi32(7));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(sc, sc),
                                                         _mm256_set1_epi32(1)));
    return _mm512_castps256_ps512(_mm256_mul_ps(f, _mm256_set1_ps(half_to_float(b.d) * 0.125f)));
  }
  static __m512i group(const Block& b, int j, const Ctx&) {
    const uint32_t ha = b.qh[2 * j], hb = b.qh[2 * j + 1];
    const uint64_t top = _pdep_u64((ha & 0xFFF) | ((hb & 0xFFF) << 12), 0x0707070707070707ull);
    const __m512i lo = _mm512_cvtepu8_epi64(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(b.qs + 8 * j)));
    const __m512i hi = _mm512_cvtepu8_epi64(_mm_cvtsi64_si128(static_cast<long long>(top)));
    const uint64_t minus =
        ((ha & 0x8000) ? 0xFFFFFFFFull : 0) | ((hb & 0x8000) ? ~0xFFFFFFFFull : 0);
    return iq1_values(_mm512_or_si512(lo, _mm512_slli_epi64(hi, 8)), minus);
  }
};

// IQ1_M: qh[k / 2] nibble k % 2: row k's top 3 index bits and (bit 3) its delta sign; 3-bit
// scales per 16 (bits 3 i of the low 12 bits of the 4 scale words), d in their top nibbles.
struct Iq1m {
  using Block = BlockIQ1_M;
  struct Ctx {};
  static void load(const Block&, Ctx&) {}
  static __m512i pattern(int j) { return quarters_pattern(j); }
  static __m512 scales(const Block& b) {
    const uint64_t sc = iq_u64(b.scales);
    const uint16_t dh = static_cast<uint16_t>(_pext_u64(sc, 0xF000F000F000F000ull));
    const uint64_t s48 = _pext_u64(sc, 0x0FFF0FFF0FFF0FFFull);  // scale i at bits 3 i
    const __m128i s8 = _mm_set_epi64x(
        static_cast<long long>(_pdep_u64(s48 >> 24, 0x0707070707070707ull)),
        static_cast<long long>(_pdep_u64(s48, 0x0707070707070707ull)));
    const __m512i v = _mm512_cvtepu8_epi32(s8);
    const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(v, v),
                                                         _mm512_set1_epi32(1)));
    return _mm512_mul_ps(f, _mm512_set1_ps(half_to_float(static_cast<f16_t>(dh)) * 0.125f));
  }
  static __m512i group(const Block& b, int j, const Ctx&) {
    const uint32_t q = iq_u32(b.qh + 4 * j);  // rows 8 j .. 8 j + 7, a nibble each
    const uint64_t top = _pdep_u64(_pext_u32(q, 0x77777777u), 0x0707070707070707ull);
    const uint64_t minus = _pdep_u64(_pext_u32(q, 0x88888888u), 0x0101010101010101ull) * 0xFF;
    const __m512i lo = _mm512_cvtepu8_epi64(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(b.qs + 8 * j)));
    const __m512i hi = _mm512_cvtepu8_epi64(_mm_cvtsi64_si128(static_cast<long long>(top)));
    return iq1_values(_mm512_or_si512(lo, _mm512_slli_epi64(hi, 8)), minus);
  }
};


// ---- ternary types ------------------------------------------------------------------------------
// w = d (t - 1) with a digit t in 0..3 (TQ2_0) or 0..2 (TQ1_0) and one scale d per 256 (every
// lane's pattern picks lane 0 of the broadcast scale). digits(blk, j, ctx): the 64 unsigned
// digits of group j in natural element order; group(): the signed values t - 1.

// TQ2_0: t a 2-bit code: byte 32 c + j, bits 2 p, is element 128 c + 32 p + j, so group 2 c + h
// (elements 128 c + 64 h ..) is the 32 bytes of half c shifted by 4 h (first 32 elements) and
// 4 h + 2 (last 32), as in MvK2.
struct Tq2 {
  using Block = BlockTQ2_0;
  static constexpr bool kDigits = true;
  struct Ctx {
    __m512i m3 = _mm512_set1_epi8(3);
    __m512i shifts[2] = {
        _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1),
        _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1)};
  };
  static void load(const Block&, Ctx&) {}
  static __m512i pattern(int) { return _mm512_setzero_si512(); }
  static __m512 scales(const Block& b) { return _mm512_set1_ps(half_to_float(b.d)); }
  static __m512i digits(const Block& b, int j, const Ctx& c) {
    const __m512i q = _mm512_broadcast_i64x4(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs + 32 * (j / 2))));
    return _mm512_and_si512(_mm512_srlv_epi16(q, c.shifts[j % 2]), c.m3);
  }
  static __m512i group(const Block& b, int j, const Ctx& c) {
    return _mm512_sub_epi8(digits(b, j, c), _mm512_set1_epi8(1));
  }
};

// TQ1_0: t a base-3 digit: element 32 p + j (p < 5) of qs[j] (j < 32), 160 + 16 p + j of
// qs[32 + j], 240 + 4 p + j of qh[j], t = ((byte * 3^p mod 256) * 3) >> 8. A group's 64 bytes
// are the source bytes in element order (broadcasts of qs[0..31], qs[32..47], qh: load() puts
// them in the context) and its word multipliers 3^p (uniform over >= 4 bytes); the two byte
// products come from 16-bit multiplies of the even and the odd bytes, t = mulhi_epu16(y_byte
// << 8, 3).
struct Tq1 {
  using Block = BlockTQ1_0;
  static constexpr bool kDigits = true;
  struct Ctx {
    __m512i m[4], src[4];
    __m512i hi_bytes = _mm512_set1_epi16(static_cast<short>(0xFF00));
    __m512i lo_bytes = _mm512_set1_epi16(0x00FF), three = _mm512_set1_epi16(3);
    Ctx() {
      alignas(64) int16_t mul[4][32];
      for (int i = 0; i < 32; ++i) {  // word i = bytes 2 i, 2 i + 1 of the group
        mul[0][i] = i < 16 ? 1 : 3;
        mul[1][i] = i < 16 ? 9 : 27;
        mul[2][i] = i < 16 ? 81 : (i < 24 ? 1 : 3);
        static constexpr int16_t kLast[8] = {1, 1, 3, 3, 9, 9, 27, 27};
        mul[3][i] = i < 8 ? 9 : (i < 16 ? 27 : (i < 24 ? 81 : kLast[i - 24]));
      }
      for (int g = 0; g < 4; ++g) m[g] = _mm512_load_si512(mul[g]);
    }
  };
  static void load(const Block& b, Ctx& c) {
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qs));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs + 32));
    c.src[0] = c.src[1] = _mm512_broadcast_i64x4(q0);
    c.src[2] =
        _mm512_inserti64x4(_mm512_castsi256_si512(q0), _mm256_broadcastsi128_si256(q1), 1);
    c.src[3] = _mm512_inserti32x4(_mm512_broadcast_i32x4(q1),
                                  _mm_set1_epi32(static_cast<int>(iq_u32(b.qh))), 3);
  }
  static __m512i pattern(int) { return _mm512_setzero_si512(); }
  static __m512 scales(const Block& b) { return _mm512_set1_ps(half_to_float(b.d)); }
  static __m512i digits(const Block&, int j, const Ctx& c) {
    const __m512i x = c.src[j];
    const __m512i y = _mm512_or_si512(
        _mm512_and_si512(_mm512_mullo_epi16(x, c.m[j]), c.lo_bytes),
        _mm512_and_si512(_mm512_mullo_epi16(_mm512_and_si512(x, c.hi_bytes), c.m[j]),
                         c.hi_bytes));
    return _mm512_or_si512(
        _mm512_mulhi_epu16(_mm512_slli_epi16(y, 8), c.three),
        _mm512_slli_epi16(_mm512_mulhi_epu16(_mm512_and_si512(y, c.hi_bytes), c.three), 8));
  }
  static __m512i group(const Block& b, int j, const Ctx& c) {
    return _mm512_sub_epi8(digits(b, j, c), _mm512_set1_epi8(1));
  }
};

}  // namespace
}  // namespace PYLLM_ISA
}  // namespace pyllm
