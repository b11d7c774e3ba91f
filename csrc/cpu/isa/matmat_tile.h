// The register tile of the AVX-512 VNNI matmat (prefill) kernels, shared by the panel sources:
// matmat_vnni.cc (legacy, k-quant and IQ4 types, from GGUF rows or the rows16 layout) and
// matmat_vnni_iq.cc (grid i-quants, from their SIMD grid expansion).
//
// Why: the F32 panel kernel (kernels.cc) is bound by F32 FMA throughput (16 multiply-adds per
// instruction). Here a panel of 32 rows is decoded once into int16 weights u (w = s * u + o per
// group of 32, or two scales per group), activations are rounded once per call to int16 steps
// per block of 32 (the same 16-bit scheme as matvec_vnni.cc: dx = amax / 32767, 256x finer than
// ggml's int8), and VPDPWSSD does 32 exact integer multiply-adds per instruction. After each
// group of 32 (or 16) the exact int32 sums are scaled by s * dx in F32, and the offset term
// o * sum(x) uses the exact F32 sum of the unrounded activations. Error bound: the same
// half-step-per-element bound as the matvec VNNI kernels (see matmul.h); tests check it per type.
//
// Register tile: 32 rows (two vectors of 16 lanes, one row per lane) x 6 tokens, 12 int32 and 12
// F32 accumulators; every weight pair load is reused by 6 tokens and every activation broadcast
// by 32 rows. Activations are prepared per call by each thread (k * n_tokens elements, small next
// to the n_out * k * n_tokens multiply-adds), which keeps matmul_part barrier-free.
//
// Included only by those two files (AVX-512 build); its definitions live in an unnamed namespace,
// so each includer has its own copy.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/isa/kernels.h"
#include "cpu/isa/simd.h"
#include "cpu/kernel_table.h"

#if !defined(PYLLM_ISA_AVX512)
#error "matmat_tile.h is part of the AVX-512 build only"
#endif

