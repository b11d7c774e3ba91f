// resolve_placement (see placement.h).
#include "model/placement.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "backend/backend.h"

namespace pyllm {

std::vector<PlacedLayers> resolve_placement(const std::vector<PlacedLayers>& requested,
                                            int n_layer) {
  if (requested.empty()) return {PlacedLayers{"cpu", 0, n_layer}};
  std::vector<PlacedLayers> out = requested;
  int next = 0, local = 0;
  for (size_t i = 0; i < requested.size(); ++i) {
    const PlacedLayers& r = requested[i];
    const std::string where = "placement range " + std::to_string(i) + " (" + r.backend + " " +
                              std::to_string(r.first) + ".." + std::to_string(r.last) + ")";
    const bool last = i + 1 == requested.size();
    if (is_remote(r)) {
      if (i != 0 && !last) {
        throw std::invalid_argument(where + ": only the first and the last range may be remote");
      }
    } else {
      ++local;
      try {
        out[i].backend = find_backend(r.backend).name();  // canonical: "opencl" -> "opencl:0"
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument(where + ": " + e.what());
      }
    }
    if (r.first != next) {
      throw std::invalid_argument(where + ": must start at layer " + std::to_string(next) +
                                  " (ranges cover every layer, in order)");
    }
    if (r.last > n_layer || r.last < r.first || (r.last == r.first && !last)) {
      throw std::invalid_argument(where + ": must end after its first layer and at most at " +
                                  std::to_string(n_layer) +
                                  " (only the last range may be empty, to hold the head alone)");
    }
    next = r.last;
  }
  if (local == 0) throw std::invalid_argument("a placement needs one range on this process");
  if (next != n_layer) {
    throw std::invalid_argument("placement covers layers 0.." + std::to_string(next) +
                                " of the model's " + std::to_string(n_layer));
  }
  return out;
}

}  // namespace pyllm
