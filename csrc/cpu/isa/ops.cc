// Element-wise and attention operators (see pyllm/ops.h), written once and compiled per ISA.
//
// The loops are shaped for the compiler's vectorizer instead of intrinsics: reductions keep
// kLanes independent partial sums (so no -ffast-math is needed to vectorize them), and halves are
// converted through _Float16 where the target converts them in hardware (F16C / AVX-512 / NEON).
// The result is plain C++ that becomes AVX2, AVX-512 or NEON code depending on the flags this
// file is compiled with.
#include <algorithm>
#include <cmath>
#include <cstring>

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

inline float half_to_float(f16_t h) {
#ifdef PYLLM_HW_F16
  _Float16 v;
  std::memcpy(&v, &h, sizeof v);
  return static_cast<float>(v);
#else
  return f16_to_f32(h);
#endif
}

inline void halves_to_floats(const f16_t* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

inline float dot(const float* a, const float* b, int n) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
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

void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
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
  // Each query row is processed with a full pass over its visible keys: scores, softmax in f32
  // with the max subtracted, then the weighted sum of values. Rows of a GQA group share the
  // same K/V rows, which stay in L1/L2 between rows.
  float kbuf[512];
  float* krow = hd <= 512 ? kbuf : nullptr;
  for (int r = 0; r < a.n_q; ++r) {
    const float* q = a.q + r * a.q_stride;
    float* out = a.out + r * a.out_stride;
    const int n = a.n_visible[r];
    float* scores = a.scratch;
    float max_score = -INFINITY;
    for (int t = 0; t < n; ++t) {
      const f16_t* k = a.k + t * a.kv_stride;
      float s;
      if (krow) {
        halves_to_floats(k, krow, hd);
        s = dot(q, krow, hd);
      } else {
        s = 0.0f;
        for (int i = 0; i < hd; ++i) s += q[i] * half_to_float(k[i]);
      }
      s *= a.scale;
      scores[t] = s;
      max_score = std::max(max_score, s);
    }
    float sum = 0.0f;
    for (int t = 0; t < n; ++t) {
      const float e = std::exp(scores[t] - max_score);
      scores[t] = e;
      sum += e;
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int i = 0; i < hd; ++i) out[i] = 0.0f;
    for (int t = 0; t < n; ++t) {
      const f16_t* v = a.v + t * a.kv_stride;
      const float p = scores[t] * inv;
      for (int i = 0; i < hd; ++i) out[i] += p * half_to_float(v[i]);
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
