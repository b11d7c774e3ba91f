// Forward: the layer loop of a chunk and its matmul / element-wise helpers (see forward.h).
#include "model/forward.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "pyllm/ops.h"
#include "pyllm/quant.h"

namespace pyllm {
namespace {

void add_bias(float* y, const WeightView& b, int64_t n_tokens, int64_t dim) {
  if (!b.present()) return;
  const float* bias = static_cast<const float*>(b.data);
  for (int64_t t = 0; t < n_tokens; ++t) {
    float* row = y + t * dim;
    for (int64_t i = 0; i < dim; ++i) row[i] += bias[i];
  }
}

MatmulParams mparams(const WeightView& w, const float* x, int64_t n_tokens, float* y) {
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

}  // namespace

void Forward::Buffers::resize(const HParams& hp, int n_batch, int n_ctx, int n_threads) {
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

Forward::Forward(const Model& m, const ContextParams& p, KVCache& kv)
    : model_(m),
      hp(m.hparams()),
      kv_(kv),
      pool_(p.n_threads),
      rope_(m.hparams(), m.weights().rope_freqs.present()
                             ? static_cast<const float*>(m.weights().rope_freqs.data)
                             : nullptr),
      n_ctx_(p.n_ctx) {
  buf_.resize(hp, p.n_batch, n_ctx_, pool_.n_threads());
}

void Forward::mm(const WeightView& w, const float* x, int64_t n_tokens, float* y) {
  matmul(mparams(w, x, n_tokens, y), pool_);
}

// Several independent products of the same input in one parallel region: one hand-over and
// one join instead of one per matrix (q/k/v, gate/up).
void Forward::mm_group(std::initializer_list<MatmulParams> ps) {
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
  pool_.run([&](int ith, int nth) {
    for (size_t i = 0; i < n; ++i) matmul_part(shared[i], ith, nth);
  });
}

// Element-wise work over n_items: inline when small (waking the pool costs more than it saves).
template <typename Fn>
void Forward::for_items(int64_t n_items, int64_t work_per_item, Fn&& fn) {
  if (n_items * work_per_item < (1 << 15) || pool_.n_threads() == 1) {
    fn(int64_t(0), n_items);
  } else {
    pool_.parallel_for(n_items, 1, fn);
  }
}

void Forward::embed(const int32_t* tokens, int n) {
  // dequantize one row of the embedding table per token
  const WeightView& emb = model_.weights().tok_embd;
  const int64_t d = hp.n_embd;
  const TypeTraits& et = type_traits(emb.type);
  const int64_t erow = row_size(emb.type, d);
  float* x = buf_.x.data();
  for (int t = 0; t < n; ++t) {
    const uint8_t* row = static_cast<const uint8_t*>(emb.data) + erow * tokens[t];
    et.to_float(row, x + t * d, d);
  }
}

void Forward::prepare(const int* pos, const int* seq, int n, int seq_len) {
  rope_.fill_positions(pos, n, seq_len, buf_.rope);
  sched_.plan(pos, seq, n, n_ctx_, hp.n_head, hp.n_head_kv);
}

// Attention of layer il over the chunk planned by prepare(): q, and the K/V rows just stored,
// into buf_.att.
void Forward::attention(int il, const int* seq) {
  const OpsTable& op = ops();
  const int64_t hd = hp.head_dim;
  const int64_t q_dim = int64_t(hp.n_head) * hd;
  const int group = sched_.group;
  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const uint8_t* kc = kv_.k(il);
  const uint8_t* vc = kv_.v(il);
  const int64_t kv_row_bytes = kv_.row_bytes(), kv_head_bytes = kv_.head_bytes();
  pool_.run([&](int ith, int nth) {
    float* scratch =
        buf_.scores.data() + static_cast<size_t>(ith * attention_scratch_floats(n_ctx_, hd));
    sched_.for_each_part(ith, nth, [&](int t, int g, int lo, int hi) {
      const int64_t region = int64_t(seq[t]) * n_ctx_ * kv_row_bytes;
      AttentionArgs a;
      a.q = buf_.q.data() + t * q_dim + int64_t(g) * group * hd;
      a.out = buf_.att.data() + t * q_dim + int64_t(g) * group * hd;
      a.q_stride = q_dim;
      a.out_stride = q_dim;
      a.n_heads = group;
      a.first_row = lo;
      a.n_q = hi - lo;
      a.n_visible = sched_.visible.data() + t;
      a.k = kc + region + g * kv_head_bytes;
      a.v = vc + region + g * kv_head_bytes;
      a.kv_row_bytes = kv_row_bytes;
      a.kv_type = kv_.type();
      a.head_dim = static_cast<int>(hd);
      a.scale = attn_scale;
      a.scratch = scratch;
      op.attention(a);
    });
  });
}

void Forward::layers(int first, int last, const int* seq, int n) {
  const ModelWeights& w = model_.weights();
  const OpsTable& op = ops();
  const int64_t d = hp.n_embd, hd = hp.head_dim;
  const int64_t q_dim = int64_t(hp.n_head) * hd;
  const int64_t kv_dim = kv_.dim();
  const int64_t kv_row_bytes = kv_.row_bytes();
  const std::vector<int64_t>& kv_row = sched_.kv_row;
  float* x = buf_.x.data();
  float* xb = buf_.xb.data();

  for (int il = first; il < last; ++il) {
    const LayerWeights& L = w.layers[il];
    const float* attn_norm = static_cast<const float*>(L.attn_norm.data);
    for_items(n, d, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) op.rms_norm(x + t * d, attn_norm, xb + t * d, d, hp.rms_eps);
    });
    mm_group({mparams(L.wq, xb, n, buf_.q.data()), mparams(L.wk, xb, n, buf_.k.data()),
              mparams(L.wv, xb, n, buf_.v.data())});
    add_bias(buf_.q.data(), L.bq, n, q_dim);
    add_bias(buf_.k.data(), L.bk, n, kv_dim);
    add_bias(buf_.v.data(), L.bv, n, kv_dim);

    uint8_t* kc = kv_.k(il);
    uint8_t* vc = kv_.v(il);
    for_items(n, q_dim + 2 * kv_dim, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* cs = buf_.rope.data() + t * hp.n_rot;
        op.rope(buf_.q.data() + t * q_dim, hp.n_head, hd, hp.n_rot, cs, hp.rope_neox);
        op.rope(buf_.k.data() + t * kv_dim, hp.n_head_kv, hd, hp.n_rot, cs, hp.rope_neox);
        kv_.store(op, buf_.k.data() + t * kv_dim, kc + kv_row[t] * kv_row_bytes);
        kv_.store(op, buf_.v.data() + t * kv_dim, vc + kv_row[t] * kv_row_bytes);
      }
    });

