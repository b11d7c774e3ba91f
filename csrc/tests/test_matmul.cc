// C++ tests of the matmul kernels: every weight type x every available ISA against a float64
// product of the dequantized weights, on odd shapes (rows not a multiple of the thread count or
// of the panel height, several token counts on both sides of the matvec/matmat switch), through
// the thread pool and through matmul_part inside one parallel region. Exit status 0 = pass.
//
// The dequantized weights come from the scalar matmul itself with X = identity (exact: every
// product is w * 1 and every other term is w * 0), so this program needs nothing but the kernels;
// tests/test_kernels.py checks the same kernels against the gguf package's dequantizer.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/matmul.h"
#include "cpu/threadpool.h"
#include "pyllm/fp16.h"
#include "pyllm/qtype.h"
#include "pyllm/repack.h"
#include "tests/check.h"

using namespace pyllm;

namespace {

struct TypeCase {
  QType type;
  const char* name;
  int block;
  int bytes;
  std::vector<int> half_offsets;  // byte offsets of the f16 scale fields inside a block
};

const std::vector<TypeCase>& cases() {
  static const std::vector<TypeCase> c = {
      {QType::F32, "F32", 1, 4, {}},
      {QType::F16, "F16", 1, 2, {0}},
      {QType::BF16, "BF16", 1, 2, {}},
      {QType::Q4_0, "Q4_0", 32, sizeof(BlockQ4_0), {0}},
      {QType::Q4_1, "Q4_1", 32, sizeof(BlockQ4_1), {0, 2}},
      {QType::Q5_0, "Q5_0", 32, sizeof(BlockQ5_0), {0}},
      {QType::Q5_1, "Q5_1", 32, sizeof(BlockQ5_1), {0, 2}},
      {QType::Q8_0, "Q8_0", 32, sizeof(BlockQ8_0), {0}},
      {QType::Q2_K, "Q2_K", 256, sizeof(BlockQ2_K), {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)}},
      {QType::Q3_K, "Q3_K", 256, sizeof(BlockQ3_K), {offsetof(BlockQ3_K, d)}},
      {QType::Q4_K, "Q4_K", 256, sizeof(BlockQ4_K), {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)}},
      {QType::Q5_K, "Q5_K", 256, sizeof(BlockQ5_K), {offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)}},
      {QType::Q6_K, "Q6_K", 256, sizeof(BlockQ6_K), {offsetof(BlockQ6_K, d)}},
      {QType::IQ4_NL, "IQ4_NL", 32, sizeof(BlockIQ4_NL), {offsetof(BlockIQ4_NL, d)}},
      {QType::IQ4_XS, "IQ4_XS", 256, sizeof(BlockIQ4_XS), {offsetof(BlockIQ4_XS, d)}},
      {QType::IQ2_XXS, "IQ2_XXS", 256, sizeof(BlockIQ2_XXS), {offsetof(BlockIQ2_XXS, d)}},
      {QType::IQ2_XS, "IQ2_XS", 256, sizeof(BlockIQ2_XS), {offsetof(BlockIQ2_XS, d)}},
      {QType::IQ2_S, "IQ2_S", 256, sizeof(BlockIQ2_S), {offsetof(BlockIQ2_S, d)}},
      {QType::IQ3_XXS, "IQ3_XXS", 256, sizeof(BlockIQ3_XXS), {offsetof(BlockIQ3_XXS, d)}},
      {QType::IQ3_S, "IQ3_S", 256, sizeof(BlockIQ3_S), {offsetof(BlockIQ3_S, d)}},
      {QType::IQ1_S, "IQ1_S", 256, sizeof(BlockIQ1_S), {offsetof(BlockIQ1_S, d)}},
      {QType::IQ1_M, "IQ1_M", 256, sizeof(BlockIQ1_M), {}},  // d: see set_iq1m_scale
      {QType::TQ1_0, "TQ1_0", 256, sizeof(BlockTQ1_0), {offsetof(BlockTQ1_0, d)}},
      {QType::TQ2_0, "TQ2_0", 256, sizeof(BlockTQ2_0), {offsetof(BlockTQ2_0, d)}},
  };
  return c;
}

