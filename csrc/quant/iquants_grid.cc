// Scalar reference dequantization of the grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
// IQ1_S, IQ1_M) and the ternary types (TQ1_0, TQ2_0), plus the TQ1_0 / TQ2_0 quantizers.
//
// Dequantization is the specification the kernels' decoders (csrc/cpu/isa/decode_iq.h) are
// checked against, and it is bit-exact with the gguf package's numpy code: every float32 product
// is rounded where numpy rounds it, in its order. For the IQ2/IQ3 types that is
// ((d * scale_factor) * constant) * grid value, then the sign (exact); for IQ1 it is
// (d * (2 s + 1)) * (grid value + delta); for the ternary types d * t. (A finite f16 d has 11
// significant bits, the scale factors at most 5 and the grid values at most 6, so every product
// is exact in float32: the order decides only the sign of a zero and how inf/NaN spread. It is
// kept anyway.) The grid and sign tables are generated from the gguf package (iquant_grids.h).
//
// The grid types have no quantizer here: choosing grid rows well needs an importance-matrix
// search (their from_float is null in the traits table). TQ1_0 / TQ2_0 quantize as the gguf
// package does (and ggml): d = max |x| per block of 256, t = round(x / d) away from zero, which
// reproduces its bytes exactly.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pyllm/fp16.h"
#include "pyllm/quant.h"
#include "quant/exact_fp.h"  // no FMA contraction in this file
#include "quant/iquant_grids.h"

namespace pyllm {

namespace {

// The 32-bit little-endian word at p (blocks may sit at any address in a memory-mapped file).
uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Byte j of a packed grid row (iquant_grids.h): element j of the row.
uint8_t grid_byte(uint64_t row, int j) { return static_cast<uint8_t>(row >> (8 * j)); }

// +1 or -1 for bit j of an 8-bit sign mask (multiplied in, as the numpy reference does).
float sign_of(uint8_t mask, int j) { return (mask >> j) & 1 ? -1.0f : 1.0f; }

// Eight values of a grid row of magnitudes: y[j] = (dl * g_j) * sign_j.
void put_row8(uint64_t row, uint8_t signs, float dl, float* y) {
  for (int j = 0; j < 8; ++j) {
    y[j] = dl * static_cast<float>(grid_byte(row, j)) * sign_of(signs, j);
  }
}

// Eight values of an IQ1 grid row: y[j] = dl * (g_j + delta), g_j in {-1, 0, 1}.
void put_row8_iq1(uint64_t row, float dl, float delta, float* y) {
  for (int j = 0; j < 8; ++j) {
    const float g = static_cast<float>(static_cast<int8_t>(grid_byte(row, j)));
    y[j] = dl * (g + delta);
  }
}

// The IQ2 sub-block factor of a 4-bit scale: (d * (0.5 + s)) * 0.25, rounded in that order.
float iq2_scale(float d, int s) { return d * (0.5f + static_cast<float>(s)) * 0.25f; }

}  // namespace

void dequantize_row_iq2_xxs(const BlockIQ2_XXS* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const float d = f16_to_f32(x[i].d);
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      const uint32_t codes = load_u32(x[i].qs + 4 * ib);      // 4 grid indices
      const uint32_t meta = load_u32(x[i].qs + 4 * ib + 2);   // 4 sign indices + scale
      const float db = iq2_scale(d, static_cast<int>(meta >> 28));
      for (int l = 0; l < 4; ++l) {
        put_row8(kIq2xxsGrid[(codes >> (8 * l)) & 0xFF], kIqKsigns[(meta >> (7 * l)) & 0x7F], db,
                 y + 8 * l);
      }
    }
  }
}

void dequantize_row_iq2_xs(const BlockIQ2_XS* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const float d = f16_to_f32(x[i].d);
    for (int k = 0; k < QK_K / 8; ++k, y += 8) {
      uint16_t q;
      std::memcpy(&q, x[i].qs + k, 2);
      const int s = (x[i].scales[k / 4] >> (4 * ((k / 2) % 2))) & 0x0F;
      put_row8(kIq2xsGrid[q & 0x1FF], kIqKsigns[q >> 9], iq2_scale(d, s), y);
    }
  }
}

