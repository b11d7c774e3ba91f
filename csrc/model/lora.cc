// LoraAdapter: the pairs and deltas of one adapter file, checked as they are set (see lora.h).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "pyllm/lora.h"
#include "pyllm/model.h"
#include "pyllm/quant.h"

namespace pyllm {

LoraAdapter::LoraAdapter(int n_layer) {
  if (n_layer <= 0 || n_layer > (1 << 16)) throw std::invalid_argument("LoraAdapter: bad n_layer");
  pairs_.resize(static_cast<size_t>(n_layer));
  deltas_.resize(static_cast<size_t>(n_layer) + 1);
}

void LoraAdapter::set_delta(int layer, DeltaSlot slot, std::vector<float> values) {
  const int s = static_cast<int>(slot);
  if (s < 0 || s >= kDeltaSlots) throw std::invalid_argument("delta for an unknown vector");
  if (slot == DeltaSlot::OutputNorm) layer = n_layer();  // the extra row
  else if (layer < 0 || layer >= n_layer()) {
    throw std::invalid_argument("delta for layer " + std::to_string(layer) +
                                " of a model with " + std::to_string(n_layer()));
  }
  if (values.empty()) throw std::invalid_argument("empty delta");
  auto& cell = deltas_[static_cast<size_t>(layer)][static_cast<size_t>(s)];
  if (!cell.empty()) throw std::invalid_argument("delta set twice for one vector");
  cell = std::move(values);
  ++n_deltas_;
}

const std::vector<float>* LoraAdapter::delta(int layer, DeltaSlot slot) const {
  if (slot == DeltaSlot::OutputNorm) layer = n_layer();
  const auto& cell = deltas_[static_cast<size_t>(layer)][static_cast<size_t>(slot)];
  return cell.empty() ? nullptr : &cell;
}

void LoraAdapter::set(int layer, LoraSlot slot, LoraPair pair) {
  const int s = static_cast<int>(slot);
  if (layer < 0 || layer >= n_layer()) {
    throw std::invalid_argument("LoRA pair for layer " + std::to_string(layer) +
                                " of a model with " + std::to_string(n_layer()));
  }
  if (s < 0 || s >= kLoraSlots) throw std::invalid_argument("LoRA pair for an unknown matrix");
  auto& cell = pairs_[static_cast<size_t>(layer)][static_cast<size_t>(s)];
  if (cell) throw std::invalid_argument("LoRA pair set twice for one matrix");
  if (pair.a_type != QType::F32 && pair.a_type != QType::F16 && pair.a_type != QType::Q8_0) {
    throw std::invalid_argument("a LoRA pair's A must be F32, F16 or Q8_0");
  }
  if (pair.b_type != QType::F32 && pair.b_type != QType::F16) {
    throw std::invalid_argument("a LoRA pair's B must be F32 or F16");
  }
  const size_t elem = pair.b_type == QType::F16 ? 2 : 4;
  if (pair.rank <= 0 || pair.n_in <= 0 || pair.n_out <= 0 ||
      (pair.a_type == QType::Q8_0 && pair.n_in % QK8_0 != 0) ||
      pair.a.size() != static_cast<size_t>(pair.rank * row_size(pair.a_type, pair.n_in)) ||
      pair.b.size() != static_cast<size_t>(pair.n_out * pair.rank) * elem) {
    throw std::invalid_argument("LoRA pair sizes do not make a low-rank product");
  }
  // B in blocks of 16 rows: element (o, j) at ((o / 16) * rank + j) * 16 + o % 16
  const int64_t blocks = (pair.n_out + 15) / 16;
  pair.b16.assign(static_cast<size_t>(blocks * pair.rank * 16) * elem, 0);
  for (int64_t o = 0; o < pair.n_out; ++o) {
    for (int j = 0; j < pair.rank; ++j) {
      const int64_t to = ((o / 16) * pair.rank + j) * 16 + o % 16;
      std::memcpy(pair.b16.data() + to * elem, pair.b.data() + (o * pair.rank + j) * elem, elem);
    }
  }
  pair.b.clear();
  pair.b.shrink_to_fit();
  max_rank_ = std::max(max_rank_, pair.rank);
  nbytes_ += static_cast<int64_t>(pair.a.size()) + pair.n_out * pair.rank * int64_t(elem);
  cell = std::make_unique<LoraPair>(std::move(pair));
}

std::vector<uint8_t> LoraPair::b_rows() const {
  const size_t elem = b_type == QType::F16 ? 2 : 4;
  std::vector<uint8_t> out(static_cast<size_t>(n_out * rank) * elem);
  for (int64_t o = 0; o < n_out; ++o) {
    for (int j = 0; j < rank; ++j) {
      const int64_t from = ((o / 16) * rank + j) * 16 + o % 16;
      std::memcpy(out.data() + (o * rank + j) * elem, b16.data() + from * elem, elem);
    }
  }
  return out;
}

bool delta_norm_weights(const LoraChunk* lc, int layer, DeltaSlot slot, const float* w,
                        int64_t d, const int* idx, int count, std::vector<float>& vectors,
                        std::vector<int>& which) {
  if (lc == nullptr || !lc->deltas) return false;
  // per layer and token while deltas are in use: scratch kept per thread, not allocated
  thread_local std::vector<std::pair<size_t, const float*>> used;  // (chunk adapter, delta)
  thread_local std::vector<double> sum;
  used.clear();
  for (size_t ai = 0; ai < lc->adapters.size(); ++ai) {
    if (const std::vector<float>* v = lc->adapters[ai]->delta(layer, slot)) {
      used.emplace_back(ai, v->data());
    }
  }
  if (used.empty()) return false;
  vectors.clear();
  which.resize(static_cast<size_t>(count));
  sum.resize(static_cast<size_t>(d));
  for (int i = 0; i < count; ++i) {
    const int t = idx ? idx[i] : i;
    if (i > 0) {
      const int prev = idx ? idx[i - 1] : i - 1;
      bool same = true;
      for (const auto& [ai, v] : used) same = same && lc->coefs(ai)[t] == lc->coefs(ai)[prev];
      if (same) {
        which[static_cast<size_t>(i)] = which[static_cast<size_t>(i) - 1];
        continue;
      }
    }
    for (size_t j = 0; j < sum.size(); ++j) sum[j] = w ? w[j] : 0.0;
    for (const auto& [ai, v] : used) {
      const double coef = lc->coefs(ai)[t];
      if (coef == 0.0) continue;
      for (size_t j = 0; j < sum.size(); ++j) sum[j] += coef * v[j];
    }
    which[static_cast<size_t>(i)] = static_cast<int>(vectors.size() / sum.size());
    for (double x : sum) vectors.push_back(static_cast<float>(x));
  }
  return true;
}

void LoraAdapter::check(const HParams& hp) const {
  const int64_t d = hp.n_embd, q = int64_t(hp.n_head) * hp.head_dim,
                kv = int64_t(hp.n_head_kv) * hp.head_dim, ff = hp.n_ff;
  // (n_out, n_in) of wq wk wv wo w_gate w_up w_down; the size of each delta slot
  const int64_t pair_shape[kLoraSlots][2] = {{q, d}, {kv, d}, {kv, d}, {d, q},
                                             {ff, d}, {ff, d}, {d, ff}};
  const int64_t delta_size[kDeltaSlots] = {d, d, q, kv, kv, d, ff, ff, d, d};
  for (int il = 0; il < n_layer(); ++il) {
    for (int s = 0; s < kLoraSlots; ++s) {
      const LoraPair* p = get(il, static_cast<LoraSlot>(s));
      if (p && (p->n_out != pair_shape[s][0] || p->n_in != pair_shape[s][1])) {
        throw std::invalid_argument("LoRA pair of layer " + std::to_string(il) + " matrix " +
                                    std::to_string(s) + " is " + std::to_string(p->n_out) +
                                    " x " + std::to_string(p->n_in) + ", the model's " +
                                    std::to_string(pair_shape[s][0]) + " x " +
                                    std::to_string(pair_shape[s][1]));
      }
    }
  }
  for (int il = 0; il <= n_layer(); ++il) {
    for (int s = 0; s < kDeltaSlots; ++s) {
      if ((il == n_layer()) != (s == static_cast<int>(DeltaSlot::OutputNorm))) continue;
      const std::vector<float>* v = delta(il, static_cast<DeltaSlot>(s));
      if (v && static_cast<int64_t>(v->size()) != delta_size[s]) {
        throw std::invalid_argument("LoRA delta of layer " + std::to_string(il) + " vector " +
                                    std::to_string(s) + " has " + std::to_string(v->size()) +
                                    " values, the model's has " + std::to_string(delta_size[s]));
      }
    }
  }
}

}  // namespace pyllm
