// Rotary position embedding angles: plain, linear scaling, YaRN, dynamic NTK and per-frequency
// factors (Llama 3.1 rope_freqs). Produces (cos, sin) pairs per position once per forward chunk;
// every layer then reuses them.
#include "model/rope.h"

#include <algorithm>
#include <cmath>

namespace pyllm {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Dimension index at which a rotation completes n_rot turns over the original context (YaRN).
double yarn_corr_dim(int n_dims, int n_ctx_orig, double n_rot, double base) {
  return n_dims * std::log(n_ctx_orig / (n_rot * 2.0 * kPi)) / (2.0 * std::log(base));
}

}  // namespace

RopeTable::RopeTable(const HParams& hp, const float* freq_factors) : hp_(hp) {
  if (freq_factors) factors_.assign(freq_factors, freq_factors + hp.n_rot / 2);
}

double RopeTable::effective_base(int seq_len) const {
  double base = hp_.rope_base;
  if (hp_.rope_scaling == RopeScaling::Dynamic && hp_.rope_orig_ctx > 0 &&
      seq_len > hp_.rope_orig_ctx) {
    // Dynamic NTK: grow the base with the sequence once it passes the trained context.
    const double f = hp_.rope_factor;
    const double dim = hp_.n_rot;
    base *= std::pow(f * seq_len / hp_.rope_orig_ctx - (f - 1.0), dim / (dim - 2.0));
  }
  return base;
}

void RopeTable::fill(int pos0, int n, int seq_len, std::vector<float>& out) const {
  std::vector<int> pos(n);
  for (int t = 0; t < n; ++t) pos[t] = pos0 + t;
  fill_positions(pos.data(), n, seq_len, out);
}

void RopeTable::fill_positions(const int* positions, int n, int seq_len,
                               std::vector<float>& out) const {
  fill_angles(positions, n, seq_len, true, out);
}

void RopeTable::rotation(int delta, std::vector<float>& out) const {
  fill_angles(&delta, 1, 0, false, out);
}

void RopeTable::fill_angles(const int* positions, int n, int seq_len, bool magnitude,
                            std::vector<float>& out) const {
  const int half = hp_.n_rot / 2;
  out.resize(static_cast<size_t>(n) * 2 * half);
  const double base = effective_base(seq_len);

  double freq_scale = 1.0;
  double ext_factor = 0.0;
  double mscale = 1.0;
  double corr_lo = 0.0, corr_hi = 0.0;
  if (hp_.rope_scaling == RopeScaling::Linear || hp_.rope_scaling == RopeScaling::Yarn) {
    freq_scale = 1.0 / hp_.rope_factor;
  }
  if (hp_.rope_scaling == RopeScaling::Yarn) {
    ext_factor = hp_.yarn_ext_factor >= 0.0f ? hp_.yarn_ext_factor : 1.0;
    const int orig = hp_.rope_orig_ctx > 0 ? hp_.rope_orig_ctx : hp_.n_ctx_train;
    corr_lo = std::max(0.0, std::floor(yarn_corr_dim(hp_.n_rot, orig, hp_.yarn_beta_fast, base)));
    corr_hi = std::min(double(hp_.n_rot - 1),
                       std::ceil(yarn_corr_dim(hp_.n_rot, orig, hp_.yarn_beta_slow, base)));
    mscale = hp_.yarn_attn_factor;
    if (ext_factor != 0.0) mscale *= 1.0 + 0.1 * std::log(1.0 / freq_scale);
  }
  if (!magnitude) mscale = 1.0;

  for (int t = 0; t < n; ++t) {
    const double pos = positions[t];
    float* row = out.data() + static_cast<size_t>(t) * 2 * half;
    for (int i = 0; i < half; ++i) {
      double inv_freq = std::pow(base, -2.0 * i / hp_.n_rot);
      if (!factors_.empty()) inv_freq /= factors_[i];
      const double extrap = pos * inv_freq;
      double theta = extrap * freq_scale;
      if (ext_factor != 0.0) {
        // YaRN: keep high-frequency dimensions unscaled, interpolate low ones, ramp between.
        const double y = (i - corr_lo) / std::max(0.001, corr_hi - corr_lo);
        const double ramp = (1.0 - std::min(1.0, std::max(0.0, y))) * ext_factor;
        theta = theta * (1.0 - ramp) + extrap * ramp;
      }
      row[2 * i] = static_cast<float>(std::cos(theta) * mscale);
      row[2 * i + 1] = static_cast<float>(std::sin(theta) * mscale);
    }
  }
}

}  // namespace pyllm
