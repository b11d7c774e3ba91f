// Block decoders (Fmt<QType>, see decode.h) of the grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S,
// IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) and the ternary types (TQ1_0, TQ2_0), for the F32-math kernels
// of kernels.cc on every ISA.
//
// Each decode is the reference dequantizer's formula (csrc/quant/iquants_grid.cc) with the same
// float operations in the same order, so it yields the reference's values bit for bit; the grid
// and sign tables are the generated ones (csrc/quant/iquant_grids.h). Included by decode.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/isa/simd.h"
#include "pyllm/qtype.h"
#include "quant/iquant_grids.h"

namespace pyllm {
namespace PYLLM_ISA {

template <QType T>
struct Fmt;

// The 32-bit little-endian word at p (blocks may sit at any address).
inline uint32_t iq_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint64_t iq_u64(const void* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

inline uint16_t iq_u16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Sign bit j of a byte -> 0xFF in byte j of a word (256 words, generated at compile time).
struct IqSignBytes {
  uint64_t m[256];
  constexpr IqSignBytes() : m() {
    for (int s = 0; s < 256; ++s) {
      for (int j = 0; j < 8; ++j) {
        if ((s >> j) & 1) m[s] |= uint64_t{0xFF} << (8 * j);
      }
    }
  }
};
inline constexpr IqSignBytes kIqSignBytes{};

// Whether no row of a grid has a zero byte (iq_row8's negation needs it).
template <class Row, size_t N>
constexpr bool no_zero_bytes(const Row (&grid)[N]) {
  for (size_t r = 0; r < N; ++r) {
    for (size_t j = 0; j < sizeof(Row); ++j) {
      if (((grid[r] >> (8 * j)) & 0xFF) == 0) return false;
    }
  }
  return true;
}
static_assert(no_zero_bytes(kIq2xxsGrid) && no_zero_bytes(kIq2xsGrid) &&
                  no_zero_bytes(kIq2sGrid) && no_zero_bytes(kIq3xxsGrid) &&
                  no_zero_bytes(kIq3sGrid),
              "the IQ2 / IQ3 grids hold magnitudes >= 1");

// iq_signed_row: the row's 8 magnitudes (bytes, > 0) as int8 values +g_j or -g_j by bit j of
// signs, negated as a whole word: -g = (g ^ 0xFF) + 1 per byte (no carry leaves a byte as g > 0).
// iq_row8: y[j] = dl * those values, widened to floats in one vectorizable loop; equal to the
// reference's (dl * g) * (+-1) as IEEE products are symmetric in sign.
inline uint64_t iq_signed_row(uint64_t row, uint8_t signs) {
  const uint64_t m = kIqSignBytes.m[signs];
  return (row ^ m) + (m & 0x0101010101010101ull);
}

inline void iq_row8(uint64_t row, uint8_t signs, float dl, float* y) {
  const uint64_t v = iq_signed_row(row, signs);
  int8_t q[8];
  std::memcpy(q, &v, 8);
  for (int j = 0; j < 8; ++j) y[j] = dl * static_cast<float>(q[j]);
}

// y[j] = dl * (g_j + delta), g_j in {-1, 0, 1}, j < 8 (IQ1_S, IQ1_M).
inline void iq1_row8(uint64_t row, float dl, float delta, float* y) {
  int8_t g[8];
  std::memcpy(g, &row, 8);
  for (int j = 0; j < 8; ++j) y[j] = dl * (static_cast<float>(g[j]) + delta);
}

// (d * (0.5 + s)) * 0.25: the IQ2 factor of a 4-bit scale.
inline float iq2_factor(float d, int s) { return d * (0.5f + static_cast<float>(s)) * 0.25f; }

// IQ2_XXS: per group of 32, a word of 4 grid indices and a word of 4 sign indices + scale.
template <>
struct Fmt<QType::IQ2_XXS> {
  using Block = BlockIQ2_XXS;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      const uint32_t codes = iq_u32(b->qs + 4 * ib);
      const uint32_t meta = iq_u32(b->qs + 4 * ib + 2);
      const float db = iq2_factor(d, static_cast<int>(meta >> 28));
      for (int l = 0; l < 4; ++l) {
        iq_row8(kIq2xxsGrid[(codes >> (8 * l)) & 0xFF], kIqKsigns[(meta >> (7 * l)) & 0x7F], db,
                y + 8 * l);
      }
    }
  }
};

// IQ2_XS: a 16-bit code per 8 elements (9-bit index, 7-bit sign index), a scale per 16.
template <>
struct Fmt<QType::IQ2_XS> {
  using Block = BlockIQ2_XS;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int k = 0; k < QK_K / 8; ++k, y += 8) {
      const uint16_t q = iq_u16(b->qs + k);
      const int s = (b->scales[k / 4] >> (4 * ((k / 2) % 2))) & 0x0F;
      iq_row8(kIq2xsGrid[q & 0x1FF], kIqKsigns[q >> 9], iq2_factor(d, s), y);
    }
  }
};

// IQ2_S: 10-bit indices (8 bits in qs, 2 in qh), explicit sign bytes, a scale per 16.
template <>
struct Fmt<QType::IQ2_S> {
  using Block = BlockIQ2_S;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    const uint8_t* signs = b->qs + QK_K / 8;
    for (int k = 0; k < QK_K / 8; ++k, y += 8) {
      const int idx = b->qs[k] | (((b->qh[k / 4] >> (2 * (k % 4))) & 3) << 8);
      const int s = (b->scales[k / 4] >> (4 * ((k / 2) % 2))) & 0x0F;
      iq_row8(kIq2sGrid[idx], signs[k], iq2_factor(d, s), y);
    }
  }
};

