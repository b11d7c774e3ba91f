// Context: the public face of a loaded model's inference state. It owns the per-sequence
// positions (n_past) and validates every call before any state changes; the work is done by
//   model/forward.{h,cc}              the forward pass (embed, layer loop, output)
//   model/attention_schedule.{h,cc}   attention grids and their split across threads
//   model/kv_cache.{h,cc}             K/V storage and the saved-state format
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/forward.h"
#include "model/kv_cache.h"
#include "pyllm/model.h"
#include "pyllm/ops.h"

namespace pyllm {

struct Context::Impl {
  KVCache kv;
  Forward forward;  // reads and appends to kv
  // Per-call bookkeeping, kept here so a decode step allocates nothing once warmed up.
  std::vector<int> pos, added, rows;
  std::vector<int32_t> seq;
  std::vector<uint8_t> want;

  Impl(const Model& m, const ContextParams& p) : kv(m.hparams(), p), forward(m, p, kv) {}
};

Context::Context(std::shared_ptr<const Model> model, const ContextParams& params)
    : model_(std::move(model)), params_(params) {
  if (!model_) throw std::invalid_argument("Context needs a model");
  if (params_.n_ctx <= 0 || params_.n_ctx > (1 << 24)) {
    throw std::invalid_argument("n_ctx must be in 1..16777216");
  }
  if (params_.n_seq <= 0 || params_.n_seq > 1024) throw std::invalid_argument("n_seq must be in 1..1024");
  if (params_.n_batch <= 0) throw std::invalid_argument("n_batch must be positive");
  params_.n_batch = std::min<int64_t>(params_.n_batch, int64_t(params_.n_ctx) * params_.n_seq);
  if (params_.kv_type == KVType::Q8_0 && model_->hparams().head_dim % QK8_0) {
    throw std::invalid_argument("a Q8_0 KV cache needs a head size that is a multiple of 32");
  }
  n_past_.assign(params_.n_seq, 0);
  impl_ = std::make_unique<Impl>(*model_, params_);
}

Context::~Context() = default;

int Context::n_threads() const { return impl_->forward.n_threads(); }

int Context::seq_n_past(int seq) const {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  return n_past_[seq];
}

void Context::seq_truncate(int seq, int n) {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  if (n < 0 || n > n_past_[seq]) throw std::out_of_range("truncate: position out of range");
  n_past_[seq] = n;
}

void Context::decode(const int32_t* tokens, int64_t n, float* logits, bool all_logits) {
  if (n <= 0) throw std::invalid_argument("decode: no tokens");
  std::vector<int32_t>& seq = impl_->seq;
  std::vector<uint8_t>& want = impl_->want;
  seq.assign(n, 0);
  want.assign(n, all_logits ? 1 : 0);
  if (!all_logits) want[n - 1] = logits ? 1 : 0;
  if (!logits) std::fill(want.begin(), want.end(), 0);
  decode_batch(tokens, seq.data(), n, want.data(), logits);
}

int64_t Context::decode_batch(const int32_t* tokens, const int32_t* seq, int64_t n,
                              const uint8_t* want_logits, float* logits) {
  const HParams& hp = model_->hparams();
  if (n <= 0) throw std::invalid_argument("decode: no tokens");
  // Validate everything and assign positions before touching any state.
  std::vector<int>& added = impl_->added;
  std::vector<int>& pos = impl_->pos;
  added.assign(params_.n_seq, 0);
  pos.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= hp.n_vocab) {
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) +
                                  " is outside the vocabulary (n_vocab " +
                                  std::to_string(hp.n_vocab) + ")");
    }
    if (seq[i] < 0 || seq[i] >= params_.n_seq) {
      throw std::invalid_argument("sequence id " + std::to_string(seq[i]) + " out of range");
    }
    pos[i] = n_past_[seq[i]] + added[seq[i]]++;
  }
  for (int s = 0; s < params_.n_seq; ++s) {
    if (added[s] > params_.n_ctx - n_past_[s]) {
      throw std::out_of_range("context is full: " + std::to_string(n_past_[s]) + " cached + " +
                              std::to_string(added[s]) + " new tokens > n_ctx " +
                              std::to_string(params_.n_ctx));
    }
  }
  int seq_len = 0;
  for (int64_t i = 0; i < n; ++i) seq_len = std::max(seq_len, pos[i] + 1);

  int64_t rows_out = 0;
  std::vector<int>& rows = impl_->rows;
  for (int64_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min<int64_t>(params_.n_batch, n - done));
    impl_->forward.chunk(tokens + done, pos.data() + done, seq + done, chunk, seq_len);
    rows.clear();
    for (int t = 0; t < chunk; ++t) {
      if (want_logits && want_logits[done + t]) rows.push_back(t);
    }
    if (!rows.empty() && logits) {
      // output() scores at most n_batch rows at a time through the scratch buffers
      impl_->forward.output(rows.data(), static_cast<int>(rows.size()),
                            logits + rows_out * hp.n_vocab);
      rows_out += static_cast<int64_t>(rows.size());
    }
    done += chunk;
  }
  for (int s = 0; s < params_.n_seq; ++s) n_past_[s] += added[s];
  return rows_out;
}

void Context::embed(const int32_t* tokens, int64_t n, int seq, float* out) {
  const HParams& hp = model_->hparams();
  if (n <= 0) throw std::invalid_argument("embed: no tokens");
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  if (n > params_.n_ctx) {
    throw std::out_of_range("embed: " + std::to_string(n) + " tokens > n_ctx " +
                            std::to_string(params_.n_ctx));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= hp.n_vocab) {
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) +
                                  " is outside the vocabulary");
    }
  }
  const int64_t d = hp.n_embd;
  const OpsTable& op = ops();
  const float* norm = static_cast<const float*>(model_->weights().output_norm.data);
  std::vector<double> acc(d, 0.0);
  std::vector<float> row(d);
  n_past_[seq] = 0;
  for (int64_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min<int64_t>(params_.n_batch, n - done));
    std::vector<int> pos(chunk), seqs(chunk, seq);
    for (int t = 0; t < chunk; ++t) pos[t] = static_cast<int>(done + t);
    impl_->forward.chunk(tokens + done, pos.data(), seqs.data(), chunk, static_cast<int>(n));
    for (int t = 0; t < chunk; ++t) {
      op.rms_norm(impl_->forward.hidden() + t * d, norm, row.data(), d, hp.rms_eps);
      for (int64_t i = 0; i < d; ++i) acc[i] += row[i];
    }
    done += chunk;
  }
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(acc[i] / static_cast<double>(n));
  n_past_[seq] = 0;
}

std::vector<uint8_t> Context::save_state() const { return impl_->kv.save(n_past_[0]); }

void Context::load_state(const uint8_t* data, int64_t size) {
  n_past_[0] = impl_->kv.load(data, size);
}

}  // namespace pyllm