// The grid i-quants and ternary types: int16-activation kernels for AVX-512 only
// (matvec_vnni_iq.cc for decode, matmat_vnni_iq.cc for prefill); F32 math on the other ISAs.
bool is_grid_int16(QType t) {
  return t == QType::IQ2_XXS || t == QType::IQ2_XS || t == QType::IQ2_S ||
         t == QType::IQ3_XXS || t == QType::IQ3_S || t == QType::IQ1_S || t == QType::IQ1_M ||
         t == QType::TQ1_0 || t == QType::TQ2_0;
}

// Whether the ISA has int16-activation kernels for t at all: the legacy, k-quant and IQ4 block
// types and those of is_grid_int16 (the float types run F32 math everywhere).
bool has_int16_kernels(QType t) {
  if (is_grid_int16(t)) return true;
  switch (t) {
    case QType::Q4_0: case QType::Q4_1: case QType::Q5_0: case QType::Q5_1: case QType::Q8_0:
    case QType::Q2_K: case QType::Q3_K: case QType::Q4_K: case QType::Q5_K: case QType::Q6_K:
    case QType::IQ4_NL: case QType::IQ4_XS:
      return true;
    default:
      return false;
  }
}

// IQ1_M has no f16 field: nibble w of its d is the top nibble of scale word w (bytes 2 w, 2 w + 1
// of `scales`); the low 12 bits of each word (the 3-bit sub-block scales) are kept.
void set_iq1m_scale(uint8_t* block, f16_t d) {
  uint8_t* sc = block + offsetof(BlockIQ1_M, scales);
  for (int w = 0; w < 4; ++w) {
    sc[2 * w + 1] = static_cast<uint8_t>((sc[2 * w + 1] & 0x0F) | (((d >> (4 * w)) & 0xF) << 4));
  }
}

// Whether matmul takes an int16-activation VNNI kernel here (matvec_vnni.cc, matvec_vnni_iq.cc,
// matmat_vnni.cc, matmat_vnni_iq.cc).
bool uses_int16_activations(Isa isa, QType t, int64_t n_tokens) {
  if (!has_int16_kernels(t)) return false;
  if (isa == Isa::Avx2) {  // matvec_avx2.cc
    return n_tokens < matmat_min_tokens() && !is_grid_int16(t) && t != QType::Q8_0 &&
           t != QType::IQ4_NL && t != QType::IQ4_XS;
  }
  if (isa != Isa::Avx512) return false;
  if (n_tokens < matmat_min_tokens()) {  // the caller has made isa the active ISA
    return true;  // matvec_vnni.cc, matvec_vnni_iq.cc: every type with int16 kernels
  }
  return t == QType::Q4_0 || t == QType::Q4_1 || t == QType::Q5_0 || t == QType::Q5_1 ||
         t == QType::Q8_0 || t == QType::Q3_K || t == QType::Q4_K || t == QType::Q5_K ||
         t == QType::Q6_K || t == QType::IQ4_NL || t == QType::IQ4_XS ||
         is_grid_int16(t);  // matmat_vnni.cc; matmat_vnni_iq.cc / matvec_vnni_iq.cc
}