namespace pyllm {
namespace PYLLM_ISA {
namespace {  // NOLINT(google-build-namespaces): one copy per includer, see above

// Vectors of 16 rows per register tile. Measured on Zen4 (Q4_0, 512 tokens): 2 vectors x 6
// tokens ~1.2x faster than 4 x 3.
constexpr int NV = 2;
constexpr int R = 16 * NV;   // rows per panel
static_assert(R == kMatmatVnniRows, "kernels.h states the panel height");
constexpr int KC = 512;      // panel depth (16 groups of 32)
constexpr int MT = 12 / NV;  // tokens per register tile (2 * NV * MT = 24 accumulators)

// All tokens' activations as int16 steps per block of 32 (one thread's copy).
struct Acts {
  std::vector<int16_t> q;   // n_tokens x k
  std::vector<float> dx;    // n_tokens x k/32
  std::vector<float> xsum;  // n_tokens x k/32, exact F32 sums
};

void prepare(const MatArgs& a, Acts& s) {
  const int64_t nb = a.k / 32;
  s.q.resize(static_cast<size_t>(a.n_tokens * a.k));
  s.dx.resize(static_cast<size_t>(a.n_tokens * nb));
  s.xsum.resize(static_cast<size_t>(a.n_tokens * nb));
  for (int64_t t = 0; t < a.n_tokens; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = a.x + t * a.ldx + 32 * b;
      const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const __m512 id = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
      const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
      const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
      int16_t* q = s.q.data() + t * a.k + 32 * b;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtepi32_epi16(i0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), _mm512_cvtepi32_epi16(i1));
      s.dx[t * nb + b] = amax / 32767.0f;
      s.xsum[t * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
    }
  }
}

template <int NT, bool kOff, int kSubs>
void micro(const int16_t* P, const float* S, const float* O, int ngroups, const int16_t* xq,
           int64_t ldq, const float* dx, const float* xs, int64_t ldg, float* y, int64_t ldy,
           int nr, bool accumulate) {
  constexpr int PP = 16 / kSubs;  // k pairs per scale
  __m512 f[NV][NT];
  for (int v = 0; v < NV; ++v) {
    for (int t = 0; t < NT; ++t) f[v][t] = _mm512_setzero_ps();
  }
  for (int g = 0; g < ngroups; ++g) {
    const int16_t* pg = P + g * 32 * R;
    const int16_t* xg = xq + 32 * g;
    for (int h = 0; h < kSubs; ++h) {
      __m512i i[NV][NT];
      for (int v = 0; v < NV; ++v) {
        for (int t = 0; t < NT; ++t) i[v][t] = _mm512_setzero_si512();
      }
      // Fully unrolled: with a rolled loop GCC 12 copies every accumulator each iteration.
#pragma GCC unroll 16
      for (int pi = 0; pi < PP; ++pi) {
        const int p = h * PP + pi;
        __m512i w[NV];
        for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(pg + p * 2 * R + 32 * v);
        for (int t = 0; t < NT; ++t) {
          int32_t pair;
          std::memcpy(&pair, xg + t * ldq + 2 * p, 4);
          const __m512i xb = _mm512_set1_epi32(pair);
          for (int v = 0; v < NV; ++v) i[v][t] = _mm512_dpwssd_epi32(i[v][t], w[v], xb);
        }
      }
      for (int v = 0; v < NV; ++v) {
        const __m512 sv = _mm512_loadu_ps(S + (g * kSubs + h) * R + 16 * v);
        for (int t = 0; t < NT; ++t) {
          const __m512 d = _mm512_set1_ps(dx[t * ldg + g]);
          f[v][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[v][t]), _mm512_mul_ps(sv, d), f[v][t]);
        }
      }
    }
    if constexpr (kOff) {
      for (int v = 0; v < NV; ++v) {
        const __m512 ov = _mm512_loadu_ps(O + g * R + 16 * v);
        for (int t = 0; t < NT; ++t) {
          f[v][t] = _mm512_fmadd_ps(ov, _mm512_set1_ps(xs[t * ldg + g]), f[v][t]);
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    float* yt = y + t * ldy;
    if (nr == R) {
      for (int v = 0; v < NV; ++v) {
        __m512 r = f[v][t];
        if (accumulate) r = _mm512_add_ps(r, _mm512_loadu_ps(yt + 16 * v));
        _mm512_storeu_ps(yt + 16 * v, r);
      }
    } else {
      alignas(64) float tmp[R];
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(tmp + 16 * v, f[v][t]);
      for (int r = 0; r < nr; ++r) yt[r] = accumulate ? yt[r] + tmp[r] : tmp[r];
    }
  }
}

template <int N, bool kOff, int kSubs>
void micro_upto(int nt, const int16_t* P, const float* S, const float* O, int ngroups,
                const int16_t* xq, int64_t ldq, const float* dx, const float* xs, int64_t ldg,
                float* y, int64_t ldy, int nr, bool acc) {
  if constexpr (N > 0) {
    if (nt == N) {
      return micro<N, kOff, kSubs>(P, S, O, ngroups, xq, ldq, dx, xs, ldg, y, ldy, nr, acc);
    }
    micro_upto<N - 1, kOff, kSubs>(nt, P, S, O, ngroups, xq, ldq, dx, xs, ldg, y, ldy, nr, acc);
  }
}

// Panel packing: R rows x kc weights of a k-chunk into the micro-kernel's operands, i.e.
// pairs[kc/2][R] (two int16 codes per int32), scales[kc/32 * kSubs][R] and offsets[kc/32][R].
// Rows past nr are zero.
//
// Vectorized packers work on 16 rows at a time: a vector holding 4 bytes (elements 4 c .. 4 c + 3
// of a group) of each of 16 rows, one row per 32-bit lane, becomes pair vectors p, p + 1 of those
// rows with two shuffles (put_unsigned, put_signed).
inline __m512i bytes_ctl(int b0, int b1, int b2, int b3) {
  // per 32-bit lane: bytes b0, b1, b2, b3 of the lane (-1: zero), for the 4 lanes of 128 bits
  alignas(16) int8_t v[16];
  for (int i = 0; i < 4; ++i) {
    const int b[4] = {b0, b1, b2, b3};
    for (int j = 0; j < 4; ++j) v[4 * i + j] = static_cast<int8_t>(b[j] < 0 ? -128 : 4 * i + b[j]);
  }
  return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(v)));
}

struct PairCtl {
  __m512i lo01 = bytes_ctl(0, -1, 1, -1), lo23 = bytes_ctl(2, -1, 3, -1);  // zero-extend
  __m512i hi01 = bytes_ctl(-1, 0, -1, 1), hi23 = bytes_ctl(-1, 2, -1, 3);  // into high bytes
};

// 16 rows x 4 unsigned codes (bytes < 128) -> pairs p, p + 1 of the rows' 16 lanes, minus bias.
inline void put_unsigned(const PairCtl& c, __m512i z, int16_t bias, int32_t* pairs, int gi, int p,
                         int half) {
  const __m512i vb = _mm512_set1_epi16(bias);
  int32_t* d = pairs + (gi * 16 + p) * R + 16 * half;
  _mm512_storeu_si512(d, _mm512_sub_epi16(_mm512_shuffle_epi8(z, c.lo01), vb));
  _mm512_storeu_si512(d + R, _mm512_sub_epi16(_mm512_shuffle_epi8(z, c.lo23), vb));
}

// 16 rows x 4 signed bytes -> pairs p, p + 1 (sign-extended through the high byte).
inline void put_signed(const PairCtl& c, __m512i z, int32_t* pairs, int gi, int p, int half) {
  int32_t* d = pairs + (gi * 16 + p) * R + 16 * half;
  _mm512_storeu_si512(d, _mm512_srai_epi16(_mm512_shuffle_epi8(z, c.hi01), 8));
  _mm512_storeu_si512(d + R, _mm512_srai_epi16(_mm512_shuffle_epi8(z, c.hi23), 8));
}

inline void put16(float* dst, int idx, int half, __m512 v) {
  _mm512_storeu_ps(dst + idx * R + 16 * half, v);
}

// The product over rows r0..r1 with panels from P: P::pack(a, o0, nr, k0, kc, pairs, scales,
// offsets) fills one panel as above; P::kOffset (offsets used) and P::kSubs (scales per group of
// 32) select the micro-kernel.
template <class P>
void matmat16(const MatArgs& a, int64_t r0, int64_t r1) {
  thread_local Acts acts;
  thread_local std::vector<int16_t> panel;
  thread_local std::vector<float> scales, offsets;
  prepare(a, acts);
  panel.resize(static_cast<size_t>(KC) * R);
  scales.resize(static_cast<size_t>(KC / 32) * P::kSubs * R);
  offsets.resize(static_cast<size_t>(KC / 32) * R);
  const int64_t nb32 = a.k / 32;
  // k-chunks outside, panels inside: one chunk of every token's activations (n_tokens x KC
  // int16, 512 KiB at 512 tokens) stays in L2 while all panels of the range use it; panels
  // outside made every panel stream all k of all tokens from L3 (369 MB per 5632 x 2048 x 512
  // product), which left prefill at the mercy of the shared L3's other users. Shared rows
  // (a.queue) come in chunks of several panels, each taken through all k-chunks by one thread
  // (y accumulates over k).
  std::atomic<int64_t>* counter = a.queue != nullptr ? &a.queue->next[0] : nullptr;
  for_row_chunks(a, r0, r1, counter, [&](int64_t c0, int64_t c1) {
    for (int64_t k0 = 0; k0 < a.k; k0 += KC) {
      const int64_t kc = std::min<int64_t>(KC, a.k - k0);
      for (int64_t o0 = c0; o0 < c1; o0 += R) {
        const int nr = static_cast<int>(std::min<int64_t>(R, c1 - o0));
        const int ngroups = static_cast<int>(kc / 32);
        P::pack(a, o0, nr, k0, kc, reinterpret_cast<int32_t*>(panel.data()), scales.data(),
                       offsets.data());
        for (int64_t t0 = 0; t0 < a.n_tokens; t0 += MT) {
          const int nt = static_cast<int>(std::min<int64_t>(MT, a.n_tokens - t0));
          micro_upto<MT, P::kOffset, P::kSubs>(
              nt, panel.data(), scales.data(), offsets.data(), ngroups,
              acts.q.data() + t0 * a.k + k0, a.k, acts.dx.data() + t0 * nb32 + k0 / 32,
              acts.xsum.data() + t0 * nb32 + k0 / 32, nb32, a.y + t0 * a.ldy + o0, a.ldy, nr,
              k0 > 0);
        }
      }
    }
  });
}

}  // namespace
}  // namespace PYLLM_ISA
}  // namespace pyllm
