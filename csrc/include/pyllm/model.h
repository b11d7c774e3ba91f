// The Llama-family model (hyper-parameters + weight views) and the inference context that runs
// the forward pass over it (its layers placed on backends, csrc/backend/backend.h).
//
// C++ never opens files: Python parses and validates the GGUF, then hands over pointers into the
// memory map (kept alive by the Python side). Model re-checks every size it is given.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pyllm/lora.h"
#include "pyllm/qtype.h"
#include "pyllm/repack.h"

namespace pyllm {

struct ActivationStats;

class WeightStore;  // csrc/backend/backend.h
class EmbeddingFile;  // csrc/model/embedding_file.h

enum class RopeScaling { None = 0, Linear = 1, Yarn = 2, Dynamic = 3 };

// Bound field by field (csrc/bindings/bind_model.cc); pyllm/formats/arch.py's HParams dataclass has the
// same fields (tests/test_model.py checks the two sets) and fills them in one loop.
struct HParams {
  std::string arch;  // general.architecture (for messages; the fields below drive the forward)
  int n_vocab = 0;
  int n_embd = 0;
  int n_layer = 0;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;     // may differ from n_embd / n_head
  int n_ff = 0;
  int n_rot = 0;        // rotary dimensions per head (<= head_dim)
  int n_ctx_train = 0;
  float rms_eps = 1e-5f;
  float rope_base = 10000.0f;
  bool rope_neox = false;  // NeoX-style halves (qwen2) vs adjacent pairs (llama GGUFs)
  RopeScaling rope_scaling = RopeScaling::None;
  float rope_factor = 1.0f;   // scaling factor (linear / yarn / dynamic)
  int rope_orig_ctx = 0;      // original training context (yarn / dynamic)
  float yarn_beta_fast = 32.0f;
  float yarn_beta_slow = 1.0f;
  float yarn_attn_factor = 1.0f;
  float yarn_ext_factor = -1.0f;  // < 0: derive (1 for yarn)
};

// A weight tensor inside the mapped file: rows of `cols` elements each (ggml ne0 = cols).
struct WeightView {
  QType type = QType::F32;
  const void* data = nullptr;
  int64_t cols = 0;
  int64_t rows = 0;
  int64_t nbytes = 0;
  WeightLayout layout = WeightLayout::Gguf;  // Rows16 once the model has repacked it
  std::string name;  // the tensor's name in its file, for error messages (set by the caller)
  bool present() const { return data != nullptr; }
};

// The weights of one layer. The bindings fill the fields by their C++ names; pyllm/formats/arch.py maps
// the GGUF tensor names onto them (the file's names are spelled only there).
// A layer's slots hold a V each: the host views here (LayerWeights); a device backend keeps its
// uploaded copies in the same slots (csrc/backend/placed_weights.h).
template <typename V>
struct LayerSlots {
  V attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
  V bq, bk, bv, bo, b_gate, b_up, b_down;  // optional biases (F32 vectors)
};
using LayerWeights = LayerSlots<WeightView>;

// Every slot by its C++ name: the one list the bindings fill from and the backends upload by.
template <typename V>
constexpr std::pair<const char*, V LayerSlots<V>::*> kLayerSlots[] = {
    {"attn_norm", &LayerSlots<V>::attn_norm}, {"wq", &LayerSlots<V>::wq},
    {"wk", &LayerSlots<V>::wk},               {"wv", &LayerSlots<V>::wv},
    {"wo", &LayerSlots<V>::wo},               {"ffn_norm", &LayerSlots<V>::ffn_norm},
    {"w_gate", &LayerSlots<V>::w_gate},       {"w_up", &LayerSlots<V>::w_up},
    {"w_down", &LayerSlots<V>::w_down},       {"bq", &LayerSlots<V>::bq},
    {"bk", &LayerSlots<V>::bk},               {"bv", &LayerSlots<V>::bv},
    {"bo", &LayerSlots<V>::bo},               {"b_gate", &LayerSlots<V>::b_gate},
    {"b_up", &LayerSlots<V>::b_up},           {"b_down", &LayerSlots<V>::b_down},
};

struct ModelWeights {
  WeightView tok_embd, output_norm, output;  // output absent -> tied to tok_embd
  WeightView rope_freqs;                     // optional Llama-3.1 frequency factors (n_rot/2)
  std::vector<LayerWeights> layers;
};

// Layers [first, last) of a model on the backend called `backend` (csrc/backend/backend.h).
struct PlacedLayers {
  std::string backend = "cpu";
  int first = 0;
  int last = 0;
};

struct ModelOptions {
  // Copy the CPU's layer matrices and the output matrix (a separate copy when it is tied to the
  // embeddings) into the rows16 layout (pyllm/repack.h) where the active ISA has rows16 decode
  // kernels (AVX-512 VNNI; Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K). Costs one pass over those
  // weights at load; decode then streams them at the memory wall.
  bool repack = true;
  // The weights are views of a read-only file mapping that need not stay resident: after
  // repacking a tensor, drop its source pages from this process (madvise DONTNEED), copy the
  // norm vectors and biases out of the file (cpu/weights.cc), and read embedding rows through
  // embedding_fd when given. The pages return to the page cache, so peak and steady RSS stay
  // ~1x the model instead of 2x. Never for anonymous memory.
  bool release_source = false;
  // A descriptor of the file whose read-only mapping holds the embedding table's view, and the
  // table's offset in that file (-1: none). With release_source, when the CPU reads the table
  // only by rows (not also as a tied output matrix left in the file's layout), the context
  // reads the rows it looks up from the file (model/embedding_file.h), so a generation maps
  // none of the table into the process. The model keeps its own duplicate of the descriptor.
  int embedding_fd = -1;
  int64_t embedding_offset = 0;
  int n_threads = 0;  // repacking threads (<= 0: physical cores)
  // The image of an earlier load's rows16 arena (a repack cache file, mapped read-only by
  // pyllm/runtime/repack_cache.py): used in place of repacking when its plan is this load's
  // (RepackImage::plan), so a later process maps the copies instead of rebuilding them; any
  // other image is ignored and the weights are repacked as without one.
  const uint8_t* repack_image = nullptr;
  int64_t repack_image_bytes = 0;
  uint64_t repack_image_plan = 0;
  // Which backend runs which layers, in layer order (csrc/model/placement.h has the rules);
  // the model's head goes with the last range. Each backend prepares its layers' weights at
  // load; every context of the model runs them there. Empty: everything on the CPU.
  std::vector<PlacedLayers> placement;
};

// The CPU's rows16 copies of a loaded model: `bytes` at `data`, laid out as `plan` says (a
// hash of the repack layout version and every copied tensor's type, shape and offset: equal
// plans lay out equal bytes for the same weights). `reused`: they came from
// ModelOptions::repack_image rather than from repacking.
struct RepackImage {
  const uint8_t* data = nullptr;
  int64_t bytes = 0;
  uint64_t plan = 0;
  bool reused = false;
};

class Model {
 public:
  // Validates every shape against hp (throws std::invalid_argument naming the tensor: its
  // WeightView::name, or its layer and field when it has none) and the placement, then has
  // each backend of the placement prepare its layers' weights (the CPU repacks as options say).
  Model(const HParams& hp, ModelWeights weights, const ModelOptions& options = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;
  const HParams& hparams() const { return hp_; }
  const ModelWeights& weights() const { return w_; }
  // Bytes of weights held in rows16 copies, made or mapped (0 when nothing was repacked).
  int64_t repacked_bytes() const { return repacked_bytes_; }
  // The CPU's rows16 copies as one block of bytes (nullptr when nothing was repacked).
  const RepackImage* repack_image() const;
  // The resolved placement: every layer range and its backend, the head with the last.
  const std::vector<PlacedLayers>& placement() const { return placement_; }
  // What backend `name` prepared at load (nullptr when no layer is placed on it).
  const WeightStore* weight_store(const std::string& name) const;
  // Where the context reads embedding rows from (ModelOptions::embedding_fd); nullptr: the
  // table's view.
  const EmbeddingFile* embedding_file() const { return embedding_file_.get(); }

 private:
  HParams hp_;
  ModelWeights w_;
  std::vector<PlacedLayers> placement_;
  // each backend's prepared weights, by the backend's name
  std::vector<std::pair<std::string, std::unique_ptr<WeightStore>>> stores_;
  int64_t repacked_bytes_ = 0;
  std::unique_ptr<EmbeddingFile> embedding_file_;
};

enum class KVType { F16 = 0, Q8_0 = 1, F32 = 2 };

// The element type a KV cache of kv_type stores its rows in.
inline QType kv_element_type(KVType t) {
  return t == KVType::Q8_0 ? QType::Q8_0 : t == KVType::F32 ? QType::F32 : QType::F16;
}

struct ContextParams {
  int n_ctx = 2048;
  int n_batch = 512;    // tokens per forward chunk
  int n_threads = 0;    // <= 0: physical cores
  KVType kv_type = KVType::F16;
  int n_seq = 1;        // independent sequences (slots), each with its own n_ctx KV region
};

class Context {
 public:
  Context(std::shared_ptr<const Model> model, const ContextParams& params);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // Runs tokens[0..n) at positions n_past()..n_past()+n, appending to the KV cache in chunks of
  // n_batch. logits: nullptr, or room for n_vocab floats (last token only) or n * n_vocab floats
  // (all_logits). Throws std::out_of_range when the tokens do not fit in n_ctx, and
  // std::invalid_argument for token ids outside the vocabulary (nothing is modified then).
  void decode(const int32_t* tokens, int64_t n, float* logits, bool all_logits);

