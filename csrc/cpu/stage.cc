// CpuDevice and CpuStage: the layer loop of a chunk, the head, and their matmul / element-wise
// helpers on the CPU thread pool (see stage.h).
#include "cpu/stage.h"

#include "cpu/weights.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "cpu/ops.h"
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

void CpuDevice::Buffers::resize(const HParams& hp, int n_batch, int n_ctx, int n_threads) {
  const size_t n = static_cast<size_t>(n_batch);
  xb.resize(n * std::max<int64_t>(hp.n_embd, int64_t(hp.n_head) * hp.head_dim));
  q.resize(n * hp.n_head * hp.head_dim);
  k.resize(n * hp.n_head_kv * hp.head_dim);
  v.resize(n * hp.n_head_kv * hp.head_dim);
  att.resize(n * hp.n_head * hp.head_dim);
  gate.resize(n * hp.n_ff);
  up.resize(n * hp.n_ff);
  scores.resize(static_cast<size_t>(n_threads * attention_scratch_floats(n_ctx, hp.head_dim)));
}

std::unique_ptr<WeightStore> CpuBackend::prepare(const HParams& hp, ModelWeights& weights,
                                                 const std::vector<LayerRange>& ranges,
                                                 const ModelOptions& options) const {
  return prepare_cpu_weights(weights, ranges, options);
}

std::unique_ptr<Device> CpuBackend::open(const Model& model, const ContextParams& params) const {
  return std::make_unique<CpuDevice>(model, params);
}

const Backend& cpu_backend() {
  static const CpuBackend backend;
  return backend;
}

CpuDevice::CpuDevice(const Model& m, const ContextParams& p)
    : model_(m), params_(p), pool_(p.n_threads) {
  buf_.resize(m.hparams(), p.n_batch, p.n_ctx, pool_.n_threads());
}

std::unique_ptr<Stage> CpuDevice::make_stage(const LayerRange& range) {
  return std::make_unique<CpuStage>(*this, range);
}

CpuStage::CpuStage(CpuDevice& device, const LayerRange& range)
    : Stage(range),
      dev_(device),
      hp(device.model_.hparams()),
      kv_(hp, device.params_, range.last - range.first) {}

void CpuStage::shift_kv(int seq, int keep, int n_discard, int n_past, const float* rot) {
  kv_.shift(ops(), seq, keep, n_discard, n_past, rot, hp.n_head_kv, hp.head_dim, hp.n_rot,
            hp.rope_neox);
}

void CpuDevice::mm(const WeightView& w, const float* x, int64_t n_tokens, float* y) {
  matmul(mparams(w, x, n_tokens, y), pool_);
}

// Several independent products of the same input in one parallel region: one hand-over and
// one join instead of one per matrix (q/k/v, gate/up).
void CpuDevice::mm_group(std::initializer_list<MatmulParams> ps) {
  mm_group(ps.begin(), ps.size());
}

void CpuDevice::mm_group(const MatmulParams* ps, size_t n,
                         const std::function<void(int, int)>* then) {
  constexpr size_t kMax = 8;
  MatmulQueue queues[kMax];
  MatmulParams shared[kMax];
  if (n > kMax) throw std::logic_error("mm_group: too many products");
  for (size_t i = 0; i < n; ++i) {
    check_matmul(ps[i]);
    shared[i] = ps[i];
    shared[i].queue = &queues[i];  // each product shares its rows among the threads
  }
  pool_.run([&](int ith, int nth) {
    for (size_t i = 0; i < n; ++i) matmul_part(shared[i], ith, nth);
    if (then != nullptr) {
      pool_.barrier();
      (*then)(ith, nth);
    }
  });
}

// Element-wise work over n_items: inline when small (waking the pool costs more than it saves).
template <typename Fn>
void CpuDevice::for_items(int64_t n_items, int64_t work_per_item, Fn&& fn) {
  if (n_items * work_per_item < (1 << 15) || pool_.n_threads() == 1) {
    fn(int64_t(0), n_items);
  } else {
    pool_.parallel_for(n_items, 1, fn);
  }
}

