// Declarations of the per-area binding registration functions called by module.cc.
#pragma once

#include <pybind11/pybind11.h>

namespace pyllm {
class Context;
}

namespace pyllm::bindings {

void register_info(pybind11::module_& m);   // bind_info.cc: version and build facts
void register_model(pybind11::module_& m);  // bind_model.cc: Model, Context
void register_quant(pybind11::module_& m);  // bind_quant.cc: type traits, quantize, dequantize
void register_kernels(pybind11::module_& m);  // bind_kernels.cc: matmul, thread count (tests/benchmarks)
void register_sampler(pybind11::module_& m);  // bind_sampler.cc: sampler chain, raw logprobs
void register_lora(pybind11::module_& m);  // bind_lora.cc: LoraAdapter
void register_gguf(pybind11::module_& m);  // bind_gguf.cc: GGUF string arrays
void register_tokenizer(pybind11::module_& m);  // bind_tokenizer.cc: BPE merge pair table
// bind_lora.cc: the Context's adapter methods (called by register_model on its Context class)
void register_context_lora(pybind11::class_<Context>& ctx);

}  // namespace pyllm::bindings
