// The CPU backend behind the device seam (csrc/backend/backend.h): CpuBackend prepares the
// weights at load; a CpuDevice is one context's thread pool and scratch activations; a CpuStage runs a range of Llama layers over a chunk,
// with the K/V rows of those layers, and on the head stage the final norm and output projection.
//
//   per layer:  h = rms_norm(x) * attn_norm
//               q,k,v = h Wq, h Wk, h Wv (+ biases)     [n][n_head*hd], [n][n_kv*hd] x2
//               rope(q), rope(k); K/V cache[pos] = k, v
//               a = softmax(q K^T / sqrt(hd)) V         causal, per head, GQA groups share K/V
//               x += a Wo
//               h = rms_norm(x) * ffn_norm
//               x += (silu(h Wgate) * (h Wup)) Wdown
//   head:       logits = rms_norm(x) * output_norm  Wout
// Weights are read straight from the memory map (or their rows16 copies) through the matmul
// kernels; activations stay F32 throughout (the accuracy bar is set by the exact model, not by
// llama.cpp's int8 path).
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "cpu/kv_cache.h"
#include "cpu/matmul.h"
#include "cpu/scratch.h"
#include "cpu/threadpool.h"
#include "pyllm/model.h"

namespace pyllm {

// The CPU as a backend: prepare() repacks its layers' matrices (csrc/cpu/weights.cc), open()
// makes a CpuDevice.
class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::unique_ptr<WeightStore> prepare(const HParams& hp, ModelWeights& weights,
                                       const std::vector<LayerRange>& ranges,
                                       const ModelOptions& options) const override;
  std::unique_ptr<Device> open(const Model& model, const ContextParams& params) const override;
};
const Backend& cpu_backend();

class CpuDevice final : public Device {
 public:
  CpuDevice(const Model& model, const ContextParams& params);
  const char* name() const override { return "cpu"; }
  std::unique_ptr<Stage> make_stage(const LayerRange& range) override;
  int n_threads() const override { return pool_.n_threads(); }

 private:
  friend class CpuStage;
  // Scratch activations for a chunk of up to n_batch tokens, shared by the device's stages.
  struct Buffers {
    ScratchBuf xb, q, k, v, att, gate, up;
    std::vector<float> lora_u;  // LoRA: A x per token (rank floats each); grown on use
    std::vector<float> lora_us;  // LoRA: one token's A x times its coefficient, per share
    ScratchBuf scores;  // per-thread attention scratch: n_threads * n_ctx
    void resize(const HParams& hp, int n_batch, int n_ctx, int n_threads);
  };

  void mm(const WeightView& w, const float* x, int64_t n_tokens, float* y);
  void mm_group(std::initializer_list<MatmulParams> ps);
  // `then` (if given) runs on every share after a barrier that follows the products
  void mm_group(const MatmulParams* ps, size_t n,
                const std::function<void(int ith, int nth)>* then = nullptr);
  template <typename Fn>
  void for_items(int64_t n_items, int64_t work_per_item, Fn&& fn);

  const Model& model_;
  ContextParams params_;
  ThreadPool pool_;
  Buffers buf_;
};

class CpuStage final : public Stage {
 public:
  CpuStage(CpuDevice& device, const LayerRange& range);
  void run_layers(const Chunk& chunk, float* hidden) override;
  void output(const float* hidden, const int* rows, int count, float* logits,
              const LoraChunk* lora) override;
  void set_activation_stats(ActivationStats* stats) override { stats_ = stats; }
  int64_t state_bytes(int n_past) const override { return kv_.state_bytes(n_past); }
  void save_state(int seq, int n_past, uint8_t* out) const override {
    kv_.save(seq, n_past, out);
  }
  void load_state(int seq, int n_past, const uint8_t* in) override { kv_.load(seq, n_past, in); }
  bool can_shift_kv() const override { return true; }
  void shift_kv(int seq, int keep, int n_discard, int n_past, const float* rot) override;

 private:
  void attention(int local_layer, const Chunk& chunk);
  // The chunk's LoRA terms of one layer (csrc/cpu/lora.cc): for each target matrix, every
  // token's row of y gains coef * factor * B (A x) of each adapter that has that matrix.
  // lora_first appends the A products to the base products' params (at most `room`; returns
  // how many) and remembers the targets; lora_second, run by every share of that region
  // after a barrier, adds its share of the terms.
  struct LoraTarget {
    LoraSlot slot;
    const float* x;  // n rows of n_in
    float* y;        // n rows of n_out
  };
  size_t lora_first(const Chunk& chunk, int layer, std::initializer_list<LoraTarget> targets,
                    MatmulParams* ps, size_t room);
  void lora_second(const Chunk& chunk, int ith, int nth);
  // base products + the layer's LoRA A products in one region, then the LoRA terms
  void mm_with_lora(const Chunk& chunk, int layer, std::initializer_list<MatmulParams> base,
                    std::initializer_list<LoraTarget> targets);

  // Deltas (csrc/cpu/lora.cc). norm_weights: the norm weights token i of `count` uses (chunk
  // token idx[i], or i when idx is null): nullptr when no adapter of the chunk has a delta for
  // `slot` (every token uses w); else w plus the token's coefficients times the deltas, one
  // vector per run of tokens with the same coefficients. add_bias_deltas: y's rows (of dim)
  // gain each token's coefficients times the deltas for `slot`.
  const float* const* norm_weights(const LoraChunk* lora, int layer, DeltaSlot slot,
                                   const float* w, const int* idx, int count);
  void add_bias_deltas(const Chunk& chunk, int layer, DeltaSlot slot, float* y, int64_t dim);
  std::vector<float> delta_w_;
  std::vector<int> delta_which_;
  std::vector<const float*> delta_ptr_;

  struct PendingLora {
    const LoraPair* pair;
    const float* x;
    float* y;
    const float* coef;  // the chunk's coefficient per token for this adapter
    int64_t u_offset;   // into the device's lora_u
  };
  std::vector<PendingLora> lora_pending_;
  size_t lora_max_rank_ = 0;  // of the pending pairs (lora_us holds that much per share)

  ActivationStats* stats_ = nullptr;  // collecting importance-matrix statistics when set

  CpuDevice& dev_;
  const HParams& hp;
  KVCache kv_;  // layers [range.first, range.last), indexed from 0
};

}  // namespace pyllm