// IQ3_XXS: one index per 4 elements (256-row grid of 4), sign indices + scale per 32.
template <>
struct Fmt<QType::IQ3_XXS> {
  using Block = BlockIQ3_XXS;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    const uint8_t* codes = b->qs;
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      const uint32_t m = iq_u32(b->qs + QK_K / 4 + 4 * ib);
      const float db = d * (0.5f + static_cast<float>(m >> 28)) * 0.5f;
      for (int l = 0; l < 4; ++l) {
        const uint8_t signs = kIqKsigns[(m >> (7 * l)) & 0x7F];
        // the two rows of 4 as one row of 8: element j of the pair is byte j of (hi << 32 | lo)
        const uint64_t row = kIq3xxsGrid[codes[8 * ib + 2 * l]] |
                             (static_cast<uint64_t>(kIq3xxsGrid[codes[8 * ib + 2 * l + 1]]) << 32);
        iq_row8(row, signs, db, y + 8 * l);
      }
    }
  }
};

// IQ3_S: 9-bit indices (8 bits in qs, 1 in qh) into a 512-row grid of 4, explicit sign bits,
// a scale (1 + 2 s) per 32.
template <>
struct Fmt<QType::IQ3_S> {
  using Block = BlockIQ3_S;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      const int s = (b->scales[ib / 2] >> (4 * (ib % 2))) & 0x0F;
      const float db = d * static_cast<float>(1 + 2 * s);
      for (int l = 0; l < 8; l += 2) {  // two rows of 4 share one sign byte
        const int k = 8 * ib + l;
        const uint32_t lo = kIq3sGrid[b->qs[k] | (((b->qh[ib] >> l) & 1) << 8)];
        const uint32_t hi = kIq3sGrid[b->qs[k + 1] | (((b->qh[ib] >> (l + 1)) & 1) << 8)];
        iq_row8(lo | (static_cast<uint64_t>(hi) << 32), b->signs[4 * ib + l / 2], db, y + 4 * l);
      }
    }
  }
};

// IQ1_S: 11-bit indices into the {-1, 0, 1} grid, per 32 a 3-bit scale and the shift's sign.
template <>
struct Fmt<QType::IQ1_S> {
  using Block = BlockIQ1_S;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      const uint16_t h = iq_u16(b->qh + ib);
      const float dl = d * static_cast<float>(2 * ((h >> 12) & 7) + 1);
      const float delta = (h & 0x8000) ? -kIq1Delta : kIq1Delta;
      for (int l = 0; l < 4; ++l) {
        iq1_row8(kIq1sGrid[b->qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8)], dl, delta,
                 y + 8 * l);
      }
    }
  }
};

// IQ1_M: IQ1_S's grid, a 3-bit scale per 16, a shift sign per 8, d spread over the scales.
template <>
struct Fmt<QType::IQ1_M> {
  using Block = BlockIQ1_M;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    uint16_t sc[4];
    std::memcpy(sc, b->scales, sizeof(sc));
    const float d = half_to_float(static_cast<f16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) |
                                                     ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000)));
    for (int s = 0; s < QK_K / 16; ++s, y += 16) {
      const float dl = d * static_cast<float>(2 * ((sc[s / 4] >> (3 * (s % 4))) & 7) + 1);
      for (int h = 0; h < 2; ++h) {
        const int nib = (b->qh[s] >> (4 * h)) & 0x0F;
        iq1_row8(kIq1sGrid[b->qs[2 * s + h] | ((nib & 7) << 8)], dl,
                 (nib & 8) ? -kIq1Delta : kIq1Delta, y + 8 * h);
      }
    }
  }
};

// TQ1_0: five base-3 digits per byte (see BlockTQ1_0), x = d * (digit - 1).
template <>
struct Fmt<QType::TQ1_0> {
  using Block = BlockTQ1_0;
  static constexpr int B = QK_K;
  static float trit(float d, uint8_t byte, uint8_t pow3) {
    const int digit = (static_cast<uint8_t>(byte * pow3) * 3) >> 8;
    return d * static_cast<float>(digit - 1);
  }
  static void decode(const Block* b, float* y) {
    static constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};
    const float d = half_to_float(b->d);
    for (int p = 0; p < 5; ++p) {
      for (int j = 0; j < 32; ++j) y[32 * p + j] = trit(d, b->qs[j], kPow3[p]);
      for (int j = 0; j < 16; ++j) y[160 + 16 * p + j] = trit(d, b->qs[32 + j], kPow3[p]);
    }
    for (int p = 0; p < 4; ++p) {
      for (int j = 0; j < 4; ++j) y[240 + 4 * p + j] = trit(d, b->qh[j], kPow3[p]);
    }
  }
};

// TQ2_0: four 2-bit codes per byte, x = d * (q - 1).
template <>
struct Fmt<QType::TQ2_0> {
  using Block = BlockTQ2_0;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int c = 0; c < 2; ++c) {
      for (int p = 0; p < 4; ++p) {
        for (int j = 0; j < 32; ++j) {
          const int q = (b->qs[32 * c + j] >> (2 * p)) & 3;
          y[128 * c + 32 * p + j] = d * static_cast<float>(q - 1);
        }
      }
    }
  }
};

}  // namespace PYLLM_ISA
}  // namespace pyllm
