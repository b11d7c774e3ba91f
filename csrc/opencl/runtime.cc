// The OpenCL runtime: device discovery and filters, one context + program per device, handles
// (see runtime.h).
#include "opencl/runtime.h"

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

namespace pyllm {
extern const char kOpenCLSource[];  // csrc/opencl/kernels.cl, embedded by CMake
}

namespace pyllm::opencl {
namespace {

const char* error_name(cl_int err) {
  switch (err) {
#define PYLLM_CL_ERR(e) \
  case e:               \
    return #e;
    PYLLM_CL_ERR(CL_DEVICE_NOT_FOUND)
    PYLLM_CL_ERR(CL_DEVICE_NOT_AVAILABLE)
    PYLLM_CL_ERR(CL_COMPILER_NOT_AVAILABLE)
    PYLLM_CL_ERR(CL_MEM_OBJECT_ALLOCATION_FAILURE)
    PYLLM_CL_ERR(CL_OUT_OF_RESOURCES)
    PYLLM_CL_ERR(CL_OUT_OF_HOST_MEMORY)
    PYLLM_CL_ERR(CL_BUILD_PROGRAM_FAILURE)
    PYLLM_CL_ERR(CL_INVALID_VALUE)
    PYLLM_CL_ERR(CL_INVALID_PLATFORM)
    PYLLM_CL_ERR(CL_INVALID_DEVICE)
    PYLLM_CL_ERR(CL_INVALID_CONTEXT)
    PYLLM_CL_ERR(CL_INVALID_COMMAND_QUEUE)
    PYLLM_CL_ERR(CL_INVALID_MEM_OBJECT)
    PYLLM_CL_ERR(CL_INVALID_BUFFER_SIZE)
    PYLLM_CL_ERR(CL_INVALID_PROGRAM_EXECUTABLE)
    PYLLM_CL_ERR(CL_INVALID_KERNEL_NAME)
    PYLLM_CL_ERR(CL_INVALID_KERNEL_ARGS)
    PYLLM_CL_ERR(CL_INVALID_ARG_INDEX)
    PYLLM_CL_ERR(CL_INVALID_ARG_VALUE)
    PYLLM_CL_ERR(CL_INVALID_ARG_SIZE)
    PYLLM_CL_ERR(CL_INVALID_WORK_DIMENSION)
    PYLLM_CL_ERR(CL_INVALID_WORK_GROUP_SIZE)
    PYLLM_CL_ERR(CL_INVALID_GLOBAL_WORK_SIZE)
    PYLLM_CL_ERR(CL_INVALID_OPERATION)
#undef PYLLM_CL_ERR
    default:
      return "an OpenCL error";
  }
}

std::string info_string(cl_device_id d, cl_device_info what) {
  size_t n = 0;
  clGetDeviceInfo(d, what, 0, nullptr, &n);
  std::string s(n, '\0');
  clGetDeviceInfo(d, what, n, s.data(), nullptr);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

std::string platform_name(cl_platform_id p) {
  size_t n = 0;
  clGetPlatformInfo(p, CL_PLATFORM_NAME, 0, nullptr, &n);
  std::string s(n, '\0');
  clGetPlatformInfo(p, CL_PLATFORM_NAME, n, s.data(), nullptr);
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// An environment filter: empty, an index, or a (case-sensitive) substring of the name.
bool matches(const char* filter, size_t index, const std::string& name) {
  if (filter == nullptr || *filter == '\0') return true;
  char* end = nullptr;
  const long i = std::strtol(filter, &end, 10);
  if (*end == '\0') return i >= 0 && static_cast<size_t>(i) == index;
  return name.find(filter) != std::string::npos;
}

}  // namespace

void check(cl_int err, const char* what) {
  if (err != CL_SUCCESS) {
    throw DeviceError(std::string("OpenCL: ") + what + " failed: " + error_name(err) + " (" +
                      std::to_string(err) + ")");
  }
}

bool is_out_of_memory(cl_int err) {
  return err == CL_MEM_OBJECT_ALLOCATION_FAILURE || err == CL_OUT_OF_RESOURCES ||
         err == CL_OUT_OF_HOST_MEMORY || err == CL_INVALID_BUFFER_SIZE;
}

std::vector<DeviceDesc> list_devices() {
  cl_uint n_platforms = 0;
  if (clGetPlatformIDs(0, nullptr, &n_platforms) != CL_SUCCESS || n_platforms == 0) return {};
  std::vector<cl_platform_id> platforms(n_platforms);
  check(clGetPlatformIDs(n_platforms, platforms.data(), nullptr), "clGetPlatformIDs");
  const char* want_platform = std::getenv("PYLLM_OPENCL_PLATFORM");
  const char* want_device = std::getenv("PYLLM_OPENCL_DEVICE");
  std::vector<DeviceDesc> out;
  for (size_t pi = 0; pi < platforms.size(); ++pi) {
    const std::string pname = platform_name(platforms[pi]);
    if (!matches(want_platform, pi, pname)) continue;
    cl_uint n_dev = 0;
    if (clGetDeviceIDs(platforms[pi], CL_DEVICE_TYPE_ALL, 0, nullptr, &n_dev) != CL_SUCCESS) continue;
    std::vector<cl_device_id> devs(n_dev);
    check(clGetDeviceIDs(platforms[pi], CL_DEVICE_TYPE_ALL, n_dev, devs.data(), nullptr),
          "clGetDeviceIDs");
    for (size_t di = 0; di < devs.size(); ++di) {
      DeviceDesc d;
      d.platform = platforms[pi];
      d.device = devs[di];
      d.platform_name = pname;
      d.name = info_string(devs[di], CL_DEVICE_NAME);
      if (!matches(want_device, di, d.name)) continue;
      d.version = info_string(devs[di], CL_DEVICE_VERSION);
      cl_ulong v = 0;
      clGetDeviceInfo(devs[di], CL_DEVICE_GLOBAL_MEM_SIZE, sizeof v, &v, nullptr);
      d.global_mem = v;
      clGetDeviceInfo(devs[di], CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof v, &v, nullptr);
      d.max_alloc = v;
      clGetDeviceInfo(devs[di], CL_DEVICE_LOCAL_MEM_SIZE, sizeof v, &v, nullptr);
      d.local_mem = v;
      size_t wg = 0;
      clGetDeviceInfo(devs[di], CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof wg, &wg, nullptr);
      d.max_work_group = wg;
      out.push_back(d);
    }
  }
  return out;
}

Runtime& Runtime::get(int index) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<Runtime>> made;
  std::lock_guard<std::mutex> lock(mu);
  auto it = made.find(index);
  if (it != made.end()) return *it->second;
  const std::vector<DeviceDesc> devices = list_devices();
  if (devices.empty()) {
    throw DeviceError(
        "no OpenCL device found (install an OpenCL driver, e.g. PoCL's pocl-opencl-icd; "
        "PYLLM_OPENCL_PLATFORM / PYLLM_OPENCL_DEVICE may be filtering them all out)");
  }
  if (index < 0 || static_cast<size_t>(index) >= devices.size()) {
    throw DeviceError("OpenCL device " + std::to_string(index) + " does not exist (" +
                      std::to_string(devices.size()) + " found; pyllm.devices() lists them)");
  }
  std::unique_ptr<Runtime> rt(new Runtime(devices[index]));
  Runtime& ref = *rt;
  made.emplace(index, std::move(rt));
  return ref;
}

Runtime::Runtime(const DeviceDesc& desc) : desc_(desc) {
  cl_int err = CL_SUCCESS;
  context_ = clCreateContext(nullptr, 1, &desc_.device, nullptr, nullptr, &err);
  check(err, "clCreateContext");
  const char* src = kOpenCLSource;
  program_ = clCreateProgramWithSource(context_, 1, &src, nullptr, &err);
  if (err != CL_SUCCESS) {
    clReleaseContext(context_);
    check(err, "clCreateProgramWithSource");
  }
  err = clBuildProgram(program_, 1, &desc_.device, "-cl-std=CL1.2", nullptr, nullptr);
  if (err != CL_SUCCESS) {
    size_t n = 0;
    clGetProgramBuildInfo(program_, desc_.device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &n);
    std::string log(n, '\0');
    clGetProgramBuildInfo(program_, desc_.device, CL_PROGRAM_BUILD_LOG, n, log.data(), nullptr);
    clReleaseProgram(program_);
    clReleaseContext(context_);
    throw DeviceError("OpenCL: the kernels do not build on " + desc_.name + ": " + log);
  }
}

Runtime::~Runtime() {
  clReleaseProgram(program_);
  clReleaseContext(context_);
}

Buffer::Buffer(cl_context ctx, size_t bytes, cl_mem_flags flags, const void* host)
    : bytes_(bytes) {
  cl_int err = CL_SUCCESS;
  if (host) flags |= CL_MEM_COPY_HOST_PTR;
  mem_ = clCreateBuffer(ctx, flags, bytes == 0 ? 1 : bytes, const_cast<void*>(host), &err);
  if (err != CL_SUCCESS) {
    mem_ = nullptr;
    check(err, ("allocating " + std::to_string(bytes) + " bytes of device memory").c_str());
  }
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    if (mem_) clReleaseMemObject(mem_);
    mem_ = std::exchange(o.mem_, nullptr);
    bytes_ = o.bytes_;
  }
  return *this;
}

Buffer::~Buffer() {
  if (mem_) clReleaseMemObject(mem_);
}

Kernel::Kernel(cl_program program, const char* name) {
  cl_int err = CL_SUCCESS;
  k_ = clCreateKernel(program, name, &err);
  check(err, name);
}

Kernel& Kernel::operator=(Kernel&& o) noexcept {
  if (this != &o) {
    if (k_) clReleaseKernel(k_);
    k_ = std::exchange(o.k_, nullptr);
  }
  return *this;
}

Kernel::~Kernel() {
  if (k_) clReleaseKernel(k_);
}

void Kernel::set_raw(cl_uint i, size_t size, const void* value) {
  check(clSetKernelArg(k_, i, size, value), "clSetKernelArg");
}

Queue::Queue(const Runtime& rt) {
  cl_int err = CL_SUCCESS;
  q_ = clCreateCommandQueue(rt.context(), rt.desc().device, 0, &err);
  check(err, "clCreateCommandQueue");
}

Queue::~Queue() {
  if (q_) {
    clFinish(q_);
    clReleaseCommandQueue(q_);
  }
}

void Queue::run(const Kernel& k, std::initializer_list<size_t> global,
                std::initializer_list<size_t> local) {
  check(clEnqueueNDRangeKernel(q_, k.get(), static_cast<cl_uint>(global.size()), nullptr,
                               global.begin(), local.size() ? local.begin() : nullptr, 0,
                               nullptr, nullptr),
        "clEnqueueNDRangeKernel");
}

void Queue::write(const Buffer& b, size_t offset, size_t bytes, const void* src) {
  if (bytes == 0) return;
  check(clEnqueueWriteBuffer(q_, b.get(), CL_TRUE, offset, bytes, src, 0, nullptr, nullptr),
        "clEnqueueWriteBuffer");
}

void Queue::read(const Buffer& b, size_t offset, size_t bytes, void* dst) {
  if (bytes == 0) return;
  check(clEnqueueReadBuffer(q_, b.get(), CL_TRUE, offset, bytes, dst, 0, nullptr, nullptr),
        "clEnqueueReadBuffer");
}

void Queue::finish() { check(clFinish(q_), "clFinish"); }

}  // namespace pyllm::opencl
