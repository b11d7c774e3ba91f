// AVX-512 VNNI matmat (prefill) panels for the block types whose weights are an integer times a
// per-32 scale plus a per-32 offset: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K, Q4_K, Q5_K, IQ4_NL,
// IQ4_XS (the integer a table level), and Q6_K (two scales per 32). The register tile that
// multiplies a panel with the int16 activations, and why, is matmat_tile.h.
//
// The panel comes from GGUF rows (scalar decoders, any type) or from the rows16 layout the model
// repacks its matrices into (vectorized, Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS); both
// give identical panels.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/isa/decode.h"
#include "cpu/isa/kernels.h"
#include "cpu/isa/matmat_tile.h"
#include "cpu/isa/rows16_simd.h"
#include "cpu/isa/simd.h"
#include "cpu/kernel_table.h"
#include "pyllm/repack.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in its headers
#pragma GCC diagnostic ignored "-Wuninitialized"        // (_mm512_cast* leave lanes undefined)
#endif

#if !defined(PYLLM_ISA_AVX512)
#error "matmat_vnni.cc is part of the AVX-512 build only (CMakeLists.txt, PYLLM_ISA_SOURCES_avx512)"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {

// Integer decoders: one group of 32 weights -> u[32] (int16), scale s, offset o, w = s * u + o.
template <QType T>
struct IntFmt;

template <>
struct IntFmt<QType::Q4_0> {
  using Block = BlockQ4_0;
  static constexpr int B = 32;
  static constexpr bool kOffset = false;
  static constexpr int kSubs = 1;  // scales per group of 32
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    for (int j = 0; j < 16; ++j) {
      u[j] = static_cast<int16_t>((b->qs[j] & 0x0F) - 8);
      u[j + 16] = static_cast<int16_t>((b->qs[j] >> 4) - 8);
    }
    s[0] = half_to_float(b->d);
    o[0] = 0.0f;
  }
};

template <>
struct IntFmt<QType::Q4_1> {
  using Block = BlockQ4_1;
  static constexpr int B = 32;
  static constexpr bool kOffset = true;
  static constexpr int kSubs = 1;  // scales per group of 32
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    for (int j = 0; j < 16; ++j) {
      u[j] = static_cast<int16_t>(b->qs[j] & 0x0F);
      u[j + 16] = static_cast<int16_t>(b->qs[j] >> 4);
    }
    s[0] = half_to_float(b->d);
    o[0] = half_to_float(b->m);
  }
};

template <class Block>
void q5_values(const Block* b, int bias, int16_t* u) {
  uint32_t qh;
  std::memcpy(&qh, b->qh, 4);
  for (int j = 0; j < 16; ++j) {
    u[j] = static_cast<int16_t>(((b->qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - bias);
    u[j + 16] = static_cast<int16_t>(((b->qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - bias);
  }
}

template <>
struct IntFmt<QType::Q5_0> {
  using Block = BlockQ5_0;
  static constexpr int B = 32;
  static constexpr bool kOffset = false;
  static constexpr int kSubs = 1;  // scales per group of 32
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    q5_values(b, 16, u);
    s[0] = half_to_float(b->d);
    o[0] = 0.0f;
  }
};

template <>
struct IntFmt<QType::Q5_1> {
  using Block = BlockQ5_1;
  static constexpr int B = 32;
  static constexpr bool kOffset = true;
  static constexpr int kSubs = 1;  // scales per group of 32
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    q5_values(b, 0, u);
    s[0] = half_to_float(b->d);
    o[0] = half_to_float(b->m);
  }
};

template <>
struct IntFmt<QType::Q8_0> {
  using Block = BlockQ8_0;
  static constexpr int B = 32;
  static constexpr bool kOffset = false;
  static constexpr int kSubs = 1;  // scales per group of 32
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    for (int j = 0; j < 32; ++j) u[j] = b->qs[j];
    s[0] = half_to_float(b->d);
    o[0] = 0.0f;
  }
};

template <>
struct IntFmt<QType::Q4_K> {
  using Block = BlockQ4_K;
  static constexpr int B = QK_K;
  static constexpr bool kOffset = true;
  static constexpr int kSubs = 1;  // scales per group of 32
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    const float d = half_to_float(b->d), dmin = half_to_float(b->dmin);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, mn;
      get_scale_min_k4(j, b->scales, &sc, &mn);
      s[j] = d * sc;
      o[j] = -dmin * mn;
      const uint8_t* q = b->qs + 32 * (j / 2);
      const int shift = 4 * (j & 1);
      for (int l = 0; l < 32; ++l) u[32 * j + l] = static_cast<int16_t>((q[l] >> shift) & 0x0F);
    }
  }
};

