// The pyllm._core extension module: each area registers its own bindings (one register_* per file).
#include <pybind11/pybind11.h>

#include "bindings/errors.h"
#include "bindings/register.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyllm C++ core: quantization formats, CPU kernels, the Llama forward pass";
  pyllm::bindings::register_errors(m);  // first: the others raise these
  pyllm::bindings::register_info(m);
  pyllm::bindings::register_lora(m);  // before the Context, whose methods take adapters
  pyllm::bindings::register_model(m);
  pyllm::bindings::register_quant(m);
  pyllm::bindings::register_sampler(m);
  pyllm::bindings::register_kernels(m);
  pyllm::bindings::register_gguf(m);
  pyllm::bindings::register_tokenizer(m);
}
