// CudaBackend, CudaDevice and CudaStage (see backend.h): weights uploaded at load in their GGUF
// form, the layer loop as kernels (kernels.cuh) on one stream per context, the K/V cache of the
// stage's layers in device memory; LoRA pairs uploaded when the context sets its adapters.
// Mirrors csrc/opencl/backend.cc.
#include "cuda/backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "backend/placed_weights.h"
#include "cuda/kernels.cuh"
#include "pyllm/model.h"
#include "pyllm/quant.h"

namespace pyllm {
namespace {

constexpr int kWG = 64;  // threads of the reductions and of mul_mat's blocks

std::string mib(uint64_t bytes) { return std::to_string((bytes + (1 << 19)) >> 20) + " MiB"; }

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw DeviceError(std::string("CUDA: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                      cudaGetErrorString(err) + ")");
  }
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error, report none
    return 0;
  }
  return n;
}

// Owning device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes, const void* host = nullptr, const char* what = "buffer")
      : bytes_(bytes) {
    const cudaError_t err = cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes);
    if (err != cudaSuccess) {
      cudaGetLastError();
      ptr_ = nullptr;
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      throw DeviceError(std::string("out of device memory allocating ") + mib(bytes) + " for " +
                        what + " (" + mib(free_b) + " free of " + mib(total_b) + ")");
    }
    if (host) check(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(o.bytes_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = o.bytes_;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  explicit operator bool() const { return ptr_ != nullptr; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct Tensor {
  DeviceBuffer buf;
  QType type = QType::F32;
  int64_t rows = 0, cols = 0;
  bool present() const { return static_cast<bool>(buf); }
  int64_t row_bytes() const { return row_size(type, cols); }
};

using CudaWeights = PlacedWeights<Tensor>;

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int index) : index_(index), name_("cuda:" + std::to_string(index)) {}
  const char* name() const override { return name_.c_str(); }
  std::unique_ptr<WeightStore> prepare(const HParams& hp, ModelWeights& weights,
                                       const std::vector<LayerRange>& ranges,
                                       const ModelOptions& options) const override;
  std::unique_ptr<Device> open(const Model& model, const ContextParams& params) const override;
  // Selects this backend's device on the calling thread (throws DeviceError when it is absent).
  void use() const {
    const int n = device_count();
    if (n == 0) {
      throw DeviceError("no CUDA device found (an NVIDIA GPU and its driver are needed; "
                        "CUDA_VISIBLE_DEVICES may hide them)");
    }
    if (index_ >= n) {
      throw DeviceError("CUDA device " + std::to_string(index_) + " does not exist (" +
                        std::to_string(n) + " found; pyllm.devices() lists them)");
    }
    check(cudaSetDevice(index_), "cudaSetDevice");
  }
  // The device is per host thread, and a context may be driven from another thread than the one
  // that made it (the server's engine): every entry point selects it again.
  void select() const { check(cudaSetDevice(index_), "cudaSetDevice"); }
  int index() const { return index_; }

 private:
  int index_;
  std::string name_;
};

std::unique_ptr<WeightStore> CudaBackend::prepare(const HParams& hp, ModelWeights& weights,
                                                  const std::vector<LayerRange>& ranges,
                                                  const ModelOptions&) const {
  use();
  if (hp.head_dim % 32 != 0 || hp.head_dim > 4 * cuda::kAttnThreads) {
    throw DeviceError("the CUDA backend needs a head size that is a multiple of 32, at most " +
                      std::to_string(4 * cuda::kAttnThreads) + " (this model's is " +
                      std::to_string(hp.head_dim) + ")");
  }
  const uint64_t total =
      placed_weight_bytes(weights, ranges, std::numeric_limits<uint64_t>::max(), name_);
  size_t free_b = 0, total_b = 0;
  check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  free_b = device_room(free_b);
  if (total > free_b) {
    throw DeviceError("the layers placed on " + name_ + " need " + mib(total) +
                      " of weights but the device has " + mib(free_b) + " free (of " +
                      mib(total_b) + "); offload fewer layers");
  }
  return std::make_unique<CudaWeights>(weights, ranges, [](const WeightView& v) {
    Tensor t;
    t.buf = DeviceBuffer(static_cast<size_t>(v.nbytes), v.data, v.name.c_str());
    t.type = v.type;
    t.rows = v.rows;
    t.cols = v.cols;
    return t;
  });
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

class CudaDevice final : public Device {
 public:
  CudaDevice(const CudaBackend& backend, const Model& m, const CudaWeights& w,
             const ContextParams& p)
      : backend_(backend), model(m), hp(m.hparams()), w(w), params(p) {
    backend.use();
    check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    const size_t n = static_cast<size_t>(p.n_batch);
    const size_t q_dim = size_t(hp.n_head) * hp.head_dim, kv_dim = size_t(hp.n_head_kv) * hp.head_dim;
    x = DeviceBuffer(n * hp.n_embd * sizeof(float), nullptr, "activations");
    xb = DeviceBuffer(n * std::max<size_t>(hp.n_embd, q_dim) * sizeof(float), nullptr, "activations");
    q = DeviceBuffer(n * q_dim * sizeof(float), nullptr, "activations");
    k = DeviceBuffer(n * kv_dim * sizeof(float), nullptr, "activations");
    v = DeviceBuffer(n * kv_dim * sizeof(float), nullptr, "activations");
    att = DeviceBuffer(n * q_dim * sizeof(float), nullptr, "activations");
    gate = DeviceBuffer(n * hp.n_ff * sizeof(float), nullptr, "activations");
    up = DeviceBuffer(n * hp.n_ff * sizeof(float), nullptr, "activations");
    rope = DeviceBuffer(n * hp.n_rot * sizeof(float), nullptr, "the chunk plan");
    kv_rows = DeviceBuffer(n * sizeof(int64_t), nullptr, "the chunk plan");
    region = DeviceBuffer(n * sizeof(int64_t), nullptr, "the chunk plan");
    visible = DeviceBuffer(n * sizeof(int), nullptr, "the chunk plan");
  }
  ~CudaDevice() override {
    if (stream) {
      cudaSetDevice(backend_.index());
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
  }
  const char* name() const override { return backend_.name(); }
  std::unique_ptr<Stage> make_stage(const LayerRange& range) override;
  int n_threads() const override { return 0; }

  void launched(const char* what) { check(cudaGetLastError(), what); }
  void write(void* dst, const void* src, size_t bytes) {
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), "upload");
  }
  void read(void* dst, const void* src, size_t bytes) {
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream), "download");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }

  void mul_mat(const Tensor& m, const float* xin, int n, float* yout) {
    if (n >= 4) {
      const dim3 grid(blocks_for(m.rows, cuda::kTileRows), blocks_for(n, cuda::kTileRows));
      cuda::mul_mat_tiled<<<grid, dim3(cuda::kTile, cuda::kTile), 0, stream>>>(
          m.buf.get<uint8_t>(), static_cast<int>(m.type), m.row_bytes(), static_cast<int>(m.cols),
          xin, yout, static_cast<int>(m.rows), n);
    } else {
      cuda::mul_mat<<<dim3(static_cast<unsigned>(m.rows), n), kWG, kWG * sizeof(float), stream>>>(
          m.buf.get<uint8_t>(), static_cast<int>(m.type), m.row_bytes(), static_cast<int>(m.cols),
          xin, yout, static_cast<int>(m.rows));
    }
    launched("mul_mat");
  }
  void rms_norm(const float* in, const Tensor& weight, float* out, int n) {
    cuda::rms_norm<<<n, kWG, kWG * sizeof(float), stream>>>(in, weight.buf.get<float>(), nullptr,
                                                            out, hp.n_embd, hp.rms_eps);
    launched("rms_norm");
  }
  // The same with a norm delta: row r's weights are host_vecs[host_which[r]] (uploaded here).
  void rms_norm_delta(const float* in, float* out, int n) {
    upload_deltas(n);
    cuda::rms_norm<<<n, kWG, kWG * sizeof(float), stream>>>(
        in, delta_v.get<float>(), delta_which.get<int>(), out, hp.n_embd, hp.rms_eps);
    launched("rms_norm");
  }
  // Buffer b holds at least `bytes` (grown, its contents dropped, when it does not); the
  // stream is drained first, as a kernel in flight may still read the old one.
  void ensure(DeviceBuffer& b, size_t bytes, const char* what) {
    if (b.bytes() >= bytes && b) return;
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    b = DeviceBuffer(bytes, nullptr, what);
  }
  void upload_deltas(int n) {
    ensure(delta_v, host_vecs.size() * sizeof(float), "LoRA deltas");
    ensure(delta_which, size_t(n) * sizeof(int), "LoRA deltas");
    write(delta_v.get(), host_vecs.data(), host_vecs.size() * sizeof(float));
    write(delta_which.get(), host_which.data(), size_t(n) * sizeof(int));
  }
  void bias(float* y, const Tensor& b, int n) {
    if (!b.present()) return;
    const int64_t total = int64_t(n) * b.cols;
    cuda::add_bias<<<blocks_for(total, 256), 256, 0, stream>>>(y, b.buf.get<float>(),
                                                               static_cast<int>(b.cols), total);
    launched("add_bias");
  }
  void upload_chunk(const Chunk& c) {
    const AttentionSchedule& s = *c.schedule;
    host_rows.assign(s.kv_row.begin(), s.kv_row.begin() + c.n);
    host_region.resize(c.n);
    for (int t = 0; t < c.n; ++t) host_region[t] = int64_t(c.seq[t]) * params.n_ctx;
    write(rope.get(), c.rope, sizeof(float) * c.n * hp.n_rot);
    write(kv_rows.get(), host_rows.data(), sizeof(int64_t) * c.n);
    write(region.get(), host_region.data(), sizeof(int64_t) * c.n);
    write(visible.get(), s.visible.data(), sizeof(int) * c.n);
  }

  const CudaBackend& backend_;
  const Model& model;
  const HParams& hp;
  const CudaWeights& w;
  ContextParams params;
  cudaStream_t stream = nullptr;
  DeviceBuffer x, xb, q, k, v, att, gate, up, rope, kv_rows, region, visible;
  std::vector<int64_t> host_rows, host_region;
  // LoRA scratch (allocated when adapters are set): A x per token, B of that, the chunk's
  // coefficients, and the per-run vectors of deltas with each token's run
  DeviceBuffer lora_u, lora_y, lora_coef, delta_v, delta_which;
  std::vector<float> host_vecs;
  std::vector<int> host_which;
};

