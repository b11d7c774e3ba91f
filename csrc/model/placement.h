// Placement: which backend runs which layers of a model, decided at load (ModelOptions).
//
// A placement is a list of layer ranges in layer order, each on a named backend; together they
// cover layers [0, n_layer) without gaps or overlaps. The model's head (final norm + output
// matrix) goes with the last range, which may be empty (first == last == n_layer) to keep the
// head on another backend than the last layers. Adjacent ranges may name the same backend.
// An empty list means every layer and the head on the CPU.
//
// A range may also be "remote": run by another process (an MPI rank of a layer pipeline,
// pyllm/runtime/mpi.py), whose weights this process neither holds nor reads. Only the first
// and the last range may be remote, and one range at least must be local: a context then takes
// its chunks as hidden rows from the previous process (first range remote) and/or hands them
// on as hidden rows instead of logits (last range remote, the head with it): Context::decode_part.
#pragma once

#include <string>
#include <vector>

#include "pyllm/model.h"

namespace pyllm {

// The placement kind of layers another process runs.
inline constexpr char kRemotePlacement[] = "remote";
inline bool is_remote(const PlacedLayers& p) { return p.backend == kRemotePlacement; }

// The placement to use: `requested` checked against n_layer and the backends of this build,
// or the all-CPU default. Throws std::invalid_argument saying what is wrong.
std::vector<PlacedLayers> resolve_placement(const std::vector<PlacedLayers>& requested,
                                            int n_layer);

}  // namespace pyllm