// Random weight bytes whose scales are finite and of moderate size.
std::vector<uint8_t> random_weights(const TypeCase& tc, int64_t n_out, int64_t k, std::mt19937& rng) {
  const int64_t n_blocks = n_out * (k / tc.block);
  std::vector<uint8_t> w(static_cast<size_t>(n_blocks * tc.bytes));
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  for (int64_t i = 0; i < n_blocks; ++i) {
    uint8_t* blk = w.data() + i * tc.bytes;
    if (tc.type == QType::F32) {
      const float f = val(rng);
      std::memcpy(blk, &f, 4);
    } else if (tc.type == QType::BF16) {
      const bf16_t h = f32_to_bf16(val(rng));
      std::memcpy(blk, &h, 2);
    }
    for (int off : tc.half_offsets) {
      const f16_t h = f32_to_f16(val(rng) * (tc.block == 1 ? 1.0f : 0.05f));
      std::memcpy(blk + off, &h, 2);
    }
    if (tc.type == QType::IQ1_M) set_iq1m_scale(blk, f32_to_f16(val(rng) * 0.05f));
  }
  return w;
}

// Dequantized weights (n_out x k, float64) via the scalar kernel and identity activations.
std::vector<double> dequantized(const TypeCase& tc, const std::vector<uint8_t>& w, int64_t n_out,
                                int64_t k, ThreadPool& pool) {
  set_active_isa(Isa::Scalar);
  std::vector<float> eye(static_cast<size_t>(k * k), 0.0f);
  for (int64_t i = 0; i < k; ++i) eye[i * k + i] = 1.0f;
  std::vector<float> y(static_cast<size_t>(k * n_out));
  matmul(tc.type, w.data(), n_out, k, eye.data(), k, y.data(), pool);  // y[i][o] = W[o][i]
  std::vector<double> out(static_cast<size_t>(n_out * k));
  for (int64_t o = 0; o < n_out; ++o) {
    for (int64_t i = 0; i < k; ++i) out[o * k + i] = y[i * n_out + o];
  }
  return out;
}

void check_type(const TypeCase& tc, ThreadPool& pool, std::mt19937& rng) {
  // 224 = 7 blocks of 32: one group of 4 plus 3 tail blocks (and 3 pairs plus 1); 75: odd float k;
  // 768 = 3 super-blocks: a prefill panel depth (512) plus a tail of 256
  const int64_t k = tc.block == 256 ? 768 : (tc.block == 32 ? 224 : 75);
  const int64_t n_out = 37;  // not a multiple of 2, 3, 4 threads or of the panel height
  const std::vector<uint8_t> w = random_weights(tc, n_out, k, rng);
  const std::vector<double> wd = dequantized(tc, w, n_out, k, pool);
  for (double v : wd) CHECK(std::isfinite(v), "%s: non-finite dequantized weight", tc.name);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t n_tokens : {1, 2, 5, 7, 13, 16, 40}) {
    std::vector<float> x(static_cast<size_t>(n_tokens * k));
    for (auto& v : x) v = nd(rng);
    for (Isa isa : available_isas()) {
      set_active_isa(isa);
      std::vector<float> y(static_cast<size_t>(n_tokens * n_out), NAN);
      matmul(tc.type, w.data(), n_out, k, x.data(), n_tokens, y.data(), pool);
      // Error allowed: F32 summation (1e-5 of sum |w x|), plus, for the kernels that split
      // activations into 16-bit integers per block of 32 (matvec_vnni.cc), half a step of that
      // rounding per element: sum_b (amax_b / 32767 / 2) * sum_{i in b} |w_i|.
      const bool i16 = uses_int16_activations(isa, tc.type, n_tokens);
      double worst = 0.0;
      for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t o = 0; o < n_out; ++o) {
          double ref = 0.0, mag = 0.0, step = 0.0;
          for (int64_t b0 = 0; b0 < k; b0 += 32) {
            double amax = 0.0, wsum = 0.0;
            for (int64_t i = b0; i < std::min<int64_t>(k, b0 + 32); ++i) {
              ref += wd[o * k + i] * x[t * k + i];
              mag += std::fabs(wd[o * k + i] * x[t * k + i]);
              amax = std::max<double>(amax, std::fabs(x[t * k + i]));
              wsum += std::fabs(wd[o * k + i]);
            }
            step += amax / 32767.0 / 2.0 * wsum;
          }
          const double allowed = 1e-5 * mag + (i16 ? step : 0.0);
          const double err = std::fabs(y[t * n_out + o] - ref) / (allowed > 0 ? allowed : 1.0);
          if (!(err <= worst)) worst = err;  // NaN-propagating max
        }
      }
      CHECK(worst <= 1.0, "%s isa=%s n_tokens=%lld: error %.3g x the allowed bound", tc.name,
            isa_name(isa), static_cast<long long>(n_tokens), worst);
    }
  }
}

