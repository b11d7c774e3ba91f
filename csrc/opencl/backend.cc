// OpenCLBackend, OpenCLDevice and OpenCLStage (see backend.h): weights uploaded at load, the
// layer loop as a sequence of kernels (csrc/opencl/kernels.cl) on one in-order queue, the K/V
// cache of the stage's layers in device memory. LoRA adapters' pairs are uploaded when the
// context sets them; a chunk's low-rank terms are two more products per pair (A x, then B of
// that scaled by each token's coefficient), its deltas per-run vectors made on the host.
#include "opencl/backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "backend/placed_weights.h"
#include "opencl/runtime.h"
#include "pyllm/model.h"
#include "pyllm/quant.h"

namespace pyllm {
namespace {

using opencl::Buffer;
using opencl::Kernel;
using opencl::Local;
using opencl::Queue;
using opencl::Runtime;

constexpr size_t kWG = 64;  // work-group of the reductions, the matrix rows and attention tiles
// mul_mat_tiled (kernels.cl): TILE x TILE work-groups over 2 TILE rows x 2 TILE tokens, used
// from this many tokens on.
constexpr size_t kTile = 8, kTileRows = 2 * kTile;
constexpr int kTiledFrom = 4;

std::string mib(uint64_t bytes) {
  return std::to_string((bytes + (1 << 19)) >> 20) + " MiB";
}

// A weight in device memory, in its GGUF form.
struct Tensor {
  Buffer buf;
  QType type = QType::F32;
  int64_t rows = 0, cols = 0;
  bool present() const { return static_cast<bool>(buf); }
  cl_long row_bytes() const { return row_size(type, cols); }
};

using ClWeights = PlacedWeights<Tensor>;

class OpenCLBackend final : public Backend {
 public:
  explicit OpenCLBackend(int index) : index_(index), name_("opencl:" + std::to_string(index)) {}
  const char* name() const override { return name_.c_str(); }

  std::unique_ptr<WeightStore> prepare(const HParams& hp, ModelWeights& weights,
                                       const std::vector<LayerRange>& ranges,
                                       const ModelOptions& options) const override;
  std::unique_ptr<Device> open(const Model& model, const ContextParams& params) const override;

 private:
  int index_;
  std::string name_;
};

std::unique_ptr<WeightStore> OpenCLBackend::prepare(const HParams& hp, ModelWeights& weights,
                                                    const std::vector<LayerRange>& ranges,
                                                    const ModelOptions&) const {
  Runtime& rt = Runtime::get(index_);
  const opencl::DeviceDesc& dev = rt.desc();
  if (hp.head_dim % 32 != 0 || hp.head_dim > 4 * static_cast<int>(kWG)) {
    throw DeviceError("the OpenCL backend needs a head size that is a multiple of 32, at most " +
                      std::to_string(4 * kWG) + " (this model's is " +
                      std::to_string(hp.head_dim) + ")");
  }
  const uint64_t room = device_room(dev.global_mem);
  const uint64_t total = placed_weight_bytes(weights, ranges, dev.max_alloc, dev.name);
  if (total > room) {
    throw DeviceError("the layers placed on " + name_ + " (" + dev.name + ") need " + mib(total) +
                      " of weights but the device has " + mib(room) + "; offload fewer layers");
  }
  return std::make_unique<ClWeights>(weights, ranges, [&](const WeightView& v) {
    Tensor t;
    try {
      t.buf = Buffer(rt.context(), static_cast<size_t>(v.nbytes), CL_MEM_READ_ONLY, v.data);
    } catch (const DeviceError& e) {
      throw DeviceError("out of device memory uploading " + v.name + " (" + mib(v.nbytes) +
                        ", " + mib(total) + " in all for the placed layers; " + dev.name +
                        " has " + mib(dev.global_mem) + "): " + e.what());
    }
    t.type = v.type;
    t.rows = v.rows;
    t.cols = v.cols;
    return t;
  });
}

class OpenCLDevice final : public Device {
 public:
  OpenCLDevice(const OpenCLBackend& backend, Runtime& rt, const Model& model,
               const ClWeights& weights, const ContextParams& params);
  const char* name() const override { return backend_.name(); }
  std::unique_ptr<Stage> make_stage(const LayerRange& range) override;
  int n_threads() const override { return 0; }

