// Context: the KV cache and the Llama forward pass over it.
//
// One decode() call runs a chunk of tokens through every layer:
//   x = embed(tokens)                                   [n][n_embd]
//   per layer:  h = rms_norm(x) * attn_norm
//               q,k,v = h Wq, h Wk, h Wv (+ biases)     [n][n_head*hd], [n][n_kv*hd] x2
//               rope(q), rope(k); K/V cache[pos] = k, v (f16)
//               a = softmax(q K^T / sqrt(hd)) V         causal, per head, GQA groups share K/V
//               x += a Wo
//               h = rms_norm(x) * ffn_norm
//               x += (silu(h Wgate) * (h Wup)) Wdown
//   logits = rms_norm(x) * output_norm  Wout
// Weights are read straight from the memory map through the matmul kernels; activations stay
// F32 throughout (the accuracy bar is set by the exact model, not by llama.cpp's int8 path).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/rope.h"
#include "pyllm/fp16.h"
#include "pyllm/matmul.h"
#include "pyllm/model.h"
#include "pyllm/ops.h"
#include "pyllm/quant.h"

namespace pyllm {

namespace {

// Scratch activations for a chunk of up to n_batch tokens.
struct Buffers {
  std::vector<float> x, xb, q, k, v, att, gate, up;
  std::vector<float> rope;
  std::vector<float> scores;  // per-thread attention scratch: n_threads * n_ctx
  // Per-call bookkeeping, kept here so a decode step allocates nothing once warmed up.
  std::vector<int> visible, pos, added, rows;
  std::vector<int> runs;  // first token of each run of consecutive tokens of one sequence
  std::vector<int64_t> kv_row, run_cost;
  std::vector<int32_t> seq;
  std::vector<uint8_t> want;
  void resize(const HParams& hp, int n_batch, int n_ctx, int n_threads) {
    const size_t n = static_cast<size_t>(n_batch);
    x.resize(n * hp.n_embd);
    xb.resize(n * std::max<int64_t>(hp.n_embd, int64_t(hp.n_head) * hp.head_dim));
    q.resize(n * hp.n_head * hp.head_dim);
    k.resize(n * hp.n_head_kv * hp.head_dim);
    v.resize(n * hp.n_head_kv * hp.head_dim);
    att.resize(n * hp.n_head * hp.head_dim);
    gate.resize(n * hp.n_ff);
    up.resize(n * hp.n_ff);
    scores.resize(static_cast<size_t>(n_threads * attention_scratch_floats(n_ctx, hp.head_dim)));
  }
};

void add_bias(float* y, const WeightView& b, int64_t n_tokens, int64_t dim) {
  if (!b.present()) return;
  const float* bias = static_cast<const float*>(b.data);
  for (int64_t t = 0; t < n_tokens; ++t) {
    float* row = y + t * dim;
    for (int64_t i = 0; i < dim; ++i) row[i] += bias[i];
  }
}

}  // namespace

struct Context::Impl {
  const HParams& hp;
  ThreadPool pool;
  RopeTable rope;
  Buffers buf;
  int n_batch;
  int n_ctx;  // per sequence
  int n_seq;
  int64_t kv_dim;
  QType kv_type;  // element type of the cache rows
  int64_t kv_row_bytes;   // bytes of one position's K (or V) row, all KV heads
  int64_t kv_head_bytes;  // bytes of one KV head within a row
  // K and V cache: per layer [n_ctx][n_head_kv * head_dim] in F16 halves or Q8_0 blocks.
  std::vector<std::vector<uint8_t>> k_cache, v_cache;

  Impl(const Model& m, const ContextParams& p)
      : hp(m.hparams()),
        pool(p.n_threads),
        rope(m.hparams(), m.weights().rope_freqs.present()
                              ? static_cast<const float*>(m.weights().rope_freqs.data)
                              : nullptr),
        n_batch(p.n_batch),
        n_ctx(p.n_ctx),
        n_seq(p.n_seq),
        kv_dim(int64_t(m.hparams().n_head_kv) * m.hparams().head_dim),
        kv_type(p.kv_type == KVType::Q8_0  ? QType::Q8_0
                : p.kv_type == KVType::F32 ? QType::F32
                                           : QType::F16) {
    kv_row_bytes = row_size(kv_type, kv_dim);
    kv_head_bytes = row_size(kv_type, hp.head_dim);
    buf.resize(hp, n_batch, n_ctx, pool.n_threads());
    const size_t rows = static_cast<size_t>(n_ctx) * n_seq;
    k_cache.assign(hp.n_layer, std::vector<uint8_t>(rows * kv_row_bytes));
    v_cache.assign(hp.n_layer, std::vector<uint8_t>(rows * kv_row_bytes));
  }

