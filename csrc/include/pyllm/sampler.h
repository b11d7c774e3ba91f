// The token sampler: a llama.cpp-compatible chain applied to one row of float32 logits.
//
// Chain (llama.cpp common/sampling order):
//   logit bias -> repetition / presence / frequency penalties over the last `repeat_last_n`
//   accepted tokens -> then one of
//     temperature == 0   greedy argmax (ties -> lowest id); the filters are skipped
//     mirostat 1 / 2     temperature, then mirostat (its own state mu, reset by reset())
//     otherwise          top-k, tail-free (tfs_z), typical-p, top-p, min-p, temperature, draw
// A filter at its neutral value (top_k 0, tfs_z 1, typical_p 1, top_p 1, min_p 0) is skipped.
// Every filter keeps at least one token.
//
// The Sampler is not thread-safe; one per generation stream. It owns scratch buffers so a call
// allocates nothing once warm, and it never sorts the whole vocabulary except for tail-free
// sampling without top-k: top-k is a bounded-heap selection, top-p / typical-p a mass histogram
// plus a weighted quickselect of one bucket (expected O(n)), softmax exponentials are vectorized.
//
// Differences from llama.cpp, on purpose: ties are broken by the lower token id everywhere
// (llama.cpp leaves them to std::sort), min_keep is 1, the penalties also apply under mirostat
// (as in llama.cpp before the sampler chain rework), and the RNG stream differs (one 32-bit
// mt19937 draw per token mapped to [0, 1), portable across standard libraries).
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pyllm {

// Bad parameters, a bad token id, or logits that cannot be sampled (NaN, +inf, all banned).
// The bindings translate it to pyllm.errors.SamplingError.
class SamplingError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct SamplerParams {
  float temperature = 0.8f;
  int32_t top_k = 40;            // 0 = off
  float top_p = 0.95f;           // 1 = off
  float min_p = 0.05f;           // 0 = off
  float typical_p = 1.0f;        // 1 = off
  float tfs_z = 1.0f;            // 1 = off
  float repeat_penalty = 1.0f;   // 1 = off
  int32_t repeat_last_n = 64;    // 0 = penalties off, -1 = every token accepted since reset()
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t mirostat = 0;          // 0 = off, 1 = mirostat, 2 = mirostat v2
  float mirostat_tau = 5.0f;
  float mirostat_eta = 0.1f;
  std::vector<std::pair<int32_t, float>> logit_bias;  // (token, bias); -inf bans the token
  int64_t seed = -1;             // -1 = a random seed (a fresh one at every reset())
};

// One surviving candidate: token id, its (modified) logit and its probability.
struct Candidate {
  int32_t id;
  float logit;
  float p;
};

// (token id, log probability) pairs, most probable first.
using TopLogprobs = std::vector<std::pair<int32_t, float>>;

struct SampleInfo {
  int32_t token = -1;
  // Log-probability of `token` under log_softmax of the RAW logits (what the OpenAI API reports
  // as logprobs), and the top_n tokens of that raw distribution.
  float logprob = 0.0f;
  TopLogprobs top;
  // The same for the distribution the token was actually drawn from (after bias, penalties,
  // filters and temperature; greedy = a single token with log-probability 0).
  float sampled_logprob = 0.0f;
  TopLogprobs sampled_top;
};

// Throws SamplingError unless every parameter is in range (see the Python SamplingParams).
void validate_sampler_params(const SamplerParams& p, int32_t n_vocab);

class Sampler {
 public:
  Sampler(SamplerParams params, int32_t n_vocab);

  // Draws a token from `logits` (n == n_vocab). Does not record it: call accept() with the token
  // that is actually kept (the penalties only see accepted tokens).
  // `mask` (optional, ceil(n / 32) words) allows token t iff bit t % 32 of word t / 32 is set:
  // the others are dropped before the chain, as a grammar requires (constrained decoding).
  int32_t sample(const float* logits, size_t n, const uint32_t* mask = nullptr);
  // sample() plus log-probabilities for OpenAI logprobs / top_logprobs (top_n may be 0). The
  // raw log-probabilities are the model's, before the mask; the sampled ones are after it.
  SampleInfo sample_with_info(const float* logits, size_t n, size_t top_n,
                              const uint32_t* mask = nullptr);
  // The chain without the draw: surviving candidates, most probable first, with their final
  // probabilities. Leaves the RNG and mirostat's mu untouched (for tests and inspection).
  std::vector<Candidate> candidates(const float* logits, size_t n,
                                    const uint32_t* mask = nullptr);

  void accept(int32_t token);
  // Clears the penalty history, sets mu to 2 * tau and re-seeds the RNG (a fixed seed gives the
  // same stream again; seed -1 draws a new random seed).
  void reset();

  const SamplerParams& params() const { return params_; }
  int32_t n_vocab() const { return n_vocab_; }
  uint32_t seed() const { return seed_cur_; }
  float mu() const { return mu_; }
  size_t history_size() const { return history_len_; }

 private:
  bool penalties_active() const;
  // work_ = logits + bias + penalties, masked
  void prepare(const float* logits, size_t n, const uint32_t* mask);
  void apply_mask(const uint32_t* mask);
  void build_distribution();                          // cands_ = final candidates with p
  int32_t draw_index();                               // one draw from cands_ by p
  void after_draw(size_t idx);                        // mirostat mu update

  void fill_all_candidates();
  void select_top_k(size_t k);                        // from work_: cands_ = top k, sorted
  void truncate_top_k(size_t k);                      // cands_ -> its top k, sorted
  void sort_candidates();
  void softmax();                                     // cands_[i].p, normalized
  void apply_tail_free(float z);
  void apply_typical(float p);
  void apply_top_p(float p);
  void apply_min_p(float p);
  void apply_temperature(float t);
  void mirostat_v1();
  void mirostat_v2();

  SamplerParams params_;
  int32_t n_vocab_;
  std::mt19937 rng_;
  uint32_t seed_cur_ = 0;
  float mu_ = 0.0f;

  // Penalty history: a ring of the last repeat_last_n accepted tokens (unbounded for -1) and the
  // count of each token inside it, updated on accept so sampling costs O(window), not O(vocab).
  std::vector<int32_t> history_;
  size_t history_head_ = 0;
  size_t history_len_ = 0;
  std::vector<int32_t> counts_;
  std::vector<uint32_t> seen_stamp_;
  uint32_t stamp_ = 0;

  std::vector<float> work_;
  std::vector<Candidate> cands_;
  bool sorted_ = false;
  std::vector<float> scratch_f_;
  std::vector<size_t> scratch_i_;
  std::vector<Candidate> scratch_c_;
  std::vector<float> scratch_e_;  // softmax: gathered logits, then their exponentials
};

// log_softmax of raw logits: the log-probability of `token` (ignored when < 0) and the top_n
// tokens, most probable first.
std::pair<float, TopLogprobs> raw_logprobs(const float* logits, size_t n, int32_t token,
                                           size_t top_n);

}  // namespace pyllm