class CudaStage final : public Stage {
 public:
  CudaStage(CudaDevice& dev, const LayerRange& range)
      : Stage(range), d_(dev), kv_type_(kv_element_type(dev.params.kv_type)) {
    const HParams& hp = dev.hp;
    row_bytes_ = row_size(kv_type_, int64_t(hp.n_head_kv) * hp.head_dim);
    head_bytes_ = row_size(kv_type_, hp.head_dim);
    const size_t rows = size_t(dev.params.n_ctx) * dev.params.n_seq;
    for (int il = range.first; il < range.last; ++il) {
      k_.emplace_back(rows * row_bytes_, nullptr, "the K/V cache");
      v_.emplace_back(rows * row_bytes_, nullptr, "the K/V cache");
    }
    if (range.head) {
      head_in_ = DeviceBuffer(size_t(dev.params.n_batch) * hp.n_embd * sizeof(float), nullptr,
                              "activations");
      logits_ = DeviceBuffer(size_t(dev.params.n_batch) * hp.n_vocab * sizeof(float), nullptr,
                             "the logits");
    }
  }

  void run_layers(const Chunk& c, float* hidden) override {
    CudaDevice& d = d_;
    d.backend_.select();
    const HParams& hp = d.hp;
    const int n = c.n;
    const int64_t nd = int64_t(n) * hp.n_embd;
    const int kv_dim = hp.n_head_kv * hp.head_dim;
    float* x = d.x.get<float>();
    float* xb = d.xb.get<float>();
    d.write(x, hidden, nd * sizeof(float));
    d.upload_chunk(c);
    if (c.lora != nullptr) {
      d.ensure(d.lora_coef, c.lora->coef.size() * sizeof(float), "LoRA coefficients");
      d.write(d.lora_coef.get(), c.lora->coef.data(), c.lora->coef.size() * sizeof(float));
    }
    const ModelWeights& host = d.model.weights();
    const int q_dim = hp.n_head * hp.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hp.head_dim));
    const size_t attn_shared = (size_t(hp.head_dim) + cuda::kAttnThreads) * sizeof(float);
    for (int il = range().first; il < range().last; ++il) {
      const LayerSlots<Tensor>& L = d.w.layers[il];
      uint8_t* kc = k_[il - range().first].get<uint8_t>();
      uint8_t* vc = v_[il - range().first].get<uint8_t>();
      norm(c, il, DeltaSlot::AttnNorm, host.layers[il].attn_norm, L.attn_norm, x, xb);
      d.mul_mat(L.wq, xb, n, d.q.get<float>());
      d.mul_mat(L.wk, xb, n, d.k.get<float>());
      d.mul_mat(L.wv, xb, n, d.v.get<float>());
      lora_terms(c, il, LoraSlot::Q, xb, d.q.get<float>(), q_dim);
      lora_terms(c, il, LoraSlot::K, xb, d.k.get<float>(), kv_dim);
      lora_terms(c, il, LoraSlot::V, xb, d.v.get<float>(), kv_dim);
      d.bias(d.q.get<float>(), L.bq, n);
      d.bias(d.k.get<float>(), L.bk, n);
      d.bias(d.v.get<float>(), L.bv, n);
      bias_delta(c, il, DeltaSlot::BQ, d.q.get<float>(), q_dim);
      bias_delta(c, il, DeltaSlot::BK, d.k.get<float>(), kv_dim);
      bias_delta(c, il, DeltaSlot::BV, d.v.get<float>(), kv_dim);
      cuda::rope<<<dim3(hp.n_head, n), hp.n_rot / 2, 0, d.stream>>>(
          d.q.get<float>(), d.rope.get<float>(), hp.n_head, hp.head_dim, hp.n_rot, hp.rope_neox);
      cuda::rope<<<dim3(hp.n_head_kv, n), hp.n_rot / 2, 0, d.stream>>>(
          d.k.get<float>(), d.rope.get<float>(), hp.n_head_kv, hp.head_dim, hp.n_rot, hp.rope_neox);
      d.launched("rope");
      cuda::kv_store<<<dim3(kv_dim / 32, n), 1, 0, d.stream>>>(
          d.k.get<float>(), kc, d.kv_rows.get<int64_t>(), row_bytes_, kv_dim, static_cast<int>(kv_type_));
      cuda::kv_store<<<dim3(kv_dim / 32, n), 1, 0, d.stream>>>(
          d.v.get<float>(), vc, d.kv_rows.get<int64_t>(), row_bytes_, kv_dim, static_cast<int>(kv_type_));
      d.launched("kv_store");
      cuda::attention<<<dim3(hp.n_head, n), cuda::kAttnThreads, attn_shared, d.stream>>>(
          d.q.get<float>(), d.att.get<float>(), kc, vc, row_bytes_, head_bytes_,
          static_cast<int>(kv_type_), d.region.get<int64_t>(), d.visible.get<int>(), hp.n_head,
          hp.n_head / hp.n_head_kv, hp.head_dim, scale);
      d.launched("attention");
      d.mul_mat(L.wo, d.att.get<float>(), n, xb);
      lora_terms(c, il, LoraSlot::O, d.att.get<float>(), xb, hp.n_embd);
      d.bias(xb, L.bo, n);
      bias_delta(c, il, DeltaSlot::BO, xb, hp.n_embd);
      cuda::add<<<blocks_for(nd, 256), 256, 0, d.stream>>>(x, xb, nd);
      norm(c, il, DeltaSlot::FfnNorm, host.layers[il].ffn_norm, L.ffn_norm, x, xb);
      d.mul_mat(L.w_gate, xb, n, d.gate.get<float>());
      d.mul_mat(L.w_up, xb, n, d.up.get<float>());
      lora_terms(c, il, LoraSlot::Gate, xb, d.gate.get<float>(), hp.n_ff);
      lora_terms(c, il, LoraSlot::Up, xb, d.up.get<float>(), hp.n_ff);
      d.bias(d.gate.get<float>(), L.b_gate, n);
      d.bias(d.up.get<float>(), L.b_up, n);
      bias_delta(c, il, DeltaSlot::BGate, d.gate.get<float>(), hp.n_ff);
      bias_delta(c, il, DeltaSlot::BUp, d.up.get<float>(), hp.n_ff);
      const int64_t nff = int64_t(n) * hp.n_ff;
      cuda::swiglu<<<blocks_for(nff, 256), 256, 0, d.stream>>>(d.gate.get<float>(), d.up.get<float>(), nff);
      d.mul_mat(L.w_down, d.gate.get<float>(), n, xb);
      lora_terms(c, il, LoraSlot::Down, d.gate.get<float>(), xb, hp.n_embd);
      d.bias(xb, L.b_down, n);
      bias_delta(c, il, DeltaSlot::BDown, xb, hp.n_embd);
      cuda::add<<<blocks_for(nd, 256), 256, 0, d.stream>>>(x, xb, nd);
      d.launched("the layer's element-wise kernels");
    }
    d.read(hidden, x, nd * sizeof(float));
  }

  void output(const float* hidden, const int* rows, int count, float* logits,
              const LoraChunk* lora) override {
    if (!range().head) throw std::logic_error("output() on a stage without the model's head");
    CudaDevice& d = d_;
    d.backend_.select();
    const int64_t dim = d.hp.n_embd;
    gathered_.resize(size_t(count) * dim);  // keeps its capacity: no allocation per token
    for (int r = 0; r < count; ++r) {
      std::copy(hidden + rows[r] * dim, hidden + (rows[r] + 1) * dim, gathered_.begin() + r * dim);
    }
    d.write(head_in_.get(), gathered_.data(), gathered_.size() * sizeof(float));
    if (delta_norm_weights(lora, 0, DeltaSlot::OutputNorm,
                           static_cast<const float*>(d.model.weights().output_norm.data), dim,
                           rows, count, d.host_vecs, d.host_which)) {
      d.rms_norm_delta(head_in_.get<float>(), d.xb.get<float>(), count);
    } else {
      d.rms_norm(head_in_.get<float>(), d.w.output_norm, d.xb.get<float>(), count);
    }
    d.mul_mat(d.w.output, d.xb.get<float>(), count, logits_.get<float>());
    d.read(logits, logits_.get(), size_t(count) * d.hp.n_vocab * sizeof(float));
  }

  int64_t state_bytes(int n_past) const override {
    return 2 * int64_t(n_past) * row_bytes_ * static_cast<int64_t>(k_.size());
  }
  void save_state(int seq, int n_past, uint8_t* out) const override {
    d_.backend_.select();
    const size_t bytes = size_t(n_past) * row_bytes_;
    const size_t base = size_t(seq) * d_.params.n_ctx * row_bytes_;  // the sequence's first row
    for (size_t i = 0; i < k_.size(); ++i) {
      d_.read(out, static_cast<const char*>(k_[i].get()) + base, bytes);
      out += bytes;
      d_.read(out, static_cast<const char*>(v_[i].get()) + base, bytes);
      out += bytes;
    }
  }
  void load_state(int seq, int n_past, const uint8_t* in) override {
    d_.backend_.select();
    const size_t bytes = size_t(n_past) * row_bytes_;
    const size_t base = size_t(seq) * d_.params.n_ctx * row_bytes_;
    for (size_t i = 0; i < k_.size(); ++i) {
      d_.write(static_cast<char*>(k_[i].get()) + base, in, bytes);
      in += bytes;
      d_.write(static_cast<char*>(v_[i].get()) + base, in, bytes);
      in += bytes;
    }
    check(cudaStreamSynchronize(d_.stream), "cudaStreamSynchronize");
  }

  void set_lora_adapters(
      const std::vector<std::shared_ptr<const LoraAdapter>>& adapters) override {
    CudaDevice& d = d_;
    d.backend_.select();
    const HParams& hp = d.hp;
    std::vector<CuAdapter> made;
    int max_rank = 0;
    for (const auto& a : adapters) {
      CuAdapter ca;
      ca.src = a.get();
      for (int il = range().first; il < range().last; ++il) {
        ca.layers.emplace_back();
        for (int s = 0; s < kLoraSlots; ++s) {
          const LoraPair* p = a->get(il, static_cast<LoraSlot>(s));
          if (p == nullptr) continue;
          const std::vector<uint8_t> b = p->b_rows();
          CuPair& cp = ca.layers.back()[static_cast<size_t>(s)];
          cp.a.buf = DeviceBuffer(p->a.size(), p->a.data(), "a LoRA adapter");
          cp.a.type = p->a_type;
          cp.b.type = p->b_type;
          cp.a.rows = p->rank;
          cp.a.cols = p->n_in;
          cp.b.buf = DeviceBuffer(b.size(), b.data(), "a LoRA adapter");
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
    check(cudaStreamSynchronize(d.stream), "cudaStreamSynchronize");  // old pairs unused now
    lora_ = std::move(made);
  }

 private:
  // LoRA: each adapter's pairs of the stage's layers in device memory (a: rank x n_in, b:
  // n_out x rank, the file's F32 or F16; absent: a.buf null)
  struct CuPair {
    Tensor a, b;
    float factor = 0.0f;
  };
  struct CuAdapter {
    const LoraAdapter* src = nullptr;
    std::vector<std::array<CuPair, kLoraSlots>> layers;
  };

  const CuAdapter& uploaded(const LoraAdapter* a) const {
    for (const CuAdapter& ca : lora_) {
      if (ca.src == a) return ca;
    }
    throw std::logic_error("a chunk names a LoRA adapter the stage was not given");
  }
  // y (n rows of n_out) += the chunk's low-rank terms of `slot` for input x
  void lora_terms(const Chunk& c, int layer, LoraSlot slot, const float* x, float* y,
                  int64_t n_out) {
    if (c.lora == nullptr) return;
    CudaDevice& d = d_;
    for (size_t ai = 0; ai < c.lora->adapters.size(); ++ai) {
      const CuPair& p =
          uploaded(c.lora->adapters[ai]).layers[layer - range().first][static_cast<size_t>(slot)];
      if (!p.a.present()) continue;
      d.mul_mat(p.a, x, c.n, d.lora_u.get<float>());
      const int64_t nu = int64_t(c.n) * p.a.rows;
      cuda::scale_rows<<<blocks_for(nu, 256), 256, 0, d.stream>>>(
          d.lora_u.get<float>(), d.lora_coef.get<float>() + ai * c.n, p.factor,
          static_cast<int>(p.a.rows), nu);
      d.launched("scale_rows");
      d.mul_mat(p.b, d.lora_u.get<float>(), c.n, d.lora_y.get<float>());
      const int64_t ny = int64_t(c.n) * n_out;
      cuda::add<<<blocks_for(ny, 256), 256, 0, d.stream>>>(y, d.lora_y.get<float>(), ny);
      d.launched("add");
    }
  }
  // xb = rms_norm(x) with the layer's norm weights w (host copy host_w) and its deltas
  void norm(const Chunk& c, int layer, DeltaSlot slot, const WeightView& host_w, const Tensor& w,
            const float* x, float* xb) {
    CudaDevice& d = d_;
    if (delta_norm_weights(c.lora, layer, slot, static_cast<const float*>(host_w.data),
                           d.hp.n_embd, nullptr, c.n, d.host_vecs, d.host_which)) {
      d.rms_norm_delta(x, xb, c.n);
    } else {
      d.rms_norm(x, w, xb, c.n);
    }
  }
  // y's rows (of dim) += the chunk's bias deltas of `slot`
  void bias_delta(const Chunk& c, int layer, DeltaSlot slot, float* y, int64_t dim) {
    CudaDevice& d = d_;
    if (!delta_norm_weights(c.lora, layer, slot, nullptr, dim, nullptr, c.n, d.host_vecs,
                            d.host_which)) {
      return;
    }
    d.upload_deltas(c.n);
    const int64_t total = int64_t(c.n) * dim;
    cuda::add_rows<<<blocks_for(total, 256), 256, 0, d.stream>>>(
        y, d.delta_v.get<float>(), d.delta_which.get<int>(), static_cast<int>(dim), total);
    d.launched("add_rows");
  }

  CudaDevice& d_;
  QType kv_type_;
  int64_t row_bytes_, head_bytes_;
  std::vector<DeviceBuffer> k_, v_;
  DeviceBuffer head_in_, logits_;
  std::vector<float> gathered_;  // the hidden rows output() scores, gathered on the host
  std::vector<CuAdapter> lora_;
};

std::unique_ptr<Stage> CudaDevice::make_stage(const LayerRange& range) {
  return std::make_unique<CudaStage>(*this, range);
}

std::unique_ptr<Device> CudaBackend::open(const Model& model, const ContextParams& params) const {
  const auto* store = dynamic_cast<const CudaWeights*>(model.weight_store(name_));
  if (store == nullptr) throw std::logic_error(name_ + ": the model placed no layers here");
  return std::make_unique<CudaDevice>(*this, model, *store, params);
}

}  // namespace

const Backend& cuda_backend(int index) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<CudaBackend>> made;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = made[index];
  if (!slot) slot = std::make_unique<CudaBackend>(index);
  return *slot;
}

std::vector<DeviceInfo> cuda_device_infos() {
  std::vector<DeviceInfo> out;
  const int n = device_count();
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    out.push_back(DeviceInfo{"cuda:" + std::to_string(i), prop.name,
                             "compute capability " + std::to_string(prop.major) + "." +
                                 std::to_string(prop.minor) + ", " +
                                 std::to_string(prop.multiProcessorCount) + " SMs",
                             static_cast<uint64_t>(prop.totalGlobalMem)});
  }
  return out;
}

}  // namespace pyllm
