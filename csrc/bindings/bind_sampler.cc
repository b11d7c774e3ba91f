// Python bindings of the sampler: _core.SamplerParams, _core.Sampler, _core.raw_logprobs.
// Logits arrive as any float32 1-D contiguous buffer (a numpy row), read in place with the GIL
// released; pyllm.runtime.sampling wraps these in the typed public API.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "bindings/register.h"
#include "pyllm/sampler.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

// Requests a read-only view and checks it is a contiguous float32 vector. The returned info
// keeps the exporter's buffer alive (and its memory pinned) while the GIL is released.
py::buffer_info float_row(const py::buffer& b) {
  py::buffer_info info = b.request();
  if (info.format != py::format_descriptor<float>::format() || info.itemsize != 4)
    throw SamplingError("logits must be float32, got buffer format '" + info.format + "'");
  if (info.ndim != 1)
    throw SamplingError("logits must be a 1-D row of n_vocab values, got " +
                        std::to_string(info.ndim) + " dimensions");
  if (info.shape[0] > 1 && info.strides[0] != 4) throw SamplingError("logits must be contiguous");
  return info;
}

// An optional token mask: None, or a contiguous uint32 vector of at least ceil(n_vocab / 32)
// words. The returned info (empty for None) keeps the buffer alive while the GIL is released.
struct MaskView {
  py::buffer_info info;
  const uint32_t* ptr = nullptr;
};

MaskView mask_words(const py::object& mask, int32_t n_vocab) {
  MaskView v;
  if (mask.is_none()) return v;
  v.info = py::reinterpret_borrow<py::buffer>(mask).request();
  const bool u32 = v.info.itemsize == 4 && (v.info.format == "I" || v.info.format == "L" ||
                                            v.info.format == "=I" || v.info.format == "<I");
  if (!u32 || v.info.ndim != 1)
    throw SamplingError("the token mask must be a 1-D uint32 array, got format '" +
                        v.info.format + "'");
  if (v.info.shape[0] > 1 && v.info.strides[0] != 4)
    throw SamplingError("the token mask must be contiguous");
  const auto need = (static_cast<py::ssize_t>(n_vocab) + 31) / 32;
  if (v.info.shape[0] < need)
    throw SamplingError("the token mask has " + std::to_string(v.info.shape[0]) +
                        " words, n_vocab " + std::to_string(n_vocab) + " needs " +
                        std::to_string(need));
  v.ptr = static_cast<const uint32_t*>(v.info.ptr);
  return v;
}

// One Sampler per Python object; the mutex makes concurrent calls from several Python threads
// (possible because the GIL is released) wait instead of racing on the scratch buffers.
struct PySampler {
  Sampler sampler;
  std::mutex mu;
  PySampler(SamplerParams p, int32_t n_vocab) : sampler(std::move(p), n_vocab) {}
};

py::list top_to_list(const TopLogprobs& top) {
  py::list out;
  for (const auto& [id, lp] : top) out.append(py::make_tuple(id, lp));
  return out;
}

}  // namespace