void dequantize_row_iq2_s(const BlockIQ2_S* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const float d = f16_to_f32(x[i].d);
    const uint8_t* signs = x[i].qs + QK_K / 8;
    for (int k = 0; k < QK_K / 8; ++k, y += 8) {
      const int idx = x[i].qs[k] | (((x[i].qh[k / 4] >> (2 * (k % 4))) & 3) << 8);
      const int s = (x[i].scales[k / 4] >> (4 * ((k / 2) % 2))) & 0x0F;
      put_row8(kIq2sGrid[idx], signs[k], iq2_scale(d, s), y);
    }
  }
}

void dequantize_row_iq3_xxs(const BlockIQ3_XXS* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const float d = f16_to_f32(x[i].d);
    const uint8_t* codes = x[i].qs;
    const uint8_t* meta = x[i].qs + QK_K / 4;
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      const uint32_t m = load_u32(meta + 4 * ib);
      const float db = d * (0.5f + static_cast<float>(m >> 28)) * 0.5f;
      for (int l = 0; l < 4; ++l) {
        const uint8_t signs = kIqKsigns[(m >> (7 * l)) & 0x7F];
        const uint32_t lo = kIq3xxsGrid[codes[8 * ib + 2 * l]];
        const uint32_t hi = kIq3xxsGrid[codes[8 * ib + 2 * l + 1]];
        for (int j = 0; j < 4; ++j) {
          y[8 * l + j] = db * static_cast<float>(grid_byte(lo, j)) * sign_of(signs, j);
          y[8 * l + j + 4] =
              db * static_cast<float>(grid_byte(hi, j)) * sign_of(signs, j + 4);
        }
      }
    }
  }
}

void dequantize_row_iq3_s(const BlockIQ3_S* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const float d = f16_to_f32(x[i].d);
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      const int s = (x[i].scales[ib / 2] >> (4 * (ib % 2))) & 0x0F;
      const float db = d * static_cast<float>(1 + 2 * s);
      for (int l = 0; l < 8; ++l) {
        const int k = 8 * ib + l;
        const uint32_t row = kIq3sGrid[x[i].qs[k] | (((x[i].qh[ib] >> l) & 1) << 8)];
        const uint8_t signs = x[i].signs[4 * ib + l / 2];
        for (int j = 0; j < 4; ++j) {
          y[4 * l + j] =
              db * static_cast<float>(grid_byte(row, j)) * sign_of(signs, 4 * (l % 2) + j);
        }
      }
    }
  }
}

void dequantize_row_iq1_s(const BlockIQ1_S* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    const float d = f16_to_f32(x[i].d);
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      uint16_t h;
      std::memcpy(&h, x[i].qh + ib, 2);
      const float dl = d * static_cast<float>(2 * ((h >> 12) & 7) + 1);
      const float delta = (h & 0x8000) ? -kIq1Delta : kIq1Delta;
      for (int l = 0; l < 4; ++l) {
        const int idx = x[i].qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8);
        put_row8_iq1(kIq1sGrid[idx], dl, delta, y + 8 * l);
      }
    }
  }
}

void dequantize_row_iq1_m(const BlockIQ1_M* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i) {
    uint16_t sc[4];
    std::memcpy(sc, x[i].scales, sizeof(sc));
    // The block's f16 scale, a nibble at the top of each of the four words.
    const f16_t dbits = static_cast<f16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) |
                                           ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000));
    const float d = f16_to_f32(dbits);
    for (int s = 0; s < QK_K / 16; ++s, y += 16) {  // 16 elements per 3-bit scale
      const float dl = d * static_cast<float>(2 * ((sc[s / 4] >> (3 * (s % 4))) & 7) + 1);
      for (int b = 0; b < 2; ++b) {  // two grid rows, the two nibbles of qh[s]
        const int nib = (x[i].qh[s] >> (4 * b)) & 0x0F;
        const int idx = x[i].qs[2 * s + b] | ((nib & 7) << 8);
        put_row8_iq1(kIq1sGrid[idx], dl, (nib & 8) ? -kIq1Delta : kIq1Delta, y + 8 * b);
      }
    }
  }
}

