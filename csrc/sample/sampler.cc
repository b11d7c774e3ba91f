// The sampler chain (see pyllm/sampler.h): parameter validation, penalty history, the filters
// (top-k, tail-free, typical, top-p, min-p), temperature, mirostat v1/v2, the draw, and raw
// log-probabilities for OpenAI-style logprobs.
//
// Semantics follow llama.cpp's sampling (common/sampling + llama-sampling) with min_keep = 1:
// every filter keeps at least one token, as llama.cpp's samplers intend.
#include "pyllm/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "cpu/fast_exp.h"

namespace pyllm {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kMirostatM = 100;  // tokens used to estimate the Zipf exponent (llama.cpp's m)

// Candidate order: higher logit first, equal logits by lower id, so every sort, selection and
// greedy choice is deterministic (llama.cpp leaves tie order to std::sort).
// A lambda object, not a function, so std algorithms inline it.
constexpr auto better = [](const Candidate& a, const Candidate& b) {
  return a.logit > b.logit || (a.logit == b.logit && a.id < b.id);
};

bool finite(float x) { return std::isfinite(x); }

// Weighted quickselect. Reorders v[0, n) so that v[0, r) holds the r first elements in `less`
// order (themselves in no particular order), where r is the smallest count whose mass reaches p
// (sum > p when `strict`, >= otherwise); returns r, or n when the whole range does not reach p.
// This is the cut a scan of the fully sorted array would find, in expected O(n) instead of a
// full sort: top-p / typical-p on an unfiltered 150k vocabulary may keep thousands of tokens.
template <class T, class Less, class Mass>
size_t mass_prefix(std::vector<T>& v, size_t n, Less less, Mass mass, double p, bool strict,
                   size_t lo = 0, double acc = 0.0) {
  // (lo, acc: v[0, lo) is already known to be kept, with mass acc)
  auto reached = [&](double m) { return strict ? m > p : m >= p; };
  size_t hi = n;
  while (hi - lo > 32) {
    // Median of three as the pivot, parked at lo during the partition.
    size_t a = lo, b = lo + (hi - lo) / 2, c = hi - 1;
    if (less(v[b], v[a])) std::swap(a, b);
    if (less(v[c], v[b])) std::swap(b, c);
    if (less(v[b], v[a])) std::swap(a, b);
    std::swap(v[lo], v[b]);
    const T pivot = v[lo];
    const auto split = std::partition(v.begin() + lo + 1, v.begin() + hi,
                                      [&](const T& x) { return less(x, pivot); });
    const auto q = static_cast<size_t>(split - v.begin()) - 1;
    std::swap(v[lo], v[q]);  // v[lo, q) precede the pivot, now at q
    double left = 0.0;
    for (size_t i = lo; i < q; ++i) left += mass(v[i]);
    if (reached(acc + left)) {
      hi = q;
      continue;
    }
    acc += left + mass(v[q]);
    if (reached(acc)) return q + 1;
    lo = q + 1;
  }
  std::sort(v.begin() + lo, v.begin() + hi, less);
  for (size_t i = lo; i < hi; ++i) {
    acc += mass(v[i]);
    if (reached(acc)) return i + 1;
  }
  return hi;  // hi < n only when rounding lost the crossing found above
}

// mass_prefix with a first pass that buckets the elements by key(x) (>= 0 and non-decreasing
// in `less` order; NaN / beyond `range` go to the last bucket) and sums each bucket's mass:
// the bucket where the cumulative mass reaches p is found in one pass, everything before it is
// kept unordered, and only that bucket goes through the quickselect.
template <class T, class Key, class Less, class Mass>
size_t bucketed_mass_prefix(std::vector<T>& v, Key key, float range, Less less, Mass mass,
                            double p, bool strict) {
  constexpr int kBuckets = 512;
  const float scale = static_cast<float>(kBuckets) / range;
  auto bucket = [&](const T& x) {
    const float d = key(x) * scale;
    return d < static_cast<float>(kBuckets) ? static_cast<int>(d) : kBuckets;
  };
  auto reached = [&](double m) { return strict ? m > p : m >= p; };
  double hist[kBuckets + 1] = {};
  for (const T& x : v) hist[bucket(x)] += mass(x);
  double acc = 0.0;
  int cut = 0;
  while (cut <= kBuckets && !reached(acc + hist[cut])) acc += hist[cut++];
  if (cut > kBuckets) return v.size();  // the whole set does not reach p: keep everything
  const auto above = std::partition(v.begin(), v.end(), [&](const T& x) { return bucket(x) < cut; });
  const auto within = std::partition(above, v.end(), [&](const T& x) { return bucket(x) == cut; });
  return mass_prefix(v, static_cast<size_t>(within - v.begin()), less, mass, p, strict,
                     static_cast<size_t>(above - v.begin()), acc);
}

// Largest value of a row; 16 independent lanes so the compiler vectorizes the loop.
float row_max(const float* x, size_t n) {
  constexpr size_t kLanes = 16;
  float m[kLanes];
  for (float& v : m) v = -kInf;
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  }
  float r = -kInf;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  for (float v : m) r = v > r ? v : r;
  return r;
}

