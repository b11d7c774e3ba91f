// LoraAdapter: the float32 pairs of one adapter file, checked as they are set (see lora.h).
#include <algorithm>
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
  max_rank_ = std::max(max_rank_, pair.rank);
  cell = std::make_unique<LoraPair>(std::move(pair));
}

}  // namespace pyllm