  void store_kv(const OpsTable& op, const float* src, uint8_t* dst) {
    if (kv_type == QType::Q8_0) {
      quantize_row_q8_0(src, reinterpret_cast<BlockQ8_0*>(dst), kv_dim);
    } else if (kv_type == QType::F32) {
      std::memcpy(dst, src, sizeof(float) * kv_dim);
    } else {
      op.f32_to_f16(src, reinterpret_cast<f16_t*>(dst), kv_dim);
    }
  }

  static MatmulParams mparams(const WeightView& w, const float* x, int64_t n_tokens, float* y) {
    MatmulParams p{};
    p.wtype = w.type;
    p.w = w.data;
    p.n_out = w.rows;
    p.k = w.cols;
    p.x = x;
    p.ldx = 0;
    p.n_tokens = n_tokens;
    p.y = y;
    p.ldy = 0;
    p.layout = w.layout;
    return p;
  }

  void mm(const WeightView& w, const float* x, int64_t n_tokens, float* y) {
    matmul(mparams(w, x, n_tokens, y), pool);
  }

  // Several independent products of the same input in one parallel region: one hand-over and
  // one join instead of one per matrix (q/k/v, gate/up).
  void mm_group(std::initializer_list<MatmulParams> ps) {
    constexpr size_t kMax = 4;
    MatmulQueue queues[kMax];
    MatmulParams shared[kMax];
    size_t n = 0;
    for (const MatmulParams& p : ps) {
      if (n == kMax) throw std::logic_error("mm_group: too many products");
      check_matmul(p);
      shared[n] = p;
      shared[n].queue = &queues[n];  // each product shares its rows among the threads
      ++n;
    }
    pool.run([&](int ith, int nth) {
      for (size_t i = 0; i < n; ++i) matmul_part(shared[i], ith, nth);
    });
  }

  // Element-wise work over n_items: inline when small (waking the pool costs more than it saves).
  template <typename Fn>
  void for_items(int64_t n_items, int64_t work_per_item, Fn&& fn) {
    if (n_items * work_per_item < (1 << 15) || pool.n_threads() == 1) {
      fn(int64_t(0), n_items);
    } else {
      pool.parallel_for(n_items, 1, fn);
    }
  }

  // Runs token t at position pos[t] of sequence seq[t] (n <= n_batch); writes the final hidden
  // states to buf.x. All of a chunk's K/V rows are stored before attention reads them.
  void forward_chunk(const Model& model, const int32_t* tokens, const int* pos, const int* seq,
                     int n, int seq_len) {
    const ModelWeights& w = model.weights();
    const OpsTable& op = ops();
    const int64_t d = hp.n_embd, hd = hp.head_dim;
    const int64_t q_dim = int64_t(hp.n_head) * hd;
    const int group = hp.n_head / hp.n_head_kv;
    float* x = buf.x.data();
    float* xb = buf.xb.data();

    // token embeddings: dequantize one row per token
    const TypeTraits& et = type_traits(w.tok_embd.type);
    const int64_t erow = row_size(w.tok_embd.type, d);
    for (int t = 0; t < n; ++t) {
      const uint8_t* row = static_cast<const uint8_t*>(w.tok_embd.data) + erow * tokens[t];
      et.to_float(row, x + t * d, d);
    }
    rope.fill_positions(pos, n, seq_len, buf.rope);
    const float attn_scale = 1.0f / std::sqrt(static_cast<float>(hd));

    std::vector<int>& visible = buf.visible;
    std::vector<int64_t>& kv_row = buf.kv_row;  // cache row of each token: region + position
    visible.resize(n);
    kv_row.resize(n);
    for (int t = 0; t < n; ++t) {
      visible[t] = pos[t] + 1;
      kv_row[t] = int64_t(seq[t]) * n_ctx + pos[t];
    }
    std::vector<int>& runs = buf.runs;
    runs.clear();
    for (int t = 0; t < n; ++t) {
      if (t == 0 || seq[t] != seq[t - 1]) runs.push_back(t);
    }
    // cost of one grid of each run (group rows per token, each its visible keys)
    std::vector<int64_t>& run_cost = buf.run_cost;
    run_cost.assign(runs.size(), 0);
    int64_t run_cost_total = 0;
    for (size_t ri = 0; ri < runs.size(); ++ri) {
      const int end = ri + 1 < runs.size() ? runs[ri + 1] : n;
      for (int t = runs[ri]; t < end; ++t) run_cost[ri] += int64_t(group) * visible[t];
      run_cost_total += run_cost[ri] * hp.n_head_kv;
    }

    for (int il = 0; il < hp.n_layer; ++il) {
      const LayerWeights& L = w.layers[il];
      const float* attn_norm = static_cast<const float*>(L.attn_norm.data);
      for_items(n, d, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) op.rms_norm(x + t * d, attn_norm, xb + t * d, d, hp.rms_eps);
      });
      mm_group({mparams(L.wq, xb, n, buf.q.data()), mparams(L.wk, xb, n, buf.k.data()),
                mparams(L.wv, xb, n, buf.v.data())});
      add_bias(buf.q.data(), L.bq, n, q_dim);
      add_bias(buf.k.data(), L.bk, n, kv_dim);
      add_bias(buf.v.data(), L.bv, n, kv_dim);

