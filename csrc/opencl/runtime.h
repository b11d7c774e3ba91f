// The OpenCL runtime of the OpenCL backend: which devices there are (PYLLM_OPENCL_PLATFORM /
// PYLLM_OPENCL_DEVICE filter them by index or name substring, as GGML_OPENCL_PLATFORM does), one
// context and one built program per device (compiled once per process, on first use), error
// checks that name the failing call, and owning handles for buffers, kernels and queues.
#pragma once

#define CL_TARGET_OPENCL_VERSION 120
#define CL_USE_DEPRECATED_OPENCL_1_2_APIS
#include <CL/cl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"

namespace pyllm::opencl {

struct DeviceDesc {
  cl_platform_id platform = nullptr;
  cl_device_id device = nullptr;
  std::string platform_name, name, version;
  uint64_t global_mem = 0, max_alloc = 0;
  size_t max_work_group = 0;
  uint64_t local_mem = 0;
};

// The devices pyllm may use, in platform then device order, after the environment's filters.
// Throws DeviceError when a filter matches nothing or names an index out of range.
std::vector<DeviceDesc> list_devices();

// Throws DeviceError naming `what` and the OpenCL error code's name unless err is CL_SUCCESS.
void check(cl_int err, const char* what);
// Whether err means the device ran out of memory (then nothing half-made stays allocated: every
// object is owned by a handle below).
bool is_out_of_memory(cl_int err);

// One usable device: its context and the program built from csrc/opencl/kernels.cl.
class Runtime {
 public:
  // The runtime of device `index` of list_devices(), made on first use; throws DeviceError.
  static Runtime& get(int index);
  const DeviceDesc& desc() const { return desc_; }
  cl_context context() const { return context_; }
  cl_program program() const { return program_; }
  ~Runtime();

 private:
  explicit Runtime(const DeviceDesc& desc);
  DeviceDesc desc_;
  cl_context context_ = nullptr;
  cl_program program_ = nullptr;
};

// Owning handle of a cl_mem.
class Buffer {
 public:
  Buffer() = default;
  Buffer(cl_context ctx, size_t bytes, cl_mem_flags flags = CL_MEM_READ_WRITE,
         const void* host = nullptr);
  Buffer(Buffer&& o) noexcept : mem_(std::exchange(o.mem_, nullptr)), bytes_(o.bytes_) {}
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();
  cl_mem get() const { return mem_; }
  size_t bytes() const { return bytes_; }
  explicit operator bool() const { return mem_ != nullptr; }

 private:
  cl_mem mem_ = nullptr;
  size_t bytes_ = 0;
};

// Local memory of `bytes` as a kernel argument.
struct Local {
  size_t bytes;
};

// Owning handle of a cl_kernel, with typed argument setting.
class Kernel {
 public:
  Kernel() = default;
  Kernel(cl_program program, const char* name);
  Kernel(Kernel&& o) noexcept : k_(std::exchange(o.k_, nullptr)) {}
  Kernel& operator=(Kernel&& o) noexcept;
  Kernel(const Kernel&) = delete;
  Kernel& operator=(const Kernel&) = delete;
  ~Kernel();

  template <typename... Args>
  Kernel& args(const Args&... a) {
    cl_uint i = 0;
    (set(i++, a), ...);
    return *this;
  }
  cl_kernel get() const { return k_; }

 private:
  void set(cl_uint i, const Buffer& b) { set_raw(i, sizeof(cl_mem), &b); }
  void set(cl_uint i, const Local& l) { set_raw(i, l.bytes, nullptr); }
  void set(cl_uint i, std::nullptr_t) { set_raw(i, sizeof(cl_mem), nullptr); }
  template <typename T>
  void set(cl_uint i, const T& v) { set_raw(i, sizeof(T), &v); }
  void set_raw(cl_uint i, size_t size, const void* value);
  cl_kernel k_ = nullptr;
};

// Owning handle of an in-order command queue.
class Queue {
 public:
  Queue(const Runtime& rt);
  Queue(const Queue&) = delete;
  Queue& operator=(const Queue&) = delete;
  ~Queue();
  cl_command_queue get() const { return q_; }
  // global: work-items per dimension (a multiple of local); local: the work-group (or null).
  void run(const Kernel& k, std::initializer_list<size_t> global,
           std::initializer_list<size_t> local = {});
  void write(const Buffer& b, size_t offset, size_t bytes, const void* src);
  void read(const Buffer& b, size_t offset, size_t bytes, void* dst);
  void finish();

 private:
  cl_command_queue q_ = nullptr;
};

}  // namespace pyllm::opencl