    attention(il, seq);

    mm(L.wo, buf_.att.data(), n, xb);
    add_bias(xb, L.bo, n, d);
    op.add(x, xb, int64_t(n) * d);

    const float* ffn_norm = static_cast<const float*>(L.ffn_norm.data);
    for_items(n, d, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) op.rms_norm(x + t * d, ffn_norm, xb + t * d, d, hp.rms_eps);
    });
    mm_group({mparams(L.w_gate, xb, n, buf_.gate.data()), mparams(L.w_up, xb, n, buf_.up.data())});
    add_bias(buf_.gate.data(), L.b_gate, n, hp.n_ff);
    add_bias(buf_.up.data(), L.b_up, n, hp.n_ff);
    const int64_t nff = int64_t(n) * hp.n_ff;
    for_items(nff, 1, [&](int64_t i0, int64_t i1) {
      op.swiglu(buf_.gate.data() + i0, buf_.up.data() + i0, buf_.gate.data() + i0, i1 - i0);
    });
    mm(L.w_down, buf_.gate.data(), n, xb);
    add_bias(xb, L.b_down, n, d);
    op.add(x, xb, int64_t(n) * d);
  }
}

void Forward::output(const int* rows, int count, float* out) {
  const ModelWeights& w = model_.weights();
  const OpsTable& op = ops();
  const int64_t d = hp.n_embd;
  const float* norm = static_cast<const float*>(w.output_norm.data);
  float* xb = buf_.xb.data();
  for (int t = 0; t < count; ++t) {
    op.rms_norm(buf_.x.data() + rows[t] * d, norm, xb + t * d, d, hp.rms_eps);
  }
  const WeightView& out_w = w.output.present() ? w.output : w.tok_embd;
  mm(out_w, xb, count, out);
}

}  // namespace pyllm