      uint8_t* kc = k_cache[il].data();
      uint8_t* vc = v_cache[il].data();
      for_items(n, q_dim + 2 * kv_dim, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const float* cs = buf.rope.data() + t * hp.n_rot;
          op.rope(buf.q.data() + t * q_dim, hp.n_head, hd, hp.n_rot, cs, hp.rope_neox);
          op.rope(buf.k.data() + t * kv_dim, hp.n_head_kv, hd, hp.n_rot, cs, hp.rope_neox);
          store_kv(op, buf.k.data() + t * kv_dim, kc + kv_row[t] * kv_row_bytes);
          store_kv(op, buf.v.data() + t * kv_dim, vc + kv_row[t] * kv_row_bytes);
        }
      });

      // Attention: a run of consecutive tokens of one sequence and the query heads of one KV
      // group form one grid of rows (see AttentionArgs), which the kernel takes in blocks that
      // load each K/V row once: the heads of a GQA group for a decode token, heads and tokens
      // for a prompt. Threads get contiguous row ranges of equal cost (a row costs its number
      // of visible keys, so causal prompts split evenly too).
      pool.run([&](int ith, int nth) {
        const int64_t c0 = run_cost_total * ith / nth, c1 = run_cost_total * (ith + 1) / nth;
        float* scratch =
            buf.scores.data() + static_cast<size_t>(ith * attention_scratch_floats(n_ctx, hd));
        int64_t cum = 0;  // cost of the rows before the current grid
        for (size_t ri = 0; ri < runs.size() && cum < c1; ++ri) {
          const int t = runs[ri];
          const int len = (ri + 1 < runs.size() ? runs[ri + 1] : n) - t;
          const int64_t region = int64_t(seq[t]) * n_ctx * kv_row_bytes;
          for (int g = 0; g < hp.n_head_kv && cum < c1; ++g) {
            if (cum + run_cost[ri] <= c0) {  // the whole grid precedes this thread's range
              cum += run_cost[ri];
              continue;
            }
            // rows whose cost starts in [c0, c1) (row l: token t + l / group); only a grid
            // across a range boundary is walked row by row
            int lo = -1, hi = 0;
            if (cum >= c0 && cum + run_cost[ri] <= c1) {
              lo = 0;
              hi = len * group;
              cum += run_cost[ri];
            } else {
              for (int l = 0; l < len * group && cum < c1; ++l) {
                if (cum >= c0) {
                  if (lo < 0) lo = l;
                  hi = l + 1;
                }
                cum += visible[t + l / group];
              }
            }
            if (lo < 0) continue;
            AttentionArgs a;
            a.q = buf.q.data() + t * q_dim + int64_t(g) * group * hd;
            a.out = buf.att.data() + t * q_dim + int64_t(g) * group * hd;
            a.q_stride = q_dim;
            a.out_stride = q_dim;
            a.n_heads = group;
            a.first_row = lo;
            a.n_q = hi - lo;
            a.n_visible = visible.data() + t;
            a.k = kc + region + g * kv_head_bytes;
            a.v = vc + region + g * kv_head_bytes;
            a.kv_row_bytes = kv_row_bytes;
            a.kv_type = kv_type;
            a.head_dim = static_cast<int>(hd);
            a.scale = attn_scale;
            a.scratch = scratch;
            op.attention(a);
          }
        }
      });

      mm(L.wo, buf.att.data(), n, xb);
      add_bias(xb, L.bo, n, d);
      op.add(x, xb, int64_t(n) * d);

      const float* ffn_norm = static_cast<const float*>(L.ffn_norm.data);
      for_items(n, d, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) op.rms_norm(x + t * d, ffn_norm, xb + t * d, d, hp.rms_eps);
      });
      mm_group({mparams(L.w_gate, xb, n, buf.gate.data()), mparams(L.w_up, xb, n, buf.up.data())});
      add_bias(buf.gate.data(), L.b_gate, n, hp.n_ff);
      add_bias(buf.up.data(), L.b_up, n, hp.n_ff);
      const int64_t nff = int64_t(n) * hp.n_ff;
      for_items(nff, 1, [&](int64_t i0, int64_t i1) {
        op.swiglu(buf.gate.data() + i0, buf.up.data() + i0, buf.gate.data() + i0, i1 - i0);
      });
      mm(L.w_down, buf.gate.data(), n, xb);
      add_bias(xb, L.b_down, n, d);
      op.add(x, xb, int64_t(n) * d);
    }
  }

  // Final norm + output projection of rows[0..count) of buf.x into out (count rows).
  void output(const Model& model, const int* rows, int count, float* out) {
    const ModelWeights& w = model.weights();
    const OpsTable& op = ops();
    const int64_t d = hp.n_embd;
    const float* norm = static_cast<const float*>(w.output_norm.data);
    float* xb = buf.xb.data();
    for (int t = 0; t < count; ++t) {
      op.rms_norm(buf.x.data() + rows[t] * d, norm, xb + t * d, d, hp.rms_eps);
    }
    const WeightView& out_w = w.output.present() ? w.output : w.tok_embd;
    mm(out_w, xb, count, out);
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
  impl_ = std::make_unique<Impl>(*model_, params_);
}

