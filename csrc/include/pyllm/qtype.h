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
  IQ4_NL = 20,
  IQ4_XS = 23,
  BF16 = 30,
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

}  // namespace pyllm