// Top `k` (id, value) of a float row, best first, ties by lower id, with a bounded heap. Blocks
// whose maximum cannot enter the heap are skipped after one vectorized pass over them, so the
// common case costs about one max-reduction of the row.
void top_k_of_row(const float* x, size_t n, size_t k, std::vector<Candidate>& out) {
  k = std::min(k, n);
  out.resize(k);
  if (k == 0) return;
  for (size_t i = 0; i < k; ++i) out[i] = Candidate{static_cast<int32_t>(i), x[i], 0.0f};
  // With `better` as the heap order, the front is the worst kept candidate.
  std::make_heap(out.begin(), out.end(), better);
  constexpr size_t kBlock = 64;
  for (size_t b = k; b < n; b += kBlock) {
    const size_t e = std::min(n, b + kBlock);
    if (!(row_max(x + b, e - b) > out.front().logit)) continue;
    for (size_t i = b; i < e; ++i) {
      // A later index never wins a tie, so strictly greater is the right test.
      if (x[i] > out.front().logit) {
        std::pop_heap(out.begin(), out.end(), better);
        out.back() = Candidate{static_cast<int32_t>(i), x[i], 0.0f};
        std::push_heap(out.begin(), out.end(), better);
      }
    }
  }
  std::sort_heap(out.begin(), out.end(), better);
}

// Rejects NaN and +inf (an overflowed forward pass must not be sampled as if it meant
// something); -inf is allowed (a masked token).
void check_row(const float* x, size_t n) {
  constexpr size_t kLanes = 16;
  int32_t bad[kLanes] = {};  // int lanes: the compare-and-or loop vectorizes
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) bad[j] |= !(x[i + j] < kInf);
  }
  int32_t any = 0;
  for (; i < n; ++i) any |= !(x[i] < kInf);
  for (int32_t v : bad) any |= v;
  if (any) throw SamplingError("logits contain NaN or +inf");
}

}  // namespace

void validate_sampler_params(const SamplerParams& p, int32_t n_vocab) {
  auto fail = [](const std::string& msg) { throw SamplingError(msg); };
  if (n_vocab <= 0) fail("n_vocab must be > 0, got " + std::to_string(n_vocab));
  if (!(p.temperature >= 0.0f) || !finite(p.temperature))
    fail("temperature must be a finite number >= 0");
  if (p.top_k < 0) fail("top_k must be >= 0 (0 = off)");
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) fail("top_p must be in (0, 1]");
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) fail("min_p must be in [0, 1]");
  if (!(p.typical_p > 0.0f && p.typical_p <= 1.0f)) fail("typical_p must be in (0, 1]");
  if (!(p.tfs_z > 0.0f && p.tfs_z <= 1.0f)) fail("tfs_z must be in (0, 1]");
  if (!(p.repeat_penalty > 0.0f) || !finite(p.repeat_penalty))
    fail("repeat_penalty must be a finite number > 0");
  if (p.repeat_last_n < -1) fail("repeat_last_n must be >= -1 (-1 = whole history)");
  if (!finite(p.presence_penalty)) fail("presence_penalty must be finite");
  if (!finite(p.frequency_penalty)) fail("frequency_penalty must be finite");
  if (p.mirostat < 0 || p.mirostat > 2) fail("mirostat must be 0, 1 or 2");
  if (!(p.mirostat_tau > 0.0f) || !finite(p.mirostat_tau))
    fail("mirostat_tau must be a finite number > 0");
  if (!(p.mirostat_eta > 0.0f) || !finite(p.mirostat_eta))
    fail("mirostat_eta must be a finite number > 0");
  for (const auto& [id, bias] : p.logit_bias) {
    if (id < 0 || id >= n_vocab)
      fail("logit_bias token " + std::to_string(id) + " is outside the vocabulary (n_vocab " +
           std::to_string(n_vocab) + ")");
    if (!(finite(bias) || bias == -kInf))
      fail("logit_bias for token " + std::to_string(id) + " must be finite or -inf");
  }
  if (p.seed < -1 || p.seed > static_cast<int64_t>(UINT32_MAX))
    fail("seed must be -1 (random) or in [0, 4294967295]");
}

