// What the C++ tests' random models share: weight views over buffers they own (quantized from
// float values the test draws), and Llama hyper-parameters from a few sizes.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "pyllm/model.h"
#include "pyllm/quant.h"

namespace pyllm::testing {

// Buffers of weights, kept alive for every model made from them (the views point into them).
class WeightBuffers {
 public:
  explicit WeightBuffers(size_t max_views) { buffers_.reserve(max_views); }
  // A view of `type` holding `values` (cols x rows floats), quantized where type is not F32.
  WeightView view(QType type, int64_t cols, int64_t rows, const std::vector<float>& values) {
    if (buffers_.size() == buffers_.capacity()) throw std::length_error("too many views");
    WeightView v;
    v.type = type;
    v.cols = cols;
    v.rows = rows;
    v.nbytes = tensor_size(type, rows, cols);
    buffers_.emplace_back(static_cast<size_t>(v.nbytes));
    if (type == QType::F32) {
      std::memcpy(buffers_.back().data(), values.data(), static_cast<size_t>(v.nbytes));
    } else {
      type_traits(type).from_float(values.data(), buffers_.back().data(), cols * rows);
    }
    v.data = buffers_.back().data();
    return v;
  }

 private:
  std::vector<std::vector<uint8_t>> buffers_;  // never reallocated: views point into them
};

inline HParams llama_hparams(int n_vocab, int n_embd, int n_layer, int n_head, int n_head_kv,
                             int head_dim, int n_ff) {
  HParams hp;
  hp.arch = "llama";
  hp.n_vocab = n_vocab;
  hp.n_embd = n_embd;
  hp.n_layer = n_layer;
  hp.n_head = n_head;
  hp.n_head_kv = n_head_kv;
  hp.head_dim = head_dim;
  hp.n_ff = n_ff;
  hp.n_rot = head_dim;
  hp.n_ctx_train = 64;
  return hp;
}

// Appends `steps` greedy decode steps to `out` (logits rows of n_vocab; its last row picks the
// first token): each step feeds the previous row's argmax and appends the new row.
inline void greedy_steps(Context& ctx, std::vector<float>& out, int n_vocab, int steps) {
  for (int step = 0; step < steps; ++step) {
    const float* last = out.data() + out.size() - n_vocab;
    int32_t tok = 0;
    for (int i = 1; i < n_vocab; ++i) {
      if (last[i] > last[tok]) tok = i;
    }
    std::vector<float> row(static_cast<size_t>(n_vocab));
    ctx.decode(&tok, 1, row.data(), false);
    out.insert(out.end(), row.begin(), row.end());
  }
}

}  // namespace pyllm::testing
