// Python bindings of LoRA adapters applied at run time: _core.LoraAdapter (an adapter's pairs in
// the file's precision, filled once by pyllm.runtime.lora) and the Context's adapter methods.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bindings/register.h"
#include "pyllm/lora.h"
#include "pyllm/model.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

LoraSlot slot_named(const std::string& name) {
  static const char* const kNames[kLoraSlots] = {"wq", "wk", "wv", "wo",
                                                 "w_gate", "w_up", "w_down"};
  for (int i = 0; i < kLoraSlots; ++i) {
    if (name == kNames[i]) return static_cast<LoraSlot>(i);
  }
  throw std::invalid_argument("no LoRA matrix slot named '" + name + "'");
}

DeltaSlot delta_slot_named(const std::string& name) {
  static const char* const kNames[kDeltaSlots] = {"attn_norm", "ffn_norm", "bq",   "bk",
                                                  "bv",        "bo",       "b_gate", "b_up",
                                                  "b_down",    "output_norm"};
  for (int i = 0; i < kDeltaSlots; ++i) {
    if (name == kNames[i]) return static_cast<DeltaSlot>(i);
  }
  throw std::invalid_argument("no delta slot named '" + name + "'");
}

}  // namespace

void register_lora(py::module_& m) {
  py::class_<LoraAdapter, std::shared_ptr<LoraAdapter>>(
      m, "LoraAdapter", "One adapter's low-rank pairs (float32), per layer and block matrix.")
      .def(py::init<int>(), py::arg("n_layer"))
      .def(
          "set",
          [](LoraAdapter& ad, int layer, const std::string& slot, const py::array& a,
             const py::array& b, float factor) {
            if (a.ndim() != 2 || b.ndim() != 2) throw std::invalid_argument("a and b must be 2-D");
            if (!(a.flags() & py::array::c_style) || !(b.flags() & py::array::c_style)) {
              throw std::invalid_argument("a and b must be C-contiguous");
            }
            LoraPair p;
            p.rank = static_cast<int>(a.shape(0));
            if (a.dtype().is(py::dtype("uint8"))) {  // Q8_0 rows
              if (a.shape(1) % static_cast<py::ssize_t>(sizeof(BlockQ8_0))) {
                throw std::invalid_argument("a's Q8_0 rows must be whole blocks");
              }
              p.a_type = QType::Q8_0;
              p.n_in = a.shape(1) / static_cast<py::ssize_t>(sizeof(BlockQ8_0)) * QK8_0;
            } else if (a.dtype().is(py::dtype("float16"))) {
              p.a_type = QType::F16;
              p.n_in = a.shape(1);
            } else if (a.dtype().is(py::dtype("float32"))) {
              p.a_type = QType::F32;
              p.n_in = a.shape(1);
            } else {
              throw std::invalid_argument("a must be float32, float16 or Q8_0 bytes (uint8)");
            }
            if (b.dtype().is(py::dtype("float16"))) {
              p.b_type = QType::F16;
            } else if (b.dtype().is(py::dtype("float32"))) {
              p.b_type = QType::F32;
            } else {
              throw std::invalid_argument("b must be float32 or float16");
            }
            p.n_out = b.shape(0);
            if (b.shape(1) != p.rank) throw std::invalid_argument("b's columns must be a's rows");
            const auto* pa = static_cast<const uint8_t*>(a.data());
            const auto* pb = static_cast<const uint8_t*>(b.data());
            p.a.assign(pa, pa + a.nbytes());
            p.b.assign(pb, pb + b.nbytes());
            p.factor = factor;
            ad.set(layer, slot_named(slot), std::move(p));
          },
          py::arg("layer"), py::arg("slot"), py::arg("a"), py::arg("b"), py::arg("factor"),
          "Pair of one matrix: a (rank, n_in) float32 or float16, or (rank, row bytes) uint8 "
          "holding Q8_0 rows; b (n_out, rank) float32 or float16; kept as given; factor = "
          "alpha / rank; slot is wq, wk, wv, wo, w_gate, w_up or w_down.")
      .def(
          "set_delta",
          [](LoraAdapter& ad, int layer, const std::string& slot,
             const py::array_t<float, py::array::c_style | py::array::forcecast>& values) {
            if (values.ndim() != 1) throw std::invalid_argument("a delta must be 1-D");
            ad.set_delta(layer, delta_slot_named(slot),
                         std::vector<float>(values.data(), values.data() + values.size()));
          },
          py::arg("layer"), py::arg("slot"), py::arg("values"),
          "A delta added (times the sequence's scale) to a vector: slot attn_norm, ffn_norm, "
          "bq, bk, bv, bo, b_gate, b_up, b_down (of `layer`) or output_norm (layer ignored).")
      .def_property_readonly("has_deltas", &LoraAdapter::has_deltas)
      .def_property_readonly("n_layer", &LoraAdapter::n_layer)
      .def_property_readonly("max_rank", &LoraAdapter::max_rank)
      .def_property_readonly("nbytes", &LoraAdapter::nbytes,
                             "Bytes of the pairs as kept (what decode reads per token).");
}

void register_context_lora(py::class_<Context>& ctx) {
  ctx.def(
         "set_lora_adapters",
         [](Context& c, const std::vector<std::shared_ptr<LoraAdapter>>& adapters) {
           std::vector<std::shared_ptr<const LoraAdapter>> v(adapters.begin(), adapters.end());
           c.set_lora_adapters(std::move(v));
         },
         py::arg("adapters"),
         "The adapters this context knows (indexes for seq_set_lora); clears every mix.")
      .def("seq_set_lora", &Context::seq_set_lora, py::arg("seq"), py::arg("mix"),
           "One sequence's adapters: [(adapter index, scale)]; [] = none.")
      .def("seq_lora", &Context::seq_lora, py::arg("seq"));
}

}  // namespace pyllm::bindings