void check_part_in_region(ThreadPool& pool, std::mt19937& rng) {
  // Two dependent matmuls inside ONE pool.run: matmul_part + barrier, as a forward pass does.
  const TypeCase& tc = cases()[3];  // Q4_0
  const int64_t k = 64, n_mid = 64, n_tokens = 3;
  const std::vector<uint8_t> w1 = random_weights(tc, n_mid, k, rng);
  const std::vector<uint8_t> w2 = random_weights(tc, 5, n_mid, rng);
  std::vector<float> x(n_tokens * k), mid(n_tokens * n_mid), y(n_tokens * 5), y_ref(n_tokens * 5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : x) v = nd(rng);
  MatmulParams p1{tc.type, w1.data(), n_mid, k, x.data(), 0, n_tokens, mid.data(), 0};
  MatmulParams p2{tc.type, w2.data(), 5, n_mid, mid.data(), 0, n_tokens, y.data(), 0};
  pool.run([&](int ith, int nth) {
    matmul_part(p1, ith, nth);
    pool.barrier();
    matmul_part(p2, ith, nth);
  });
  ThreadPool single(1);
  std::vector<float> mid_ref(n_tokens * n_mid);
  matmul(tc.type, w1.data(), n_mid, k, x.data(), n_tokens, mid_ref.data(), single);
  matmul(tc.type, w2.data(), 5, n_mid, mid_ref.data(), n_tokens, y_ref.data(), single);
  for (size_t i = 0; i < y.size(); ++i) {
    CHECK(std::fabs(y[i] - y_ref[i]) <= 1e-5f * (1.0f + std::fabs(y_ref[i])),
          "matmul_part in a region differs at %zu: %g vs %g", i, y[i], y_ref[i]);
  }
}

// The rows16 layout (pyllm/repack.h): a lossless permutation, and matmul over it (rows16
// kernels, or the unpacking fallback) equal to the GGUF-layout result up to F32 summation order.
// The packed buffer is sized exactly, so sanitizer builds catch any read past it.
void check_rows16(const TypeCase& tc, ThreadPool& pool, std::mt19937& rng) {
  const int64_t k = tc.block == 256 ? 512 : 224, n_out = 48;
  const std::vector<uint8_t> w = random_weights(tc, n_out, k, rng);
  std::vector<uint8_t> packed(static_cast<size_t>(repacked_size(tc.type, n_out, k)));
  repack_rows16(tc.type, w.data(), k, 0, n_out / kRepackRows, packed.data());
  std::vector<uint8_t> back(w.size());
  const size_t group_bytes = w.size() / (n_out / kRepackRows);
  for (int64_t g = 0; g < n_out / kRepackRows; ++g) {
    unpack_rows16_group(tc.type, packed.data(), k, g, back.data() + g * group_bytes);
  }
  CHECK(back == w, "%s: rows16 unpack does not restore the GGUF bytes", tc.name);
  const std::vector<double> wd = dequantized(tc, w, n_out, k, pool);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t n_tokens : {1, 2, 3, 5, 40}) {
    std::vector<float> x(static_cast<size_t>(n_tokens * k));
    for (auto& v : x) v = nd(rng);
    for (Isa isa : available_isas()) {
      set_active_isa(isa);
      std::vector<float> y(static_cast<size_t>(n_tokens * n_out), NAN), y16 = y;
      matmul(tc.type, w.data(), n_out, k, x.data(), n_tokens, y.data(), pool);
      MatmulParams p{tc.type, packed.data(), n_out, k, x.data(), 0, n_tokens, y16.data(), 0};
      p.layout = WeightLayout::Rows16;
      matmul(p, pool);
      for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t o = 0; o < n_out; ++o) {
          double mag = 0.0;
          for (int64_t i = 0; i < k; ++i) mag += std::fabs(wd[o * k + i] * x[t * k + i]);
          const double diff = std::fabs(double(y16[t * n_out + o]) - y[t * n_out + o]);
          CHECK(diff <= 2e-5 * mag, "%s rows16 isa=%s n_tokens=%lld out %lld: %g vs %g", tc.name,
                isa_name(isa), static_cast<long long>(n_tokens), static_cast<long long>(o),
                y16[t * n_out + o], y[t * n_out + o]);
        }
      }
    }
  }
}