  const OpenCLBackend& backend_;
  Runtime& rt;
  const Model& model;
  const HParams& hp;
  const ClWeights& w;
  ContextParams params;
  Queue queue;
  Kernel k_mul_mat, k_mul_mat_tiled, k_rms_norm, k_add_bias, k_add, k_swiglu, k_rope, k_kv_store,
      k_attention, k_scale_rows, k_add_rows;
  Buffer x, xb, q, k, v, att, gate, up, rope, kv_rows, region, visible;
  std::vector<cl_long> host_rows, host_region;
  // LoRA scratch (allocated when adapters are set): A x per token, B of that, the chunk's
  // coefficients, and the per-run vectors of deltas with each token's run
  Buffer lora_u, lora_y, lora_coef, delta_v, delta_which;
  std::vector<float> host_vecs;
  std::vector<int> host_which;

  Buffer alloc(size_t bytes, const char* what) {
    try {
      return Buffer(rt.context(), bytes);
    } catch (const DeviceError& e) {
      throw DeviceError(std::string("out of device memory for the context's ") + what + " (" +
                        mib(bytes) + "; " + rt.desc().name + " has " +
                        mib(rt.desc().global_mem) + "): " + e.what());
    }
  }

  // Product of the n rows of xin with matrix m into yout (n x m.rows): one work-group per row
  // and token for a few tokens (decode), tiles of rows x tokens for more (prefill).
  void mul_mat(const Tensor& m, const Buffer& xin, int n, const Buffer& yout) {
    if (n >= kTiledFrom) {
      k_mul_mat_tiled.args(m.buf, static_cast<cl_int>(m.type), m.row_bytes(),
                           static_cast<cl_int>(m.cols), xin, yout, static_cast<cl_int>(m.rows),
                           static_cast<cl_int>(n));
      const size_t rows = (static_cast<size_t>(m.rows) + kTileRows - 1) / kTileRows;
      const size_t toks = (static_cast<size_t>(n) + kTileRows - 1) / kTileRows;
      queue.run(k_mul_mat_tiled, {rows * kTile, toks * kTile}, {kTile, kTile});
      return;
    }
    k_mul_mat.args(m.buf, static_cast<cl_int>(m.type), m.row_bytes(), static_cast<cl_int>(m.cols),
                   xin, yout, static_cast<cl_int>(m.rows), Local{kWG * sizeof(float)});
    queue.run(k_mul_mat, {static_cast<size_t>(m.rows) * kWG, static_cast<size_t>(n)}, {kWG, 1});
  }
  // Buffer b holds at least `bytes` (grown, its contents dropped, when it does not).
  void ensure(Buffer& b, size_t bytes, const char* what) {
    if (b.bytes() < bytes) b = alloc(bytes, what);
  }

  void rms_norm(const Buffer& in, const Tensor& weight, const Buffer& out, int n) {
    k_rms_norm.args(in, nullptr, weight.buf, nullptr, out, static_cast<cl_int>(hp.n_embd),
                    hp.rms_eps, Local{kWG * sizeof(float)});
    queue.run(k_rms_norm, {static_cast<size_t>(n) * kWG}, {kWG});
  }
  // The same with a norm delta: row r's weights are host_vecs[host_which[r]] (uploaded here).
  void rms_norm_delta(const Buffer& in, const Buffer& out, int n) {
    upload_deltas(n);
    k_rms_norm.args(in, nullptr, delta_v, delta_which, out, static_cast<cl_int>(hp.n_embd),
                    hp.rms_eps, Local{kWG * sizeof(float)});
    queue.run(k_rms_norm, {static_cast<size_t>(n) * kWG}, {kWG});
  }
  void upload_deltas(int n) {
    ensure(delta_v, host_vecs.size() * sizeof(float), "LoRA deltas");
    ensure(delta_which, size_t(n) * sizeof(cl_int), "LoRA deltas");
    queue.write(delta_v, 0, host_vecs.size() * sizeof(float), host_vecs.data());
    queue.write(delta_which, 0, size_t(n) * sizeof(cl_int), host_which.data());
  }
  void bias(const Buffer& y, const Tensor& b, int n) {
    if (!b.present()) return;
    k_add_bias.args(y, b.buf, static_cast<cl_int>(b.cols));
    queue.run(k_add_bias, {static_cast<size_t>(n) * b.cols});
  }