Sampler::Sampler(SamplerParams params, int32_t n_vocab)
    : params_(std::move(params)), n_vocab_(n_vocab) {
  validate_sampler_params(params_, n_vocab_);
  work_.resize(static_cast<size_t>(n_vocab_));
  if (penalties_active()) {
    counts_.assign(static_cast<size_t>(n_vocab_), 0);
    seen_stamp_.assign(static_cast<size_t>(n_vocab_), 0);
    if (params_.repeat_last_n > 0) history_.resize(static_cast<size_t>(params_.repeat_last_n));
  }
  reset();
}

bool Sampler::penalties_active() const {
  return params_.repeat_last_n != 0 &&
         !(params_.repeat_penalty == 1.0f && params_.presence_penalty == 0.0f &&
           params_.frequency_penalty == 0.0f);
}

void Sampler::reset() {
  if (penalties_active()) {
    std::fill(counts_.begin(), counts_.end(), 0);
    if (params_.repeat_last_n < 0) history_.clear();
  }
  history_head_ = 0;
  history_len_ = 0;
  mu_ = 2.0f * params_.mirostat_tau;
  seed_cur_ = params_.seed < 0 ? std::random_device{}() : static_cast<uint32_t>(params_.seed);
  rng_.seed(seed_cur_);
}

void Sampler::accept(int32_t token) {
  if (token < 0 || token >= n_vocab_)
    throw SamplingError("accepted token " + std::to_string(token) +
                        " is outside the vocabulary (n_vocab " + std::to_string(n_vocab_) + ")");
  if (!penalties_active()) return;
  if (params_.repeat_last_n < 0) {
    history_.push_back(token);
    ++history_len_;
  } else {
    // Ring buffer: the oldest token sits at history_head_.
    const size_t w = history_.size();
    if (history_len_ == w) {
      --counts_[static_cast<size_t>(history_[history_head_])];
      history_[history_head_] = token;
      history_head_ = (history_head_ + 1) % w;
    } else {
      history_[(history_head_ + history_len_) % w] = token;
      ++history_len_;
    }
  }
  ++counts_[static_cast<size_t>(token)];
}

void Sampler::prepare(const float* logits, size_t n, const uint32_t* mask) {
  if (n != static_cast<size_t>(n_vocab_))
    throw SamplingError("logits have " + std::to_string(n) + " entries, the sampler expects " +
                        std::to_string(n_vocab_) + " (n_vocab)");
  check_row(logits, n);
  std::memcpy(work_.data(), logits, n * sizeof(float));
  for (const auto& [id, bias] : params_.logit_bias) work_[static_cast<size_t>(id)] += bias;
  if (mask != nullptr) apply_mask(mask);
  if (!penalties_active() || history_len_ == 0) return;

  // Each distinct token of the window once: divide a positive logit by the penalty, multiply a
  // non-positive one (so a penalty > 1 always makes the token less likely), then subtract the
  // OpenAI frequency (per occurrence) and presence (once) penalties.
  if (++stamp_ == 0) {
    std::fill(seen_stamp_.begin(), seen_stamp_.end(), 0);
    stamp_ = 1;
  }
  const float rp = params_.repeat_penalty;
  const size_t w = history_.size();
  for (size_t j = 0; j < history_len_; ++j) {
    const int32_t t = history_[(history_head_ + j) % w];
    const auto ti = static_cast<size_t>(t);
    if (seen_stamp_[ti] == stamp_) continue;
    seen_stamp_[ti] = stamp_;
    const int32_t c = counts_[ti];
    float& l = work_[ti];
    l = l <= 0.0f ? l * rp : l / rp;
    l -= static_cast<float>(c) * params_.frequency_penalty + params_.presence_penalty;
  }
}

