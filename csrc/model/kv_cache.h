// KV storage of a context: per layer, the K and V rows of every position of every sequence
// (n_seq regions of n_ctx rows each) in F16, Q8_0 or F32, how a row is stored, and the
// serialized state (the cached rows of sequence 0). Which positions are valid is the context's
// bookkeeping (n_past per sequence); this class only holds the rows.
#pragma once

#include <cstdint>
#include <vector>

#include "pyllm/model.h"
#include "pyllm/ops.h"
#include "pyllm/qtype.h"

namespace pyllm {

class KVCache {
 public:
  KVCache(const HParams& hp, const ContextParams& params);

  QType type() const { return type_; }
  int64_t dim() const { return dim_; }                // floats of one position: all KV heads
  int64_t row_bytes() const { return row_bytes_; }    // bytes of one position's K (or V) row
  int64_t head_bytes() const { return head_bytes_; }  // bytes of one KV head within a row
  int n_layer() const { return static_cast<int>(k_.size()); }
  // Row of position pos of sequence seq, counted from the start of a layer's storage.
  int64_t row(int seq, int pos) const { return int64_t(seq) * n_ctx_ + pos; }
  // A layer's storage: n_seq * n_ctx rows of row_bytes().
  uint8_t* k(int layer) { return k_[layer].data(); }
  uint8_t* v(int layer) { return v_[layer].data(); }

  // Converts one row of dim() floats into the cache's element type at dst.
  void store(const OpsTable& op, const float* src, uint8_t* dst) const;

  // State of sequence 0: a header, then per layer the K and V rows of positions [0, n_past).
  std::vector<uint8_t> save(int n_past) const;
  // Loads what save() wrote (checking that it fits this model and cache type); returns n_past.
  int load(const uint8_t* data, int64_t size);

 private:
  int n_ctx_;  // rows per sequence
  int64_t dim_;
  QType type_;
  int64_t row_bytes_;
  int64_t head_bytes_;
  std::vector<std::vector<uint8_t>> k_, v_;  // per layer
};

}  // namespace pyllm
