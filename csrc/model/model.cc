// Model: checks the hyper-parameters and every weight view against each other before any
// forward pass may read them (defence in depth behind the Python-side GGUF validation), resolves
// the placement of its layers and has each backend prepare its share of the weights (the CPU's
// rows16 copies: csrc/cpu/weights.cc), which the model then owns, with the descriptor its
// embedding rows are read through (model/embedding_file.h).
#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "backend/backend.h"
#include "model/embedding_file.h"
#include "model/placement.h"
#include "pyllm/model.h"
#include "pyllm/quant.h"

namespace pyllm {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// `where` names the slot ("layer 3 wq") for a tensor that is missing or has no name of its own.
void check_weight(const WeightView& w, const std::string& where, int64_t cols, int64_t rows,
                  bool required, bool f32_only = false) {
  if (!w.present()) {
    if (required) fail("missing tensor for " + where);
    return;
  }
  const std::string& name = w.name.empty() ? where : w.name;
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

// Every weight of layer i against the hyper-parameters.
void check_layer(const HParams& hp, const LayerWeights& l, int i) {
  const int64_t d = hp.n_embd, q_dim = int64_t(hp.n_head) * hp.head_dim;
  const int64_t kv_dim = int64_t(hp.n_head_kv) * hp.head_dim;
  const std::string p = "layer " + std::to_string(i) + " ";
  check_weight(l.attn_norm, p + "attn_norm", d, 1, true, true);
  check_weight(l.wq, p + "wq", d, q_dim, true);
  check_weight(l.wk, p + "wk", d, kv_dim, true);
  check_weight(l.wv, p + "wv", d, kv_dim, true);
  check_weight(l.wo, p + "wo", q_dim, d, true);
  check_weight(l.bq, p + "bq", q_dim, 1, false, true);
  check_weight(l.bk, p + "bk", kv_dim, 1, false, true);
  check_weight(l.bv, p + "bv", kv_dim, 1, false, true);
  check_weight(l.bo, p + "bo", d, 1, false, true);
  check_weight(l.b_gate, p + "b_gate", hp.n_ff, 1, false, true);
  check_weight(l.b_up, p + "b_up", hp.n_ff, 1, false, true);
  check_weight(l.b_down, p + "b_down", d, 1, false, true);
  check_weight(l.ffn_norm, p + "ffn_norm", d, 1, true, true);
  check_weight(l.w_gate, p + "w_gate", d, hp.n_ff, true);
  check_weight(l.w_up, p + "w_up", d, hp.n_ff, true);
  check_weight(l.w_down, p + "w_down", hp.n_ff, d, true);
}

}  // namespace

Model::Model(const HParams& hp, ModelWeights weights, const ModelOptions& options)
    : hp_(hp), w_(std::move(weights)) {
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

  placement_ = resolve_placement(options.placement, hp.n_layer);
  // Layers run by another process (a "remote" range) are neither checked nor read here: their
  // views may be absent. The embedding table is needed to embed (first range here) and as the
  // tied output matrix (head here, no output.weight).
  const bool embeds = !is_remote(placement_.front()), head = !is_remote(placement_.back());
  const int64_t d = hp.n_embd;
  check_weight(w_.output, "output", d, hp.n_vocab, false);
  check_weight(w_.tok_embd, "tok_embd", d, hp.n_vocab, embeds || (head && !w_.output.present()));
  check_weight(w_.output_norm, "output_norm", d, 1, head, true);
  check_weight(w_.rope_freqs, "rope_freqs", hp.n_rot / 2, 1, false, true);
  for (const PlacedLayers& r : placement_) {
    if (is_remote(r)) continue;
    for (int i = r.first; i < r.last; ++i) check_layer(hp, w_.layers[i], i);
  }
  // Each backend prepares the ranges placed on it, in one call (the CPU repacks them into one
  // arena).
  std::vector<std::string> done;
  for (const PlacedLayers& p : placement_) {
    if (is_remote(p) || std::find(done.begin(), done.end(), p.backend) != done.end()) continue;
    done.push_back(p.backend);
    std::vector<LayerRange> ranges;
    for (size_t i = 0; i < placement_.size(); ++i) {
      const PlacedLayers& r = placement_[i];
      if (r.backend == p.backend) ranges.push_back({r.first, r.last, i + 1 == placement_.size()});
    }
    stores_.emplace_back(p.backend, find_backend(p.backend).prepare(hp_, w_, ranges, options));
    if (p.backend == "cpu") repacked_bytes_ = stores_.back().second->bytes();
  }
  // An output matrix read from the table's own bytes (tied, left in the file's layout) streams
  // the whole table every token: it is mapped anyway, and the lookups read it there.
  const bool table_is_output =
      head && (!w_.output.present() || w_.output.data == w_.tok_embd.data);
  if (options.release_source && options.embedding_fd >= 0 && embeds && !table_is_output &&
      w_.tok_embd.layout == WeightLayout::Gguf) {
    auto file = std::make_unique<EmbeddingFile>(options.embedding_fd, options.embedding_offset,
                                                row_size(w_.tok_embd.type, d));
    if (file->open()) embedding_file_ = std::move(file);
  }
}

Model::~Model() = default;

const RepackImage* Model::repack_image() const {
  const WeightStore* cpu = weight_store("cpu");
  const RepackImage* image = cpu ? cpu->repack_image() : nullptr;
  return image && image->bytes > 0 ? image : nullptr;
}

const WeightStore* Model::weight_store(const std::string& name) const {
  for (const auto& [backend, store] : stores_) {
    if (backend == name) return store.get();
  }
  return nullptr;
}

}  // namespace pyllm
