// Placement: which backend runs which layers of a model, decided at load (ModelOptions).
//
// A placement is a list of layer ranges in layer order, each on a named backend; together they
// cover layers [0, n_layer) without gaps or overlaps. The model's head (final norm + output
// matrix) goes with the last range, which may be empty (first == last == n_layer) to keep the
// head on another backend than the last layers. Adjacent ranges may name the same backend.
// An empty list means every layer and the head on the CPU.
#pragma once

#include <vector>

#include "pyllm/model.h"

namespace pyllm {

// The placement to use: `requested` checked against n_layer and the backends of this build,
// or the all-CPU default. Throws std::invalid_argument saying what is wrong.
std::vector<PlacedLayers> resolve_placement(const std::vector<PlacedLayers>& requested,
                                            int n_layer);

}  // namespace pyllm
