// Bindings of the model and inference context: one call per prompt chunk / generated token,
// with the GIL released for the whole forward pass.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "bindings/register.h"
#include "pyllm/model.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

// The Python objects owning the mapped weights stay referenced as long as the model lives.
struct PyModel {
  std::shared_ptr<const Model> model;
  py::object keep_alive;
};

WeightView view_from(const py::handle& spec, const std::string& name) {
  // spec = (type_id, buffer, cols, rows)
  auto t = spec.cast<py::tuple>();
  if (t.size() != 4) throw std::invalid_argument(name + ": expected (type, buffer, cols, rows)");
  py::buffer b = t[1].cast<py::buffer>();
  py::buffer_info info = b.request();
  if (info.ndim != 1 || info.itemsize != 1 || (info.strides.size() && info.strides[0] != 1)) {
    throw std::invalid_argument(name + ": weights must be a flat contiguous byte buffer");
  }
  WeightView w;
  w.type = static_cast<QType>(t[0].cast<uint32_t>());
  w.data = info.ptr;
  w.nbytes = info.size;
  w.cols = t[2].cast<int64_t>();
  w.rows = t[3].cast<int64_t>();
  return w;
}

HParams hparams_from(const py::dict& d) {
  HParams hp;
  auto geti = [&](const char* k, int& out) { if (d.contains(k)) out = d[k].cast<int>(); };
  auto getf = [&](const char* k, float& out) { if (d.contains(k)) out = d[k].cast<float>(); };
  geti("n_vocab", hp.n_vocab);
  geti("n_embd", hp.n_embd);
  geti("n_layer", hp.n_layer);
  geti("n_head", hp.n_head);
  geti("n_head_kv", hp.n_head_kv);
  geti("head_dim", hp.head_dim);
  geti("n_ff", hp.n_ff);
  geti("n_rot", hp.n_rot);
  geti("n_ctx_train", hp.n_ctx_train);
  getf("rms_eps", hp.rms_eps);
  getf("rope_base", hp.rope_base);
  if (d.contains("rope_neox")) hp.rope_neox = d["rope_neox"].cast<bool>();
  if (d.contains("rope_scaling")) hp.rope_scaling = d["rope_scaling"].cast<RopeScaling>();
  getf("rope_factor", hp.rope_factor);
  geti("rope_orig_ctx", hp.rope_orig_ctx);
  getf("yarn_beta_fast", hp.yarn_beta_fast);
  getf("yarn_beta_slow", hp.yarn_beta_slow);
  getf("yarn_attn_factor", hp.yarn_attn_factor);
  getf("yarn_ext_factor", hp.yarn_ext_factor);
  return hp;
}

PyModel make_model(const py::dict& hparams, const py::dict& tensors, bool repack,
                   bool release_source, int n_threads) {
  HParams hp = hparams_from(hparams);
  ModelWeights w;
  auto get = [&](const std::string& name) -> WeightView {
    if (!tensors.contains(name)) return WeightView{};
    return view_from(tensors[py::str(name)], name);
  };
  w.tok_embd = get("token_embd.weight");
  w.output_norm = get("output_norm.weight");
  w.output = get("output.weight");
  w.rope_freqs = get("rope_freqs.weight");
  if (hp.n_layer < 0 || hp.n_layer > 100000) throw std::invalid_argument("bad layer count");
  w.layers.resize(hp.n_layer);
  for (int i = 0; i < hp.n_layer; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights& l = w.layers[i];
    l.attn_norm = get(p + "attn_norm.weight");
    l.wq = get(p + "attn_q.weight");
    l.wk = get(p + "attn_k.weight");
    l.wv = get(p + "attn_v.weight");
    l.wo = get(p + "attn_output.weight");
    l.bq = get(p + "attn_q.bias");
    l.bk = get(p + "attn_k.bias");
    l.bv = get(p + "attn_v.bias");
    l.bo = get(p + "attn_output.bias");
    l.b_gate = get(p + "ffn_gate.bias");
    l.b_up = get(p + "ffn_up.bias");
    l.b_down = get(p + "ffn_down.bias");
    l.ffn_norm = get(p + "ffn_norm.weight");
    l.w_gate = get(p + "ffn_gate.weight");
    l.w_up = get(p + "ffn_up.weight");
    l.w_down = get(p + "ffn_down.weight");
  }
  PyModel m;
  ModelOptions opt;
  opt.repack = repack;
  opt.release_source = release_source;
  opt.n_threads = n_threads;
  {
    py::gil_scoped_release nogil;  // repacking is a pass over the weights
    m.model = std::make_shared<const Model>(hp, std::move(w), opt);
  }
  m.keep_alive = tensors;
  return m;
}

}  // namespace

