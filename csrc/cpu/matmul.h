// Quantized matrix x matrix / matrix x vector products: the one compute entry point the forward
// pass uses for every weight multiplication.
//
//   Y[t][o] = sum_i W[o][i] * X[t][i]      t < n_tokens, o < n_out, i < k
//
// Layouts
//   W  n_out rows in the GGUF layout of `wtype` (row o starts at o * row_size(wtype, k) bytes);
//      exactly what a GGUF tensor with dims (k, n_out) holds, so a memory-mapped tensor is used
//      in place. Weight types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K; k must
//      be a multiple of the type's block size (32 or 256; any k for the float types).
//   X  n_tokens rows of k floats, row-major, row stride ldx (>= k).
//   Y  n_tokens rows of n_out floats, row-major, row stride ldy (>= n_out); overwritten. Y must
//      not overlap X or W.
//
// Accuracy (no kernel rounds activations to 8 bits, unlike ggml's Q8_0/Q8_K dot products,
// which alone add ~0.003 KL to a forward pass)
//   * F32-math kernels (every type and ISA except below): weights are dequantized exactly as the
//     reference dequantizer does, activations are used unrounded, products are accumulated in F32
//     with FMA: |err| <= ~1e-5 * sum_i |W[o][i] X[t][i]| (measured worst ~1e-6 at k = 512).
//   * AVX-512 VNNI kernels (csrc/cpu/isa/matvec_vnni.cc: matvec of every block type;
//     matmat_vnni.cc: matmat of every block type except Q2_K) and the AVX2 int
//     kernels (matvec_avx2.cc: matvec of every block type except Q8_0): each
//     activation block of 32 is rounded to int16 steps (dx = amax / 32767, 256x finer than int8;
//     matvec splits them exactly into two int8 terms for VPDPBUSD / VPMADDUBSW, matmat uses
//     VPDPWSSD); weights are not rounded; the integer dot products are exact.
//     Extra error <= sum_blocks (dx_b / 2) * sum_{i in b} |W[o][i]|, i.e. ~2^-16 relative to the
//     block maximum; its KL contribution is ~65000x below ggml's int8 rounding.
//   * Rows16 weights (pyllm/repack.h) on AVX-512 VNNI: the matvec kernels of matvec_r16.cc
//     (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) round activations exactly like the int16-split
//     kernels above, so the same bound holds; they differ from the GGUF-layout kernels only in
//     F32 summation order.
//   tests/test_kernels.py checks every type x ISA x token count against a float64 numpy product
//   of the gguf package's dequantized weights at exactly these bounds.
//   Trade measured on the dev box (Zen4, 1 core, CPU time): F32-math matvec ~6.6 GB/s on Q4_0
//   (L2-resident 256 x 2048) vs ~12.6 GB/s with the int16-split VNNI kernel, Q4_K 6.4 -> 14.4;
//   matmat 5632 x 2048 x 512 tokens Q4_0 ~70 GOP/s F32 panel vs ~125 GOP/s int16 VNNI panel.
//   PYLLM_FORCE_ISA=scalar gives the F32-math kernels everywhere.

// Kernel choice and threads
//   n_tokens < matmat_min_tokens() (16; 32 with the AVX-512 VNNI kernels): the matvec kernel
//   (memory-bound: one pass over W, blocks decoded in registers, up to 4 tokens per pass).
//   Otherwise the matmat kernel (compute-bound: a panel of 32 rows is decoded once, into F32 or
//   int16, and reused for every token). The kernels of active_isa() (cpu.h; PYLLM_FORCE_ISA)
//   are used. Rows are split into contiguous ranges, one per thread of the pool, except for
//   rows16 weights with a MatmulQueue (matmul() always makes one), where threads claim chunks
//   of rows as they go (see MatmulQueue). The kernels keep their scratch (panels,
//   prepared activations) thread_local: no allocation per call once warm, no shared state
//   beyond a queue's counters, so concurrent matmuls on different pools are safe. The VNNI kernels
//   prepare the activations on every thread (k * n_tokens elements, small next to the
//   n_out * k * n_tokens work), which is what lets matmul_part run without a barrier.
//
// Errors: std::invalid_argument for unsupported types, k not a multiple of the block size,
// negative or absurd sizes, strides smaller than the row length, null or misaligned float
// buffers. Nothing else throws except std::bad_alloc.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/threadpool.h"
#include "pyllm/qtype.h"
#include "pyllm/repack.h"

