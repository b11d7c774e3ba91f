// exp for softmax-like uses, written as plain scalar code that compilers vectorize (libm's
// expf call does not): the sampler's softmax/mirostat, the attention softmax and SwiGLU.
//
// Internal linkage on purpose (unnamed namespace): csrc/cpu/isa/ops.cc includes this once per
// ISA with different -m flags, and an inline function with external linkage would let the
// linker keep one ISA's copy for all of them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace pyllm {
namespace {

// exp(x) for x <= 0 written so the compiler vectorizes it (the libm call does not): round
// x / ln2 to k with the 1.5 * 2^23 trick, reduce r = x - k ln2 (Cody-Waite, two parts), a
// degree-6 polynomial for e^r on |r| <= ln2 / 2, and scale by 2^k through the exponent bits.
// Relative error ~2e-7; below -87 the result is 0 (float would go subnormal).
// GCC only if-converts (and so vectorizes) the float selects below without trapping-math; the
// selects never trap on the values they see.
#if defined(__GNUC__) && !defined(__clang__)
#define PYLLM_VECTOR_SELECTS __attribute__((optimize("no-trapping-math")))
#else
#define PYLLM_VECTOR_SELECTS
#endif

PYLLM_VECTOR_SELECTS inline float exp_nonpositive(float x) {
  const float magic = 12582912.0f;
  x = x < -87.0f ? -87.0f : x;
  const float kf_m = x * 1.44269504088896341f + magic;
  const float kf = kf_m - magic;
  int32_t kbits;
  std::memcpy(&kbits, &kf_m, 4);
  const int32_t k = kbits - 0x4B400000;  // the integer rounded into the mantissa
  const float r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187045e-06f;
  float q = 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  q = q * r + 1.0f;
  int32_t qbits;
  std::memcpy(&qbits, &q, 4);
  qbits += k * (1 << 23);
  std::memcpy(&q, &qbits, 4);
  return x <= -87.0f ? 0.0f : q;
}

// out[i] = exp(x[i] - mx) (x[i] <= mx; -inf gives 0); returns the sum. 16 float lanes (the
// compiler does not reorder a single float sum), added up in double per block.
PYLLM_VECTOR_SELECTS inline double exp_shifted(const float* x, float mx, float* out, size_t n) {
  constexpr size_t kLanes = 16;
  double total = 0.0;
  size_t i = 0;
  while (i + kLanes <= n) {
    float part[kLanes] = {};
    const size_t end = std::min(n - n % kLanes, i + 1024);
    for (; i < end; i += kLanes) {
      for (size_t j = 0; j < kLanes; ++j) {
        const float v = exp_nonpositive(x[i + j] - mx);
        out[i + j] = v;
        part[j] += v;
      }
    }
    for (float v : part) total += v;
  }
  for (; i < n; ++i) {
    out[i] = exp_nonpositive(x[i] - mx);
    total += out[i];
  }
  return total;
}

// silu(g) = g * sigmoid(g), with exp only of non-positive arguments: sigmoid(g) = 1 / (1 + e)
// for g >= 0 and e / (1 + e) for g < 0, where e = exp(-|g|) (no overflow at either end).
PYLLM_VECTOR_SELECTS inline float silu(float g) {
  const float e = exp_nonpositive(g < 0.0f ? g : -g);
  return g * (g < 0.0f ? e : 1.0f) / (1.0f + e);
}

}  // namespace
}  // namespace pyllm