// A banned token becomes -inf, as a logit bias of -inf would: every filter of the chain already
// gives such a token no mass. Penalties applied afterwards keep -inf at -inf.
void Sampler::apply_mask(const uint32_t* mask) {
  const size_t n = work_.size();
  float* w = work_.data();
  uint32_t any = 0;
  for (size_t base = 0; base < n; base += 32) {
    const size_t len = std::min<size_t>(32, n - base);
    const uint32_t bits = len == 32 ? mask[base / 32] : mask[base / 32] & ((1u << len) - 1u);
    any |= bits;
    if (bits == 0xFFFFFFFFu) continue;
    if (bits == 0) {  // most words of a grammar's mask: a plain fill
      std::fill(w + base, w + base + len, -kInf);
      continue;
    }
    // a mixed word: a select per lane on the float's bits, with no branch (a grammar that
    // allows, say, every word-like token mixes the bits, and a branch per token would
    // mispredict on about half of them: measured 7x slower at half the vocabulary allowed)
    constexpr uint32_t kNegInfBits = 0xFF800000u;
    for (size_t j = 0; j < len; ++j) {
      uint32_t x;
      std::memcpy(&x, w + base + j, sizeof x);
      const uint32_t keep = 0u - ((bits >> j) & 1u);  // all ones for an allowed token
      x = (x & keep) | (kNegInfBits & ~keep);
      std::memcpy(w + base + j, &x, sizeof x);
    }
  }
  if (any == 0) throw SamplingError("the token mask allows no token");
}

void Sampler::fill_all_candidates() {
  const size_t n = work_.size();
  cands_.resize(n);
  for (size_t i = 0; i < n; ++i) cands_[i] = Candidate{static_cast<int32_t>(i), work_[i], 0.0f};
  sorted_ = false;
}

void Sampler::select_top_k(size_t k) {
  top_k_of_row(work_.data(), work_.size(), k, cands_);
  sorted_ = true;
}

void Sampler::sort_candidates() {
  if (!sorted_) std::sort(cands_.begin(), cands_.end(), better);
  sorted_ = true;
}

void Sampler::truncate_top_k(size_t k) {
  k = std::max<size_t>(k, 1);
  if (k >= cands_.size()) {
    sort_candidates();
    return;
  }
  if (!sorted_) std::partial_sort(cands_.begin(), cands_.begin() + k, cands_.end(), better);
  cands_.resize(k);
  sorted_ = true;
}

void Sampler::softmax() {
  float mx = -kInf;
  if (sorted_ && !cands_.empty()) {
    mx = cands_[0].logit;
  } else {
    for (const Candidate& c : cands_) mx = std::max(mx, c.logit);
  }
  if (cands_.empty() || mx == -kInf)
    throw SamplingError("no token can be sampled: every logit is -inf (all tokens banned)");
  if (mx == kInf) {
    // A tiny temperature can overflow the scaled logits: the +inf ones share all the mass.
    float cnt = 0.0f;
    for (const Candidate& c : cands_) cnt += c.logit == kInf ? 1.0f : 0.0f;
    for (Candidate& c : cands_) c.p = c.logit == kInf ? 1.0f / cnt : 0.0f;
    return;
  }
  // Gather the logits into a flat array so the exponentials run vectorized.
  const size_t n = cands_.size();
  std::vector<float>& e = scratch_e_;
  e.resize(2 * n);
  for (size_t i = 0; i < n; ++i) e[i] = cands_[i].logit;
  const double sum = exp_shifted(e.data(), mx, e.data() + n, n);
  const float inv = static_cast<float>(1.0 / sum);
  for (size_t i = 0; i < n; ++i) cands_[i].p = e[n + i] * inv;
}

void Sampler::apply_tail_free(float z) {
  const size_t n = cands_.size();
  if (n <= 2) return;
  sort_candidates();
  softmax();
  // Second differences of the sorted probabilities, absolute and normalized; cut where their
  // running sum passes z (the "tail" starts where the curve flattens).
  std::vector<float>& d2 = scratch_f_;
  d2.resize(n - 2);
  for (size_t i = 0; i + 2 < n; ++i) {
    const float d1a = cands_[i].p - cands_[i + 1].p;
    const float d1b = cands_[i + 1].p - cands_[i + 2].p;
    d2[i] = std::fabs(d1a - d1b);
  }
  float sum = 0.0f;
  for (float v : d2) sum += v;
  if (sum > 1e-6f) {
    for (float& v : d2) v /= sum;
  } else {
    for (float& v : d2) v = 1.0f / static_cast<float>(d2.size());
  }
  float cum = 0.0f;
  size_t last = n;
  for (size_t i = 0; i < d2.size(); ++i) {
    cum += d2[i];
    if (cum > z && i >= 1) {  // i >= min_keep
      last = i;
      break;
    }
  }
  cands_.resize(last);
}