namespace pyllm {

// From this many tokens on, the active ISA's matmat kernel is used (see above).
int64_t matmat_min_tokens();

// Tokens a matvec kernel dots with each decoded block in one pass over the weights: a batch of
// up to this many costs about one pass (speculative decoding sizes its drafts by it).
constexpr int kMatvecTokens = 4;

// Work sharing for the kernels on rows16 weights (decode and prefill): threads that hold the same
// queue claim chunks of rows one after another instead of each taking a fixed share, so a
// thread slowed down by whatever else runs on its core does not hold up the product (a fixed
// split waits for the slowest thread; llama.cpp shares work the same way). Rows are computed
// independently, so the results do not depend on who computed them. One fresh queue per product
// and call; matmul() makes its own. Measured (2 threads, interleaved, this VM): 1.1B Q4_K_M
// decode 28.6-39.9 -> 31.4-42.2 t/s, 7B Q4_K_M 4.6-6.6 -> 5.4-6.7 t/s; 1.1B Q4_K_M pp512
// 105-138 -> 124-143 t/s.
struct MatmulQueue {
  static constexpr int kPasses = 8;  // token passes it can hand out (2 or 4 tokens per pass)
  std::atomic<int64_t> next[kPasses];
  MatmulQueue() {
    for (auto& n : next) n.store(0, std::memory_order_relaxed);
  }
};

struct MatmulParams {
  QType wtype;
  const void* w;     // n_out rows, GGUF layout
  int64_t n_out;
  int64_t k;
  const float* x;    // n_tokens x k, row stride ldx
  int64_t ldx;       // 0 means k
  int64_t n_tokens;
  float* y;          // n_tokens x n_out, row stride ldy
  int64_t ldy;       // 0 means n_out
  // Rows16: w holds the whole tensor in the interleaved layout of pyllm/repack.h (types with
  // repack_supported(), n_out a multiple of 16). Same results within the same bounds; decode is
  // faster where the ISA has rows16 kernels (AVX-512 VNNI), other paths unpack 16 rows at a time.
  WeightLayout layout = WeightLayout::Gguf;
  // Optional (see MatmulQueue): shared by every thread that runs this product's matmul_part.
  MatmulQueue* queue = nullptr;
};

// The whole product on `pool` (the calling thread takes part). Called from inside a job of the
// same pool it runs single-threaded on the caller; use matmul_part there instead.
void matmul(QType wtype, const void* w, int64_t n_out, int64_t k, const float* x, int64_t n_tokens,
            float* y, ThreadPool& pool);
void matmul(const MatmulParams& p, ThreadPool& pool);

// Inside an already-running parallel region (e.g. one pool.run() for a whole forward pass):
// thread ith of nth computes its share of the rows of Y and returns WITHOUT a barrier. All nth
// threads must call it with the same parameters; call pool.barrier() before anyone reads Y.
// p must pass check_matmul (checked once by the caller, e.g. at model load) and W must be
// 2-byte aligned (4 for F32), as GGUF tensor data always is; matmul() also accepts odd
// addresses (it copies such weights once).
void matmul_part(const MatmulParams& p, int ith, int nth);

// Throws std::invalid_argument when p is not a valid problem (see above); matmul() calls it.
void check_matmul(const MatmulParams& p);

// The weight types matmul supports.
bool matmul_supports(QType wtype);

// Whether the active ISA has rows16 decode kernels for wtype (repacking pays off).
bool matmul_has_rows16_kernel(QType wtype);

// Bytes of one weight row of k elements; throws std::invalid_argument like check_matmul.
int64_t matmul_row_bytes(QType wtype, int64_t k);

// Which kernels the table of a compiled ISA has for one weight type (the tables themselves are
// csrc/cpu/isa/table_<isa>.cc). For tests: every weight type needs matvec and matmat everywhere.
struct MatmulKernels {
  QType type;
  bool matvec, matmat, matvec_r16, matmat_r16;
};
// The types with at least one kernel in isa's table, by type id; throws std::invalid_argument if
// isa is not compiled into this build.
std::vector<MatmulKernels> matmul_kernels(Isa isa);

}  // namespace pyllm
