// Build facts exposed to Python: extension version and the ISAs compiled into this binary.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/register.h"

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
}

}  // namespace pyllm::bindings