template <>
struct IntFmt<QType::Q5_K> {
  using Block = BlockQ5_K;
  static constexpr int B = QK_K;
  static constexpr bool kOffset = true;
  static constexpr int kSubs = 1;  // scales per group of 32
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    const float d = half_to_float(b->d), dmin = half_to_float(b->dmin);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, mn;
      get_scale_min_k4(j, b->scales, &sc, &mn);
      s[j] = d * sc;
      o[j] = -dmin * mn;
      const uint8_t* q = b->qs + 32 * (j / 2);
      const int shift = 4 * (j & 1);
      for (int l = 0; l < 32; ++l) {
        const int high = (b->qh[l] >> j) & 1;
        u[32 * j + l] = static_cast<int16_t>(((q[l] >> shift) & 0x0F) | (high << 4));
      }
    }
  }
};

// Q3_K: the 6-bit sub-block scale (minus 32, |sc| <= 32) is folded into the integer weight,
// u = sc * q with q in -4..3 (|u| <= 128), so a group of 32 keeps one F32 scale d. Group g of a
// block is elements 32g .. 32g + 31 = sub-blocks 2g, 2g + 1 (see decode.h for the bit layout).
template <>
struct IntFmt<QType::Q3_K> {
  using Block = BlockQ3_K;
  static constexpr int B = QK_K;
  static constexpr bool kOffset = false;
  static constexpr int kSubs = 1;  // scales per group of 32
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    int8_t sc[16];
    q3k_scales(b->scales, sc);
    const float d = half_to_float(b->d);
    for (int g = 0; g < 8; ++g) {
      const int h = g / 4, shift = 2 * (g % 4);
      const uint8_t bit = static_cast<uint8_t>(1u << g);  // hmask bit 4h + g % 4 == g
      for (int l = 0; l < 32; ++l) {
        const int q = ((b->qs[32 * h + l] >> shift) & 3) - ((b->hmask[l] & bit) ? 0 : 4);
        u[32 * g + l] = static_cast<int16_t>(sc[2 * g + (l >= 16)] * q);
      }
      s[g] = d;
      o[g] = 0.0f;
    }
  }
};

