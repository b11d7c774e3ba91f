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

  // Whether every angle is a fixed multiple of the position (all modes but dynamic NTK, whose
  // base grows with the sequence length): then keys can be moved to other positions exactly.
  bool linear_in_position() const { return hp_.rope_scaling != RopeScaling::Dynamic; }
  // (cos, sin) pairs of the rotation by `delta` positions (n_rot/2 pairs), without YaRN's
  // magnitude scaling: applied to a rotated key it moves the key by delta positions.
  void rotation(int delta, std::vector<float>& out) const;

 private:
  // magnitude: YaRN's scaling of cos and sin (the keys' and queries' angles) or none
  void fill_angles(const int* positions, int n, int seq_len, bool magnitude,
                   std::vector<float>& out) const;
  HParams hp_;
  std::vector<float> factors_;
};

}  // namespace pyllm
