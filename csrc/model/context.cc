// Context: the public face of a loaded model's inference state. It owns the per-sequence
// positions (n_past) and validates every call before any state changes. Each chunk of tokens is
// planned here on the host (RoPE angles, model/rope.h; which keys each token sees and where its
// K/V rows go, model/attention_schedule.h), embedded into host rows of hidden state, and run
// through the stages of the model's placement (model/placement.h) in layer order; the stage
// with the head writes the logits. The stages are the backends' (csrc/backend/backend.h), e.g.
// the CPU's in csrc/cpu/stage.h, each with the K/V storage of its layers. LoRA adapters
// (pyllm/lora.h) are the context's too: each sequence's mix becomes, per chunk, the
// coefficient of every adapter for every token, which the stages apply. In a layer pipeline
// (remote placement ranges) a context runs only this process's stages: decode_part takes the
// chunk as hidden rows from the process before and/or hands its rows on to the next.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "cpu/ops.h"
#include "cpu/scratch.h"
#include "model/attention_schedule.h"
#include "model/embedding_file.h"
#include "model/placement.h"
#include "model/rope.h"
#include "pyllm/model.h"
#include "pyllm/quant.h"

namespace pyllm {

struct Context::Impl {
  const Model& model;
  RopeTable rope;
  AttentionSchedule schedule;
  std::vector<float> rope_buf;                       // chunk plan
  ScratchBuf hidden;                                 // [n_batch][n_embd] rows
  std::vector<uint8_t> row_buf;  // an embedding row read from the file (Model::embedding_file)
  std::vector<std::unique_ptr<Device>> devices;      // one per backend the placement names
  std::vector<std::unique_ptr<Stage>> stages;        // in layer order; the last has the head
  // Per-call bookkeeping, kept here so a decode step allocates nothing once warmed up.
  std::vector<int> pos, added, rows;
  std::vector<int32_t> seq;
  std::vector<uint8_t> want;
  LoraChunk lora;  // the adapters of the current chunk's tokens
  std::unique_ptr<ActivationStats> stats;  // importance-matrix statistics, once collected
  bool collecting = false;
  // Whether this process embeds the tokens (the first range is not remote) and holds the head
  // (the last range is not remote); see model/placement.h.
  bool embeds = true, head = true;

  Impl(const Model& m, const ContextParams& p)
      : model(m),
        rope(m.hparams(), m.weights().rope_freqs.present()
                              ? static_cast<const float*>(m.weights().rope_freqs.data)
                              : nullptr) {
    hidden.resize(static_cast<size_t>(p.n_batch) * m.hparams().n_embd);
    const std::vector<PlacedLayers>& placement = m.placement();
    embeds = !is_remote(placement.front());
    head = !is_remote(placement.back());
    for (size_t i = 0; i < placement.size(); ++i) {
      const PlacedLayers& r = placement[i];
      if (is_remote(r)) continue;  // another process runs these layers
      Device* dev = nullptr;
      for (auto& d : devices) {
        if (r.backend == d->name()) dev = d.get();
      }
      if (!dev) {
        devices.push_back(find_backend(r.backend).open(m, p));
        dev = devices.back().get();
      }
      stages.push_back(dev->make_stage({r.first, r.last, i + 1 == placement.size()}));
    }
  }

  // This process's layers over one chunk (n <= n_batch): token t at position pos[t] of
  // sequence seq[t], embedded from tokens[t] or, when the first range is remote, given as row t
  // of `in` ([n][n_embd]); leaves the hidden states after the local layers (on the head's
  // process the final ones, before the output norm) in `hidden`.
  void chunk(const int32_t* tokens, const float* in, const int* pos, const int* seq, int n,
             int seq_len, int n_ctx,
             const std::vector<std::shared_ptr<const LoraAdapter>>& adapters,
             const std::vector<LoraMix>& mixes) {
    const HParams& hp = model.hparams();
    if (in != nullptr) {
      std::memcpy(hidden.data(), in, sizeof(float) * static_cast<size_t>(n) * hp.n_embd);
    } else {
      embed(tokens, n);
    }
    rope.fill_positions(pos, n, seq_len, rope_buf);
    schedule.plan(pos, seq, n, n_ctx, hp.n_head, hp.n_head_kv);
    plan_lora(seq, n, adapters, mixes);
    const Chunk c{n, pos, seq, rope_buf.data(), &schedule, lora.empty() ? nullptr : &lora};
    for (auto& s : stages) s->run_layers(c, hidden.data());
  }

