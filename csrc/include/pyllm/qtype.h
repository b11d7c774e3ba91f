// GGML tensor type ids and the on-disk block layouts of every weight type pyllm computes with.
//
// Each struct is byte-identical to the block stored in a GGUF file (checked by static_assert),
// so a tensor's data can be reinterpreted in place from the memory map without copying.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pyllm {

// Values are the ggml type ids written in GGUF tensor infos.
enum class QType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
};

using f16_t = uint16_t;   // IEEE half, stored as raw bits
using bf16_t = uint16_t;  // bfloat16, stored as raw bits

constexpr int QK4_0 = 32;
constexpr int QK4_1 = 32;
constexpr int QK5_0 = 32;
constexpr int QK5_1 = 32;
constexpr int QK8_0 = 32;
constexpr int QK8_1 = 32;
constexpr int QK_K = 256;         // super-block size of the k-quants
constexpr int K_SCALE_SIZE = 12;  // packed 6-bit scales/mins of Q4_K and Q5_K

struct BlockQ4_0 {
  f16_t d;              // scale
  uint8_t qs[QK4_0 / 2];  // nibbles: low nibble = element j, high nibble = element j + 16
};
static_assert(sizeof(BlockQ4_0) == 2 + QK4_0 / 2, "Q4_0 block size");

struct BlockQ4_1 {
  f16_t d;  // scale
  f16_t m;  // min
  uint8_t qs[QK4_1 / 2];
};
static_assert(sizeof(BlockQ4_1) == 4 + QK4_1 / 2, "Q4_1 block size");

struct BlockQ5_0 {
  f16_t d;
  uint8_t qh[4];  // fifth bit of each of the 32 quants
  uint8_t qs[QK5_0 / 2];
};
static_assert(sizeof(BlockQ5_0) == 2 + 4 + QK5_0 / 2, "Q5_0 block size");

struct BlockQ5_1 {
  f16_t d;
  f16_t m;
  uint8_t qh[4];
  uint8_t qs[QK5_1 / 2];
};
static_assert(sizeof(BlockQ5_1) == 4 + 4 + QK5_1 / 2, "Q5_1 block size");

struct BlockQ8_0 {
  f16_t d;
  int8_t qs[QK8_0];
};
static_assert(sizeof(BlockQ8_0) == 2 + QK8_0, "Q8_0 block size");

// Activation type for Q4_1/Q5_1 dots: s = d * sum(qs) lets the min term be applied once.
struct BlockQ8_1 {
  f16_t d;
  f16_t s;
  int8_t qs[QK8_1];
};
static_assert(sizeof(BlockQ8_1) == 4 + QK8_1, "Q8_1 block size");

struct BlockQ2_K {
  uint8_t scales[QK_K / 16];  // 4-bit scale (low) and 4-bit min (high) per 16 weights
  uint8_t qs[QK_K / 4];       // 2-bit quants
  f16_t d;                    // super-block scale for the scales
  f16_t dmin;                 // super-block scale for the mins
};
static_assert(sizeof(BlockQ2_K) == 2 * 2 + QK_K / 16 + QK_K / 4, "Q2_K block size");

struct BlockQ3_K {
  uint8_t hmask[QK_K / 8];  // high bit of each quant
  uint8_t qs[QK_K / 4];     // low 2 bits
  uint8_t scales[12];       // 16 scales of 6 bits
  f16_t d;
};
static_assert(sizeof(BlockQ3_K) == 2 + QK_K / 4 + QK_K / 8 + 12, "Q3_K block size");

struct BlockQ4_K {
  f16_t d;
  f16_t dmin;
  uint8_t scales[K_SCALE_SIZE];  // 8 scales + 8 mins, 6 bits each
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(BlockQ4_K) == 2 * 2 + K_SCALE_SIZE + QK_K / 2, "Q4_K block size");

struct BlockQ5_K {
  f16_t d;
  f16_t dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qh[QK_K / 8];
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(BlockQ5_K) == 2 * 2 + K_SCALE_SIZE + QK_K / 2 + QK_K / 8, "Q5_K block size");