void Sampler::apply_typical(float p) {
  softmax();
  // Surprise -log p_i = (max - l_i) + log Z, and log Z = -log p_max: no logarithm per token.
  const size_t n = cands_.size();
  float mx = -kInf;
  float p_max = 0.0f;
  for (const Candidate& c : cands_) {
    if (c.logit > mx) {
      mx = c.logit;
      p_max = c.p;
    }
  }
  const float log_z = -std::log(p_max);
  std::vector<float>& score = scratch_f_;
  score.resize(n);
  // Entropy of the candidates; 0 * log 0 is taken as 0 (banned tokens carry no mass).
  double entropy = 0.0;
  for (size_t i = 0; i < n; ++i) {
    score[i] = (mx - cands_[i].logit) + log_z;  // the surprise for now; +inf when banned
    if (cands_[i].p > 0.0f) entropy += static_cast<double>(cands_[i].p) * score[i];
  }
  const auto h = static_cast<float>(entropy);
  for (size_t i = 0; i < n; ++i) score[i] = std::fabs(score[i] - h);
  // Keep the tokens whose surprise is closest to the entropy until their mass exceeds p.
  std::vector<size_t>& idx = scratch_i_;
  idx.resize(n);
  std::iota(idx.begin(), idx.end(), size_t{0});
  auto less = [&](size_t a, size_t b) {
    return score[a] < score[b] || (score[a] == score[b] && better(cands_[a], cands_[b]));
  };
  // min_keep - 1 = 0: the first token always counts
  const size_t last = bucketed_mass_prefix(
      idx, [&](size_t i) { return score[i]; }, 32.0f, less,
      [&](size_t i) { return static_cast<double>(cands_[i].p); }, p, true);
  scratch_c_.resize(last);
  for (size_t i = 0; i < last; ++i) scratch_c_[i] = cands_[idx[i]];
  cands_.swap(scratch_c_);
  sorted_ = false;  // now in typicality order, not probability order
}

void Sampler::apply_top_p(float p) {
  softmax();
  if (sorted_) {
    double cum = 0.0;
    size_t last = cands_.size();
    for (size_t i = 0; i < cands_.size(); ++i) {
      cum += cands_[i].p;
      if (cum >= p) {
        last = i + 1;
        break;
      }
    }
    cands_.resize(last);
    return;
  }
  // Bucketed by distance below the best logit, which follows `better` order.
  float mx = -kInf;
  for (const Candidate& c : cands_) mx = std::max(mx, c.logit);
  const size_t last = bucketed_mass_prefix(
      cands_, [mx](const Candidate& c) { return mx - c.logit; }, 32.0f, better,
      [](const Candidate& c) { return static_cast<double>(c.p); }, p, false);
  cands_.resize(last);
  // The kept set is the right one but unordered; small sets are cheap to order for min-p.
  if (last <= 4096) {
    std::sort(cands_.begin(), cands_.end(), better);
    sorted_ = true;
  }
}

void Sampler::apply_min_p(float p) {
  // p_i >= p * p_max  <=>  logit_i >= logit_max + log(p): no exponentials needed.
  if (cands_.empty()) return;
  if (sorted_) {
    const float thr = cands_[0].logit + std::log(p);
    size_t i = 1;  // the best token always stays
    while (i < cands_.size() && cands_[i].logit >= thr) ++i;
    cands_.resize(i);
    return;
  }
  float mx = -kInf;
  for (const Candidate& c : cands_) mx = std::max(mx, c.logit);
  const float thr = mx + std::log(p);
  size_t out = 0;
  for (size_t i = 0; i < cands_.size(); ++i) {
    if (cands_[i].logit >= thr) cands_[out++] = cands_[i];
  }
  cands_.resize(out);
}

void Sampler::apply_temperature(float t) {
  if (t == 1.0f) return;
  for (Candidate& c : cands_) c.logit /= t;
}