// ---- ternary types ----------------------------------------------------------------------------

namespace {

constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};

// Ternary digit p (0 = the most significant) of a TQ1_0 byte, as t = digit - 1: multiplying by
// 3^p (mod 256) shifts the digit to the top of the fixed-point fraction, * 3 >> 8 reads it.
int tq1_trit(uint8_t byte, int p) {
  const uint8_t shifted = static_cast<uint8_t>(byte * kPow3[p]);
  return ((shifted * 3) >> 8) - 1;
}

// d = max |x| of a block and t = round(x / d) (half away from zero), stored as t + 1 in 0..2;
// the float operations of the gguf package (and ggml): id = 1 / d, then x * id. |x * id| rounds
// to at most 1, so t is read off the sign of the rounded value (a NaN from non-finite input
// gives t = 0 instead of an undefined conversion).
float ternary_codes(const float* x, uint8_t* q) {
  float amax = 0.0f;
  for (int j = 0; j < QK_K; ++j) {
    const float a = std::fabs(x[j]);
    if (a > amax) amax = a;
  }
  const float id = amax != 0.0f ? 1.0f / amax : 0.0f;
  for (int j = 0; j < QK_K; ++j) {
    const float r = std::round(x[j] * id);
    q[j] = r > 0.0f ? 2 : r < 0.0f ? 0 : 1;
  }
  return amax;
}

// A base-3 number of digits (most significant first) as the byte ceil(v * 256 / 243).
uint8_t tq1_pack(const uint8_t* digits, int count, int stride) {
  int v = 0;
  for (int p = 0; p < 5; ++p) v = 3 * v + (p < count ? digits[p * stride] : 0);
  return static_cast<uint8_t>((v * 256 + 242) / 243);
}

}  // namespace

void dequantize_row_tq1_0(const BlockTQ1_0* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i, y += QK_K) {
    const float d = f16_to_f32(x[i].d);
    for (int p = 0; p < 5; ++p) {
      for (int j = 0; j < 32; ++j) {
        y[32 * p + j] = d * static_cast<float>(tq1_trit(x[i].qs[j], p));
      }
      for (int j = 0; j < 16; ++j) {
        y[160 + 16 * p + j] = d * static_cast<float>(tq1_trit(x[i].qs[32 + j], p));
      }
    }
    for (int p = 0; p < 4; ++p) {
      for (int j = 0; j < 4; ++j) {
        y[240 + 4 * p + j] = d * static_cast<float>(tq1_trit(x[i].qh[j], p));
      }
    }
  }
}

void quantize_row_tq1_0(const float* x, BlockTQ1_0* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
    uint8_t q[QK_K];
    y[i].d = f32_to_f16(ternary_codes(x, q));
    for (int j = 0; j < 32; ++j) y[i].qs[j] = tq1_pack(q + j, 5, 32);
    for (int j = 0; j < 16; ++j) y[i].qs[32 + j] = tq1_pack(q + 160 + j, 5, 16);
    for (int j = 0; j < 4; ++j) y[i].qh[j] = tq1_pack(q + 240 + j, 4, 4);
  }
}

void dequantize_row_tq2_0(const BlockTQ2_0* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i, y += QK_K) {
    const float d = f16_to_f32(x[i].d);
    for (int c = 0; c < 2; ++c) {
      for (int p = 0; p < 4; ++p) {
        for (int j = 0; j < 32; ++j) {
          const int t = ((x[i].qs[32 * c + j] >> (2 * p)) & 3) - 1;
          y[128 * c + 32 * p + j] = d * static_cast<float>(t);
        }
      }
    }
  }
}

void quantize_row_tq2_0(const float* x, BlockTQ2_0* y, int64_t n) {
  for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
    uint8_t q[QK_K];
    y[i].d = f32_to_f16(ternary_codes(x, q));
    for (int c = 0; c < 2; ++c) {
      for (int j = 0; j < 32; ++j) {
        const uint8_t* t = q + 128 * c + j;
        y[i].qs[32 * c + j] =
            static_cast<uint8_t>(t[0] | (t[32] << 2) | (t[64] << 4) | (t[96] << 6));
      }
    }
  }
}

}  // namespace pyllm
