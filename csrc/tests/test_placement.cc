// C++ test of the device seam under the sanitizers (csrc/tests/run.sh): a small random model
// (F32 norms, Q8_0 and F32 matrices, GQA) is loaded with several placements of its layers on the
// CPU; every placement must give the logits of the one-range model bit for bit (prompt, decode
// steps, several sequences), move its saved state to a one-range context exactly, and bad
// placements must be refused before anything is allocated; the device backends' weight check
// refuses the types they have no kernels for. Exit status 0 = pass.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/placed_weights.h"
#include "pyllm/model.h"
#include "pyllm/quant.h"
#include "tests/check.h"
#include "tests/random_model.h"

using namespace pyllm;

namespace {

constexpr int kLayers = 4, kEmbd = 64, kHead = 4, kHeadKV = 2, kHeadDim = 16, kFF = 128,
              kVocab = 96;

struct Weights {
  testing::WeightBuffers buffers{256};
  ModelWeights w;

  WeightView make(QType type, int64_t cols, int64_t rows, float scale, std::mt19937& rng,
                  float offset = 0.0f) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> values(static_cast<size_t>(cols * rows));
    for (float& v : values) v = offset + dist(rng);
    return buffers.view(type, cols, rows, values);
  }

  explicit Weights(unsigned seed) {
    std::mt19937 rng(seed);
    w.tok_embd = make(QType::F32, kEmbd, kVocab, 1.0f, rng);
    w.output_norm = make(QType::F32, kEmbd, 1, 0.1f, rng, 1.0f);
    w.output = make(QType::Q8_0, kEmbd, kVocab, 0.2f, rng);
    for (int i = 0; i < kLayers; ++i) {
      LayerWeights l;
      l.attn_norm = make(QType::F32, kEmbd, 1, 0.1f, rng, 1.0f);
      l.wq = make(QType::Q8_0, kEmbd, kHead * kHeadDim, 0.2f, rng);
      l.wk = make(QType::Q8_0, kEmbd, kHeadKV * kHeadDim, 0.2f, rng);
      l.wv = make(QType::F32, kEmbd, kHeadKV * kHeadDim, 0.2f, rng);
      l.wo = make(QType::Q8_0, kHead * kHeadDim, kEmbd, 0.2f, rng);
      l.ffn_norm = make(QType::F32, kEmbd, 1, 0.1f, rng, 1.0f);
      l.w_gate = make(QType::Q8_0, kEmbd, kFF, 0.2f, rng);
      l.w_up = make(QType::F32, kEmbd, kFF, 0.2f, rng);
      l.w_down = make(QType::Q8_0, kFF, kEmbd, 0.2f, rng);
      w.layers.push_back(l);
    }
  }
};

HParams hparams() {
  return testing::llama_hparams(kVocab, kEmbd, kLayers, kHead, kHeadKV, kHeadDim, kFF);
}

std::shared_ptr<const Model> load(const Weights& src, std::vector<PlacedLayers> placement) {
  ModelOptions opt;
  opt.n_threads = 2;
  opt.placement = std::move(placement);
  return std::make_shared<const Model>(hparams(), src.w, opt);
}

ContextParams params(int n_seq = 1) {
  ContextParams p;
  p.n_ctx = 32;
  p.n_batch = 5;  // several chunks per prompt
  p.n_threads = 2;
  p.n_seq = n_seq;
  return p;
}

// Logits of a prompt (every position) and three greedy steps after it.
std::vector<float> run(const std::shared_ptr<const Model>& model) {
  Context ctx(model, params());
  const std::vector<int32_t> prompt = {1, 7, 22, 5, 90, 41, 3, 3, 17, 60, 2, 88};
  std::vector<float> out(prompt.size() * kVocab);
  ctx.decode(prompt.data(), static_cast<int64_t>(prompt.size()), out.data(), true);
  testing::greedy_steps(ctx, out, kVocab, 3);
  return out;
}

void check_placements(const Weights& src) {
  const std::vector<float> base = run(load(src, {}));
  const std::vector<std::vector<PlacedLayers>> splits = {
      {{"cpu", 0, 2}, {"cpu", 2, 4}},
      {{"cpu", 0, 1}, {"cpu", 1, 2}, {"cpu", 2, 3}, {"cpu", 3, 4}, {"cpu", 4, 4}},
      {{"cpu", 0, 4}, {"cpu", 4, 4}},
  };
  for (size_t i = 0; i < splits.size(); ++i) {
    const std::vector<float> got = run(load(src, splits[i]));
    CHECK(got == base, "placement %zu: logits differ from the one-range model", i);
  }
}