void Sampler::mirostat_v1() {
  const float t = params_.temperature;
  const size_t n = work_.size();
  // s_hat only needs ratios of neighbouring probabilities, i.e. logit differences of the top m
  // tokens, so the full softmax llama.cpp computes is not needed: select the top m, estimate the
  // Zipf exponent, derive k, then select the top k.
  select_top_k(std::min<size_t>(kMirostatM, n));
  apply_temperature(t);
  double sum_tb = 0.0;
  double sum_tt = 0.0;
  for (size_t i = 0; i + 1 < static_cast<size_t>(kMirostatM) && i + 1 < cands_.size(); ++i) {
    const float next = cands_[i + 1].logit;
    if (next == -kInf) break;  // the rest have probability 0
    const double ti = std::log(static_cast<double>(i + 2) / static_cast<double>(i + 1));
    const double bi = static_cast<double>(cands_[i].logit) - next;  // log(p_i / p_{i+1})
    sum_tb += ti * bi;
    sum_tt += ti * ti;
  }
  double k = 1.0;
  if (sum_tt > 0.0) {
    const double s_hat = sum_tb / sum_tt;
    const double eps = s_hat - 1.0;
    const double nv = static_cast<double>(n_vocab_);
    // eps / (1 - N^-eps) -> 1 / ln N as eps -> 0
    const double frac = std::fabs(eps) < 1e-7 ? 1.0 / std::log(nv)
                                              : eps / (1.0 - std::pow(nv, -eps));
    k = std::pow(frac * std::pow(2.0, static_cast<double>(mu_)), 1.0 / s_hat);
  }
  size_t kk = n;
  if (k < static_cast<double>(n)) kk = std::max<size_t>(1, static_cast<size_t>(k));  // NaN -> n
  if (kk > cands_.size()) {
    // A large k (mu high, flat distribution): an unordered O(n) selection is enough to draw.
    fill_all_candidates();
    if (kk < n) {
      std::nth_element(cands_.begin(), cands_.begin() + static_cast<std::ptrdiff_t>(kk),
                       cands_.end(), better);
      cands_.resize(kk);
    }
    apply_temperature(t);
  } else {
    cands_.resize(kk);
  }
  softmax();
}

void Sampler::mirostat_v2() {
  const float t = params_.temperature;
  // Keep tokens whose surprise -log2 p is at most mu: p >= 2^-mu, i.e. in logits
  // l >= max + log Z - mu ln 2, computed over the whole (temperature-scaled) vocabulary.
  const size_t n = work_.size();
  for (size_t i = 0; i < n; ++i) work_[i] /= t;
  const float mx = row_max(work_.data(), n);
  if (mx == -kInf)
    throw SamplingError("no token can be sampled: every logit is -inf (all tokens banned)");
  if (mx == kInf) {
    fill_all_candidates();
    softmax();
    return;
  }
  // e_i = exp(l_i - max) once; the survivors' probabilities reuse them.
  std::vector<float>& e = scratch_f_;
  e.resize(n);
  const double z = exp_shifted(work_.data(), mx, e.data(), n);
  const double thr = mx + std::log(z) - static_cast<double>(mu_) * std::log(2.0);
  cands_.clear();
  double kept = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (static_cast<double>(work_[i]) >= thr) {
      cands_.push_back(Candidate{static_cast<int32_t>(i), work_[i], e[i]});
      kept += e[i];
    }
  }
  if (cands_.empty()) {  // always keep the most probable token (the lowest id among equals)
    const auto best = static_cast<size_t>(std::find(work_.begin(), work_.end(), mx) -
                                          work_.begin());
    cands_.push_back(Candidate{static_cast<int32_t>(best), mx, 1.0f});
    kept = 1.0;
  }
  const auto inv = static_cast<float>(1.0 / kept);
  for (Candidate& c : cands_) c.p *= inv;
  sorted_ = false;
}

void Sampler::build_distribution() {
  const SamplerParams& p = params_;
  if (p.temperature == 0.0f) {
    // Vectorized max, then the first index holding it: ties keep the lowest id.
    const float mx = row_max(work_.data(), work_.size());
    const size_t best = static_cast<size_t>(
        std::find(work_.begin(), work_.end(), mx) - work_.begin());
    if (work_[best] == -kInf)
      throw SamplingError("no token can be sampled: every logit is -inf (all tokens banned)");
    cands_.assign(1, Candidate{static_cast<int32_t>(best), work_[best], 1.0f});
    sorted_ = true;
    return;
  }
  if (p.mirostat == 1) {
    mirostat_v1();
    return;
  }
  if (p.mirostat == 2) {
    mirostat_v2();
    return;
  }
  const size_t n = work_.size();
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < n) {
    select_top_k(static_cast<size_t>(p.top_k));
  } else {
    fill_all_candidates();
  }
  if (p.tfs_z < 1.0f) apply_tail_free(p.tfs_z);
  if (p.typical_p < 1.0f) apply_typical(p.typical_p);
  if (p.top_p < 1.0f) apply_top_p(p.top_p);
  if (p.min_p > 0.0f) apply_min_p(p.min_p);
  apply_temperature(p.temperature);
  softmax();
}

