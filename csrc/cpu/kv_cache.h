// K/V storage of the CPU backend for one stage's layers: per layer, the K and V rows of every
// position of every sequence (n_seq regions of n_ctx rows each) in F16, Q8_0 or F32, how a row
// is stored, and the stage's part of a saved state. Which positions are valid is the context's
// bookkeeping (n_past per sequence); this class only holds the rows.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/ops.h"
#include "cpu/scratch.h"
#include "pyllm/model.h"
#include "pyllm/qtype.h"

namespace pyllm {

class KVCache {
 public:
  // Storage for n_layer layers (a stage's range) of a context with params.
  KVCache(const HParams& hp, const ContextParams& params, int n_layer);

  QType type() const { return type_; }
  int64_t dim() const { return dim_; }                // floats of one position: all KV heads
  int64_t row_bytes() const { return row_bytes_; }    // bytes of one position's K (or V) row
  int64_t head_bytes() const { return head_bytes_; }  // bytes of one KV head within a row
  int n_layer() const { return static_cast<int>(k_.size()); }
  // A layer's storage (counted from the stage's first layer): n_seq * n_ctx rows of
  // row_bytes(); the row of position pos of sequence seq is seq * n_ctx + pos.
  uint8_t* k(int layer) { return k_[layer].data(); }
  uint8_t* v(int layer) { return v_[layer].data(); }

  // Converts one row of dim() floats into the cache's element type at dst.
  void store(const OpsTable& op, const float* src, uint8_t* dst) const;

  // Per layer, the K then the V rows of positions [0, n_past) of sequence seq (the format of
  // Stage::save_state).
  int64_t state_bytes(int n_past) const { return 2 * int64_t(n_past) * row_bytes_ * n_layer(); }
  void save(int seq, int n_past, uint8_t* out) const;
  void load(int seq, int n_past, const uint8_t* in);

  // Stage::shift_kv for these layers: the V rows move as they are; each K row is widened to
  // floats, rotated (op.rope over n_head_kv heads of head_dim, n_rot of them rotated) and
  // stored back, so F16 / Q8_0 keys are rounded once more (F32 keys are exact but for the
  // rotation's own rounding).
  void shift(const OpsTable& op, int seq, int keep, int n_discard, int n_past, const float* rot,
             int n_head_kv, int head_dim, int n_rot, bool neox);

 private:
  int64_t dim_;
  QType type_;
  int64_t row_bytes_;
  int64_t head_bytes_;
  int64_t n_ctx_;  // rows per sequence
  // Per layer, zeroed pages from calloc (ZeroedBuf): a context costs the positions it uses
  // rather than all of n_ctx at creation (a cold start does not wait for the whole cache to be
  // zeroed).
  std::vector<ZeroedBuf<uint8_t>> k_, v_;
};

}  // namespace pyllm
