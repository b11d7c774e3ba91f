// Importance-matrix statistics (what `pyllm imatrix` writes): for every matrix product of the
// forward, the sum over the evaluated tokens of each input column's squared activation. A
// context collects them while asked to (Context::collect_activation_stats); quantizers weight
// each column's rounding error by the mean square (pyllm/formats/imatrix.py).
//
// A Llama layer has four distinct matmul inputs: the normed hidden state read by q, k and v;
// the attention output read by the output projection; the normed hidden state read by gate and
// up; the SwiGLU product read by down. The head's input (the final-normed rows that get logits)
// is the output matrix's. Sums are kept in double: a large run adds millions of squares.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "pyllm/model.h"

namespace pyllm {

enum class StatSlot : int { AttnIn = 0, AttnOut = 1, FfnIn = 2, FfnDown = 3 };
constexpr int kStatSlots = 4;

struct ActivationStats {
  struct Layer {
    std::array<std::vector<double>, kStatSlots> sums;
    int64_t n_tokens = 0;  // tokens through this layer while collecting
  };
  std::vector<Layer> layers;
  std::vector<double> output;  // the output matrix's input rows
  int64_t n_output = 0;        // rows scored by the head while collecting

  explicit ActivationStats(const HParams& hp) : layers(static_cast<size_t>(hp.n_layer)) {
    const size_t d = static_cast<size_t>(hp.n_embd);
    const size_t q_dim = static_cast<size_t>(hp.n_head) * static_cast<size_t>(hp.head_dim);
    for (Layer& l : layers) {
      l.sums[static_cast<int>(StatSlot::AttnIn)].assign(d, 0.0);
      l.sums[static_cast<int>(StatSlot::AttnOut)].assign(q_dim, 0.0);
      l.sums[static_cast<int>(StatSlot::FfnIn)].assign(d, 0.0);
      l.sums[static_cast<int>(StatSlot::FfnDown)].assign(static_cast<size_t>(hp.n_ff), 0.0);
    }
    output.assign(d, 0.0);
  }

  // sums[j] += x[t][j]^2 over rows t < n of x (row length sums.size()).
  static void accumulate(std::vector<double>& sums, const float* x, int64_t n) {
    const int64_t dim = static_cast<int64_t>(sums.size());
    for (int64_t t = 0; t < n; ++t) {
      const float* row = x + t * dim;
      for (int64_t j = 0; j < dim; ++j) sums[j] += double(row[j]) * double(row[j]);
    }
  }
  void add(int layer, StatSlot slot, const float* x, int64_t n) {
    accumulate(layers[static_cast<size_t>(layer)].sums[static_cast<int>(slot)], x, n);
  }
};

}  // namespace pyllm
