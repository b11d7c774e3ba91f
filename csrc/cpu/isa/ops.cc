// Element-wise and attention operators (see cpu/ops.h), written once and compiled per ISA.
//
// Dot products and AXPYs use the float-vector vocabulary of cpu/isa/simd.h (shared with the
// matmul kernels); the simple element-wise loops are left to the compiler's vectorizer, with
// reductions kept in kLanes independent partial sums so no -ffast-math is needed.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/fast_exp.h"
#include "cpu/isa/simd.h"
#include "cpu/ops.h"
#include "pyllm/fp16.h"

#ifndef PYLLM_ISA
#error "ops.cc is compiled once per ISA with PYLLM_ISA defined"
#endif

namespace pyllm {
namespace PYLLM_ISA {
namespace {

constexpr int kLanes = 16;

// The hardware's float -> half conversion (round to nearest even, as f32_to_f16). GCC spells
// the type _Float16 on x86; on aarch64 its C++ front end (GCC 12) has only __fp16, the ARM
// storage type, which converts with the same IEEE rounding.
#if defined(PYLLM_ISA_AVX2) || defined(PYLLM_ISA_AVX512)
#define PYLLM_HW_F16 1
using hw_f16 = _Float16;
#elif defined(PYLLM_ISA_NEON)
#define PYLLM_HW_F16 1
using hw_f16 = __fp16;
#endif

inline float dot(const float* a, const float* b, int n) {
  vf acc0 = vzero(), acc1 = vzero();
  int i = 0;
  for (; i + 2 * VN <= n; i += 2 * VN) {
    acc0 = vfma(vload(a + i), vload(b + i), acc0);
    acc1 = vfma(vload(a + i + VN), vload(b + i + VN), acc1);
  }
  for (; i + VN <= n; i += VN) acc0 = vfma(vload(a + i), vload(b + i), acc0);
  float s = vsum(vadd(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out += p * x
inline void axpy(float p, const float* x, float* out, int n) {
  const vf vp = vset1(p);
  int i = 0;
  for (; i + VN <= n; i += VN) vstore(out + i, vfma(vp, vload(x + i), vload(out + i)));
  for (; i < n; ++i) out[i] += p * x[i];
}

// Row t of one KV head as floats.
inline void load_kv_row(const AttentionArgs& a, const uint8_t* base, int t, float* dst) {
  const uint8_t* row = base + t * a.kv_row_bytes;
  const int hd = a.head_dim;
  if (a.kv_type == QType::F32) {
    std::memcpy(dst, row, sizeof(float) * hd);
    return;
  }
  if (a.kv_type == QType::Q8_0) {
    const BlockQ8_0* b = reinterpret_cast<const BlockQ8_0*>(row);
    for (int j = 0; j < hd / QK8_0; ++j) {
      const float d = half_to_float(b[j].d);
      for (int i = 0; i < QK8_0; ++i) dst[j * QK8_0 + i] = d * b[j].qs[i];
    }
    return;
  }
  const f16_t* h = reinterpret_cast<const f16_t*>(row);
  int i = 0;
  for (; i + VN <= hd; i += VN) vstore(dst + i, vload_f16(h + i));
  for (; i < hd; ++i) dst[i] = half_to_float(h[i]);
}

void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(x[i + j]) * x[i + j];
  }
  double ss = 0.0;
  for (; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  for (int j = 0; j < kLanes; ++j) ss += acc[j];
  const float scale = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
  if (w) {
    for (int64_t k = 0; k < n; ++k) y[k] = x[k] * scale * w[k];
  } else {
    for (int64_t k = 0; k < n; ++k) y[k] = x[k] * scale;
  }
}

PYLLM_VECTOR_SELECTS void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = silu(gate[i]) * up[i];
}

void add(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void rope(float* x, int n_heads, int head_dim, int n_rot, const float* cos_sin, bool neox) {
  const int half = n_rot / 2;
  for (int h = 0; h < n_heads; ++h) {
    float* v = x + static_cast<int64_t>(h) * head_dim;
    if (neox) {
      for (int i = 0; i < half; ++i) {
        const float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = a * s + b * c;
      }
    } else {
      for (int i = 0; i < half; ++i) {
        const float c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
      }
    }
  }
}

// The query rows [r0, r0 + kAttentionRows) of a problem (clipped to n_q): their q and out
// pointers and visible-key counts, from the (token, head) grid of AttentionArgs.
struct RowBlock {
  int nr, nmax = 0;
  const float* q[kAttentionRows];
  float* out[kAttentionRows];
  int vis[kAttentionRows];

  RowBlock(const AttentionArgs& a, int r0) : nr(std::min(kAttentionRows, a.n_q - r0)) {
    for (int r = 0; r < nr; ++r) {
      const int l = a.first_row + r0 + r, tok = l / a.n_heads, head = l % a.n_heads;
      q[r] = a.q + tok * a.q_stride + head * a.head_dim;
      out[r] = a.out + tok * a.out_stride + head * a.head_dim;
      vis[r] = a.n_visible[tok];
      nmax = std::max(nmax, vis[r]);
    }
  }

  // out = acc / sum, row by row (acc [nr][hd])
  void finish(const float* acc, const float* sum, int hd) const {
    for (int r = 0; r < nr; ++r) {
      const float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;
      for (int i = 0; i < hd; ++i) out[r][i] = acc[r * hd + i] * inv;
    }
  }
};

#if defined(PYLLM_ISA_AVX512)
// Sums of 16 vectors: lane j of the result is the sum of the 16 lanes of v[j] (a fixed tree, so
// a key's score does not depend on which other keys share its tile).
inline __m512 reduce16(__m512* v) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                                  _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88),
                                  _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// Tile of kAttentionKeys K or V rows t0.. as floats, [16][hd]; rows past n are zero.
inline void load_kv_tile(const AttentionArgs& a, const uint8_t* base, int t0, int n, float* tile) {
  const int hd = a.head_dim;
  for (int j = 0; j < n; ++j) load_kv_row(a, base, t0 + j, tile + j * hd);
  for (int j = n; j < kAttentionKeys; ++j) std::memset(tile + j * hd, 0, sizeof(float) * hd);
}

// Attention with keys in tiles of 16: the scores of a query row against a tile are 16
// independent dot products whose lane sums come out together (reduce16), instead of one
// horizontal sum per key; values are accumulated per tile with the row's accumulators loaded
// once. Per row, the order of the value accumulation is that of the generic kernel below.
void attention_tiled(const AttentionArgs& a) {
  const int hd = a.head_dim;
  constexpr int KT = kAttentionKeys;
  float* tile = a.scratch;  // [KT][hd]
  for (int r0 = 0; r0 < a.n_q; r0 += kAttentionRows) {
    const RowBlock blk(a, r0);
    const int nr = blk.nr, nmax = blk.nmax;
    const int* vis = blk.vis;
    const int ldsc = (nmax + KT - 1) / KT * KT;
    float* acc = tile + KT * hd;                // [nr][hd]
    float* scores = acc + kAttentionRows * hd;  // [nr][ldsc]
    const __m512 scale = _mm512_set1_ps(a.scale);
    for (int t0 = 0; t0 < nmax; t0 += KT) {
      load_kv_tile(a, a.k, t0, std::min(KT, nmax - t0), tile);
      for (int r = 0; r < nr; ++r) {
        if (t0 >= vis[r]) continue;
        __m512 dots[KT];
        for (int j = 0; j < KT; ++j) dots[j] = _mm512_setzero_ps();
        for (int d = 0; d < hd; d += 16) {
          const __m512 qv = _mm512_loadu_ps(blk.q[r] + d);
          for (int j = 0; j < KT; ++j) {
            dots[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(tile + j * hd + d), dots[j]);
          }
        }
        _mm512_storeu_ps(scores + r * ldsc + t0, _mm512_mul_ps(reduce16(dots), scale));
      }
    }
    float sum[kAttentionRows];
    for (int r = 0; r < nr; ++r) {
      float* sc = scores + r * ldsc;
      float mx = -INFINITY;
      for (int t = 0; t < vis[r]; ++t) mx = std::max(mx, sc[t]);
      sum[r] = static_cast<float>(exp_shifted(sc, mx, sc, vis[r]));
      std::memset(acc + r * hd, 0, sizeof(float) * hd);
    }
    for (int t0 = 0; t0 < nmax; t0 += KT) {
      load_kv_tile(a, a.v, t0, std::min(KT, nmax - t0), tile);
      for (int r = 0; r < nr; ++r) {
        const int n = std::min(KT, vis[r] - t0);
        if (n <= 0) continue;
        const float* p = scores + r * ldsc + t0;
        for (int d = 0; d < hd; d += 16) {
          __m512 o = _mm512_loadu_ps(acc + r * hd + d);
          for (int j = 0; j < n; ++j) {
            o = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(tile + j * hd + d), o);
          }
          _mm512_storeu_ps(acc + r * hd + d, o);
        }
      }
    }
    blk.finish(acc, sum, hd);
  }
}
#endif

void attention(const AttentionArgs& a) {
  const int hd = a.head_dim;
#if defined(PYLLM_ISA_AVX512)
  if (hd % 16 == 0) return attention_tiled(a);
#endif
  // Query rows go in blocks of kAttentionRows: one pass over the visible keys loads each K row
  // once for the block (scores), a softmax per row in F32 with the row's maximum subtracted,
  // and one pass over the values. Per row the arithmetic and its order are those of a
  // row-at-a-time kernel; the block only shares the loading of K/V rows.
  float* row = a.scratch;  // one dequantized K or V row
  for (int r0 = 0; r0 < a.n_q; r0 += kAttentionRows) {
    const RowBlock blk(a, r0);
    const int nr = blk.nr, nmax = blk.nmax;
    const int* vis = blk.vis;
    float* acc = row + hd;                       // [nr][hd] output accumulators
    float* scores = acc + kAttentionRows * hd;   // [nr][nmax]
    float max_score[kAttentionRows], sum[kAttentionRows];
    for (int r = 0; r < nr; ++r) max_score[r] = -INFINITY;
    for (int t = 0; t < nmax; ++t) {
      load_kv_row(a, a.k, t, row);
      for (int r = 0; r < nr; ++r) {
        if (t >= vis[r]) continue;
        const float s = dot(blk.q[r], row, hd) * a.scale;
        scores[r * nmax + t] = s;
        max_score[r] = std::max(max_score[r], s);
      }
    }
    for (int r = 0; r < nr; ++r) {
      float* sc = scores + r * nmax;
      sum[r] = static_cast<float>(exp_shifted(sc, max_score[r], sc, vis[r]));
      for (int i = 0; i < hd; ++i) acc[r * hd + i] = 0.0f;
    }
    for (int t = 0; t < nmax; ++t) {
      load_kv_row(a, a.v, t, row);
      for (int r = 0; r < nr; ++r) {
        if (t < vis[r]) axpy(scores[r * nmax + t], row, acc + r * hd, hd);
      }
    }
    blk.finish(acc, sum, hd);
  }
}

void to_f16(const float* x, f16_t* y, int64_t n) {
#ifdef PYLLM_HW_F16
  for (int64_t i = 0; i < n; ++i) {
    const hw_f16 h = static_cast<hw_f16>(x[i]);
    std::memcpy(&y[i], &h, sizeof h);
  }
#else
  for (int64_t i = 0; i < n; ++i) y[i] = f32_to_f16(x[i]);
#endif
}

void lowrank_add(const void* b16, bool f16, int rank, const float* u, float* y,
                 int64_t n_rows) {
  constexpr int kBlock = 16;
  constexpr int kVecs = kBlock / VN;
  for (int64_t blk = 0; blk * kBlock < n_rows; ++blk) {
    vf acc[kVecs];
    for (int v = 0; v < kVecs; ++v) acc[v] = vzero();
    const int64_t base = blk * rank * kBlock;
    for (int j = 0; j < rank; ++j) {
      const vf uj = vset1(u[j]);
      for (int v = 0; v < kVecs; ++v) {
        const int64_t at = base + int64_t(j) * kBlock + v * VN;
        const vf w = f16 ? vload_f16(static_cast<const f16_t*>(b16) + at)
                         : vload(static_cast<const float*>(b16) + at);
        acc[v] = vfma(w, uj, acc[v]);
      }
    }
    float out[kBlock];
    for (int v = 0; v < kVecs; ++v) vstore(out + v * VN, acc[v]);
    const int64_t m = std::min<int64_t>(kBlock, n_rows - blk * kBlock);
    for (int64_t i = 0; i < m; ++i) y[blk * kBlock + i] += out[i];
  }
}

const OpsTable kTable = {rms_norm, swiglu, add, rope, attention, to_f16, lowrank_add};

}  // namespace

const OpsTable& ops_table() { return kTable; }

}  // namespace PYLLM_ISA
}  // namespace pyllm
