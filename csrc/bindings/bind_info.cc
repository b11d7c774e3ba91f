// Build facts exposed to Python: extension version and the ISAs compiled into this binary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/register.h"
#include "cpu/cpu.h"
#include "cpu/matmul.h"

#ifndef PYLLM_VERSION
#define PYLLM_VERSION "0.0.0"
#endif

namespace pyllm::bindings {

static std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ',') {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

void register_info(pybind11::module_& m) {
  m.attr("__version__") = PYLLM_VERSION;
  m.def("compiled_isas", [] { return split_commas(PYLLM_ISA_LIST); },
        "Instruction sets whose kernels are compiled into this build (the run-time choice is among these).");
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (Isa isa : available_isas()) out.push_back(isa_name(isa));
    return out;
  }, "ISAs both compiled in and supported by this CPU, best last.");
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); },
        "The ISA the kernels use now (PYLLM_FORCE_ISA, else the best available).");
  m.def("set_active_isa", [](const std::string& name) { set_active_isa(parse_isa(name)); },
        "Switch the kernels to another available ISA (for tests and benchmarks).");
  m.def("matmat_min_tokens", [] { return matmat_min_tokens(); },
        "Tokens from which a product takes the active ISA's prefill (matmat) kernel.");
  m.attr("MATVEC_TOKENS") = kMatvecTokens;
  m.def("cpu_features", [] {
    const CpuFeatures& f = pyllm::cpu_features();
    pybind11::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c; d["bmi2"] = f.bmi2;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq; d["avx512vnni"] = f.avx512vnni; d["avx512bf16"] = f.avx512bf16;
    d["neon"] = f.neon; d["neon_dotprod"] = f.neon_dotprod;
    d["physical_cores"] = f.physical_cores; d["logical_cores"] = f.logical_cores;
    d["available_cpus"] = pyllm::available_cpus();  // affinity mask and cgroup quota, now
    return d;
  }, "Detected CPU features and core counts (available_cpus: those this process may use).");
}

}  // namespace pyllm::bindings
