// Element-wise and attention operators (see pyllm/ops.h), written once and compiled per ISA.
//
// Dot products and AXPYs use the float-vector vocabulary of cpu/isa/simd.h (shared with the
// matmul kernels); the simple element-wise loops are left to the compiler's vectorizer, with
// reductions kept in kLanes independent partial sums so no -ffast-math is needed.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/fast_exp.h"
#include "cpu/isa/simd.h"
#include "pyllm/fp16.h"
#include "pyllm/ops.h"

#ifndef PYLLM_ISA
#error "ops.cc is compiled once per ISA with PYLLM_ISA defined"
#endif

namespace pyllm {
namespace PYLLM_ISA {
namespace {

constexpr int kLanes = 16;

#if defined(PYLLM_ISA_AVX2) || defined(PYLLM_ISA_AVX512) || defined(PYLLM_ISA_NEON)
#define PYLLM_HW_F16 1
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

void attention(const AttentionArgs& a) {
  const int hd = a.head_dim;
  // Query rows go in blocks of kAttentionRows: one pass over the visible keys loads each K row
  // once for the block (scores), a softmax per row in F32 with the row's maximum subtracted,
  // and one pass over the values. Per row the arithmetic and its order are those of a
  // row-at-a-time kernel; the block only shares the loading of K/V rows.
  float* row = a.scratch;  // one dequantized K or V row
  for (int r0 = 0; r0 < a.n_q; r0 += kAttentionRows) {
    const int nr = std::min(kAttentionRows, a.n_q - r0);
    const float* q[kAttentionRows];
    float* out[kAttentionRows];
    int vis[kAttentionRows];
    int nmax = 0;
    for (int r = 0; r < nr; ++r) {
      const int l = a.first_row + r0 + r, tok = l / a.n_heads, head = l % a.n_heads;
      q[r] = a.q + tok * a.q_stride + head * hd;
      out[r] = a.out + tok * a.out_stride + head * hd;
      vis[r] = a.n_visible[tok];
      nmax = std::max(nmax, vis[r]);
    }
    float* acc = row + hd;                       // [nr][hd] output accumulators
    float* scores = acc + kAttentionRows * hd;   // [nr][nmax]
    float max_score[kAttentionRows], sum[kAttentionRows];
    for (int r = 0; r < nr; ++r) max_score[r] = -INFINITY;
    for (int t = 0; t < nmax; ++t) {
      load_kv_row(a, a.k, t, row);
      for (int r = 0; r < nr; ++r) {
        if (t >= vis[r]) continue;
        const float s = dot(q[r], row, hd) * a.scale;
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
    for (int r = 0; r < nr; ++r) {
      const float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;
      for (int i = 0; i < hd; ++i) out[r][i] = acc[r * hd + i] * inv;
    }
  }
}

void to_f16(const float* x, f16_t* y, int64_t n) {
#ifdef PYLLM_HW_F16
  for (int64_t i = 0; i < n; ++i) {
    const _Float16 h = static_cast<_Float16>(x[i]);
    std::memcpy(&y[i], &h, sizeof h);
  }
#else
  for (int64_t i = 0; i < n; ++i) y[i] = f32_to_f16(x[i]);
#endif
}

const OpsTable kTable = {rms_norm, swiglu, add, rope, attention, to_f16};

}  // namespace

const OpsTable& ops_table() { return kTable; }

}  // namespace PYLLM_ISA
}  // namespace pyllm
