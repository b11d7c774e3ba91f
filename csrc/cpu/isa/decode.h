// Per-type block decoders used by the kernels: one `Fmt<QType>` per weight type with its block
// struct, block size and a `decode(block, out)` that writes the block's float values.
//
// These follow the formulas of the reference dequantizers (csrc/quant, the gguf package) term by
// term, so a kernel that decodes with them and then accumulates in F32 differs from the exact
// product only by F32 accumulation rounding. They are inline templates so that each ISA build
// compiles (and possibly vectorizes) them with its own flags. The grid i-quants and the ternary
// types have theirs in decode_iq.h, included at the end.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/isa/simd.h"
#include "pyllm/qtype.h"
#include "pyllm/quant.h"

namespace pyllm {
namespace PYLLM_ISA {

template <QType T>
struct Fmt;

template <>
struct Fmt<QType::F32> {
  using Block = float;
  static constexpr int B = 1;
  static void decode(const Block* b, float* y) { y[0] = b[0]; }
};

template <>
struct Fmt<QType::F16> {
  using Block = f16_t;
  static constexpr int B = 1;
  static void decode(const Block* b, float* y) { y[0] = f16_to_f32(b[0]); }
};

template <>
struct Fmt<QType::BF16> {
  using Block = bf16_t;
  static constexpr int B = 1;
  static void decode(const Block* b, float* y) { y[0] = bf16_to_f32(b[0]); }
};

template <>
struct Fmt<QType::Q4_0> {
  using Block = BlockQ4_0;
  static constexpr int B = 32;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>((b->qs[j] & 0x0F) - 8) * d;
      y[j + 16] = static_cast<float>((b->qs[j] >> 4) - 8) * d;
    }
  }
};

template <>
struct Fmt<QType::Q4_1> {
  using Block = BlockQ4_1;
  static constexpr int B = 32;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d), m = half_to_float(b->m);
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>(b->qs[j] & 0x0F) * d + m;
      y[j + 16] = static_cast<float>(b->qs[j] >> 4) * d + m;
    }
  }
};

template <>
struct Fmt<QType::Q5_0> {
  using Block = BlockQ5_0;
  static constexpr int B = 32;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    uint32_t qh;
    std::memcpy(&qh, b->qh, 4);
    for (int j = 0; j < 16; ++j) {
      const int h0 = ((qh >> j) << 4) & 0x10;
      const int h1 = (qh >> (j + 12)) & 0x10;
      y[j] = static_cast<float>(((b->qs[j] & 0x0F) | h0) - 16) * d;
      y[j + 16] = static_cast<float>(((b->qs[j] >> 4) | h1) - 16) * d;
    }
  }
};

template <>
struct Fmt<QType::Q5_1> {
  using Block = BlockQ5_1;
  static constexpr int B = 32;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d), m = half_to_float(b->m);
    uint32_t qh;
    std::memcpy(&qh, b->qh, 4);
    for (int j = 0; j < 16; ++j) {
      const int h0 = ((qh >> j) << 4) & 0x10;
      const int h1 = (qh >> (j + 12)) & 0x10;
      y[j] = static_cast<float>((b->qs[j] & 0x0F) | h0) * d + m;
      y[j + 16] = static_cast<float>((b->qs[j] >> 4) | h1) * d + m;
    }
  }
};

template <>
struct Fmt<QType::Q8_0> {
  using Block = BlockQ8_0;
  static constexpr int B = 32;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(b->qs[j]) * d;
  }
};

template <>
struct Fmt<QType::Q2_K> {
  using Block = BlockQ2_K;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d), dmin = half_to_float(b->dmin);
    const uint8_t* q = b->qs;
    int is = 0;
    for (int n = 0; n < QK_K; n += 128) {
      for (int shift = 0; shift < 8; shift += 2) {
        for (int half = 0; half < 2; ++half) {
          const uint8_t sc = b->scales[is++];
          const float dl = d * static_cast<float>(sc & 0x0F);
          const float ml = dmin * static_cast<float>(sc >> 4);
          for (int l = 0; l < 16; ++l) {
            *y++ = dl * static_cast<float>((q[l + 16 * half] >> shift) & 3) - ml;
          }
        }
      }
      q += 32;
    }
  }
};

