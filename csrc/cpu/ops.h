// Element-wise and attention operators of the forward pass, with one implementation per ISA.
//
// These are the non-matmul parts of a transformer layer (norms, RoPE, softmax attention over the
// KV cache, SwiGLU). csrc/cpu/isa/ops.cc is compiled once per ISA; ops() returns the table of the
// active ISA (PYLLM_FORCE_ISA applies), so the same code runs vectorized for AVX2 / AVX-512 / NEON.
#pragma once

#include <cstdint>

#include "cpu/cpu.h"
#include "pyllm/qtype.h"

namespace pyllm {

// One attention problem: query rows of one KV head, laid out as a grid of n_tok tokens x
// n_heads query heads that share the KV head (the heads of one GQA group are head_dim floats
// apart in a token's q row). The kernel handles the n_q rows starting at linear index first_row
// (row l = token l / n_heads, head l % n_heads), so threads can split one grid anywhere.
struct AttentionArgs {
  const float* q;        // head 0 of token 0 of the grid
  int64_t q_stride;      // floats between consecutive tokens' query rows
  const uint8_t* k;      // this KV head's slice of cache row 0 (F16 halves or Q8_0 blocks)
  const uint8_t* v;      // same layout as k
  int64_t kv_row_bytes;  // bytes between consecutive positions
  QType kv_type;         // F16, F32 or Q8_0 (head_dim a multiple of 32) cache rows
  float* out;            // laid out like q, with out_stride floats between tokens
  int64_t out_stride;
  int n_heads;           // query heads per token in the grid (>= 1)
  int first_row;         // first linear row index to compute
  int n_q;               // rows to compute
  int head_dim;
  // Causal limit per token of the grid: its rows see positions [0, n_visible[token]).
  const int* n_visible;
  float scale;           // usually 1/sqrt(head_dim)
  float* scratch;        // >= attention_scratch_floats(max(n_visible), head_dim) floats
};

// Query rows the attention kernel handles together: each K/V row is loaded (converted from
// f16 / Q8_0) once per block of rows, e.g. once for all query heads of a GQA group in decode,
// or for several heads and tokens of a prompt.
constexpr int kAttentionRows = 8;
// Keys the AVX-512 kernel converts and scores together (a tile of K or V rows).
constexpr int kAttentionKeys = 16;
constexpr int64_t attention_scratch_floats(int64_t n_ctx, int64_t head_dim) {
  // scores [rows][n_ctx rounded up to a tile], accumulators [rows][head_dim], one K/V tile
  return kAttentionRows * (n_ctx + kAttentionKeys + head_dim) + kAttentionKeys * head_dim;
}

struct OpsTable {
  // y = x / rms(x) * w   (n floats; w may be null for no weight)
  void (*rms_norm)(const float* x, const float* w, float* y, int64_t n, float eps);
  // x[i] = silu(gate[i]) * up[i], written to out
  void (*swiglu)(const float* gate, const float* up, float* out, int64_t n);
  // y += x
  void (*add)(float* y, const float* x, int64_t n);
  // Rotate n_heads heads of head_dim floats (stride head_dim) in place by (cos, sin) pairs of
  // n_rot/2 angles. neox: pairs (i, i + n_rot/2); else adjacent pairs (2i, 2i+1).
  void (*rope)(float* x, int n_heads, int head_dim, int n_rot, const float* cos_sin, bool neox);
  // Causal softmax attention for one KV head (see AttentionArgs).
  void (*attention)(const AttentionArgs& a);
  // f32 -> f16 row (round to nearest even) for writing the KV cache
  void (*f32_to_f16)(const float* x, f16_t* y, int64_t n);
  // LoRA's B product for one token: y[o] += sum_j u[j] * B[o][j] for n_rows rows of a B stored
  // in blocks of 16 rows, each block `rank` columns of 16 row values (F16 or F32). A small rank
  // makes row dot products all horizontal sums; across 16 rows it is rank broadcast-FMAs.
  void (*lowrank_add)(const void* b16, bool f16, int rank, const float* u, float* y,
                      int64_t n_rows);
};

// The table for the active ISA.
const OpsTable& ops();
// The table for a specific ISA (must be available); for tests.
const OpsTable& ops_for(Isa isa);

}  // namespace pyllm