  int n_past() const { return n_past_[0]; }
  // Forget cached positions >= n (keep a shared prefix); n must be <= n_past().
  void truncate(int n) { seq_truncate(0, n); }

  // Continuous batching: token i goes to sequence seq[i] at that sequence's next position, all
  // tokens run through ONE forward (each weight is read once for every sequence of the step).
  // For each i with want_logits[i] != 0, a row of n_vocab logits is written to `logits`, in
  // order. Returns the number of rows written. Throws like decode() (nothing is modified then).
  int64_t decode_batch(const int32_t* tokens, const int32_t* seq, int64_t n,
                       const uint8_t* want_logits, float* logits);
  // One process's part of a layer pipeline (a placement whose first and/or last range is
  // "remote", model/placement.h): as decode_batch, but when the first range is remote the
  // tokens come as hidden rows `in` ([n][n_embd], tokens null) from the process before, and
  // when the last range is remote `out` receives every token's hidden rows after this
  // process's layers ([n][n_embd], returns n) instead of logits. Exactly one of tokens / in is
  // given. The RoPE scaling's sequence length is at least min_seq_len, so a batch run as
  // several parts gets the angles of one call (dynamic NTK depends on it). Throws like
  // decode_batch (nothing is modified then).
  int64_t decode_part(const int32_t* tokens, const float* in, const int32_t* seq, int64_t n,
                      const uint8_t* want_logits, float* out, int min_seq_len);
  // What decode_batch / decode_part would throw for these tokens (tokens may be null: not
  // checked), without running anything.
  void check_batch(const int32_t* tokens, const int32_t* seq, int64_t n) const;
  // Whether this process embeds tokens / holds the head (neither range remote).
  bool embeds_tokens() const;
  bool has_head() const;
  // Embedding of a text: runs tokens at positions 0..n of sequence `seq` and writes the mean over
  // tokens of the final-normed hidden states (n_embd floats). The sequence is left empty, so use
  // a free slot. Throws std::out_of_range when n > n_ctx.
  void embed(const int32_t* tokens, int64_t n, int seq, float* out);
  int n_seq() const { return params_.n_seq; }
  int seq_n_past(int seq) const;
  void seq_truncate(int seq, int n);
  // Context shift (llama.cpp's): drop sequence seq's positions [keep, keep + n_discard), move
  // the later ones down and re-rotate their keys by -n_discard positions, as if the kept
  // tokens had been evaluated at their new positions (up to the K/V element type's rounding).
  // Throws std::invalid_argument for a RoPE mode whose angles are not linear in the position
  // (dynamic NTK: they depend on the sequence length), std::out_of_range for bad bounds, and
  // DeviceError when a stage cannot shift (nothing is changed then).
  void seq_shift(int seq, int keep, int n_discard);
  int n_ctx() const { return params_.n_ctx; }
  int n_threads() const;
  const Model& model() const { return *model_; }
  // The model's placement (Model::placement()).
  const std::vector<PlacedLayers>& placement() const { return model_->placement(); }

