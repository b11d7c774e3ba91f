// The Llama forward pass on the CPU for one context: its thread pool, RoPE table and scratch
// activations, and the stages of a chunk of tokens — embed them, run a range of layers over
// them (appending to and reading the KV cache), project chosen rows to logits.
//
//   x = embed(tokens)                                   [n][n_embd]
//   per layer:  h = rms_norm(x) * attn_norm
//               q,k,v = h Wq, h Wk, h Wv (+ biases)     [n][n_head*hd], [n][n_kv*hd] x2
//               rope(q), rope(k); K/V cache[pos] = k, v
//               a = softmax(q K^T / sqrt(hd)) V         causal, per head, GQA groups share K/V
//               x += a Wo
//               h = rms_norm(x) * ffn_norm
//               x += (silu(h Wgate) * (h Wup)) Wdown
//   logits = rms_norm(x) * output_norm  Wout
// Weights are read straight from the memory map (or their rows16 copies) through the matmul
// kernels; activations stay F32 throughout (the accuracy bar is set by the exact model, not by
// llama.cpp's int8 path).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "model/attention_schedule.h"
#include "model/kv_cache.h"
#include "model/rope.h"
#include "pyllm/matmul.h"
#include "pyllm/model.h"
#include "pyllm/threadpool.h"

namespace pyllm {

class Forward {
 public:
  // Scratch for chunks of up to params.n_batch tokens; kv must outlive this object.
  Forward(const Model& model, const ContextParams& params, KVCache& kv);

  // The whole model over one chunk (n <= n_batch): token t at position pos[t] of sequence
  // seq[t]; leaves the final hidden states (before the output norm) in hidden().
  void chunk(const int32_t* tokens, const int* pos, const int* seq, int n, int seq_len) {
    embed(tokens, n);
    prepare(pos, seq, n, seq_len);
    layers(0, model_.hparams().n_layer, seq, n);
  }
  // The stages of chunk(): token embeddings into hidden(); RoPE angles and the attention
  // schedule of the chunk; layers [first, last) over hidden() (all of a chunk's K/V rows of a
  // layer are stored before its attention reads them).
  void embed(const int32_t* tokens, int n);
  void prepare(const int* pos, const int* seq, int n, int seq_len);
  void layers(int first, int last, const int* seq, int n);
  // Final norm + output projection of hidden() rows[0..count) into out (count rows of n_vocab).
  void output(const int* rows, int count, float* out);

  const float* hidden() const { return buf_.x.data(); }
  int n_threads() const { return pool_.n_threads(); }

 private:
  // Scratch activations for a chunk of up to n_batch tokens.
  struct Buffers {
    std::vector<float> x, xb, q, k, v, att, gate, up;
    std::vector<float> rope;
    std::vector<float> scores;  // per-thread attention scratch: n_threads * n_ctx
    void resize(const HParams& hp, int n_batch, int n_ctx, int n_threads);
  };

  void mm(const WeightView& w, const float* x, int64_t n_tokens, float* y);
  void mm_group(std::initializer_list<MatmulParams> ps);
  template <typename Fn>
  void for_items(int64_t n_items, int64_t work_per_item, Fn&& fn);
  void attention(int layer, const int* seq);

  const Model& model_;
  const HParams& hp;
  KVCache& kv_;
  ThreadPool pool_;
  RopeTable rope_;
  Buffers buf_;
  AttentionSchedule sched_;
  int n_ctx_;  // per sequence
};

}  // namespace pyllm
