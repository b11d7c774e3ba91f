// C++ test of a whole forward on every kernel ISA of the build, and across machines: a random
// model drawn from a portable generator (the same weights on x86 and aarch64), its layers in
// the weight types with the most kernels (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, F32), runs a
// 20-token prompt in chunks of 16 (prefill kernels) and 4 (decode kernels) and 3 greedy steps.
//
//   test_forward_isa                     every ISA against the scalar one (exit 0 = pass)
//   test_forward_isa --write FILE        the active ISA's logits (PYLLM_FORCE_ISA picks it)
//   test_forward_isa --compare FILE TOL  the active ISA's logits against FILE: the largest
//                                        difference must be <= TOL x the largest |logit|
//
// csrc/tests/run_aarch64.sh writes the x86 result and compares the NEON build's under qemu.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/cpu.h"
#include "pyllm/model.h"
#include "pyllm/quant.h"
#include "tests/check.h"
#include "tests/random_model.h"

using namespace pyllm;

namespace {

constexpr int kLayers = 3, kEmbd = 256, kHead = 8, kHeadKV = 2, kHeadDim = 32, kFF = 512,
              kVocab = 128;

// splitmix64: integer arithmetic only, so every machine draws the same numbers.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Roughly normal: the sum of four uniforms in [-1, 1), scaled (exact in float).
  float normal(float scale) {
    float sum = 0.0f;
    for (int i = 0; i < 4; ++i) {
      sum += static_cast<float>(static_cast<int32_t>(next() >> 40) - (1 << 23)) / (1 << 23);
    }
    return sum * 0.5f * scale;
  }
};

struct Weights {
  testing::WeightBuffers buffers{64};
  ModelWeights w;

  WeightView make(QType type, int64_t cols, int64_t rows, float scale, Rng& rng,
                  float offset = 0.0f) {
    std::vector<float> values(static_cast<size_t>(cols * rows));
    for (float& v : values) v = offset + rng.normal(scale);
    return buffers.view(type, cols, rows, values);
  }

  Weights() {
    Rng rng{42};
    w.tok_embd = make(QType::F32, kEmbd, kVocab, 1.0f, rng);
    w.output_norm = make(QType::F32, kEmbd, 1, 0.1f, rng, 1.0f);
    w.output = make(QType::Q8_0, kEmbd, kVocab, 0.1f, rng);
    const QType kinds[][7] = {
        {QType::Q4_0, QType::Q8_0, QType::Q4_K, QType::Q6_K, QType::Q5_K, QType::F16, QType::Q4_1},
        {QType::Q4_K, QType::Q4_0, QType::F16, QType::Q5_K, QType::Q6_K, QType::Q4_1, QType::Q8_0},
        {QType::Q6_K, QType::Q5_K, QType::Q8_0, QType::Q4_1, QType::F32, QType::Q4_K, QType::Q4_0},
    };
    for (int i = 0; i < kLayers; ++i) {
      const QType* k = kinds[i];
      LayerWeights l;
      l.attn_norm = make(QType::F32, kEmbd, 1, 0.1f, rng, 1.0f);
      l.wq = make(k[0], kEmbd, kHead * kHeadDim, 0.08f, rng);
      l.wk = make(k[1], kEmbd, kHeadKV * kHeadDim, 0.08f, rng);
      l.wv = make(k[2], kEmbd, kHeadKV * kHeadDim, 0.08f, rng);
      l.wo = make(k[3], kHead * kHeadDim, kEmbd, 0.08f, rng);
      l.ffn_norm = make(QType::F32, kEmbd, 1, 0.1f, rng, 1.0f);
      l.w_gate = make(k[4], kEmbd, kFF, 0.08f, rng);
      l.w_up = make(k[5], kEmbd, kFF, 0.08f, rng);
      l.w_down = make(k[6], kFF, kEmbd, 0.06f, rng);
      w.layers.push_back(l);
    }
  }
};

HParams hparams() {
  return testing::llama_hparams(kVocab, kEmbd, kLayers, kHead, kHeadKV, kHeadDim, kFF);
}

// Every position's logits of the prompt, then 3 greedy steps, on the active ISA.
std::vector<float> forward(const Weights& src) {
  ModelOptions opt;
  opt.n_threads = 2;
  auto model = std::make_shared<const Model>(hparams(), src.w, opt);
  ContextParams p;
  p.n_ctx = 32;
  p.n_batch = 16;
  p.n_threads = 2;
  Context ctx(model, p);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 20; ++i) prompt.push_back((i * 37 + 11) % kVocab);
  std::vector<float> out(prompt.size() * kVocab);
  ctx.decode(prompt.data(), static_cast<int64_t>(prompt.size()), out.data(), true);
  testing::greedy_steps(ctx, out, kVocab, 3);
  return out;
}

// max |a - b| / max |b| (plain comparisons: GCC 12's aarch64 vectorizer crashes on this loop
// written with std::fmax, an internal compiler error in vect_transform_reduction)
double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0.0, mag = 0.0;
  for (size_t i = 0; i < b.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    const double m = std::fabs(static_cast<double>(b[i]));
    if (d > diff) diff = d;
    if (m > mag) mag = m;
  }
  return diff / mag;
}

}  // namespace

int main(int argc, char** argv) {
  const Weights src;
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--write" && argc == 3) {
    const std::vector<float> out = forward(src);
    FILE* f = std::fopen(argv[2], "wb");
    CHECK(f != nullptr, "cannot write %s", argv[2]);
    if (f) {
      CHECK(std::fwrite(out.data(), sizeof(float), out.size(), f) == out.size(), "short write");
      std::fclose(f);
    }
    std::printf("%s: %zu logits of isa=%s\n", argv[2], out.size(), isa_name(active_isa()));
    return pyllm::testing::test_exit_status();
  }
  if (mode == "--compare" && argc == 4) {
    const std::vector<float> out = forward(src);
    std::vector<float> want(out.size());
    FILE* f = std::fopen(argv[2], "rb");
    CHECK(f != nullptr, "cannot read %s", argv[2]);
    if (f) {
      CHECK(std::fread(want.data(), sizeof(float), want.size(), f) == want.size() &&
                std::fgetc(f) == EOF,
            "%s does not hold %zu logits", argv[2], want.size());
      std::fclose(f);
    }
    const double tol = std::atof(argv[3]), diff = rel_diff(out, want);
    std::printf("isa=%s against %s: largest difference %.3g of the largest logit (bound %g)\n",
                isa_name(active_isa()), argv[2], diff, tol);
    CHECK(diff <= tol, "isa=%s: %.3g > %g", isa_name(active_isa()), diff, tol);
    return pyllm::testing::test_exit_status();
  }
  CHECK(argc == 1, "usage: test_forward_isa [--write FILE | --compare FILE TOL]");
  // Every ISA against the scalar one: the F32-math kernels (neon) agree to float rounding
  // (measured 7e-6); the int16 activations of the AVX2 / AVX-512 integer kernels stay within
  // 5e-4 of the largest logit (measured 5.5e-5 and 1.3e-4).
  set_active_isa(Isa::Scalar);
  const std::vector<float> base = forward(src);
  for (Isa isa : available_isas()) {
    set_active_isa(isa);
    const double diff = rel_diff(forward(src), base);
    const double bound = isa == Isa::Scalar || isa == Isa::Neon ? 2e-5 : 5e-4;
    std::printf("isa=%s: largest difference %.3g of the largest logit\n", isa_name(isa), diff);
    CHECK(diff <= bound, "isa=%s: %.3g > %g", isa_name(isa), diff, bound);
  }
  return pyllm::testing::test_exit_status();
}