// Attention of the stage's layer il (counted from its first) over the chunk: q, and the K/V rows
// just stored, into the device's att buffer.
void CpuStage::attention(int il, const Chunk& c) {
  const OpsTable& op = ops();
  CpuDevice::Buffers& buf = dev_.buf_;
  const AttentionSchedule& sched = *c.schedule;
  const int n_ctx = dev_.params_.n_ctx;
  const int64_t hd = hp.head_dim;
  const int64_t q_dim = int64_t(hp.n_head) * hd;
  const int group = sched.group;
  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const uint8_t* kc = kv_.k(il);
  const uint8_t* vc = kv_.v(il);
  const int64_t kv_row_bytes = kv_.row_bytes(), kv_head_bytes = kv_.head_bytes();
  dev_.pool_.run([&](int ith, int nth) {
    float* scratch =
        buf.scores.data() + static_cast<size_t>(ith * attention_scratch_floats(n_ctx, hd));
    sched.for_each_part(ith, nth, [&](int t, int g, int lo, int hi) {
      const int64_t region = int64_t(c.seq[t]) * n_ctx * kv_row_bytes;
      AttentionArgs a;
      a.q = buf.q.data() + t * q_dim + int64_t(g) * group * hd;
      a.out = buf.att.data() + t * q_dim + int64_t(g) * group * hd;
      a.q_stride = q_dim;
      a.out_stride = q_dim;
      a.n_heads = group;
      a.first_row = lo;
      a.n_q = hi - lo;
      a.n_visible = sched.visible.data() + t;
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

void CpuStage::run_layers(const Chunk& c, float* x) {
  const ModelWeights& w = dev_.model_.weights();
  const OpsTable& op = ops();
  CpuDevice& dev = dev_;
  CpuDevice::Buffers& buf = dev.buf_;
  const int n = c.n;
  const int64_t d = hp.n_embd, hd = hp.head_dim;
  const int64_t q_dim = int64_t(hp.n_head) * hd;
  const int64_t kv_dim = kv_.dim();
  const int64_t kv_row_bytes = kv_.row_bytes();
  const std::vector<int64_t>& kv_row = c.schedule->kv_row;
  float* xb = buf.xb.data();

  for (int il = 0; il < kv_.n_layer(); ++il) {
    const LayerWeights& L = w.layers[range().first + il];
    const int layer = range().first + il;
    const float* attn_norm = static_cast<const float*>(L.attn_norm.data);
    const float* const* attn_w =
        norm_weights(c.lora, layer, DeltaSlot::AttnNorm, attn_norm, nullptr, n);
    dev.for_items(n, d, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        op.rms_norm(x + t * d, attn_w ? attn_w[t] : attn_norm, xb + t * d, d, hp.rms_eps);
      }
    });
    if (stats_) stats_->add(layer, StatSlot::AttnIn, xb, n);
    mm_with_lora(c, layer,
                 {mparams(L.wq, xb, n, buf.q.data()), mparams(L.wk, xb, n, buf.k.data()),
                  mparams(L.wv, xb, n, buf.v.data())},
                 {{LoraSlot::Q, xb, buf.q.data()}, {LoraSlot::K, xb, buf.k.data()},
                  {LoraSlot::V, xb, buf.v.data()}});
    add_bias(buf.q.data(), L.bq, n, q_dim);
    add_bias(buf.k.data(), L.bk, n, kv_dim);
    add_bias(buf.v.data(), L.bv, n, kv_dim);
    add_bias_deltas(c, layer, DeltaSlot::BQ, buf.q.data(), q_dim);
    add_bias_deltas(c, layer, DeltaSlot::BK, buf.k.data(), kv_dim);
    add_bias_deltas(c, layer, DeltaSlot::BV, buf.v.data(), kv_dim);

    uint8_t* kc = kv_.k(il);
    uint8_t* vc = kv_.v(il);
    dev.for_items(n, q_dim + 2 * kv_dim, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* cs = c.rope + t * hp.n_rot;
        op.rope(buf.q.data() + t * q_dim, hp.n_head, hd, hp.n_rot, cs, hp.rope_neox);
        op.rope(buf.k.data() + t * kv_dim, hp.n_head_kv, hd, hp.n_rot, cs, hp.rope_neox);
        kv_.store(op, buf.k.data() + t * kv_dim, kc + kv_row[t] * kv_row_bytes);
        kv_.store(op, buf.v.data() + t * kv_dim, vc + kv_row[t] * kv_row_bytes);
      }
    });

    attention(il, c);

    if (stats_) stats_->add(layer, StatSlot::AttnOut, buf.att.data(), n);
    mm_with_lora(c, layer, {mparams(L.wo, buf.att.data(), n, xb)},
                 {{LoraSlot::O, buf.att.data(), xb}});
    add_bias(xb, L.bo, n, d);
    add_bias_deltas(c, layer, DeltaSlot::BO, xb, d);
    op.add(x, xb, int64_t(n) * d);

    const float* ffn_norm = static_cast<const float*>(L.ffn_norm.data);
    const float* const* ffn_w =
        norm_weights(c.lora, layer, DeltaSlot::FfnNorm, ffn_norm, nullptr, n);
    dev.for_items(n, d, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        op.rms_norm(x + t * d, ffn_w ? ffn_w[t] : ffn_norm, xb + t * d, d, hp.rms_eps);
      }
    });
    if (stats_) stats_->add(layer, StatSlot::FfnIn, xb, n);
    mm_with_lora(c, layer,
                 {mparams(L.w_gate, xb, n, buf.gate.data()), mparams(L.w_up, xb, n, buf.up.data())},
                 {{LoraSlot::Gate, xb, buf.gate.data()}, {LoraSlot::Up, xb, buf.up.data()}});
    add_bias(buf.gate.data(), L.b_gate, n, hp.n_ff);
    add_bias(buf.up.data(), L.b_up, n, hp.n_ff);
    add_bias_deltas(c, layer, DeltaSlot::BGate, buf.gate.data(), hp.n_ff);
    add_bias_deltas(c, layer, DeltaSlot::BUp, buf.up.data(), hp.n_ff);
    const int64_t nff = int64_t(n) * hp.n_ff;
    dev.for_items(nff, 1, [&](int64_t i0, int64_t i1) {
      op.swiglu(buf.gate.data() + i0, buf.up.data() + i0, buf.gate.data() + i0, i1 - i0);
    });
    if (stats_) {
      stats_->add(layer, StatSlot::FfnDown, buf.gate.data(), n);
      stats_->layers[static_cast<size_t>(layer)].n_tokens += n;
    }
    mm_with_lora(c, layer, {mparams(L.w_down, buf.gate.data(), n, xb)},
                 {{LoraSlot::Down, buf.gate.data(), xb}});
    add_bias(xb, L.b_down, n, d);
    add_bias_deltas(c, layer, DeltaSlot::BDown, xb, d);
    op.add(x, xb, int64_t(n) * d);
  }
}

