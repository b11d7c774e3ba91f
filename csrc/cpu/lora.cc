// The CPU stage's LoRA terms (see pyllm/lora.h), in two phases of the parallel region of a
// layer's products, so that they cost no region of their own:
//   lora_first: for each adapter of the chunk and each target it adapts, the product U = A X
//     (A in the file's F32 or F16, X the base product's input), appended to the base products'
//     region;
//   lora_second: in that same region after a barrier, y += B (coef U) for every pending
//     target, each share over its 16-row blocks of B (OpsTable::lowrank_add).
// The A products go through the F32 / F16 / Q8_0 matmul kernels.
// Deltas: a norm's weights become, per run of tokens with the same coefficients, w plus the
// coefficients times the adapters' deltas (delta_norm_weights); a bias delta is added to each
// token's row times its coefficient.
#include <algorithm>
#include <stdexcept>
#include <utility>
#include <vector>

#include "cpu/matmul.h"
#include "cpu/ops.h"
#include "cpu/stage.h"

namespace pyllm {

size_t CpuStage::lora_first(const Chunk& c, int layer, std::initializer_list<LoraTarget> targets,
                            MatmulParams* ps, size_t room) {
  lora_pending_.clear();
  if (c.lora == nullptr) return 0;
  const LoraChunk& lc = *c.lora;
  const int64_t n = c.n;
  int64_t u_size = 0;
  for (size_t ai = 0; ai < lc.adapters.size(); ++ai) {
    for (const LoraTarget& t : targets) {
      const LoraPair* p = lc.adapters[ai]->get(layer, t.slot);
      if (p == nullptr) continue;
      lora_pending_.push_back({p, t.x, t.y, lc.coefs(ai), u_size});
      u_size += n * p->rank;
    }
  }
  if (lora_pending_.empty()) return 0;
  CpuDevice::Buffers& buf = dev_.buf_;
  if (buf.lora_u.size() < static_cast<size_t>(u_size)) buf.lora_u.resize(u_size);
  lora_max_rank_ = 0;
  for (const PendingLora& pl : lora_pending_) {
    lora_max_rank_ = std::max<size_t>(lora_max_rank_, static_cast<size_t>(pl.pair->rank));
  }
  const size_t us_size = lora_max_rank_ * static_cast<size_t>(dev_.pool_.n_threads());
  if (buf.lora_us.size() < us_size) buf.lora_us.resize(us_size);
  // the A products that fit go with the base products; the rest run here, in groups
  size_t added = 0;
  std::vector<MatmulParams> rest;
  for (const PendingLora& pl : lora_pending_) {
    const MatmulParams p{pl.pair->a_type, pl.pair->a.data(), pl.pair->rank, pl.pair->n_in,
                         pl.x, 0, n, buf.lora_u.data() + pl.u_offset, 0};
    if (added < room) ps[added++] = p;
    else rest.push_back(p);
  }
  for (size_t i = 0; i < rest.size(); i += 4) {
    dev_.mm_group(rest.data() + i, std::min<size_t>(4, rest.size() - i));
  }
  return added;
}

void CpuStage::lora_second(const Chunk& c, int ith, int nth) {
  CpuDevice::Buffers& buf = dev_.buf_;
  const OpsTable& op = ops();
  float* us = buf.lora_us.data() + static_cast<size_t>(ith) * lora_max_rank_;
  // y += B (coef u) for this share's 16-row blocks of every pending target: no lock, no
  // second buffer; tokens whose coefficient is 0 (their sequence does not use the adapter) skip
  for (const PendingLora& pl : lora_pending_) {
    const LoraPair& p = *pl.pair;
    const int64_t blocks = (p.n_out + 15) / 16;
    const int64_t b0 = blocks * ith / nth, b1 = blocks * (ith + 1) / nth;
    if (b0 >= b1) continue;
    const bool f16 = p.b_type == QType::F16;
    const size_t elem = f16 ? 2 : 4;
    const uint8_t* b = p.b16.data() + static_cast<size_t>(b0 * p.rank * 16) * elem;
    const int64_t rows = std::min<int64_t>(p.n_out, b1 * 16) - b0 * 16;
    const float* u = buf.lora_u.data() + pl.u_offset;
    for (int64_t t = 0; t < c.n; ++t) {
      const float f = pl.coef[t] * p.factor;
      if (f == 0.0f) continue;
      for (int j = 0; j < p.rank; ++j) us[j] = u[t * p.rank + j] * f;
      op.lowrank_add(b, f16, p.rank, us, pl.y + t * p.n_out + b0 * 16, rows);
    }
  }
}

const float* const* CpuStage::norm_weights(const LoraChunk* lc, int layer, DeltaSlot slot,
                                           const float* w, const int* idx, int count) {
  if (!delta_norm_weights(lc, layer, slot, w, hp.n_embd, idx, count, delta_w_, delta_which_)) {
    return nullptr;
  }
  delta_ptr_.resize(static_cast<size_t>(count));
  for (size_t i = 0; i < delta_ptr_.size(); ++i) {
    delta_ptr_[i] = delta_w_.data() + static_cast<size_t>(delta_which_[i]) * hp.n_embd;
  }
  return delta_ptr_.data();
}

void CpuStage::add_bias_deltas(const Chunk& c, int layer, DeltaSlot slot, float* y, int64_t dim) {
  if (c.lora == nullptr || !c.lora->deltas) return;
  const LoraChunk& lc = *c.lora;
  for (size_t ai = 0; ai < lc.adapters.size(); ++ai) {
    const std::vector<float>* v = lc.adapters[ai]->delta(layer, slot);
    if (v == nullptr) continue;
    const float* coef = lc.coefs(ai);
    for (int64_t t = 0; t < c.n; ++t) {
      if (coef[t] == 0.0f) continue;
      float* row = y + t * dim;
      for (int64_t j = 0; j < dim; ++j) row[j] += coef[t] * (*v)[static_cast<size_t>(j)];
    }
  }
}

}  // namespace pyllm