  // The chunk's RoPE angles, K/V rows, sequence regions and visible keys, once per stage call.
  void upload_chunk(const Chunk& c) {
    const AttentionSchedule& s = *c.schedule;
    host_rows.assign(s.kv_row.begin(), s.kv_row.begin() + c.n);
    host_region.resize(c.n);
    for (int t = 0; t < c.n; ++t) host_region[t] = cl_long(c.seq[t]) * params.n_ctx;
    queue.write(rope, 0, sizeof(float) * c.n * hp.n_rot, c.rope);
    queue.write(kv_rows, 0, sizeof(cl_long) * c.n, host_rows.data());
    queue.write(region, 0, sizeof(cl_long) * c.n, host_region.data());
    queue.write(visible, 0, sizeof(cl_int) * c.n, s.visible.data());
  }
};

class OpenCLStage final : public Stage {
 public:
  OpenCLStage(OpenCLDevice& dev, const LayerRange& range);
  void run_layers(const Chunk& chunk, float* hidden) override;
  void set_lora_adapters(const std::vector<std::shared_ptr<const LoraAdapter>>& adapters) override;
  void output(const float* hidden, const int* rows, int count, float* logits,
              const LoraChunk* lora) override;
  int64_t state_bytes(int n_past) const override {
    return 2 * int64_t(n_past) * row_bytes_ * static_cast<int64_t>(k_.size());
  }
  void save_state(int seq, int n_past, uint8_t* out) const override;
  void load_state(int seq, int n_past, const uint8_t* in) override;

 private:
  OpenCLDevice& d_;
  QType kv_type_;
  int64_t row_bytes_, head_bytes_;
  std::vector<Buffer> k_, v_;  // per layer of the range: n_seq * n_ctx rows
  Buffer head_in_, logits_;    // head stage only
  std::vector<float> gathered_;  // the hidden rows output() scores, gathered on the host