void check_batch_and_state(const Weights& src) {
  auto whole = load(src, {});
  auto split = load(src, {{"cpu", 0, 1}, {"cpu", 1, 3}, {"cpu", 3, 4}, {"cpu", 4, 4}});
  const std::vector<int32_t> toks = {4, 9, 11, 30, 31, 2, 8, 77, 65};
  const std::vector<int32_t> seqs = {0, 0, 0, 1, 1, 2, 2, 2, 2};
  const std::vector<uint8_t> want(toks.size(), 1);
  std::vector<float> a(toks.size() * kVocab), b(toks.size() * kVocab);
  Context ca(whole, params(3)), cb(split, params(3));
  ca.decode_batch(toks.data(), seqs.data(), static_cast<int64_t>(toks.size()), want.data(), a.data());
  cb.decode_batch(toks.data(), seqs.data(), static_cast<int64_t>(toks.size()), want.data(), b.data());
  CHECK(a == b, "batched logits differ between placements");

  // The state of a split context continues in a one-range context exactly.
  const std::vector<uint8_t> state = cb.save_state();
  Context fresh(whole, params(3));
  fresh.load_state(state.data(), static_cast<int64_t>(state.size()));
  CHECK(fresh.n_past() == 3, "n_past %d after load", fresh.n_past());
  CHECK(fresh.save_state() == state, "the state does not round-trip across placements");
  const int32_t next = 12;
  std::vector<float> x(kVocab), y(kVocab);
  fresh.decode(&next, 1, x.data(), false);
  cb.decode(&next, 1, y.data(), false);
  CHECK(x == y, "decoding after the moved state differs");
  bool refused = false;
  try {
    fresh.load_state(state.data(), static_cast<int64_t>(state.size()) - 1);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused, "a truncated state was accepted");
}

void check_bad_placements(const Weights& src) {
  const std::vector<std::vector<PlacedLayers>> bad = {
      {{"cpu", 0, 3}},                               // does not cover the model
      {{"cpu", 0, 2}, {"cpu", 3, 4}},                // gap
      {{"cpu", 0, 3}, {"cpu", 2, 4}},                // overlap
      {{"cpu", 0, 5}},                               // past the last layer
      {{"cpu", 0, 2}, {"cpu", 2, 2}, {"cpu", 2, 4}},  // an empty range that is not the last
      {{"tpu", 0, 4}},                               // no such backend
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    bool refused = false;
    try {
      load(src, bad[i]);
    } catch (const std::invalid_argument& e) {
      refused = std::strstr(e.what(), "placement") != nullptr ||
                std::strstr(e.what(), "backend") != nullptr;
    }
    CHECK(refused, "bad placement %zu was not refused with a placement message", i);
  }
}

// The device backends' size check refuses weight types their kernels cannot decode (the grid
// i-quants, TQ1_0, TQ2_0) with a DeviceError naming the type, before anything is uploaded.
void check_device_types(const Weights& src) {
  const std::vector<LayerRange> all = {{0, kLayers, true}};
  CHECK(placed_weight_bytes(src.w, all, UINT64_MAX, "dev") > 0, "no bytes for a Q8_0 model");
  for (QType t : kAllQTypes) {
    if (!type_traits(t).is_weight) continue;
    ModelWeights w = src.w;
    w.layers[1].w_down.type = t;  // the size check reads the type, never the data
    std::string error;
    try {
      placed_weight_bytes(w, all, UINT64_MAX, "dev");
    } catch (const DeviceError& e) {
      error = e.what();
    }
    const bool legacy = static_cast<int>(t) <= static_cast<int>(QType::Q6_K) ||
                        t == QType::IQ4_NL || t == QType::IQ4_XS || t == QType::BF16;
    CHECK(device_decodes(t) == legacy, "%s: device_decodes is wrong", type_traits(t).name);
    CHECK(legacy == error.empty(), "%s: placed on a device: '%s'", type_traits(t).name,
          error.c_str());
    CHECK(legacy || error.find(type_traits(t).name) != std::string::npos,
          "%s: the error does not name the type", type_traits(t).name);
  }
}

}  // namespace

int main() {
  const Weights src(7);
  check_placements(src);
  check_batch_and_state(src);
  check_bad_placements(src);
  check_device_types(src);
  return pyllm::testing::test_exit_status();
}
