// The per-ISA kernel function table (internal to the CPU backend).
//
// The files under csrc/cpu/isa/ are compiled once per ISA with PYLLM_ISA=<scalar|avx2|avx512|neon>
// (CMakeLists.txt lists which files each ISA gets); each compilation puts its symbols in namespace
// pyllm::<isa>. Each ISA's table is written out in one file, one row per weight type:
//   scalar, neon: csrc/cpu/isa/table_portable.cc
//   avx2:         csrc/cpu/isa/table_avx2.cc
//   avx512:       csrc/cpu/isa/table_avx512.cc
// matmul.cc picks the table of active_isa() and splits rows across threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "cpu/cpu.h"
#include "cpu/matmul.h"
#include "pyllm/qtype.h"

namespace pyllm {

// One matmul problem: Y[t][o] = sum_i W[o][i] * X[t][i] for t < n_tokens, o < n_out.
struct MatArgs {
  const uint8_t* w;   // n_out rows of row_bytes each, the GGUF layout of the weight type
                      // (matvec_r16: the rows16 layout of the whole tensor instead)
  int64_t row_bytes;  // bytes of one weight row (k elements)
  int64_t k;          // elements per row (a multiple of the type's block size)
  const float* x;     // n_tokens rows, row stride ldx floats
  int64_t ldx;
  int64_t n_tokens;
  float* y;  // n_tokens rows, row stride ldy floats
  int64_t ldy;
  // matvec_r16 / matmat_r16 only: when set, [r0, r1) is the whole matrix and threads claim
  // chunks of chunk_rows rows from queue->next[pass] (cpu/matmul.h; see for_row_chunks).
  MatmulQueue* queue = nullptr;
  int64_t chunk_rows = 0;
};

// Calls body(b, e) for the rows a kernel's thread works on: [r0, r1) at once, or, when counter is
// set (then [r0, r1) is the whole matrix), chunks of a.chunk_rows rows claimed one after another
// until every row has been taken.
template <class Body>
inline void for_row_chunks(const MatArgs& a, int64_t r0, int64_t r1,
                           std::atomic<int64_t>* counter, Body&& body) {
  if (counter == nullptr) {
    if (r0 < r1) body(r0, r1);
    return;
  }
  const int64_t chunk = a.chunk_rows > 0 ? a.chunk_rows : r1 - r0;
  for (int64_t b; (b = counter->fetch_add(chunk, std::memory_order_relaxed)) < r1;) {
    body(b, std::min(b + chunk, r1));
  }
}

// Computes the output columns o in [r0, r1) for all tokens. Kernels for the same problem may run
// concurrently on disjoint row ranges; they keep their scratch on the stack or thread_local.
using RowsFn = void (*)(const MatArgs& a, int64_t r0, int64_t r1);

// Table size, indexed by the ggml type id (QType): above every weight type's id (TQ2_0 = 35).
constexpr int kMaxTypeId = 40;

struct KernelTable {
  Isa isa;
  // Decode-shaped kernel (few tokens): streams each weight once, dequantizes in registers.
  RowsFn matvec[kMaxTypeId];
  // Prefill-shaped kernel (many tokens): dequantizes a panel of rows once and reuses it
  // for every token. Best with row ranges that are multiples of matmat_rows.
  RowsFn matmat[kMaxTypeId];
  int matmat_rows;
  // Decode-shaped kernels over the rows16 layout (pyllm/repack.h), row ranges in multiples of
  // 16; null where the ISA has none (matmul then unpacks groups for the kernels above).
  RowsFn matvec_r16[kMaxTypeId];
  // Prefill-shaped kernels over the rows16 layout (row ranges in multiples of 16); null where
  // the ISA has none (matmul then unpacks groups to GGUF rows for matmat).
  RowsFn matmat_r16[kMaxTypeId];
  // From this many tokens on, matmat beats matvec (measured per ISA on Zen4; the crossover is
  // where decoding a panel once stops costing more than decoding each block per 4 tokens).
  int matmat_min_tokens;
};

// One row of an ISA's table: the kernels that ISA runs for one weight type (nullptr: none).
struct TypeKernels {
  QType type;
  RowsFn matvec;
  RowsFn matmat;
  RowsFn matvec_r16;
  RowsFn matmat_r16;
};

// The lookup table (indexed by type id, for matmul's dispatch) holding the given rows.
template <size_t N>
KernelTable make_kernel_table(Isa isa, int matmat_rows, int matmat_min_tokens,
                              const TypeKernels (&rows)[N]) {
  KernelTable t{};
  t.isa = isa;
  t.matmat_rows = matmat_rows;
  t.matmat_min_tokens = matmat_min_tokens;
  for (const TypeKernels& r : rows) {
    const int id = static_cast<int>(r.type);
    if (id < 0 || id >= kMaxTypeId) std::abort();  // a row beyond the table: raise kMaxTypeId
    t.matvec[id] = r.matvec;
    t.matmat[id] = r.matmat;
    t.matvec_r16[id] = r.matvec_r16;
    t.matmat_r16[id] = r.matmat_r16;
  }
  return t;
}

namespace scalar { const KernelTable& kernel_table(); }
#ifdef PYLLM_HAVE_ISA_AVX2
namespace avx2 { const KernelTable& kernel_table(); }
#endif
#ifdef PYLLM_HAVE_ISA_AVX512
namespace avx512 { const KernelTable& kernel_table(); }
#endif
#ifdef PYLLM_HAVE_ISA_NEON
namespace neon { const KernelTable& kernel_table(); }
#endif

}  // namespace pyllm
