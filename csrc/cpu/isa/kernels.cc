// The portable matmul kernels, compiled for every ISA (see simd.h): F32 math on any weight type.
// Which of them an ISA's table actually uses is written in its table file (table_<isa>.cc);
// where an ISA has faster kernels (int16-rounded activations, see matmul.h) its table names
// those instead.
//
// Accuracy design: activations stay F32 on every path in this file. Weights are dequantized (in
// registers or into a small panel) exactly as the reference dequantizer does, and products are
// accumulated in F32 with FMA, so results differ from a float64 product of the dequantized
// weights only by F32 rounding of the sums (~1e-6 relative in practice). ggml instead rounds the
// activations to 8 bits (Q8_0/Q8_K), which adds ~0.003 KL to a forward pass.
//
//  * matvec (decode, few tokens): one pass over the weight rows, each block decoded into a stack
//    buffer and dotted with up to 4 tokens at once. The x86 tables use the int16-split kernels
//    of matvec_avx2.cc / matvec_vnni.cc for the block types instead (1.5-10x faster).
//  * matmat (prefill, many tokens): decode a panel of R = 2*VN rows x KC columns into F32,
//    transposed so that one vector holds R rows of one column; a register-tiled micro-kernel then
//    broadcasts activations and accumulates MT tokens x R rows. Every weight is decoded once per
//    panel and reused by every token; the cost is F32 FMA throughput (16 multiply-adds per
//    AVX-512 instruction). The int16 VNNI panel kernel does 32 per instruction and measured ~1.7x
//    faster on Zen4 (Q4_0, 512 tokens), at the int16 activation rounding documented in matmul.h.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/isa/decode.h"
#include "cpu/isa/kernels.h"
#include "cpu/isa/simd.h"
#include "cpu/kernel_table.h"

// GCC 12 reports its own AVX-512 intrinsic headers (`__Y` may be used uninitialized) when they
// are inlined into templates; the warning is a known false positive, so it is silenced here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {
constexpr int kTokGroup = kMatvecTokens;  // tokens a matvec pass dots with each decoded block
}  // namespace

// ---------------------------------------------------------------------------------------------
// Block-type matvec: decode one block into a buffer, dot it with each token's activation slice.

template <QType T>
void matvec_blocks(const MatArgs& a, int64_t r0, int64_t r1) {
  using F = Fmt<T>;
  using Block = typename F::Block;
  constexpr int B = F::B;
  static_assert(B % VN == 0, "block must hold whole vectors");
  const int64_t nb = a.k / B;
  alignas(64) float buf[B];
  for (int64_t t0 = 0; t0 < a.n_tokens; t0 += kTokGroup) {
    const int nt = static_cast<int>(std::min<int64_t>(kTokGroup, a.n_tokens - t0));
    for (int64_t r = r0; r < r1; ++r) {
      const Block* row = reinterpret_cast<const Block*>(a.w + r * a.row_bytes);
      vf acc[kTokGroup] = {vzero(), vzero(), vzero(), vzero()};
      for (int64_t b = 0; b < nb; ++b) {
        F::decode(row + b, buf);
        for (int t = 0; t < nt; ++t) {
          const float* x = a.x + (t0 + t) * a.ldx + b * B;
          for (int i = 0; i < B; i += VN) acc[t] = vfma(vload(buf + i), vload(x + i), acc[t]);
        }
      }
      for (int t = 0; t < nt; ++t) a.y[(t0 + t) * a.ldy + r] = vsum(acc[t]);
    }
  }
}

// Float weight types: vector loads straight from the row, scalar tail for k % VN.
namespace {

template <QType T>
float load_one(const void* row, int64_t i) {
  if constexpr (T == QType::F32) return static_cast<const float*>(row)[i];
  if constexpr (T == QType::F16) return f16_to_f32(static_cast<const f16_t*>(row)[i]);
  return bf16_to_f32(static_cast<const bf16_t*>(row)[i]);
}

template <QType T>
vf load_vec(const void* row, int64_t i) {
  if constexpr (T == QType::F32) return vload(static_cast<const float*>(row) + i);
  if constexpr (T == QType::F16) return vload_f16(static_cast<const f16_t*>(row) + i);
  return vload_bf16(static_cast<const bf16_t*>(row) + i);
}

}  // namespace