int32_t Sampler::draw_index() {
  double total = 0.0;
  for (const Candidate& c : cands_) total += c.p;
  // One 32-bit draw mapped to [0, 1): portable, unlike std::*_distribution whose algorithms
  // differ between standard libraries (same seed must give the same text everywhere).
  const double u = static_cast<double>(rng_()) * (1.0 / 4294967296.0);
  const double target = u * total;
  double cum = 0.0;
  for (size_t i = 0; i < cands_.size(); ++i) {
    cum += cands_[i].p;
    if (target < cum) return static_cast<int32_t>(i);
  }
  for (size_t i = cands_.size(); i-- > 0;) {  // rounding at the very end of the range
    if (cands_[i].p > 0.0f) return static_cast<int32_t>(i);
  }
  return 0;
}

void Sampler::after_draw(size_t idx) {
  if (params_.temperature == 0.0f || params_.mirostat == 0) return;
  // Move mu against the error between the observed surprise and the target tau.
  const float surprise = -std::log2(cands_[idx].p);
  mu_ -= params_.mirostat_eta * (surprise - params_.mirostat_tau);
}

int32_t Sampler::sample(const float* logits, size_t n, const uint32_t* mask) {
  prepare(logits, n, mask);
  build_distribution();
  const auto idx = static_cast<size_t>(draw_index());
  after_draw(idx);
  return cands_[idx].id;
}

SampleInfo Sampler::sample_with_info(const float* logits, size_t n, size_t top_n,
                                     const uint32_t* mask) {
  SampleInfo info;
  prepare(logits, n, mask);
  build_distribution();
  const auto idx = static_cast<size_t>(draw_index());
  after_draw(idx);
  info.token = cands_[idx].id;
  info.sampled_logprob = std::log(cands_[idx].p);
  const size_t m = std::min(top_n, cands_.size());
  if (m > 0) {
    auto by_p = [](const Candidate& a, const Candidate& b) {
      return a.p > b.p || (a.p == b.p && a.id < b.id);
    };
    scratch_c_ = cands_;
    std::partial_sort(scratch_c_.begin(), scratch_c_.begin() + m, scratch_c_.end(), by_p);
    for (size_t i = 0; i < m; ++i)
      info.sampled_top.emplace_back(scratch_c_[i].id, std::log(scratch_c_[i].p));
  }
  auto raw = raw_logprobs(logits, n, info.token, top_n);
  info.logprob = raw.first;
  info.top = std::move(raw.second);
  return info;
}

std::vector<Candidate> Sampler::candidates(const float* logits, size_t n,
                                           const uint32_t* mask) {
  prepare(logits, n, mask);
  build_distribution();
  std::vector<Candidate> out = cands_;
  std::sort(out.begin(), out.end(), [](const Candidate& a, const Candidate& b) {
    return a.p > b.p || (a.p == b.p && a.id < b.id);
  });
  return out;
}

std::pair<float, TopLogprobs> raw_logprobs(const float* logits, size_t n, int32_t token,
                                           size_t top_n) {
  if (n == 0) throw SamplingError("logits are empty");
  if (token >= 0 && static_cast<size_t>(token) >= n)
    throw SamplingError("token " + std::to_string(token) + " is outside the logits row");
  check_row(logits, n);
  const float mx = row_max(logits, n);
  if (mx == -kInf) throw SamplingError("every logit is -inf");
  std::vector<float> e(n);
  const double z = exp_shifted(logits, mx, e.data(), n);
  const float lse = mx + static_cast<float>(std::log(z));
  std::pair<float, TopLogprobs> out;
  out.first = token >= 0 ? logits[token] - lse : 0.0f;
  if (top_n > 0) {
    std::vector<Candidate> top;
    top_k_of_row(logits, n, top_n, top);
    for (const Candidate& c : top) out.second.emplace_back(c.id, c.logit - lse);
  }
  return out;
}

}  // namespace pyllm