struct BlockQ6_K {
  uint8_t ql[QK_K / 2];      // low 4 bits
  uint8_t qh[QK_K / 4];      // high 2 bits
  int8_t scales[QK_K / 16];  // 8-bit scales
  f16_t d;
};
static_assert(sizeof(BlockQ6_K) == 2 + QK_K / 16 + 3 * QK_K / 4, "Q6_K block size");

// Activation type for all k-quant dots.
struct BlockQ8_K {
  float d;
  int8_t qs[QK_K];
  int16_t bsums[QK_K / 16];  // sums of each group of 16 quants
};
static_assert(sizeof(BlockQ8_K) == 4 + QK_K + QK_K / 16 * 2, "Q8_K block size");

// ---- i-quants (csrc/quant/iquants.cc) ------------------------------------------------------

// IQ4_NL / IQ4_XS: a 4-bit index into this non-linear table of int8 levels per element.
constexpr int8_t kIq4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                   1,    13,   25,  38,  53,  69,  89,  113};
constexpr int QK4_NL = 32;

// x = d * level[q]; qs[j] holds elements j (low nibble) and j + 16 (high nibble).
struct BlockIQ4_NL {
  f16_t d;
  uint8_t qs[QK4_NL / 2];
};
static_assert(sizeof(BlockIQ4_NL) == 2 + QK4_NL / 2, "IQ4_NL block size");

// x = d * (ls_j - 32) * level[q] for sub-block j of 32, ls_j a 6-bit scale: its low 4 bits in
// scales_l (two per byte, sub-block 2 i in the low nibble), its high 2 in scales_h (bits 2 j);
// qs as IQ4_NL's per sub-block of 32.
struct BlockIQ4_XS {
  f16_t d;
  uint16_t scales_h;
  uint8_t scales_l[QK_K / 64];
  uint8_t qs[QK_K / 2];
};
static_assert(sizeof(BlockIQ4_XS) == 2 + 2 + QK_K / 64 + QK_K / 2, "IQ4_XS block size");

// ---- grid i-quants (csrc/quant/iquants_grid.cc, tables in csrc/quant/iquant_grids.h) --------
// Each code picks a whole row of 8 (or 4) magnitudes from a fixed grid; 8 sign bits per row of
// 8 give the signs. A "7-bit sign index" is looked up in kIqKsigns, which adds an eighth bit so
// that the number of minus signs is even. Super-blocks of QK_K = 256 elements throughout.

// Per group of 32 (8 of them), two 32-bit words at qs + 4 ib (little-endian): the first holds
// 4 grid indices (byte l: elements 8 l .. 8 l + 7, 256-row grid), the second 4 7-bit sign
// indices (bits 7 l ..) and a 4-bit scale s in its top bits; x = d * (0.5 + s) * 0.25 * g * sign.
struct BlockIQ2_XXS {
  f16_t d;
  uint16_t qs[QK_K / 8];
};
static_assert(sizeof(BlockIQ2_XXS) == 2 + QK_K / 4, "IQ2_XXS block size");

// qs[k] covers elements 8 k .. 8 k + 7: a 9-bit grid index (512 rows) and a 7-bit sign index
// above it. A 4-bit scale per 16 elements (scales[k / 4], low nibble first):
// x = d * (0.5 + s) * 0.25 * g * sign.
struct BlockIQ2_XS {
  f16_t d;
  uint16_t qs[QK_K / 8];
  uint8_t scales[QK_K / 32];
};
static_assert(sizeof(BlockIQ2_XS) == 2 + QK_K / 4 + QK_K / 32, "IQ2_XS block size");

// qs[0..31]: low 8 bits of the grid index of elements 8 k .. 8 k + 7 (1024 rows), the top 2 bits
// in qh[k / 4] (bits 2 (k % 4)); qs[32 + k]: their 8 sign bits (no parity table); scales as
// IQ2_XS's: x = d * (0.5 + s) * 0.25 * g * sign.
struct BlockIQ2_S {
  f16_t d;
  uint8_t qs[QK_K / 4];
  uint8_t qh[QK_K / 32];
  uint8_t scales[QK_K / 32];
};
static_assert(sizeof(BlockIQ2_S) == 2 + QK_K / 4 + QK_K / 16, "IQ2_S block size");