  // Each adapter any token of the chunk uses, with every token's coefficient (its sequence's
  // scale for it, summed if the mix names it twice).
  void plan_lora(const int* seq, int n,
                 const std::vector<std::shared_ptr<const LoraAdapter>>& adapters,
                 const std::vector<LoraMix>& mixes) {
    lora.adapters.clear();
    lora.deltas = false;
    lora.n = n;
    lora.coef.clear();
    for (size_t a = 0; a < adapters.size(); ++a) {
      bool used = false;
      for (int t = 0; t < n && !used; ++t) {
        for (const auto& [id, scale] : mixes[static_cast<size_t>(seq[t])]) {
          if (id == static_cast<int>(a) && scale != 0.0f) used = true;
        }
      }
      if (!used) continue;
      const size_t base = lora.coef.size();
      lora.coef.resize(base + static_cast<size_t>(n), 0.0f);
      for (int t = 0; t < n; ++t) {
        for (const auto& [id, scale] : mixes[static_cast<size_t>(seq[t])]) {
          if (id == static_cast<int>(a)) lora.coef[base + static_cast<size_t>(t)] += scale;
        }
      }
      lora.adapters.push_back(adapters[a].get());
      lora.deltas = lora.deltas || adapters[a]->has_deltas();
    }
  }