// Q6_K: u = q - 32 (|u| <= 32) with the signed 8-bit scale of each sub-block of 16 kept as an
// F32 scale d * sc, i.e. two scales per group of 32 (kSubs = 2: the micro-kernel rescales after
// every 8 pairs). Folding sc into u would need |u| up to 4096 and could overflow int32 lanes.
template <>
struct IntFmt<QType::Q6_K> {
  using Block = BlockQ6_K;
  static constexpr int B = QK_K;
  static constexpr bool kOffset = false;
  static constexpr int kSubs = 2;
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    const float d = half_to_float(b->d);
    for (int n = 0; n < 2; ++n) {
      const uint8_t* ql = b->ql + 64 * n;
      const uint8_t* qh = b->qh + 32 * n;
      int16_t* un = u + 128 * n;
      for (int l = 0; l < 32; ++l) {
        un[l] = static_cast<int16_t>(((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32);
        un[l + 32] = static_cast<int16_t>(((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
        un[l + 64] = static_cast<int16_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
        un[l + 96] = static_cast<int16_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
      }
    }
    for (int j = 0; j < 16; ++j) s[j] = d * static_cast<float>(b->scales[j]);
    for (int g = 0; g < 8; ++g) o[g] = 0.0f;
  }
};

// IQ4_NL / IQ4_XS: u = the signed level (|u| <= 127), one scale per group of 32 (IQ4_NL's d,
// IQ4_XS's d * (ls_j - 32)).
inline void iq4_levels(const uint8_t* qs, int16_t* u) {
  for (int j = 0; j < 16; ++j) {
    u[j] = kIq4Levels[qs[j] & 0x0F];
    u[j + 16] = kIq4Levels[qs[j] >> 4];
  }
}

template <>
struct IntFmt<QType::IQ4_NL> {
  using Block = BlockIQ4_NL;
  static constexpr int B = QK4_NL;
  static constexpr bool kOffset = false;
  static constexpr int kSubs = 1;
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    iq4_levels(b->qs, u);
    s[0] = half_to_float(b->d);
    o[0] = 0.0f;
  }
};

template <>
struct IntFmt<QType::IQ4_XS> {
  using Block = BlockIQ4_XS;
  static constexpr int B = QK_K;
  static constexpr bool kOffset = false;
  static constexpr int kSubs = 1;
  static void decode(const Block* b, int16_t* u, float* s, float* o) {
    const float d = half_to_float(b->d);
    for (int j = 0; j < 8; ++j) {
      iq4_levels(b->qs + 16 * j, u + 32 * j);
      s[j] = d * static_cast<float>(iq4xs_scale(b, j));
      o[j] = 0.0f;
    }
  }
};

// From GGUF rows: the scalar decoders above, one row at a time.
template <QType T>
struct GgufPanel {
  static constexpr bool kOffset = IntFmt<T>::kOffset;
  static constexpr int kSubs = IntFmt<T>::kSubs;
  static void pack(const MatArgs& a, int64_t o0, int nr, int64_t k0, int64_t kc, int32_t* pairs,
                   float* scales, float* offsets) {
    using F = IntFmt<T>;
    using Block = typename F::Block;
    constexpr int G = F::B / 32;  // groups per block
    alignas(64) int16_t u[F::B];
    float s[G * F::kSubs], o[G];
    const int ngroups = static_cast<int>(kc / 32);
    for (int r = 0; r < R; ++r) {
      if (r >= nr) {
        for (int64_t p = 0; p < kc / 2; ++p) pairs[p * R + r] = 0;
        for (int g = 0; g < ngroups; ++g) {
          offsets[g * R + r] = 0.0f;
          for (int h = 0; h < F::kSubs; ++h) scales[(g * F::kSubs + h) * R + r] = 0.0f;
        }
        continue;
      }
      const Block* row = reinterpret_cast<const Block*>(a.w + (o0 + r) * a.row_bytes);
      for (int64_t b = 0; b < kc / F::B; ++b) {
        F::decode(row + k0 / F::B + b, u, s, o);
        for (int g = 0; g < G; ++g) {
          const int gi = static_cast<int>(b * G + g);
          for (int h = 0; h < F::kSubs; ++h) {
            scales[(gi * F::kSubs + h) * R + r] = s[g * F::kSubs + h];
          }
          offsets[gi * R + r] = o[g];
          for (int p = 0; p < 16; ++p) {
            int32_t pr;
            std::memcpy(&pr, u + 32 * g + 2 * p, 4);
            pairs[(gi * 16 + p) * R + r] = pr;
          }
        }
      }
    }
  }
};

// From the rows16 layout (pyllm/repack.h): a 64-byte body chunk holds 4 code bytes of each of
// 16 rows, one row per 32-bit lane, so a few shuffles per chunk give the pair vectors of 16
// rows directly (the scalar GGUF decode above cost ~13 % of a 1.1B prefill). Codes, scales and
// offsets are exactly those of GgufPanel, so both layouts give identical results.
template <QType T>
struct R16Panel {
  static constexpr bool kOffset = IntFmt<T>::kOffset;
  static constexpr int kSubs = IntFmt<T>::kSubs;
  static void pack(const MatArgs& a, int64_t o0, int nr, int64_t k0, int64_t kc, int32_t* pairs,
                   float* scales, float* offsets) {
    using F = IntFmt<T>;
    static const PairCtl ctl;
    const int64_t nb = a.k / F::B, gbb = repack_group_block_bytes(T);
    const int ngroups = static_cast<int>(kc / 32);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int half = 0; half < 2; ++half) {
      if (16 * half >= nr) {  // rows past the matrix (a 16-row tail panel)
        for (int64_t p = 0; p < kc / 2; ++p) {
          _mm512_storeu_si512(pairs + p * R + 16 * half, _mm512_setzero_si512());
        }
        for (int g = 0; g < ngroups; ++g) {
          put16(offsets, g, half, _mm512_setzero_ps());
          for (int h = 0; h < F::kSubs; ++h) put16(scales, g * F::kSubs + h, half, _mm512_setzero_ps());
        }
        continue;
      }
      const uint8_t* grp = a.w + (o0 + 16 * half) / 16 * nb * gbb;
      for (int64_t b = 0; b < kc / F::B; ++b) {
        const uint8_t* p = grp + (k0 / F::B + b) * gbb;
        const int g0 = static_cast<int>(b * (F::B / 32));  // first group of the block
        if constexpr (T == QType::Q4_0 || T == QType::Q4_1) {
          const int hdr = T == QType::Q4_1 ? 64 : 32;
          put16(scales, g0, half, f16x16(p));
          put16(offsets, g0, half, T == QType::Q4_1 ? f16x16(p + 32) : _mm512_setzero_ps());
          const int16_t bias = T == QType::Q4_0 ? 8 : 0;
          for (int c = 0; c < 4; ++c) {
            const __m512i z = _mm512_loadu_si512(p + hdr + 64 * c);
            put_unsigned(ctl, _mm512_and_si512(z, m4), bias, pairs, g0, 2 * c, half);
            put_unsigned(ctl, _mm512_and_si512(_mm512_srli_epi16(z, 4), m4), bias, pairs, g0,
                         8 + 2 * c, half);
          }
        } else if constexpr (T == QType::Q8_0) {
          put16(scales, g0, half, f16x16(p));
          put16(offsets, g0, half, _mm512_setzero_ps());
          for (int c = 0; c < 8; ++c) {
            put_signed(ctl, _mm512_loadu_si512(p + 32 + 64 * c), pairs, g0, 2 * c, half);
          }
        } else if constexpr (T == QType::Q4_K || T == QType::Q5_K) {
          const __m512 d = f16x16(p), dmin = f16x16(p + 32);
          for (int j = 0; j < 8; ++j) {
            put16(scales, g0 + j, half, _mm512_mul_ps(d, u8x16(p + 64 + 16 * j)));
            // -(dmin * mn), as the GGUF decoder's -dmin * mn (negation is exact)
            put16(offsets, g0 + j, half,
                  _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, u8x16(p + 192 + 16 * j))));
          }
          // Q5_K: the 8 qh chunks come first; bit j of qh[l] is the fifth bit of element l of
          // sub-block j, moved to bit 4 of its byte (as matvec_r16.cc's R16Q5_K)
          constexpr bool kQ5 = T == QType::Q5_K;
          const uint8_t* qh = p + 64 + 256;
          const uint8_t* body = qh + (kQ5 ? 512 : 0);
          const __m512i bit4 = _mm512_set1_epi8(0x10);
          for (int c = 0; c < 32; ++c) {  // qs[4c..4c+3]: sub-blocks 2 (c / 8) and 2 (c / 8) + 1
            const __m512i z = _mm512_loadu_si512(body + 64 * c);
            const int j = 2 * (c / 8), pp = 2 * (c % 8);
            __m512i u0 = _mm512_and_si512(z, m4);
            __m512i u1 = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
            if constexpr (kQ5) {
              const __m512i h = _mm512_loadu_si512(qh + 64 * (c % 8));
              const __m512i h0 = j < 4 ? _mm512_slli_epi16(h, 4 - j) : _mm512_srli_epi16(h, j - 4);
              const __m512i h1 = j < 3 ? _mm512_slli_epi16(h, 3 - j) : _mm512_srli_epi16(h, j - 3);
              u0 = _mm512_ternarylogic_epi32(u0, h0, bit4, 0xF8);
              u1 = _mm512_ternarylogic_epi32(u1, h1, bit4, 0xF8);
            }
            put_unsigned(ctl, u0, 0, pairs, g0 + j, pp, half);
            put_unsigned(ctl, u1, 0, pairs, g0 + j + 1, pp, half);
          }
        } else if constexpr (T == QType::IQ4_NL || T == QType::IQ4_XS) {
          // the levels by VPSHUFB, as matvec_r16.cc's R16Iq4
          constexpr bool kXs = T == QType::IQ4_XS;
          const __m512i levels = _mm512_broadcast_i32x4(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Levels)));
          const __m512 d = f16x16(p);
          const uint8_t* body = p + (kXs ? 32 + 128 : 32);
          for (int j = 0; j < F::B / 32; ++j) {
            put16(scales, g0 + j, half, kXs ? _mm512_mul_ps(d, s8x16(p + 32 + 16 * j)) : d);
            put16(offsets, g0 + j, half, _mm512_setzero_ps());
            for (int c = 0; c < 4; ++c) {
              const __m512i z = _mm512_loadu_si512(body + 256 * j + 64 * c);
              put_signed(ctl, _mm512_shuffle_epi8(levels, _mm512_and_si512(z, m4)), pairs,
                         g0 + j, 2 * c, half);
              put_signed(ctl,
                         _mm512_shuffle_epi8(levels,
                                             _mm512_and_si512(_mm512_srli_epi16(z, 4), m4)),
                         pairs, g0 + j, 8 + 2 * c, half);
            }
          }
        } else if constexpr (T == QType::Q6_K) {
          const __m512 d = f16x16(p);
          for (int j = 0; j < 16; ++j) put16(scales, 2 * g0 + j, half, _mm512_mul_ps(d, s8x16(p + 32 + 16 * j)));
          for (int g = 0; g < 8; ++g) put16(offsets, g0 + g, half, _mm512_setzero_ps());
          const uint8_t* body = p + 32 + 256;
          for (int hh = 0; hh < 2; ++hh) {
            for (int c = 0; c < 8; ++c) {
              const uint8_t* ch = body + 64 * (24 * hh + 3 * c);
              const __m512i A = _mm512_loadu_si512(ch), B = _mm512_loadu_si512(ch + 64),
                            H = _mm512_loadu_si512(ch + 128);
              __m512i q[4];  // codes 0..63 of elements 128 hh + 32 m + 4 c ..
              q6k_codes(A, B, H, q);
              for (int m = 0; m < 4; ++m) {
                put_unsigned(ctl, q[m], 32, pairs, g0 + 4 * hh + m, 2 * c, half);
              }
            }
          }
        }
      }
    }
  }
};

}  // namespace