// qs[0..63]: one grid index (256 rows of 4) per 4 elements; then 8 32-bit words, one per group
// of 32, holding 4 7-bit sign indices (one per 8 elements) and a 4-bit scale in the top bits:
// x = d * (0.5 + s) * 0.5 * g * sign.
struct BlockIQ3_XXS {
  f16_t d;
  uint8_t qs[3 * QK_K / 8];
};
static_assert(sizeof(BlockIQ3_XXS) == 2 + 3 * QK_K / 8, "IQ3_XXS block size");

// qs[k]: low 8 bits of the grid index of elements 4 k .. 4 k + 3 (512 rows), the ninth bit in
// qh[k / 8] (bit k % 8); signs: one bit per element; a 4-bit scale s per group of 32 (low nibble
// first): x = d * (1 + 2 s) * g * sign.
struct BlockIQ3_S {
  f16_t d;
  uint8_t qs[QK_K / 4];
  uint8_t qh[QK_K / 32];
  uint8_t signs[QK_K / 8];
  uint8_t scales[QK_K / 64];
};
static_assert(sizeof(BlockIQ3_S) == 2 + QK_K / 4 + QK_K / 32 + QK_K / 8 + QK_K / 64,
              "IQ3_S block size");

// Grid rows of {-1, 0, 1} (2048 of them). qs[k]: low 8 bits of the index of elements
// 8 k .. 8 k + 7; qh[ib] per group of 32: the 4 high 3-bit parts (bits 3 l), a 3-bit scale s
// (bits 12-14) and the sign of the shift (bit 15): x = d * (2 s + 1) * (g +- 0.125).
struct BlockIQ1_S {
  f16_t d;
  uint8_t qs[QK_K / 8];
  uint16_t qh[QK_K / 32];
};
static_assert(sizeof(BlockIQ1_S) == 2 + QK_K / 8 + QK_K / 16, "IQ1_S block size");

// IQ1_S's grid with a 3-bit scale per 16 elements and a shift sign per 8. qh[k / 2] nibble
// k % 2 holds the high 3 bits of the index of qs[k] and (bit 3) its shift sign. scales: four
// little-endian uint16 words, each with four 3-bit scales (bits 3 i) in its low 12 bits; the
// block's f16 d is spread over their top nibbles (word w gives bits 4 w .. 4 w + 3):
// x = d * (2 s + 1) * (g +- 0.125).
struct BlockIQ1_M {
  uint8_t qs[QK_K / 8];
  uint8_t qh[QK_K / 16];
  uint8_t scales[QK_K / 32];
};
static_assert(sizeof(BlockIQ1_M) == QK_K / 8 + QK_K / 16 + QK_K / 32, "IQ1_M block size");

// ---- ternary types (csrc/quant/iquants_grid.cc): x = d * t, t in {-1, 0, 1} ----------------

// Five base-3 digits per byte as a fixed-point fraction: byte = ceil(v * 256 / 243) for
// v = sum of digit_p * 3^(4 - p); digit p is recovered as ((uint8_t)(byte * 3^p) * 3) >> 8, and
// t = digit - 1. qs[0..31] hold elements 32 p + j (p = 0..4), qs[32..47] elements 160 + 16 p + j,
// qh[0..3] (four digits each) elements 240 + 4 p + j.
struct BlockTQ1_0 {
  uint8_t qs[(QK_K - 4 * QK_K / 64) / 5];
  uint8_t qh[QK_K / 64];
  f16_t d;
};
static_assert(sizeof(BlockTQ1_0) == 48 + 4 + 2, "TQ1_0 block size");

// Four 2-bit codes q (t = q - 1) per byte: byte 32 c + j, bits 2 p, is element 128 c + 32 p + j.
struct BlockTQ2_0 {
  uint8_t qs[QK_K / 4];
  f16_t d;
};
static_assert(sizeof(BlockTQ2_0) == QK_K / 4 + 2, "TQ2_0 block size");

}  // namespace pyllm
