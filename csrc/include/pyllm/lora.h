// LoRA adapters applied at run time: after the product of an adapted block matrix W with the
// chunk's input X, every token t adds coef[t] * factor * B (A x_t), where factor = alpha / rank
// (from the file) and coef[t] is the scale its sequence gives the adapter (0: not used). The
// adapters' pairs live here, uploaded once per adapter file; a context holds the adapters it
// knows and each sequence's mix of them, so sequences with different adapters share one forward
// (the base product is shared, each adds its own low-rank term).
// An adapter may also carry deltas (LLaMA2-Accessory's bias and norm tuning): vectors that a
// token's coefficient times are added to a layer's norm weights or matrix biases, or to the
// output norm.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "pyllm/qtype.h"

namespace pyllm {

struct HParams;

// The block matrices an adapter may carry (in LayerSlots order: wq, wk, wv, wo, w_gate, w_up,
// w_down).
enum class LoraSlot : int { Q = 0, K = 1, V = 2, O = 3, Gate = 4, Up = 5, Down = 6 };
constexpr int kLoraSlots = 7;

// A and B in the adapter file's own precision: A in F32, F16 or Q8_0 (through the matmul
// kernels of those types), B in F32 or F16 (F16 files, the converter's default as llama.cpp's,
// halve what decode streams per token; F32 files are applied exactly; a Q8_0 file's B comes as
// F32, which holds its values exactly).
// B is kept in blocks of 16 rows, each block rank columns of 16 values (the last block padded
// with zero rows): a product with a rank of 8-64 is then broadcast-FMAs over 16 rows at a time
// (OpsTable::lowrank_add) instead of one short dot product and horizontal sum per row.
struct LoraPair {
  QType a_type = QType::F32;  // F32, F16 or Q8_0
  QType b_type = QType::F32;  // F32 or F16
  int rank = 0;
  int64_t n_in = 0, n_out = 0;
  std::vector<uint8_t> a;    // rank rows of n_in elements (as in the file)
  std::vector<uint8_t> b;    // n_out x rank elements (row-major, as in the file)
  std::vector<uint8_t> b16;  // B in blocks of 16 rows (filled by LoraAdapter::set)
  float factor = 1.0f;       // alpha / rank
  // B as rows of `rank` values again (what a device backend's matmul reads), from b16
  std::vector<uint8_t> b_rows() const;
};

// The vectors a delta may be added to: a layer's two norm weights and seven biases (in
// LayerSlots order), and the output norm (no layer).
enum class DeltaSlot : int {
  AttnNorm = 0, FfnNorm, BQ, BK, BV, BO, BGate, BUp, BDown, OutputNorm
};
constexpr int kDeltaSlots = 10;

class LoraAdapter {
 public:
  explicit LoraAdapter(int n_layer);
  // Throws std::invalid_argument for a layer out of range, a slot given twice, or sizes that
  // do not make a (n_out x n_in) low-rank product.
  void set(int layer, LoraSlot slot, LoraPair pair);
  const LoraPair* get(int layer, LoraSlot slot) const {
    return pairs_[static_cast<size_t>(layer)][static_cast<size_t>(slot)].get();
  }
  // A delta (float32; its size is checked against the model by Context::set_lora_adapters).
  // `layer` is ignored for OutputNorm. Throws std::invalid_argument as set() does.
  void set_delta(int layer, DeltaSlot slot, std::vector<float> values);
  // The delta of (layer, slot), or nullptr (layer ignored for OutputNorm).
  const std::vector<float>* delta(int layer, DeltaSlot slot) const;
  bool has_deltas() const { return n_deltas_ > 0; }
  // Throws std::invalid_argument naming the first pair or delta whose sizes do not fit a
  // model with these hyper-parameters (the forward reads them without further checks).
  void check(const HParams& hp) const;
  int n_layer() const { return static_cast<int>(pairs_.size()); }
  int max_rank() const { return max_rank_; }
  int64_t nbytes() const { return nbytes_; }  // of the pairs as kept (what decode streams)

 private:
  std::vector<std::array<std::unique_ptr<LoraPair>, kLoraSlots>> pairs_;
  // per layer, the slots before OutputNorm; then one more row whose first cell is OutputNorm's
  std::vector<std::array<std::vector<float>, kDeltaSlots>> deltas_;
  int max_rank_ = 0;
  int n_deltas_ = 0;
  int64_t nbytes_ = 0;
};

// What one chunk applies: the adapters any of its tokens uses and, per adapter, each token's
// coefficient (its sequence's scale; 0 when the sequence does not use it).
struct LoraChunk {
  std::vector<const LoraAdapter*> adapters;
  std::vector<float> coef;  // [adapters.size()][n]
  int n = 0;
  bool deltas = false;      // some adapter of the chunk carries deltas
  bool empty() const { return adapters.empty(); }
  const float* coefs(size_t i) const { return coef.data() + i * static_cast<size_t>(n); }
};

// The norm weights of a chunk's tokens when its adapters carry deltas for `slot` (layer
// ignored for OutputNorm): false when none does (every token uses w). Else `vectors` holds, per
// run of tokens with the same coefficients, w plus the coefficients times the deltas (summed in
// double, rounded once: what a merged model holds; d values each), and which[i] is the vector
// of token i of `count` (chunk token idx[i], or i when idx is null). With w null, the vectors
// are the deltas' sums alone (what a bias gains).
bool delta_norm_weights(const LoraChunk* lora, int layer, DeltaSlot slot, const float* w,
                        int64_t d, const int* idx, int count, std::vector<float>& vectors,
                        std::vector<int>& which);

// One sequence's adapters: (index into the context's adapters, scale).
using LoraMix = std::vector<std::pair<int, float>>;

}  // namespace pyllm