void CpuStage::mm_with_lora(const Chunk& c, int layer, std::initializer_list<MatmulParams> base,
                            std::initializer_list<LoraTarget> targets) {
  if (c.lora == nullptr) {  // the plain path: exactly the products of a model without adapters
    if (base.size() == 1) {
      matmul(*base.begin(), dev_.pool_);
    } else {
      dev_.mm_group(base);
    }
    return;
  }
  constexpr size_t kMax = 8;
  MatmulParams ps[kMax];
  size_t n = 0;
  for (const MatmulParams& p : base) ps[n++] = p;
  n += lora_first(c, layer, targets, ps + n, kMax - n);
  if (lora_pending_.empty()) {
    dev_.mm_group(ps, n);
    return;
  }
  // the low-rank terms in the same region, after a barrier (A x of every token is done then):
  // one parallel region per target group, not two
  const std::function<void(int, int)> then = [&](int ith, int nth) { lora_second(c, ith, nth); };
  dev_.mm_group(ps, n, &then);
  lora_pending_.clear();
}

void CpuStage::output(const float* hidden, const int* rows, int count, float* out,
                      const LoraChunk* lora) {
  if (!range().head) throw std::logic_error("output() on a stage without the model's head");
  const ModelWeights& w = dev_.model_.weights();
  const OpsTable& op = ops();
  const int64_t d = hp.n_embd;
  const float* norm = static_cast<const float*>(w.output_norm.data);
  const float* const* norm_w = norm_weights(lora, 0, DeltaSlot::OutputNorm, norm, rows, count);
  float* xb = dev_.buf_.xb.data();
  for (int t = 0; t < count; ++t) {
    op.rms_norm(hidden + rows[t] * d, norm_w ? norm_w[t] : norm, xb + t * d, d, hp.rms_eps);
  }
  if (stats_) {
    ActivationStats::accumulate(stats_->output, xb, count);
    stats_->n_output += count;
  }
  const WeightView& out_w = w.output.present() ? w.output : w.tok_embd;
  dev_.mm(out_w, xb, count, out);
}

}  // namespace pyllm
