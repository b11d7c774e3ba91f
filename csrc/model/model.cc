// Model: checks the hyper-parameters and every weight view against each other before any
// forward pass may read them (defence in depth behind the Python-side GGUF validation).
#include <stdexcept>
#include <string>
#include <utility>

#include "pyllm/model.h"
#include "pyllm/quant.h"

namespace pyllm {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

void check_weight(const WeightView& w, const std::string& name, int64_t cols, int64_t rows,
                  bool required, bool f32_only = false) {
  if (!w.present()) {
    if (required) fail("missing tensor " + name);
    return;
  }
  const TypeTraits* tt = find_type_traits(static_cast<uint32_t>(w.type));
  if (!tt || !tt->is_weight) fail(name + ": unsupported tensor type id " +
                                  std::to_string(static_cast<uint32_t>(w.type)));
  if (f32_only && w.type != QType::F32) fail(name + ": expected an F32 tensor, got " + tt->name);
  if (w.cols != cols || w.rows != rows) {
    fail(name + ": shape " + std::to_string(w.cols) + "x" + std::to_string(w.rows) +
         ", expected " + std::to_string(cols) + "x" + std::to_string(rows));
  }
  if (w.nbytes != tensor_size(w.type, rows, cols)) {
    fail(name + ": " + std::to_string(w.nbytes) + " bytes do not match its shape and type");
  }
}

}  // namespace

Model::Model(const HParams& hp, ModelWeights weights) : hp_(hp), w_(std::move(weights)) {
  if (hp.n_vocab <= 0 || hp.n_embd <= 0 || hp.n_layer <= 0 || hp.n_head <= 0 ||
      hp.n_head_kv <= 0 || hp.head_dim <= 0 || hp.n_ff <= 0) {
    fail("hyper-parameters must be positive");
  }
  if (hp.n_head % hp.n_head_kv) fail("n_head must be a multiple of n_head_kv");
  if (hp.n_rot <= 0 || hp.n_rot > hp.head_dim || hp.n_rot % 2) {
    fail("rope dimension count must be even and within the head size");
  }
  if (hp.head_dim > 512) fail("head sizes above 512 are not supported");
  if (!(hp.rms_eps > 0.0f) || !(hp.rope_base > 0.0f)) fail("rms_eps and rope base must be > 0");
  if (hp.rope_scaling != RopeScaling::None && !(hp.rope_factor > 0.0f)) {
    fail("rope scaling factor must be > 0");
  }
  if (static_cast<int>(w_.layers.size()) != hp.n_layer) fail("layer count mismatch");

  const int64_t d = hp.n_embd, q_dim = int64_t(hp.n_head) * hp.head_dim;
  const int64_t kv_dim = int64_t(hp.n_head_kv) * hp.head_dim;
  check_weight(w_.tok_embd, "token_embd.weight", d, hp.n_vocab, true);
  check_weight(w_.output_norm, "output_norm.weight", d, 1, true, true);
  check_weight(w_.output, "output.weight", d, hp.n_vocab, false);
  check_weight(w_.rope_freqs, "rope_freqs.weight", hp.n_rot / 2, 1, false, true);
  for (int i = 0; i < hp.n_layer; ++i) {
    const LayerWeights& l = w_.layers[i];
    const std::string p = "blk." + std::to_string(i) + ".";
    check_weight(l.attn_norm, p + "attn_norm.weight", d, 1, true, true);
    check_weight(l.wq, p + "attn_q.weight", d, q_dim, true);
    check_weight(l.wk, p + "attn_k.weight", d, kv_dim, true);
    check_weight(l.wv, p + "attn_v.weight", d, kv_dim, true);
    check_weight(l.wo, p + "attn_output.weight", q_dim, d, true);
    check_weight(l.bq, p + "attn_q.bias", q_dim, 1, false, true);
    check_weight(l.bk, p + "attn_k.bias", kv_dim, 1, false, true);
    check_weight(l.bv, p + "attn_v.bias", kv_dim, 1, false, true);
    check_weight(l.bo, p + "attn_output.bias", d, 1, false, true);
    check_weight(l.b_gate, p + "ffn_gate.bias", hp.n_ff, 1, false, true);
    check_weight(l.b_up, p + "ffn_up.bias", hp.n_ff, 1, false, true);
    check_weight(l.b_down, p + "ffn_down.bias", d, 1, false, true);
    check_weight(l.ffn_norm, p + "ffn_norm.weight", d, 1, true, true);
    check_weight(l.w_gate, p + "ffn_gate.weight", d, hp.n_ff, true);
    check_weight(l.w_up, p + "ffn_up.weight", d, hp.n_ff, true);
    check_weight(l.w_down, p + "ffn_down.weight", hp.n_ff, d, true);
  }
}

}  // namespace pyllm
