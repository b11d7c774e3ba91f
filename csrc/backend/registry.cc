// The backends of this build, by name. A GPU backend adds its entry here, under its CMake
// option (PYLLM_OPENCL, PYLLM_CUDA), and its Backend/Device/Stage in its own folder beside
// csrc/cpu/.
#include <cstdlib>
#include <stdexcept>

#include "backend/backend.h"
#include "cpu/stage.h"
#ifdef PYLLM_HAVE_CUDA
#include "cuda/backend.h"
#endif
#ifdef PYLLM_HAVE_OPENCL
#include "opencl/backend.h"
#endif

namespace pyllm {

std::vector<std::string> backend_names() {
  std::vector<std::string> out = {"cpu"};
#ifdef PYLLM_HAVE_CUDA
  out.emplace_back("cuda");
#endif
#ifdef PYLLM_HAVE_OPENCL
  out.emplace_back("opencl");
#endif
  return out;
}

std::vector<DeviceInfo> device_infos() {
  std::vector<DeviceInfo> out = {DeviceInfo{"cpu", "CPU", "the host's cores (the thread pool)", 0}};
#ifdef PYLLM_HAVE_CUDA
  for (DeviceInfo& d : cuda_device_infos()) out.push_back(std::move(d));
#endif
#ifdef PYLLM_HAVE_OPENCL
  for (DeviceInfo& d : opencl_device_infos()) out.push_back(std::move(d));
#endif
  return out;
}

const Backend& find_backend(const std::string& name) {
  const size_t colon = name.find(':');
  const std::string kind = name.substr(0, colon);
  [[maybe_unused]] int index = 0;  // read only by the GPU backends of the build
  if (colon != std::string::npos) {
    const std::string digits = name.substr(colon + 1);
    char* end = nullptr;
    const long i = std::strtol(digits.c_str(), &end, 10);
    if (digits.empty() || *end != '\0' || i < 0 || i > 1024) {
      throw std::invalid_argument("bad device name '" + name + "' (expected e.g. opencl:0)");
    }
    index = static_cast<int>(i);
  }
  if (kind == "cpu" && colon == std::string::npos) return cpu_backend();
#ifdef PYLLM_HAVE_CUDA
  if (kind == "cuda") return cuda_backend(index);
#endif
#ifdef PYLLM_HAVE_OPENCL
  if (kind == "opencl") return opencl_backend(index);
#endif
  if (kind == "opencl" || kind == "cuda" || kind == "metal") {
    std::string upper = kind;
    for (char& c : upper) c = static_cast<char>(c - 'a' + 'A');
    throw std::invalid_argument("this build has no backend '" + kind + "': rebuild with -DPYLLM_" +
                                upper + "=ON (pip install -Ccmake.define.PYLLM_" + upper +
                                "=ON .)");
  }
  throw std::invalid_argument("this build has no backend '" + name + "'");
}

}  // namespace pyllm
