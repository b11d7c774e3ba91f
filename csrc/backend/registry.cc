// The backends of this build, by name. A GPU backend adds its entry here, under its CMake
// option (PYLLM_OPENCL, PYLLM_CUDA), and its Device/Stage in its own folder beside csrc/cpu/.
#include <stdexcept>

#include "backend/backend.h"
#include "cpu/stage.h"

namespace pyllm {

std::vector<std::string> backend_names() { return {"cpu"}; }

std::unique_ptr<Device> make_device(const std::string& name, const Model& model,
                                    const ContextParams& params) {
  if (name == "cpu") return std::make_unique<CpuDevice>(model, params);
  throw std::invalid_argument("this build has no backend '" + name + "'");
}

}  // namespace pyllm
