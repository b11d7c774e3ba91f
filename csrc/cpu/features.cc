// Owns CPU feature detection (cpuid/xgetbv on x86, compile-time facts on ARM) and the choice of
// the active kernel ISA, including the PYLLM_FORCE_ISA override used by tests.
#include "cpu/cpu.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <fstream>

#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define PYLLM_X86 1
#include <cpuid.h>
#endif

namespace pyllm {
namespace {

#ifdef PYLLM_X86
void cpuid(unsigned leaf, unsigned sub, unsigned regs[4]) {
  __cpuid_count(leaf, sub, regs[0], regs[1], regs[2], regs[3]);
}

unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

// Counts distinct (physical id, core id) pairs in /proc/cpuinfo; falls back to logical count.
int count_physical_cores(int logical) {
  std::ifstream f("/proc/cpuinfo");
  if (!f) return logical;
  std::set<std::pair<int, int>> cores;
  std::string line;
  int phys = 0;
  while (std::getline(f, line)) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, line.find_last_not_of(" \t", colon - 1) + 1);
    int value = std::atoi(line.c_str() + colon + 1);
    if (key == "physical id") phys = value;
    if (key == "core id") cores.insert({phys, value});
  }
  return cores.empty() ? logical : static_cast<int>(cores.size());
}

// CPUs granted by a cgroup quota (v2 "cpu.max": "QUOTA PERIOD" or "max PERIOD"; v1
// cfs_quota_us / cfs_period_us, -1 = none), rounded up; 0 when there is none.
int cgroup_cpu_limit() {
  double quota = -1, period = 0;
  std::ifstream v2("/sys/fs/cgroup/cpu.max");
  if (v2) {
    std::string q;
    if (!(v2 >> q >> period) || q == "max") return 0;
    quota = std::atof(q.c_str());
  } else {
    std::ifstream q1("/sys/fs/cgroup/cpu/cpu.cfs_quota_us");
    std::ifstream p1("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
    if (!(q1 >> quota) || !(p1 >> period)) return 0;
  }
  if (quota <= 0 || period <= 0) return 0;
  return std::max(1, static_cast<int>(std::ceil(quota / period)));
}

// CPUs in this process's affinity mask, or 0 when unknown.
int affinity_cpus() {
#if defined(__linux__)
  // A fixed cpu_set_t holds 1024 CPUs; larger machines need a bigger, dynamically sized set.
  for (int n = 1024; n <= (1 << 16); n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (set == nullptr) return 0;
    const size_t size = CPU_ALLOC_SIZE(n);
    CPU_ZERO_S(size, set);
    if (sched_getaffinity(0, size, set) == 0) {
      const int count = CPU_COUNT_S(size, set);
      CPU_FREE(set);
      return count;
    }
    CPU_FREE(set);
    if (errno != EINVAL) return 0;  // EINVAL: the set is too small for this kernel's CPUs
  }
#endif
  return 0;
}

CpuFeatures detect() {
  CpuFeatures f;
  f.logical_cores = static_cast<int>(std::thread::hardware_concurrency());
  if (f.logical_cores <= 0) f.logical_cores = 1;
  f.physical_cores = count_physical_cores(f.logical_cores);
#ifdef PYLLM_X86
  unsigned r[4];
  cpuid(0, 0, r);
  unsigned max_leaf = r[0];
  cpuid(1, 0, r);
  bool osxsave = r[2] & (1u << 27);
  f.fma = r[2] & (1u << 12);
  f.f16c = r[2] & (1u << 29);
  // The OS must save the vector registers for the extensions to be usable.
  unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  bool ymm_ok = (xcr0 & 0x6) == 0x6;
  bool zmm_ok = (xcr0 & 0xe6) == 0xe6;
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    f.avx2 = ymm_ok && (r[1] & (1u << 5));
    f.bmi2 = r[1] & (1u << 8);
    f.avx512f = zmm_ok && (r[1] & (1u << 16));
    f.avx512dq = zmm_ok && (r[1] & (1u << 17));
    f.avx512bw = zmm_ok && (r[1] & (1u << 30));
    f.avx512vl = zmm_ok && (r[1] & (1u << 31));
    f.avx512vnni = zmm_ok && (r[2] & (1u << 11));
    unsigned r1[4];
    cpuid(7, 1, r1);
    f.avx512bf16 = zmm_ok && (r1[0] & (1u << 5));
  }
  f.fma = f.fma && ymm_ok;
  f.f16c = f.f16c && ymm_ok;
#elif defined(__aarch64__)
  f.neon = true;
#if defined(__ARM_FEATURE_DOTPROD)
  f.neon_dotprod = true;
#endif
#endif
  return f;
}

bool compiled_in(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
#ifdef PYLLM_HAVE_ISA_AVX2
      return true;
#else
      return false;
#endif
    case Isa::Avx512:
#ifdef PYLLM_HAVE_ISA_AVX512
      return true;
#else
      return false;
#endif
    case Isa::Neon:
#ifdef PYLLM_HAVE_ISA_NEON
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool cpu_supports(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return f.avx2 && f.fma && f.f16c && f.bmi2;
    case Isa::Avx512:
      return f.avx2 && f.fma && f.f16c && f.bmi2 && f.avx512f && f.avx512bw && f.avx512vl &&
             f.avx512dq && f.avx512vnni && f.avx512bf16;
    case Isa::Neon:
      return f.neon;
  }
  return false;
}

std::once_flag g_isa_once;
std::atomic<int> g_isa{0};

void init_isa() {
  const char* forced = std::getenv("PYLLM_FORCE_ISA");
  if (forced && *forced) {
    Isa isa = parse_isa(forced);
    if (!isa_available(isa)) {
      throw std::runtime_error(std::string("PYLLM_FORCE_ISA=") + forced +
                               ": this ISA is not available on this CPU or in this build");
    }
    g_isa.store(static_cast<int>(isa));
    return;
  }
  g_isa.store(static_cast<int>(available_isas().back()));
}

}  // namespace

int available_cpus() {
  int n = affinity_cpus();
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  const int quota = cgroup_cpu_limit();
  if (quota > 0) n = std::min(n, quota);
  return std::max(1, n);
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
    case Isa::Neon:
      return "neon";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon}) {
    if (name == isa_name(isa)) return isa;
  }
  throw std::invalid_argument("unknown ISA '" + name + "' (expected scalar, avx2, avx512 or neon)");
}

bool isa_available(Isa isa) { return compiled_in(isa) && cpu_supports(isa); }

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::Scalar, Isa::Neon, Isa::Avx2, Isa::Avx512}) {
    if (isa_available(isa)) out.push_back(isa);
  }
  return out;
}

Isa active_isa() {
  std::call_once(g_isa_once, init_isa);
  return static_cast<Isa>(g_isa.load());
}

void set_active_isa(Isa isa) {
  if (!isa_available(isa)) {
    throw std::runtime_error(std::string("ISA ") + isa_name(isa) +
                             " is not available on this CPU or in this build");
  }
  std::call_once(g_isa_once, [] {});
  g_isa.store(static_cast<int>(isa));
}

}  // namespace pyllm
