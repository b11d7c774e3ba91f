// Rotary embedding angle tables (see rope.cc).
#pragma once

#include <vector>

#include "pyllm/model.h"

namespace pyllm {

class RopeTable {
 public:
  // freq_factors: optional n_rot/2 divisors of the inverse frequencies (rope_freqs.weight).
  RopeTable(const HParams& hp, const float* freq_factors);

  // (cos, sin) pairs for positions pos0..pos0+n-1: out[t][2i], out[t][2i+1], n_rot/2 pairs each.
  // seq_len is the sequence length the dynamic-NTK base is computed for.
  void fill(int pos0, int n, int seq_len, std::vector<float>& out) const;
  // Same for arbitrary positions pos[0..n) (tokens of several sequences in one batch).
  void fill_positions(const int* pos, int n, int seq_len, std::vector<float>& out) const;

  double effective_base(int seq_len) const;

 private:
  HParams hp_;
  std::vector<float> factors_;
};

}  // namespace pyllm