template <QType T>
void matvec_float(const MatArgs& a, int64_t r0, int64_t r1) {
  const int64_t kv = a.k / VN * VN;
  for (int64_t t0 = 0; t0 < a.n_tokens; t0 += kTokGroup) {
    const int nt = static_cast<int>(std::min<int64_t>(kTokGroup, a.n_tokens - t0));
    for (int64_t r = r0; r < r1; ++r) {
      const void* row = a.w + r * a.row_bytes;
      vf acc[kTokGroup] = {vzero(), vzero(), vzero(), vzero()};
      for (int64_t i = 0; i < kv; i += VN) {
        const vf w = load_vec<T>(row, i);
        for (int t = 0; t < nt; ++t) acc[t] = vfma(w, vload(a.x + (t0 + t) * a.ldx + i), acc[t]);
      }
      for (int t = 0; t < nt; ++t) {
        float s = vsum(acc[t]);
        const float* x = a.x + (t0 + t) * a.ldx;
        for (int64_t i = kv; i < a.k; ++i) s += load_one<T>(row, i) * x[i];
        a.y[(t0 + t) * a.ldy + r] = s;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// matmat: F32 panel + register-tiled micro-kernel.

namespace {

constexpr int R = kMatmatF32Rows;  // rows per panel (two vectors)
constexpr int KC = 512;    // panel depth: 512 x R floats = 32 KiB on AVX-512, L1/L2 resident
#if defined(PYLLM_ISA_AVX512)
constexpr int MT = 12;  // tokens per micro-tile: 24 accumulators + 2 weights of 32 registers
#elif defined(PYLLM_ISA_AVX2)
constexpr int MT = 6;  // 12 accumulators + 2 weights + 1 broadcast of 16 registers
#elif defined(PYLLM_ISA_NEON)
constexpr int MT = 8;
#else
constexpr int MT = 4;
#endif

// Decodes elements [k0, k0 + kc) of one weight row into out (k0, kc multiples of the block).
template <QType T>
void decode_run(const uint8_t* row, int64_t k0, int64_t kc, float* out) {
  using F = Fmt<T>;
  using Block = typename F::Block;
  const Block* blk = reinterpret_cast<const Block*>(row) + k0 / F::B;
  for (int64_t b = 0; b < kc / F::B; ++b) F::decode(blk + b, out + b * F::B);
}

template <int NT>
void micro(const float* P, int64_t kc, const float* x, int64_t ldx, float* y, int64_t ldy,
           int nr, bool accumulate) {
  vf c0[NT], c1[NT];
  for (int t = 0; t < NT; ++t) c0[t] = vzero(), c1[t] = vzero();
  for (int64_t kk = 0; kk < kc; ++kk) {
    const vf w0 = vload(P + kk * R), w1 = vload(P + kk * R + VN);
    for (int t = 0; t < NT; ++t) {
      const vf xb = vset1(x[t * ldx + kk]);
      c0[t] = vfma(w0, xb, c0[t]);
      c1[t] = vfma(w1, xb, c1[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    float* yt = y + t * ldy;
    if (nr == R) {
      if (accumulate) {
        vstore(yt, vadd(vload(yt), c0[t]));
        vstore(yt + VN, vadd(vload(yt + VN), c1[t]));
      } else {
        vstore(yt, c0[t]);
        vstore(yt + VN, c1[t]);
      }
    } else {
      alignas(64) float tmp[R];
      vstore(tmp, c0[t]);
      vstore(tmp + VN, c1[t]);
      for (int r = 0; r < nr; ++r) yt[r] = accumulate ? yt[r] + tmp[r] : tmp[r];
    }
  }
}

template <int N>
void micro_upto(int nt, const float* P, int64_t kc, const float* x, int64_t ldx, float* y,
                int64_t ldy, int nr, bool acc) {
  if constexpr (N > 0) {
    if (nt == N) return micro<N>(P, kc, x, ldx, y, ldy, nr, acc);
    micro_upto<N - 1>(nt, P, kc, x, ldx, y, ldy, nr, acc);
  }
}

}  // namespace

template <QType T>
void matmat_f32(const MatArgs& a, int64_t r0, int64_t r1) {
  thread_local std::vector<float> panel_store, run_store;
  panel_store.resize(static_cast<size_t>(KC) * R + 16);
  run_store.resize(KC);
  float* P = panel_store.data();
  float* run = run_store.data();
  for (int64_t o0 = r0; o0 < r1; o0 += R) {
    const int nr = static_cast<int>(std::min<int64_t>(R, r1 - o0));
    for (int64_t k0 = 0; k0 < a.k; k0 += KC) {
      const int64_t kc = std::min<int64_t>(KC, a.k - k0);
      for (int r = 0; r < R; ++r) {
        if (r < nr) {
          decode_run<T>(a.w + (o0 + r) * a.row_bytes, k0, kc, run);
          for (int64_t i = 0; i < kc; ++i) P[i * R + r] = run[i];
        } else {
          for (int64_t i = 0; i < kc; ++i) P[i * R + r] = 0.0f;
        }
      }
      for (int64_t t0 = 0; t0 < a.n_tokens; t0 += MT) {
        const int nt = static_cast<int>(std::min<int64_t>(MT, a.n_tokens - t0));
        micro_upto<MT>(nt, P, kc, a.x + t0 * a.ldx + k0, a.ldx, a.y + t0 * a.ldy + o0, a.ldy,
                       nr, k0 > 0);
      }
    }
  }
}

// The types each kernel is built for (the kernels of an ISA's table must exist for its rows).
PYLLM_KERNEL_FOR(matvec_float, F32)
PYLLM_KERNEL_FOR(matvec_float, F16)
PYLLM_KERNEL_FOR(matvec_float, BF16)
#define PYLLM_BLOCK_TYPE(T) PYLLM_KERNEL_FOR(matvec_blocks, T)
PYLLM_BLOCK_TYPE(Q4_0) PYLLM_BLOCK_TYPE(Q4_1) PYLLM_BLOCK_TYPE(Q5_0) PYLLM_BLOCK_TYPE(Q5_1)
PYLLM_BLOCK_TYPE(Q8_0) PYLLM_BLOCK_TYPE(Q2_K) PYLLM_BLOCK_TYPE(Q3_K) PYLLM_BLOCK_TYPE(Q4_K)
PYLLM_BLOCK_TYPE(Q5_K) PYLLM_BLOCK_TYPE(Q6_K) PYLLM_BLOCK_TYPE(IQ4_NL) PYLLM_BLOCK_TYPE(IQ4_XS)
PYLLM_BLOCK_TYPE(IQ2_XXS) PYLLM_BLOCK_TYPE(IQ2_XS) PYLLM_BLOCK_TYPE(IQ2_S)
PYLLM_BLOCK_TYPE(IQ3_XXS) PYLLM_BLOCK_TYPE(IQ3_S) PYLLM_BLOCK_TYPE(IQ1_S) PYLLM_BLOCK_TYPE(IQ1_M)
PYLLM_BLOCK_TYPE(TQ1_0) PYLLM_BLOCK_TYPE(TQ2_0)
#undef PYLLM_BLOCK_TYPE
#define PYLLM_ANY_TYPE(T) PYLLM_KERNEL_FOR(matmat_f32, T)
PYLLM_ANY_TYPE(F32) PYLLM_ANY_TYPE(F16) PYLLM_ANY_TYPE(BF16)
PYLLM_ANY_TYPE(Q4_0) PYLLM_ANY_TYPE(Q4_1) PYLLM_ANY_TYPE(Q5_0) PYLLM_ANY_TYPE(Q5_1)
PYLLM_ANY_TYPE(Q8_0) PYLLM_ANY_TYPE(Q2_K) PYLLM_ANY_TYPE(Q3_K) PYLLM_ANY_TYPE(Q4_K)
PYLLM_ANY_TYPE(Q5_K) PYLLM_ANY_TYPE(Q6_K) PYLLM_ANY_TYPE(IQ4_NL) PYLLM_ANY_TYPE(IQ4_XS)
PYLLM_ANY_TYPE(IQ2_XXS) PYLLM_ANY_TYPE(IQ2_XS) PYLLM_ANY_TYPE(IQ2_S)
PYLLM_ANY_TYPE(IQ3_XXS) PYLLM_ANY_TYPE(IQ3_S) PYLLM_ANY_TYPE(IQ1_S) PYLLM_ANY_TYPE(IQ1_M)
PYLLM_ANY_TYPE(TQ1_0) PYLLM_ANY_TYPE(TQ2_0)
#undef PYLLM_ANY_TYPE

}  // namespace PYLLM_ISA
}  // namespace pyllm
