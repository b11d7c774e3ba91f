// LoraAdapter: the float32 pairs of one adapter file, checked as they are set (see lora.h).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "pyllm/lora.h"

namespace pyllm {

LoraAdapter::LoraAdapter(int n_layer) {
  if (n_layer <= 0 || n_layer > (1 << 16)) throw std::invalid_argument("LoraAdapter: bad n_layer");
  pairs_.resize(static_cast<size_t>(n_layer));
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
  const size_t elem = pair.type == QType::F16 ? 2 : pair.type == QType::F32 ? 4 : 0;
  if (elem == 0) throw std::invalid_argument("LoRA pairs must be F32 or F16");
  if (pair.rank <= 0 || pair.n_in <= 0 || pair.n_out <= 0 ||
      pair.a.size() != static_cast<size_t>(pair.rank * pair.n_in) * elem ||
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
  cell = std::make_unique<LoraPair>(std::move(pair));
}

}  // namespace pyllm
