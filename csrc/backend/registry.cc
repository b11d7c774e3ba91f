// The backends of this build, by name. A GPU backend adds its entry here, under its CMake
// option (PYLLM_OPENCL, PYLLM_CUDA), and its Backend/Device/Stage in its own folder beside
// csrc/cpu/.
#include <stdexcept>

#include "backend/backend.h"
#include "cpu/stage.h"

namespace pyllm {

namespace {
const Backend* const kBackends[] = {&cpu_backend()};
}  // namespace

std::vector<std::string> backend_names() {
  std::vector<std::string> out;
  for (const Backend* b : kBackends) out.emplace_back(b->name());
  return out;
}

const Backend& find_backend(const std::string& name) {
  for (const Backend* b : kBackends) {
    if (name == b->name()) return *b;
  }
  throw std::invalid_argument("this build has no backend '" + name + "'");
}

}  // namespace pyllm