  // One row of the embedding table per token, dequantized into `hidden`.
  void embed(const int32_t* tokens, int n) {
    const WeightView& emb = model.weights().tok_embd;
    const int64_t d = model.hparams().n_embd;
    const TypeTraits& et = type_traits(emb.type);
    const int64_t erow = row_size(emb.type, d);
    const EmbeddingFile* file = model.embedding_file();
    if (file != nullptr) row_buf.resize(static_cast<size_t>(erow));
    for (int t = 0; t < n; ++t) {
      const uint8_t* row = static_cast<const uint8_t*>(emb.data) + erow * tokens[t];
      if (file != nullptr && file->read(tokens[t], row_buf.data())) row = row_buf.data();
      et.to_float(row, hidden.data() + t * d, d);
    }
  }
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
  lora_mix_.assign(params_.n_seq, {});
  impl_ = std::make_unique<Impl>(*model_, params_);
}

void Context::set_lora_adapters(std::vector<std::shared_ptr<const LoraAdapter>> adapters) {
  for (const auto& a : adapters) {
    if (!a) throw std::invalid_argument("set_lora_adapters: null adapter");
    if (a->n_layer() != model_->hparams().n_layer) {
      throw std::invalid_argument("a LoRA adapter for " + std::to_string(a->n_layer()) +
                                  " layers, the model has " +
                                  std::to_string(model_->hparams().n_layer));
    }
    a->check(model_->hparams());
  }
  // each stage takes the new adapters; if one cannot, every stage goes back to the old ones
  try {
    for (auto& s : impl_->stages) s->set_lora_adapters(adapters);
  } catch (...) {
    for (auto& s : impl_->stages) s->set_lora_adapters(lora_);
    throw;
  }
  lora_ = std::move(adapters);
  lora_mix_.assign(params_.n_seq, {});
}

void Context::collect_activation_stats(bool on) {
  if (!on) {
    for (auto& s : impl_->stages) s->set_activation_stats(nullptr);
    impl_->collecting = false;
    return;
  }
  auto fresh = std::make_unique<ActivationStats>(model_->hparams());
  try {
    for (auto& s : impl_->stages) s->set_activation_stats(fresh.get());
  } catch (...) {
    for (auto& s : impl_->stages) s->set_activation_stats(nullptr);
    impl_->collecting = false;
    throw;
  }
  impl_->stats = std::move(fresh);
  impl_->collecting = true;
}

const ActivationStats* Context::activation_stats() const { return impl_->stats.get(); }

bool Context::collecting_activation_stats() const { return impl_->collecting; }

void Context::seq_set_lora(int seq, const LoraMix& mix) {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  for (const auto& [id, scale] : mix) {
    if (id < 0 || id >= static_cast<int>(lora_.size())) {
      throw std::invalid_argument("LoRA adapter index " + std::to_string(id) + " out of range (" +
                                  std::to_string(lora_.size()) + " adapters)");
    }
    if (!std::isfinite(scale)) throw std::invalid_argument("LoRA scale must be finite");
  }
  lora_mix_[static_cast<size_t>(seq)] = mix;
}

const LoraMix& Context::seq_lora(int seq) const {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  return lora_mix_[static_cast<size_t>(seq)];
}

Context::~Context() = default;

// The CPU pool's threads (0 when no layer runs on the CPU).
int Context::n_threads() const {
  for (const auto& d : impl_->devices) {
    if (d->n_threads() > 0) return d->n_threads();
  }
  return 0;
}

int Context::seq_n_past(int seq) const {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  return n_past_[seq];
}

void Context::seq_truncate(int seq, int n) {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  if (n < 0 || n > n_past_[seq]) throw std::out_of_range("truncate: position out of range");
  n_past_[seq] = n;
}

void Context::seq_shift(int seq, int keep, int n_discard) {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  const int n_past = n_past_[seq];
  if (keep < 0 || n_discard < 1 || keep + n_discard > n_past) {
    throw std::out_of_range("shift: keep " + std::to_string(keep) + " + discard " +
                            std::to_string(n_discard) + " must be within the " +
                            std::to_string(n_past) + " cached positions (discard >= 1)");
  }
  if (!impl_->rope.linear_in_position()) {
    throw std::invalid_argument("this model's RoPE scaling (dynamic NTK) changes every angle "
                                "with the sequence length, so cached keys cannot be moved to "
                                "other positions exactly: no context shift");
  }
  for (const auto& s : impl_->stages) {
    if (!s->can_shift_kv()) {
      throw DeviceError("the context shift moves K/V rows on the CPU only: place every layer "
                        "on the CPU (no -ngl) to use it");
    }
  }
  std::vector<float> rot;
  impl_->rope.rotation(-n_discard, rot);
  for (auto& s : impl_->stages) s->shift_kv(seq, keep, n_discard, n_past, rot.data());
  n_past_[seq] = n_past - n_discard;
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
  if (!impl_->embeds || !impl_->head) {
    throw std::invalid_argument("this context's model runs some layers in another process "
                                "(a remote placement range): use decode_part");
  }
  return decode_part(tokens, nullptr, seq, n, want_logits, logits, 0);
}

void Context::assign_positions(const int32_t* tokens, const int32_t* seq, int64_t n,
                               std::vector<int>& pos, std::vector<int>& added) const {
  const HParams& hp = model_->hparams();
  if (n <= 0) throw std::invalid_argument("decode: no tokens");
  added.assign(params_.n_seq, 0);
  pos.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    if (tokens && (tokens[i] < 0 || tokens[i] >= hp.n_vocab)) {
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
}

void Context::check_batch(const int32_t* tokens, const int32_t* seq, int64_t n) const {
  std::vector<int> pos, added;
  assign_positions(tokens, seq, n, pos, added);
}

int64_t Context::decode_part(const int32_t* tokens, const float* in, const int32_t* seq,
                             int64_t n, const uint8_t* want_logits, float* out,
                             int min_seq_len) {
  const HParams& hp = model_->hparams();
  if ((in != nullptr) == impl_->embeds || (tokens == nullptr) == impl_->embeds) {
    throw std::invalid_argument(impl_->embeds ? "decode_part: this process embeds the tokens: "
                                                "give tokens, not hidden rows"
                                              : "decode_part: the first layers run in another "
                                                "process: give their hidden rows, not tokens");
  }
  // Validate everything and assign positions before touching any state.
  std::vector<int>& added = impl_->added;
  std::vector<int>& pos = impl_->pos;
  assign_positions(tokens, seq, n, pos, added);
  int seq_len = std::max(0, min_seq_len);
  for (int64_t i = 0; i < n; ++i) seq_len = std::max(seq_len, pos[i] + 1);

  const int64_t d = hp.n_embd;
  int64_t rows_out = 0;
  std::vector<int>& rows = impl_->rows;
  for (int64_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min<int64_t>(params_.n_batch, n - done));
    impl_->chunk(tokens ? tokens + done : nullptr, in ? in + done * d : nullptr,
                 pos.data() + done, seq + done, chunk, seq_len, params_.n_ctx, lora_, lora_mix_);
    if (!impl_->head) {
      // the chunk goes on to the process with the next layers as hidden rows
      if (out) std::memcpy(out + done * d, impl_->hidden.data(), sizeof(float) * chunk * d);
      rows_out += chunk;
      done += chunk;
      continue;
    }
    rows.clear();
    for (int t = 0; t < chunk; ++t) {
      if (want_logits && want_logits[done + t]) rows.push_back(t);
    }
    if (!rows.empty() && out) {
      // output() scores at most n_batch rows at a time through the scratch buffers
      impl_->stages.back()->output(impl_->hidden.data(), rows.data(),
                                   static_cast<int>(rows.size()), out + rows_out * hp.n_vocab,
                                   impl_->lora.empty() ? nullptr : &impl_->lora);
      rows_out += static_cast<int64_t>(rows.size());
    }
    done += chunk;
  }
  for (int s = 0; s < params_.n_seq; ++s) n_past_[s] += added[s];
  return rows_out;
}

bool Context::embeds_tokens() const { return impl_->embeds; }

bool Context::has_head() const { return impl_->head; }

void Context::embed(const int32_t* tokens, int64_t n, int seq, float* out) {
  const HParams& hp = model_->hparams();
  if (n <= 0) throw std::invalid_argument("embed: no tokens");
  if (!impl_->embeds || !impl_->head) {
    throw std::invalid_argument("embeddings need every layer in this process (not with a layer "
                                "pipeline over MPI)");
  }
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
  // the sequence's adapters' output-norm deltas, as a merged model holds them
  std::vector<float> norm_w;
  for (const auto& [id, scale] : lora_mix_[static_cast<size_t>(seq)]) {
    const std::vector<float>* delta =
        lora_[static_cast<size_t>(id)]->delta(0, DeltaSlot::OutputNorm);
    if (delta == nullptr || scale == 0.0f) continue;
    if (norm_w.empty()) norm_w.assign(norm, norm + d);
    for (int64_t i = 0; i < d; ++i) norm_w[i] += scale * (*delta)[static_cast<size_t>(i)];
  }
  if (!norm_w.empty()) norm = norm_w.data();
  std::vector<double> acc(d, 0.0);
  std::vector<float> row(d);
  n_past_[seq] = 0;
  for (int64_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min<int64_t>(params_.n_batch, n - done));
    std::vector<int> pos(chunk), seqs(chunk, seq);
    for (int t = 0; t < chunk; ++t) pos[t] = static_cast<int>(done + t);
    impl_->chunk(tokens + done, nullptr, pos.data(), seqs.data(), chunk, static_cast<int>(n),
                 params_.n_ctx, lora_, lora_mix_);
    for (int t = 0; t < chunk; ++t) {
      op.rms_norm(impl_->hidden.data() + t * d, norm, row.data(), d, hp.rms_eps);
      for (int64_t i = 0; i < d; ++i) acc[i] += row[i];
    }
    done += chunk;
  }
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(acc[i] / static_cast<double>(n));
  n_past_[seq] = 0;
}