  // LoRA: each adapter's pairs of the stage's layers in device memory (a: rank x n_in, b:
  // n_out x rank, the file's F32 or F16; absent: a.buf null)
  struct ClPair {
    Tensor a, b;
    float factor = 0.0f;
  };
  struct ClAdapter {
    const LoraAdapter* src = nullptr;
    std::vector<std::array<ClPair, kLoraSlots>> layers;
  };
  std::vector<ClAdapter> lora_;
  const ClAdapter& uploaded(const LoraAdapter* a) const;
  // y (n rows of n_out) += the chunk's low-rank terms of `slot` for input x
  void lora_terms(const Chunk& c, int layer, LoraSlot slot, const Buffer& x, const Buffer& y,
                  int64_t n_out);
  // xb = rms_norm(x) with the layer's norm weights w (host copy host_w) and its deltas
  void norm(const Chunk& c, int layer, DeltaSlot slot, const WeightView& host_w, const Tensor& w,
            const Buffer& x, const Buffer& xb);
  // y's rows (of dim) += the chunk's bias deltas of `slot`
  void bias_delta(const Chunk& c, int layer, DeltaSlot slot, const Buffer& y, int64_t dim);
};

OpenCLDevice::OpenCLDevice(const OpenCLBackend& backend, Runtime& runtime, const Model& m,
                           const ClWeights& weights, const ContextParams& p)
    : backend_(backend),
      rt(runtime),
      model(m),
      hp(m.hparams()),
      w(weights),
      params(p),
      queue(runtime),
      k_mul_mat(runtime.program(), "mul_mat"),
      k_mul_mat_tiled(runtime.program(), "mul_mat_tiled"),
      k_rms_norm(runtime.program(), "rms_norm"),
      k_add_bias(runtime.program(), "add_bias"),
      k_add(runtime.program(), "add"),
      k_swiglu(runtime.program(), "swiglu"),
      k_rope(runtime.program(), "rope"),
      k_kv_store(runtime.program(), "kv_store"),
      k_attention(runtime.program(), "attention"),
      k_scale_rows(runtime.program(), "scale_rows"),
      k_add_rows(runtime.program(), "add_rows") {
  const size_t n = static_cast<size_t>(p.n_batch);
  const size_t q_dim = size_t(hp.n_head) * hp.head_dim, kv_dim = size_t(hp.n_head_kv) * hp.head_dim;
  x = alloc(n * hp.n_embd * sizeof(float), "activations");
  xb = alloc(n * std::max<size_t>(hp.n_embd, q_dim) * sizeof(float), "activations");
  q = alloc(n * q_dim * sizeof(float), "activations");
  k = alloc(n * kv_dim * sizeof(float), "activations");
  v = alloc(n * kv_dim * sizeof(float), "activations");
  att = alloc(n * q_dim * sizeof(float), "activations");
  gate = alloc(n * hp.n_ff * sizeof(float), "activations");
  up = alloc(n * hp.n_ff * sizeof(float), "activations");
  rope = alloc(n * hp.n_rot * sizeof(float), "chunk plan");
  kv_rows = alloc(n * sizeof(cl_long), "chunk plan");
  region = alloc(n * sizeof(cl_long), "chunk plan");
  visible = alloc(n * sizeof(cl_int), "chunk plan");
}

std::unique_ptr<Stage> OpenCLDevice::make_stage(const LayerRange& range) {
  return std::make_unique<OpenCLStage>(*this, range);
}

OpenCLStage::OpenCLStage(OpenCLDevice& dev, const LayerRange& range)
    : Stage(range), d_(dev), kv_type_(kv_element_type(dev.params.kv_type)) {
  const HParams& hp = dev.hp;
  row_bytes_ = row_size(kv_type_, int64_t(hp.n_head_kv) * hp.head_dim);
  head_bytes_ = row_size(kv_type_, hp.head_dim);
  const size_t rows = size_t(dev.params.n_ctx) * dev.params.n_seq;
  for (int il = range.first; il < range.last; ++il) {
    k_.push_back(dev.alloc(rows * row_bytes_, "K/V cache"));
    v_.push_back(dev.alloc(rows * row_bytes_, "K/V cache"));
  }
  if (range.head) {
    head_in_ = dev.alloc(size_t(dev.params.n_batch) * hp.n_embd * sizeof(float), "activations");
    logits_ = dev.alloc(size_t(dev.params.n_batch) * hp.n_vocab * sizeof(float), "logits");
  }
}

void OpenCLStage::run_layers(const Chunk& c, float* hidden) {
  OpenCLDevice& d = d_;
  const HParams& hp = d.hp;
  const int n = c.n;
  const size_t nd = size_t(n) * hp.n_embd;
  const cl_int q_dim = hp.n_head * hp.head_dim, kv_dim = hp.n_head_kv * hp.head_dim;
  d.queue.write(d.x, 0, nd * sizeof(float), hidden);
  d.upload_chunk(c);
  if (c.lora != nullptr) {
    d.ensure(d.lora_coef, c.lora->coef.size() * sizeof(float), "LoRA coefficients");
    d.queue.write(d.lora_coef, 0, c.lora->coef.size() * sizeof(float), c.lora->coef.data());
  }
  const ModelWeights& host = d.model.weights();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hp.head_dim));
  for (int il = range().first; il < range().last; ++il) {
    const LayerSlots<Tensor>& L = d.w.layers[il];
    const Buffer& kc = k_[il - range().first];
    const Buffer& vc = v_[il - range().first];
    norm(c, il, DeltaSlot::AttnNorm, host.layers[il].attn_norm, L.attn_norm, d.x, d.xb);
    d.mul_mat(L.wq, d.xb, n, d.q);
    d.mul_mat(L.wk, d.xb, n, d.k);
    d.mul_mat(L.wv, d.xb, n, d.v);
    lora_terms(c, il, LoraSlot::Q, d.xb, d.q, q_dim);
    lora_terms(c, il, LoraSlot::K, d.xb, d.k, kv_dim);
    lora_terms(c, il, LoraSlot::V, d.xb, d.v, kv_dim);
    d.bias(d.q, L.bq, n);
    d.bias(d.k, L.bk, n);
    d.bias(d.v, L.bv, n);
    bias_delta(c, il, DeltaSlot::BQ, d.q, q_dim);
    bias_delta(c, il, DeltaSlot::BK, d.k, kv_dim);
    bias_delta(c, il, DeltaSlot::BV, d.v, kv_dim);
    for (auto [buf, heads] : {std::pair<const Buffer*, cl_int>{&d.q, hp.n_head}, {&d.k, hp.n_head_kv}}) {
      d.k_rope.args(*buf, d.rope, heads, static_cast<cl_int>(hp.head_dim),
                    static_cast<cl_int>(hp.n_rot), static_cast<cl_int>(hp.rope_neox ? 1 : 0));
      d.queue.run(d.k_rope, {size_t(hp.n_rot / 2), size_t(heads), size_t(n)});
    }
    for (auto [src, cache] : {std::pair<const Buffer*, const Buffer*>{&d.k, &kc}, {&d.v, &vc}}) {
      d.k_kv_store.args(*src, *cache, d.kv_rows, static_cast<cl_long>(row_bytes_), kv_dim,
                        static_cast<cl_int>(kv_type_));
      d.queue.run(d.k_kv_store, {size_t(kv_dim / 32), size_t(n)});
    }
    d.k_attention.args(d.q, d.att, kc, vc, static_cast<cl_long>(row_bytes_),
                       static_cast<cl_long>(head_bytes_), static_cast<cl_int>(kv_type_), d.region,
                       d.visible, static_cast<cl_int>(hp.n_head),
                       static_cast<cl_int>(hp.n_head / hp.n_head_kv),
                       static_cast<cl_int>(hp.head_dim), scale,
                       Local{size_t(hp.head_dim) * sizeof(float)}, Local{kWG * sizeof(float)});
    d.queue.run(d.k_attention, {kWG, size_t(hp.n_head), size_t(n)}, {kWG, 1, 1});
    d.mul_mat(L.wo, d.att, n, d.xb);
    lora_terms(c, il, LoraSlot::O, d.att, d.xb, hp.n_embd);
    d.bias(d.xb, L.bo, n);
    bias_delta(c, il, DeltaSlot::BO, d.xb, hp.n_embd);
    d.k_add.args(d.x, d.xb);
    d.queue.run(d.k_add, {nd});
    norm(c, il, DeltaSlot::FfnNorm, host.layers[il].ffn_norm, L.ffn_norm, d.x, d.xb);
    d.mul_mat(L.w_gate, d.xb, n, d.gate);
    d.mul_mat(L.w_up, d.xb, n, d.up);
    lora_terms(c, il, LoraSlot::Gate, d.xb, d.gate, hp.n_ff);
    lora_terms(c, il, LoraSlot::Up, d.xb, d.up, hp.n_ff);
    d.bias(d.gate, L.b_gate, n);
    d.bias(d.up, L.b_up, n);
    bias_delta(c, il, DeltaSlot::BGate, d.gate, hp.n_ff);
    bias_delta(c, il, DeltaSlot::BUp, d.up, hp.n_ff);
    d.k_swiglu.args(d.gate, d.up);
    d.queue.run(d.k_swiglu, {size_t(n) * hp.n_ff});
    d.mul_mat(L.w_down, d.gate, n, d.xb);
    lora_terms(c, il, LoraSlot::Down, d.gate, d.xb, hp.n_embd);
    d.bias(d.xb, L.b_down, n);
    bias_delta(c, il, DeltaSlot::BDown, d.xb, hp.n_embd);
    d.k_add.args(d.x, d.xb);
    d.queue.run(d.k_add, {nd});
  }
  d.queue.read(d.x, 0, nd * sizeof(float), hidden);
}

