// CPU feature detection and the run-time choice of kernel ISA.
#pragma once

#include <string>
#include <vector>

namespace pyllm {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Neon = 3 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false;
  bool neon = false, neon_dotprod = false;
  int physical_cores = 1;
  int logical_cores = 1;
};

// Features of the machine we run on (detected once, cached).
const CpuFeatures& cpu_features();

// CPUs this process may run on: its affinity mask (sched_getaffinity; taskset, cpusets),
// capped by a cgroup CPU quota (v2 cpu.max or v1 cfs_quota_us, rounded up); at least 1. Read
// on every call (the mask can change at run time).
int available_cpus();

// Name used in PYLLM_FORCE_ISA and in reports: "scalar", "avx2", "avx512", "neon".
const char* isa_name(Isa isa);

// Whether `isa` is both compiled into this binary and supported by this CPU.
bool isa_available(Isa isa);

// ISAs usable here, best last.
std::vector<Isa> available_isas();

// The ISA kernels use: PYLLM_FORCE_ISA if set (throws std::runtime_error when the forced ISA is
// unknown or unavailable), else the best available. Evaluated once; set_active_isa overrides it.
Isa active_isa();
void set_active_isa(Isa isa);  // throws std::runtime_error if not available

// Parses an ISA name; throws std::invalid_argument for unknown names.
Isa parse_isa(const std::string& name);

}  // namespace pyllm