namespace {
// The saved state: this header, then each stage's part in layer order (per layer, the K then
// the V rows of positions [0, n_past) of sequence 0, in the cache's element type).
constexpr int32_t kStateMagic = 0x504c4c4d;  // "MLLP"
struct StateHeader {
  int32_t magic, n_past, n_layer, kv_dim, kv_type;
};
}  // namespace

int64_t Context::state_header_bytes() { return sizeof(StateHeader); }

std::vector<uint8_t> Context::save_state(int seq) const {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  const HParams& hp = model_->hparams();
  const int n_past = n_past_[seq];
  const StateHeader h{kStateMagic, n_past, hp.n_layer, hp.n_head_kv * hp.head_dim,
                      static_cast<int32_t>(kv_element_type(params_.kv_type))};
  int64_t size = sizeof h;
  for (const auto& s : impl_->stages) size += s->state_bytes(n_past);
  std::vector<uint8_t> out(size);
  std::memcpy(out.data(), &h, sizeof h);
  uint8_t* p = out.data() + sizeof h;
  for (const auto& s : impl_->stages) {
    s->save_state(seq, n_past, p);
    p += s->state_bytes(n_past);
  }
  return out;
}

void Context::load_state(const uint8_t* data, int64_t size, int seq) {
  if (seq < 0 || seq >= params_.n_seq) throw std::out_of_range("sequence id out of range");
  const HParams& hp = model_->hparams();
  StateHeader h;
  if (size < static_cast<int64_t>(sizeof h)) throw std::invalid_argument("state is too short");
  std::memcpy(&h, data, sizeof h);
  if (h.magic != kStateMagic || h.n_layer != hp.n_layer || h.kv_dim != hp.n_head_kv * hp.head_dim) {
    throw std::invalid_argument("state was saved from a different model");
  }
  if (h.kv_type != static_cast<int32_t>(kv_element_type(params_.kv_type))) {
    throw std::invalid_argument("state was saved with a different KV cache type");
  }
  if (h.n_past < 0 || h.n_past > params_.n_ctx) {
    throw std::invalid_argument("state does not fit in this context");
  }
  int64_t expected = sizeof h;
  for (const auto& s : impl_->stages) expected += s->state_bytes(h.n_past);
  if (size != expected) throw std::invalid_argument("state size does not match its header");
  const uint8_t* p = data + sizeof h;
  for (auto& s : impl_->stages) {
    s->load_state(seq, h.n_past, p);
    p += s->state_bytes(h.n_past);
  }
  n_past_[seq] = h.n_past;
}

}  // namespace pyllm
