// The OpenCL backend behind the device seam (csrc/backend/backend.h), built with
// -DPYLLM_OPENCL=ON. OpenCLBackend uploads the weights of its layers at load, in their quantized
// form; an OpenCLDevice is one context's command queue, kernels and activation buffers; an
// OpenCLStage runs its layers with their K/V cache in device memory. A stage receives the hidden
// rows once and returns them once per call; everything between stays on the device.
#pragma once

#include <string>
#include <vector>

#include "backend/backend.h"

namespace pyllm {

// The backend of OpenCL device `index` (of pyllm::opencl::list_devices()), named "opencl:<index>".
const Backend& opencl_backend(int index);
// One entry per usable OpenCL device (for pyllm.devices()).
std::vector<DeviceInfo> opencl_device_infos();

}  // namespace pyllm
