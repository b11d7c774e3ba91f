// The CPU backend's preparation of a model's weights at load: the matrices of its layers (and
// the output matrix, with the head) copied into the rows16 layout (pyllm/repack.h) where the
// active ISA has rows16 kernels. The copies live in one arena the returned store owns.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "pyllm/model.h"

namespace pyllm {

std::unique_ptr<WeightStore> prepare_cpu_weights(ModelWeights& weights,
                                                 const std::vector<LayerRange>& ranges,
                                                 const ModelOptions& options);

}  // namespace pyllm