// The types each panel source is built for (every type IntFmt decodes; the rows16 layouts).
template <QType T>
void matmat_vnni(const MatArgs& a, int64_t r0, int64_t r1) {
  matmat16<GgufPanel<T>>(a, r0, r1);
}

template <QType T>
void matmat_vnni_r16(const MatArgs& a, int64_t r0, int64_t r1) {
  matmat16<R16Panel<T>>(a, r0, r1);
}

PYLLM_KERNEL_FOR(matmat_vnni, Q4_0)
PYLLM_KERNEL_FOR(matmat_vnni, Q4_1)
PYLLM_KERNEL_FOR(matmat_vnni, Q5_0)
PYLLM_KERNEL_FOR(matmat_vnni, Q5_1)
PYLLM_KERNEL_FOR(matmat_vnni, Q8_0)
PYLLM_KERNEL_FOR(matmat_vnni, Q3_K)
PYLLM_KERNEL_FOR(matmat_vnni, Q4_K)
PYLLM_KERNEL_FOR(matmat_vnni, Q5_K)
PYLLM_KERNEL_FOR(matmat_vnni, Q6_K)
PYLLM_KERNEL_FOR(matmat_vnni, IQ4_NL)
PYLLM_KERNEL_FOR(matmat_vnni, IQ4_XS)
PYLLM_KERNEL_FOR(matmat_vnni_r16, Q4_0)
PYLLM_KERNEL_FOR(matmat_vnni_r16, Q4_1)
PYLLM_KERNEL_FOR(matmat_vnni_r16, Q8_0)
PYLLM_KERNEL_FOR(matmat_vnni_r16, Q4_K)
PYLLM_KERNEL_FOR(matmat_vnni_r16, Q5_K)
PYLLM_KERNEL_FOR(matmat_vnni_r16, Q6_K)
PYLLM_KERNEL_FOR(matmat_vnni_r16, IQ4_NL)
PYLLM_KERNEL_FOR(matmat_vnni_r16, IQ4_XS)

}  // namespace PYLLM_ISA
}  // namespace pyllm