// Products on rows16 weights with the rows shared through a MatmulQueue (threads claim chunks as
// they go, several chunks per thread here; decode and, from 32 tokens on AVX-512, prefill) give
// bit-identical results to one thread doing the whole product: every row is computed by the same
// arithmetic whoever claims it.
void check_rows16_shared(const TypeCase& tc, ThreadPool& pool, std::mt19937& rng) {
  const int64_t k = 2048, n_out = 40 * kRepackRows;
  const std::vector<uint8_t> w = random_weights(tc, n_out, k, rng);
  std::vector<uint8_t> packed(static_cast<size_t>(repacked_size(tc.type, n_out, k)));
  repack_rows16(tc.type, w.data(), k, 0, n_out / kRepackRows, packed.data());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t n_tokens : {1, 4, 6, 16, 17, 40}) {
    std::vector<float> x(static_cast<size_t>(n_tokens * k));
    for (auto& v : x) v = nd(rng);
    for (Isa isa : available_isas()) {
      set_active_isa(isa);
      std::vector<float> y(static_cast<size_t>(n_tokens * n_out), NAN), y1 = y;
      MatmulParams p{tc.type, packed.data(), n_out, k, x.data(), 0, n_tokens, y.data(), 0};
      p.layout = WeightLayout::Rows16;
      MatmulQueue queue;
      p.queue = &queue;
      pool.run([&](int ith, int nth) { matmul_part(p, ith, nth); });
      MatmulParams one = p;
      one.queue = nullptr;
      one.y = y1.data();
      matmul_part(one, 0, 1);
      CHECK(std::memcmp(y.data(), y1.data(), y.size() * sizeof(float)) == 0,
            "%s rows16 isa=%s n_tokens=%lld: shared rows differ from one thread's result",
            tc.name, isa_name(isa), static_cast<long long>(n_tokens));
    }
  }
}

void check_errors(ThreadPool& pool) {
  float x[64] = {}, y[64] = {};
  uint8_t w[1024] = {};
  auto throws = [&](QType t, int64_t n_out, int64_t k) {
    try {
      matmul(t, w, n_out, k, x, 1, y, pool);
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  CHECK(throws(QType::Q4_0, 1, 33), "k not a multiple of 32 must throw");
  CHECK(throws(QType::Q4_K, 1, 32), "k not a multiple of 256 must throw");
  CHECK(throws(QType::Q8_K, 1, 256), "activation-only type must throw");
  CHECK(throws(static_cast<QType>(99), 1, 32), "unknown type must throw");
  CHECK(throws(QType::F32, -1, 4), "negative size must throw");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  for (int threads : {1, 3}) {
    ThreadPool pool(threads);
    for (const TypeCase& tc : cases()) check_type(tc, pool, rng);
    for (const TypeCase& tc : cases()) {
      if (repack_supported(tc.type)) check_rows16(tc, pool, rng);
      if (repack_supported(tc.type)) check_rows16_shared(tc, pool, rng);
    }
    check_part_in_region(pool, rng);
    check_errors(pool);
  }
  return pyllm::testing::test_exit_status();
}