void register_sampler(py::module_& m) {
  py::class_<SamplerParams>(m, "SamplerParams",
                            "Raw sampler settings; pyllm.runtime.sampling.SamplingParams fills them.")
      .def(py::init<>())
      .def_readwrite("temperature", &SamplerParams::temperature)
      .def_readwrite("top_k", &SamplerParams::top_k)
      .def_readwrite("top_p", &SamplerParams::top_p)
      .def_readwrite("min_p", &SamplerParams::min_p)
      .def_readwrite("typical_p", &SamplerParams::typical_p)
      .def_readwrite("tfs_z", &SamplerParams::tfs_z)
      .def_readwrite("repeat_penalty", &SamplerParams::repeat_penalty)
      .def_readwrite("repeat_last_n", &SamplerParams::repeat_last_n)
      .def_readwrite("presence_penalty", &SamplerParams::presence_penalty)
      .def_readwrite("frequency_penalty", &SamplerParams::frequency_penalty)
      .def_readwrite("mirostat", &SamplerParams::mirostat)
      .def_readwrite("mirostat_tau", &SamplerParams::mirostat_tau)
      .def_readwrite("mirostat_eta", &SamplerParams::mirostat_eta)
      .def_readwrite("logit_bias", &SamplerParams::logit_bias)
      .def_readwrite("seed", &SamplerParams::seed);

  py::class_<PySampler>(m, "Sampler", "llama.cpp-compatible sampler chain over one logits row.")
      .def(py::init<SamplerParams, int32_t>(), py::arg("params"), py::arg("n_vocab"))
      .def("sample", [](PySampler& s, const py::buffer& logits, const py::object& mask) {
        py::buffer_info info = float_row(logits);
        MaskView m = mask_words(mask, s.sampler.n_vocab());
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(s.mu);
        return s.sampler.sample(static_cast<const float*>(info.ptr),
                                static_cast<size_t>(info.shape[0]), m.ptr);
      }, py::arg("logits"), py::arg("mask") = py::none(),
         "Draw a token (does not accept it); `mask`: allowed tokens as uint32 bit words.")
      .def("sample_with_info", [](PySampler& s, const py::buffer& logits, size_t top_n,
                                  const py::object& mask) {
        py::buffer_info info = float_row(logits);
        MaskView m = mask_words(mask, s.sampler.n_vocab());
        SampleInfo r;
        {
          py::gil_scoped_release nogil;
          std::lock_guard<std::mutex> lock(s.mu);
          r = s.sampler.sample_with_info(static_cast<const float*>(info.ptr),
                                         static_cast<size_t>(info.shape[0]), top_n, m.ptr);
        }
        return py::make_tuple(r.token, r.logprob, top_to_list(r.top), r.sampled_logprob,
                              top_to_list(r.sampled_top));
      }, py::arg("logits"), py::arg("top_n"), py::arg("mask") = py::none(),
         "Draw a token; returns (token, raw logprob, raw top_n, sampled logprob, sampled top_n).")
      .def("candidates", [](PySampler& s, const py::buffer& logits, const py::object& mask) {
        py::buffer_info info = float_row(logits);
        MaskView m = mask_words(mask, s.sampler.n_vocab());
        std::vector<Candidate> c;
        {
          py::gil_scoped_release nogil;
          std::lock_guard<std::mutex> lock(s.mu);
          c = s.sampler.candidates(static_cast<const float*>(info.ptr),
                                   static_cast<size_t>(info.shape[0]), m.ptr);
        }
        py::array_t<int32_t> ids(static_cast<py::ssize_t>(c.size()));
        py::array_t<float> probs(static_cast<py::ssize_t>(c.size()));
        auto wi = ids.mutable_unchecked<1>();
        auto wp = probs.mutable_unchecked<1>();
        for (size_t i = 0; i < c.size(); ++i) {
          wi(static_cast<py::ssize_t>(i)) = c[i].id;
          wp(static_cast<py::ssize_t>(i)) = c[i].p;
        }
        return py::make_tuple(ids, probs);
      }, py::arg("logits"), py::arg("mask") = py::none(),
         "The chain without the draw: (ids, probs) most probable first; RNG and mu untouched.")
      .def("accept", [](PySampler& s, int32_t token) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.sampler.accept(token);
      }, py::arg("token"))
      .def("accept_many", [](PySampler& s, const std::vector<int32_t>& tokens) {
        std::lock_guard<std::mutex> lock(s.mu);
        for (int32_t t : tokens) s.sampler.accept(t);
      }, py::arg("tokens"))
      .def("reset", [](PySampler& s) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.sampler.reset();
      })
      .def_property_readonly("seed", [](PySampler& s) { return s.sampler.seed(); })
      .def_property_readonly("mu", [](PySampler& s) { return s.sampler.mu(); })
      .def_property_readonly("n_vocab", [](PySampler& s) { return s.sampler.n_vocab(); })
      .def_property_readonly("history_size",
                             [](PySampler& s) { return s.sampler.history_size(); });

  m.def("raw_logprobs", [](const py::buffer& logits, int32_t token, size_t top_n) {
    py::buffer_info info = float_row(logits);
    std::pair<float, TopLogprobs> r;
    {
      py::gil_scoped_release nogil;
      r = raw_logprobs(static_cast<const float*>(info.ptr), static_cast<size_t>(info.shape[0]),
                       token, top_n);
    }
    return py::make_tuple(r.first, top_to_list(r.second));
  }, py::arg("logits"), py::arg("token"), py::arg("top_n"),
     "log_softmax of a logits row: (logprob of token (-1: none), top_n (id, logprob)).");
}

}  // namespace pyllm::bindings