void OpenCLStage::set_lora_adapters(
    const std::vector<std::shared_ptr<const LoraAdapter>>& adapters) {
  OpenCLDevice& d = d_;
  const HParams& hp = d.hp;
  std::vector<ClAdapter> made;
  int max_rank = 0;
  for (const auto& a : adapters) {
    ClAdapter ca;
    ca.src = a.get();
    for (int il = range().first; il < range().last; ++il) {
      ca.layers.emplace_back();
      for (int s = 0; s < kLoraSlots; ++s) {
        const LoraPair* p = a->get(il, static_cast<LoraSlot>(s));
        if (p == nullptr) continue;
        const std::vector<uint8_t> b = p->b_rows();
        ClPair& cp = ca.layers.back()[static_cast<size_t>(s)];
        cp.a.buf = Buffer(d.rt.context(), p->a.size(), CL_MEM_READ_ONLY, p->a.data());
        cp.a.type = p->a_type;
        cp.b.type = p->b_type;
        cp.a.rows = p->rank;
        cp.a.cols = p->n_in;
        cp.b.buf = Buffer(d.rt.context(), b.size(), CL_MEM_READ_ONLY, b.data());
        cp.b.rows = p->n_out;
        cp.b.cols = p->rank;
        cp.factor = p->factor;
        max_rank = std::max(max_rank, p->rank);
      }
    }
    made.push_back(std::move(ca));
  }
  if (!adapters.empty()) {
    const size_t n = static_cast<size_t>(d.params.n_batch);
    const size_t widest = std::max<size_t>({size_t(hp.n_embd), size_t(hp.n_ff),
                                            size_t(hp.n_head) * hp.head_dim});
    d.ensure(d.lora_u, n * std::max(max_rank, 1) * sizeof(float), "LoRA activations");
    d.ensure(d.lora_y, n * widest * sizeof(float), "LoRA activations");
  }
  lora_ = std::move(made);
}

