// The C++ exceptions the bindings raise as pyllm.errors classes, translated by one translator
// that register_errors (module.cc) installs once; the error classes are looked up once there.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace pyllm::bindings {

// Raised as pyllm.errors.QuantError (bad tensor types, sizes or buffers given to the kernels).
class QuantError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void raise_quant_error(const std::string& msg) { throw QuantError(msg); }

// Installs the translation of QuantError and pyllm::SamplingError; called once by module.cc.
void register_errors(pybind11::module_& m);

}  // namespace pyllm::bindings
