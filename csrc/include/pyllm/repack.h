// Row-interleaved ("rows16") weight layout: what the model copies its big weight matrices into
// at load so that decode kernels read each weight byte once with almost no shuffling.
//
// Why: in the GGUF layout a row is a run of blocks, so a matvec kernel works on one row at a
// time and spends most of its instructions moving nibbles and scales into place and reducing
// per-row sums (measured: the int16-split VNNI Q4_0 kernel ran ~15 GB/s per core from L2, below
// the DRAM wall). Interleaving 16 rows puts one row in each 32-bit lane of an AVX-512 register:
// a VPDPBUSD then multiplies 4 weights of 16 rows with the same 4 (broadcast) activations, the
// 16 row sums never need a horizontal reduction, and the per-block scales of the 16 rows are one
// contiguous vector. Bytes and weights are unchanged (no rounding); only their order is.
//
// Layout of a tensor of n_rows (a multiple of 16) x k: groups of 16 rows, one after another;
// a group is its k / block_size "group blocks" in order; a group block holds, for block b of
// each of the 16 rows r:
//   header  per-row fields, field by field, row-minor (all 16 rows of field 1, then field 2):
//           Q4_0, Q8_0: d (f16)                                          32 bytes
//           Q4_1:       d, m (f16)                                       64 bytes
//           Q4_K, Q5_K: d, dmin (f16), then the 8 six-bit scales and the
//                       8 six-bit mins unpacked to one byte each,
//                       sub-block-major ([j][r])                         64 + 256 bytes
//           Q6_K:       d (f16), then the 16 int8 scales [j][r]          32 + 256 bytes
//           IQ4_NL:     d (f16)                                          32 bytes
//           IQ4_XS:     d (f16), then the 8 six-bit sub-block scales
//                       minus 32 as int8, [j][r]                         32 + 128 bytes
//   body    the block's quant bytes in 4-byte chunks: chunk c of row r at byte 64 * c + 4 * r
//           of the body. Chunks are in block order (Q5_K: its 8 qh chunks, then its 32 qs
//           ones, as the block stores them), except Q6_K: for each half h < 2 and
//           c < 8 the chunks ql[64 h + 4 c], ql[64 h + 32 + 4 c], qh[32 h + 4 c] (the order
//           its kernel consumes them).
// Q4_0, Q4_1, Q8_0, Q6_K and IQ4_NL keep their size exactly; Q4_K grows by 2.8 %, Q5_K by
// 2.3 % and IQ4_XS by 1.5 % (unpacked scales, which would otherwise cost ~10 scalar
// instructions per row and super-block in the kernel).
#pragma once

#include <cstdint>

#include "pyllm/qtype.h"

namespace pyllm {

enum class WeightLayout : uint8_t {
  Gguf = 0,    // rows as GGUF stores them
  Rows16 = 1,  // the interleaved layout above
};

constexpr int kRepackRows = 16;
// Part of every repack plan's hash (pyllm/model.h RepackImage): bump it whenever the bytes
// repack_rows16 writes change, so that saved images of the old layout are not used.
constexpr uint32_t kRepackLayoutVersion = 1;

// Types with a rows16 layout.
bool repack_supported(QType type);
// Bytes of one group block (16 rows x one block) of a supported type.
int64_t repack_group_block_bytes(QType type);
// Bytes of n_rows x k in the rows16 layout; throws std::invalid_argument when the type has no
// rows16 layout, n_rows is not a multiple of 16, or k is not a multiple of the block size.
int64_t repacked_size(QType type, int64_t n_rows, int64_t k);

// GGUF rows -> rows16 for rows [g0 * 16, g1 * 16) (so threads can share a tensor by groups).
// src and dst point at the whole tensors.
void repack_rows16(QType type, const void* src, int64_t k, int64_t g0, int64_t g1, void* dst);
// One rows16 group (group index g of the tensor at src) -> its 16 GGUF rows in dst
// (16 * row_size bytes). Exact inverse of repack_rows16.
void unpack_rows16_group(QType type, const void* src, int64_t k, int64_t g, void* dst);

}  // namespace pyllm