const OpenCLStage::ClAdapter& OpenCLStage::uploaded(const LoraAdapter* a) const {
  for (const ClAdapter& ca : lora_) {
    if (ca.src == a) return ca;
  }
  throw std::logic_error("a chunk names a LoRA adapter the stage was not given");
}

void OpenCLStage::lora_terms(const Chunk& c, int layer, LoraSlot slot, const Buffer& x,
                             const Buffer& y, int64_t n_out) {
  if (c.lora == nullptr) return;
  OpenCLDevice& d = d_;
  for (size_t ai = 0; ai < c.lora->adapters.size(); ++ai) {
    const ClPair& p =
        uploaded(c.lora->adapters[ai]).layers[layer - range().first][static_cast<size_t>(slot)];
    if (!p.a.present()) continue;
    d.mul_mat(p.a, x, c.n, d.lora_u);
    d.k_scale_rows.args(d.lora_u, d.lora_coef, static_cast<cl_int>(ai * c.n), p.factor,
                        static_cast<cl_int>(p.a.rows));
    d.queue.run(d.k_scale_rows, {size_t(c.n) * p.a.rows});
    d.mul_mat(p.b, d.lora_u, c.n, d.lora_y);
    d.k_add.args(y, d.lora_y);
    d.queue.run(d.k_add, {size_t(c.n) * n_out});
  }
}

void OpenCLStage::norm(const Chunk& c, int layer, DeltaSlot slot, const WeightView& host_w,
                       const Tensor& w, const Buffer& x, const Buffer& xb) {
  OpenCLDevice& d = d_;
  if (delta_norm_weights(c.lora, layer, slot, static_cast<const float*>(host_w.data),
                         d.hp.n_embd, nullptr, c.n, d.host_vecs, d.host_which)) {
    d.rms_norm_delta(x, xb, c.n);
  } else {
    d.rms_norm(x, w, xb, c.n);
  }
}

