// One exception translator for the pyllm.errors classes the C++ side raises.
#include "bindings/errors.h"

#include <exception>

#include "backend/backend.h"
#include "pyllm/sampler.h"

namespace py = pybind11;

namespace pyllm::bindings {

void register_errors(py::module_& m) {
  // Looked up once, at import. The references are never released: a translator may still run
  // during interpreter shutdown, after the module's own objects are gone.
  py::module_ errors = py::module_::import("pyllm.errors");
  static PyObject* const quant_error = py::object(errors.attr("QuantError")).release().ptr();
  static PyObject* const sampling_error = py::object(errors.attr("SamplingError")).release().ptr();
  static PyObject* const device_error = py::object(errors.attr("DeviceError")).release().ptr();
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const QuantError& e) {
      PyErr_SetString(quant_error, e.what());
    } catch (const SamplingError& e) {
      PyErr_SetString(sampling_error, e.what());
    } catch (const DeviceError& e) {
      PyErr_SetString(device_error, e.what());
    }
  });
}

}  // namespace pyllm::bindings