// The 16 signed 6-bit scales of a Q3_K block (stored as 4+2 bit fields in 12 bytes), minus 32.
inline void q3k_scales(const uint8_t* packed, int8_t* out) {
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? packed[j] & 0x0F : packed[j - 8] >> 4;
    const int high = (packed[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
    out[j] = static_cast<int8_t>((low | (high << 4)) - 32);
  }
}

template <>
struct Fmt<QType::Q3_K> {
  using Block = BlockQ3_K;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    int8_t sc[16];
    q3k_scales(b->scales, sc);
    const uint8_t* q = b->qs;
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < QK_K; n += 128) {
      for (int shift = 0; shift < 8; shift += 2) {
        for (int half = 0; half < 2; ++half) {
          const float dl = d * static_cast<float>(sc[is++]);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int v = ((q[l] >> shift) & 3) - ((b->hmask[l] & m) ? 0 : 4);
            *y++ = dl * static_cast<float>(v);
          }
        }
        m = static_cast<uint8_t>(m << 1);
      }
      q += 32;
    }
  }
};

template <>
struct Fmt<QType::Q4_K> {
  using Block = BlockQ4_K;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d), dmin = half_to_float(b->dmin);
    const uint8_t* q = b->qs;
    for (int j = 0; j < 8; j += 2) {
      uint8_t sc, mn;
      get_scale_min_k4(j, b->scales, &sc, &mn);
      const float d1 = d * sc, m1 = dmin * mn;
      get_scale_min_k4(j + 1, b->scales, &sc, &mn);
      const float d2 = d * sc, m2 = dmin * mn;
      for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>(q[l] & 0x0F) - m1;
      for (int l = 0; l < 32; ++l) y[l + 32] = d2 * static_cast<float>(q[l] >> 4) - m2;
      y += 64;
      q += 32;
    }
  }
};

template <>
struct Fmt<QType::Q5_K> {
  using Block = BlockQ5_K;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d), dmin = half_to_float(b->dmin);
    const uint8_t* ql = b->qs;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < 8; j += 2) {
      uint8_t sc, mn;
      get_scale_min_k4(j, b->scales, &sc, &mn);
      const float d1 = d * sc, m1 = dmin * mn;
      get_scale_min_k4(j + 1, b->scales, &sc, &mn);
      const float d2 = d * sc, m2 = dmin * mn;
      for (int l = 0; l < 32; ++l) {
        y[l] = d1 * static_cast<float>((ql[l] & 0x0F) + ((b->qh[l] & u1) ? 16 : 0)) - m1;
      }
      for (int l = 0; l < 32; ++l) {
        y[l + 32] = d2 * static_cast<float>((ql[l] >> 4) + ((b->qh[l] & u2) ? 16 : 0)) - m2;
      }
      y += 64;
      ql += 32;
      u1 = static_cast<uint8_t>(u1 << 2);
      u2 = static_cast<uint8_t>(u2 << 2);
    }
  }
};

template <>
struct Fmt<QType::Q6_K> {
  using Block = BlockQ6_K;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    const uint8_t* ql = b->ql;
    const uint8_t* qh = b->qh;
    const int8_t* sc = b->scales;
    for (int n = 0; n < QK_K; n += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
        y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
};

// IQ4_NL: d * level[q]; qs[j] holds elements j (low nibble) and j + 16 (high nibble).
template <>
struct Fmt<QType::IQ4_NL> {
  using Block = BlockIQ4_NL;
  static constexpr int B = QK4_NL;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int j = 0; j < 16; ++j) {
      y[j] = d * static_cast<float>(kIq4Levels[b->qs[j] & 0x0F]);
      y[j + 16] = d * static_cast<float>(kIq4Levels[b->qs[j] >> 4]);
    }
  }
};

// The 6-bit scale of sub-block j of an IQ4_XS block, minus 32.
inline int iq4xs_scale(const BlockIQ4_XS* b, int j) {
  const int low = (b->scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
  const int high = (b->scales_h >> (2 * j)) & 3;
  return (low | (high << 4)) - 32;
}

// IQ4_XS: sub-block j of 32 is IQ4_NL's layout at qs + 16 j with the scale d * (ls_j - 32).
template <>
struct Fmt<QType::IQ4_XS> {
  using Block = BlockIQ4_XS;
  static constexpr int B = QK_K;
  static void decode(const Block* b, float* y) {
    const float d = half_to_float(b->d);
    for (int ib = 0; ib < QK_K / 32; ++ib, y += 32) {
      const float dl = d * static_cast<float>(iq4xs_scale(b, ib));
      const uint8_t* qs = b->qs + 16 * ib;
      for (int j = 0; j < 16; ++j) {
        y[j] = dl * static_cast<float>(kIq4Levels[qs[j] & 0x0F]);
        y[j + 16] = dl * static_cast<float>(kIq4Levels[qs[j] >> 4]);
      }
    }
  }
};

}  // namespace PYLLM_ISA
}  // namespace pyllm

#include "cpu/isa/decode_iq.h"  // IWYU pragma: export