void OpenCLStage::bias_delta(const Chunk& c, int layer, DeltaSlot slot, const Buffer& y,
                             int64_t dim) {
  OpenCLDevice& d = d_;
  if (!delta_norm_weights(c.lora, layer, slot, nullptr, dim, nullptr, c.n, d.host_vecs,
                          d.host_which)) {
    return;
  }
  d.upload_deltas(c.n);
  d.k_add_rows.args(y, d.delta_v, d.delta_which, static_cast<cl_int>(dim));
  d.queue.run(d.k_add_rows, {size_t(c.n) * dim});
}

void OpenCLStage::output(const float* hidden, const int* rows, int count, float* logits,
                         const LoraChunk* lora) {
  if (!range().head) throw std::logic_error("output() on a stage without the model's head");
  OpenCLDevice& d = d_;
  const int64_t dim = d.hp.n_embd;
  gathered_.resize(size_t(count) * dim);  // keeps its capacity: no allocation per token
  for (int r = 0; r < count; ++r) {
    std::copy(hidden + rows[r] * dim, hidden + (rows[r] + 1) * dim, gathered_.begin() + r * dim);
  }
  d.queue.write(head_in_, 0, gathered_.size() * sizeof(float), gathered_.data());
  if (delta_norm_weights(lora, 0, DeltaSlot::OutputNorm,
                         static_cast<const float*>(d.model.weights().output_norm.data), dim, rows,
                         count, d.host_vecs, d.host_which)) {
    d.rms_norm_delta(head_in_, d.xb, count);
  } else {
    d.rms_norm(head_in_, d.w.output_norm, d.xb, count);
  }
  d.mul_mat(d.w.output, d.xb, count, logits_);
  d.queue.read(logits_, 0, size_t(count) * d.hp.n_vocab * sizeof(float), logits);
}

void OpenCLStage::save_state(int seq, int n_past, uint8_t* out) const {
  const size_t bytes = size_t(n_past) * row_bytes_;
  const size_t base = size_t(seq) * d_.params.n_ctx * row_bytes_;  // the sequence's first row
  for (size_t i = 0; i < k_.size(); ++i) {
    d_.queue.read(k_[i], base, bytes, out);
    out += bytes;
    d_.queue.read(v_[i], base, bytes, out);
    out += bytes;
  }
}

void OpenCLStage::load_state(int seq, int n_past, const uint8_t* in) {
  const size_t bytes = size_t(n_past) * row_bytes_;
  const size_t base = size_t(seq) * d_.params.n_ctx * row_bytes_;
  for (size_t i = 0; i < k_.size(); ++i) {
    d_.queue.write(k_[i], base, bytes, in);
    in += bytes;
    d_.queue.write(v_[i], base, bytes, in);
    in += bytes;
  }
}

std::unique_ptr<Device> OpenCLBackend::open(const Model& model, const ContextParams& params) const {
  const auto* store = dynamic_cast<const ClWeights*>(model.weight_store(name_));
  if (store == nullptr) throw std::logic_error(name_ + ": the model placed no layers here");
  return std::make_unique<OpenCLDevice>(*this, Runtime::get(index_), model, *store, params);
}

}  // namespace

const Backend& opencl_backend(int index) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<OpenCLBackend>> made;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = made[index];
  if (!slot) slot = std::make_unique<OpenCLBackend>(index);
  return *slot;
}

std::vector<DeviceInfo> opencl_device_infos() {
  std::vector<DeviceInfo> out;
  std::vector<opencl::DeviceDesc> devices;
  try {
    devices = opencl::list_devices();
  } catch (const DeviceError&) {
    return out;  // a filter that matches nothing lists nothing
  }
  for (size_t i = 0; i < devices.size(); ++i) {
    const opencl::DeviceDesc& d = devices[i];
    out.push_back(DeviceInfo{"opencl:" + std::to_string(i), d.name,
                             d.platform_name + ", " + d.version + ", max work-group " +
                                 std::to_string(d.max_work_group) + ", local memory " +
                                 std::to_string(d.local_mem / 1024) + " KiB",
                             d.global_mem});
  }
  return out;
}

}  // namespace pyllm