void register_model(py::module_& m) {
  // The enums cross as themselves; their names are the spellings users and GGUF files use
  // (pyllm.arch maps rope.scaling.type to RopeScaling, pyllm.footprint checks kv_type names).
  py::enum_<RopeScaling>(m, "RopeScaling", "RoPE context extension (GGUF rope.scaling.type).")
      .value("none", RopeScaling::None)
      .value("linear", RopeScaling::Linear)
      .value("yarn", RopeScaling::Yarn)
      .value("dynamic", RopeScaling::Dynamic);
  py::enum_<KVType>(m, "KVType", "Element type of the KV cache.")
      .value("f16", KVType::F16)
      .value("q8_0", KVType::Q8_0)
      .value("f32", KVType::F32);
  m.attr("DEFAULT_KV_TYPE") = ContextParams{}.kv_type;

  py::class_<PyModel>(m, "Model", "Llama-family weights (views into the memory-mapped GGUF).")
      .def(py::init(&make_model), py::arg("hparams"), py::arg("tensors"),
           py::arg("repack") = false, py::arg("release_source") = false, py::arg("n_threads") = 0,
           "hparams: dict of HParams fields; tensors: name -> (ggml type id, flat uint8 buffer, "
           "cols, rows). repack: copy the matrices into the rows16 layout where the CPU has "
           "kernels for it (faster decode). release_source: drop the repacked tensors' pages "
           "from this process afterwards; ONLY for buffers of a read-only file mapping.")
      .def_property_readonly("repacked_bytes",
                             [](const PyModel& m) { return m.model->repacked_bytes(); })
      .def_property_readonly("n_vocab", [](const PyModel& m) { return m.model->hparams().n_vocab; })
      .def_property_readonly("n_embd", [](const PyModel& m) { return m.model->hparams().n_embd; })
      .def_property_readonly("n_layer", [](const PyModel& m) { return m.model->hparams().n_layer; });

  py::class_<Context>(m, "Context", "KV cache + forward pass; not thread-safe (one per thread).")
      .def(py::init([](const PyModel& model, int n_ctx, int n_batch, int n_threads,
                       KVType kv_type, int n_seq) {
             ContextParams p;
             p.n_ctx = n_ctx;
             p.n_batch = n_batch;
             p.n_threads = n_threads;
             p.n_seq = n_seq;
             p.kv_type = kv_type;
             return std::make_unique<Context>(model.model, p);
           }),
           // the defaults are ContextParams's (pyllm.model.LLM passes every value itself)
           py::arg("model"), py::arg("n_ctx") = ContextParams{}.n_ctx,
           py::arg("n_batch") = ContextParams{}.n_batch,
           py::arg("n_threads") = ContextParams{}.n_threads,
           py::arg("kv_type") = ContextParams{}.kv_type, py::arg("n_seq") = ContextParams{}.n_seq,
           py::keep_alive<1, 2>())
      .def(
          "decode",
          [](Context& ctx, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
             const std::string& logits) {
            if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be a 1-D array");
            const int64_t n = tokens.shape(0);
            const int64_t n_vocab = ctx.model().hparams().n_vocab;
            const bool all = logits == "all";
            if (!all && logits != "last" && logits != "none") {
              throw std::invalid_argument("logits must be 'all', 'last' or 'none'");
            }
            py::array_t<float> out;
            if (all) out = py::array_t<float>({n, n_vocab});
            else if (logits == "last") out = py::array_t<float>({n_vocab});
            float* dst = logits == "none" ? nullptr : out.mutable_data();
            const int32_t* src = tokens.data();
            {
              py::gil_scoped_release release;
              ctx.decode(src, n, dst, all);
            }
            if (logits == "none") return py::object(py::none());
            return py::object(out);
          },
          py::arg("tokens"), py::arg("logits") = "last",
          "Evaluate tokens after the cached ones; returns logits of the last token ('last'), of "
          "every token ('all', shape (n, n_vocab)) or None ('none').")
      .def(
          "decode_batch",
          [](Context& ctx, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
             py::array_t<int32_t, py::array::c_style | py::array::forcecast> seq,
             py::array_t<uint8_t, py::array::c_style | py::array::forcecast> want) {
            if (tokens.ndim() != 1 || seq.ndim() != 1 || want.ndim() != 1 ||
                seq.shape(0) != tokens.shape(0) || want.shape(0) != tokens.shape(0)) {
              throw std::invalid_argument("tokens, seq and want_logits must be 1-D, same length");
            }
            const int64_t n = tokens.shape(0);
            int64_t rows = 0;
            const uint8_t* w = want.data();
            for (int64_t i = 0; i < n; ++i) rows += w[i] ? 1 : 0;
            const int64_t n_vocab = ctx.model().hparams().n_vocab;
            py::array_t<float> out({rows, n_vocab});
            float* dst = out.mutable_data();
            const int32_t* t = tokens.data();
            const int32_t* s = seq.data();
            {
              py::gil_scoped_release release;
              ctx.decode_batch(t, s, n, w, dst);
            }
            return out;
          },
          py::arg("tokens"), py::arg("seq"), py::arg("want_logits"),
          "Continuous batching: token i joins sequence seq[i]; one forward for all of them. "
          "Returns logits (rows, n_vocab) for the tokens with want_logits[i] set, in order.")
      .def(
          "embed",
          [](Context& ctx, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
             int seq) {
            if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be a 1-D array");
            py::array_t<float> out(ctx.model().hparams().n_embd);
            float* dst = out.mutable_data();
            const int32_t* src = tokens.data();
            const int64_t n = tokens.shape(0);
            {
              py::gil_scoped_release release;
              ctx.embed(src, n, seq, dst);
            }
            return out;
          },
          py::arg("tokens"), py::arg("seq") = 0,
          "Mean over tokens of the final-normed hidden states (n_embd,); empties sequence seq.")
      .def_property_readonly("n_seq", &Context::n_seq)
      .def("seq_n_past", &Context::seq_n_past, py::arg("seq"))
      .def("seq_truncate", &Context::seq_truncate, py::arg("seq"), py::arg("n"),
           "Forget positions >= n of one sequence (0 frees the slot).")
      .def_property_readonly("n_past", &Context::n_past)
      .def_property_readonly("n_ctx", &Context::n_ctx)
      .def_property_readonly("n_threads", &Context::n_threads)
      .def("truncate", &Context::truncate, py::arg("n"), "Forget cached positions >= n.")
      .def("save_state", [](const Context& ctx) {
        std::vector<uint8_t> s = ctx.save_state();
        return py::bytes(reinterpret_cast<const char*>(s.data()), s.size());
      })
      .def("load_state", [](Context& ctx, const py::bytes& b) {
        std::string_view v = b;
        ctx.load_state(reinterpret_cast<const uint8_t*>(v.data()), static_cast<int64_t>(v.size()));
      });
}

}  // namespace pyllm::bindings