  // LoRA adapters (pyllm/lora.h): the ones this context knows (replacing the earlier ones and
  // every sequence's mix), and one sequence's mix of them, [(adapter index, scale)]. A mix
  // applies from the next decode on; the caller drops cached positions computed without it.
  // Throws std::invalid_argument for an adapter of another layer count, an index out of range,
  // a non-finite scale, or layers placed on a backend that cannot apply adapters.
  void set_lora_adapters(std::vector<std::shared_ptr<const LoraAdapter>> adapters);
  void seq_set_lora(int seq, const LoraMix& mix);
  const LoraMix& seq_lora(int seq) const;

  // Importance-matrix statistics (pyllm/activation_stats.h): on starts a fresh collection over
  // every later decode (throws DeviceError, collecting nothing, when layers are placed on a
  // backend that cannot collect them); off stops it. activation_stats() is the last
  // collection (nullptr before the first), kept after it stops.
  void collect_activation_stats(bool on);
  const ActivationStats* activation_stats() const;
  bool collecting_activation_stats() const;

  // State for save/load: sequence seq's cached K/V of positions [0, n_past) plus n_past (a
  // state of one sequence loads into any sequence of a context of the same model and KV type).
  std::vector<uint8_t> save_state(int seq = 0) const;
  // Bytes of the header a saved state starts with (the rest: each layer's rows, in order).
  static int64_t state_header_bytes();
  void load_state(const uint8_t* data, int64_t size, int seq = 0);

 private:
  struct Impl;
  void assign_positions(const int32_t* tokens, const int32_t* seq, int64_t n,
                        std::vector<int>& pos, std::vector<int>& added) const;
  std::shared_ptr<const Model> model_;
  ContextParams params_;
  std::vector<int> n_past_;  // per sequence
  std::vector<std::shared_ptr<const LoraAdapter>> lora_;
  std::vector<LoraMix> lora_mix_;  // per sequence
  std::unique_ptr<Impl> impl_;
};

}  // namespace pyllm
