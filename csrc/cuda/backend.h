// The CUDA backend behind the device seam (csrc/backend/backend.h), built with -DPYLLM_CUDA=ON:
// the same stages as the OpenCL backend (csrc/opencl/backend.h), as CUDA kernels
// (csrc/cuda/kernels.cuh) on one stream per context. Plain C++ header: the registry includes it.
#pragma once

#include <vector>

#include "backend/backend.h"

namespace pyllm {

// The backend of CUDA device `index`, named "cuda:<index>".
const Backend& cuda_backend(int index);
// One entry per CUDA device (none without a driver or a GPU).
std::vector<DeviceInfo> cuda_device_infos();

}  // namespace pyllm