Context::~Context() = default;

int Context::n_threads() const { return impl_->pool.n_threads(); }

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
  std::vector<int32_t>& seq = impl_->buf.seq;
  std::vector<uint8_t>& want = impl_->buf.want;
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
  std::vector<int>& added = impl_->buf.added;
  std::vector<int>& pos = impl_->buf.pos;
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
  std::vector<int>& rows = impl_->buf.rows;
  for (int64_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min<int64_t>(params_.n_batch, n - done));
    impl_->forward_chunk(*model_, tokens + done, pos.data() + done, seq + done, chunk, seq_len);
    rows.clear();
    for (int t = 0; t < chunk; ++t) {
      if (want_logits && want_logits[done + t]) rows.push_back(t);
    }
    if (!rows.empty() && logits) {
      // output() scores at most n_batch rows at a time through the scratch buffers
      impl_->output(*model_, rows.data(), static_cast<int>(rows.size()),
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
    impl_->forward_chunk(*model_, tokens + done, pos.data(), seqs.data(), chunk,
                         static_cast<int>(n));
    for (int t = 0; t < chunk; ++t) {
      op.rms_norm(impl_->buf.x.data() + t * d, norm, row.data(), d, hp.rms_eps);
      for (int64_t i = 0; i < d; ++i) acc[i] += row[i];
    }
    done += chunk;
  }
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(acc[i] / static_cast<double>(n));
  n_past_[seq] = 0;
}

std::vector<uint8_t> Context::save_state() const {
  const HParams& hp = model_->hparams();
  const int64_t per_layer = int64_t(n_past_[0]) * impl_->kv_row_bytes;
  const int32_t header[5] = {0x504c4c4d /* "MLLP" */, n_past_[0], hp.n_layer,
                             static_cast<int32_t>(impl_->kv_dim),
                             static_cast<int32_t>(impl_->kv_type)};
  std::vector<uint8_t> out(sizeof header + 2 * per_layer * hp.n_layer);
  uint8_t* p = out.data();
  std::memcpy(p, header, sizeof header);
  p += sizeof header;
  for (int il = 0; il < hp.n_layer; ++il) {
    std::memcpy(p, impl_->k_cache[il].data(), per_layer);
    p += per_layer;
    std::memcpy(p, impl_->v_cache[il].data(), per_layer);
    p += per_layer;
  }
  return out;
}

void Context::load_state(const uint8_t* data, int64_t size) {
  const HParams& hp = model_->hparams();
  int32_t header[5];
  if (size < static_cast<int64_t>(sizeof header)) throw std::invalid_argument("state is too short");
  std::memcpy(header, data, sizeof header);
  if (header[0] != 0x504c4c4d || header[2] != hp.n_layer || header[3] != impl_->kv_dim) {
    throw std::invalid_argument("state was saved from a different model");
  }
  if (header[4] != static_cast<int32_t>(impl_->kv_type)) {
    throw std::invalid_argument("state was saved with a different KV cache type");
  }
  const int n = header[1];
  if (n < 0 || n > params_.n_ctx) throw std::invalid_argument("state does not fit in this context");
  const int64_t per_layer = int64_t(n) * impl_->kv_row_bytes;
  if (size != static_cast<int64_t>(sizeof header) + 2 * per_layer * hp.n_layer) {
    throw std::invalid_argument("state size does not match its header");
  }
  const uint8_t* p = data + sizeof header;
  for (int il = 0; il < hp.n_layer; ++il) {
    std::memcpy(impl_->k_cache[il].data(), p, per_layer);
    p += per_layer;
    std::memcpy(impl_->v_cache[il].data(), p, per_layer);
    p += per_layer;
  }
  n_past_[0] = n;
}

}  // namespace pyllm
