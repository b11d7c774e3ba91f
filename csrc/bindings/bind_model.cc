// Bindings of the model and inference context: one call per prompt chunk / generated token,
// with the GIL released for the whole forward pass.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "backend/backend.h"
#include "bindings/register.h"
#include "pyllm/activation_stats.h"
#include "pyllm/model.h"

namespace py = pybind11;

namespace pyllm::bindings {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
namespace {

// The Python objects owning the mapped weights stay referenced as long as the model lives.
struct PyModel {
  std::shared_ptr<const Model> model;
  py::object keep_alive;
};

// The weight slots by their C++ names (a layer's: kLayerSlots in pyllm/model.h).
// pyllm/formats/arch.py maps the GGUF tensor names onto these
// (the file's names are spelled only there); the binding exports both lists so that a test can
// check that the two sides agree.
constexpr std::pair<const char*, WeightView ModelWeights::*> kModelSlots[] = {
    {"tok_embd", &ModelWeights::tok_embd},
    {"output_norm", &ModelWeights::output_norm},
    {"output", &ModelWeights::output},
    {"rope_freqs", &ModelWeights::rope_freqs},
};

WeightView view_from(const py::handle& spec, const std::string& slot) {
  // spec = (type_id, buffer, cols, rows, name in the file)
  auto t = spec.cast<py::tuple>();
  if (t.size() != 5) throw std::invalid_argument(slot + ": expected (type, buffer, cols, rows, name)");
  WeightView w;
  w.name = t[4].cast<std::string>();
  py::buffer b = t[1].cast<py::buffer>();
  py::buffer_info info = b.request();
  if (info.ndim != 1 || info.itemsize != 1 || (info.strides.size() && info.strides[0] != 1)) {
    throw std::invalid_argument(w.name + ": weights must be a flat contiguous byte buffer");
  }
  w.type = static_cast<QType>(t[0].cast<uint32_t>());
  w.data = info.ptr;
  w.nbytes = info.size;
  w.cols = t[2].cast<int64_t>();
  w.rows = t[3].cast<int64_t>();
  return w;
}

// Fills the slots named in `specs` (slot name -> spec); an unknown slot name is an error, so a
// name changed on one side only cannot be dropped silently.
template <typename Weights, size_t N>
void fill_slots(Weights& w, const py::dict& specs,
                const std::pair<const char*, WeightView Weights::*> (&slots)[N],
                const std::string& where) {
  size_t used = 0;
  for (const auto& [name, member] : slots) {
    if (!specs.contains(name)) continue;
    w.*member = view_from(specs[py::str(name)], where + name);
    ++used;
  }
  if (used != py::len(specs)) {
    for (const auto& item : specs) {
      const std::string key = py::str(item.first);
      bool known = false;
      for (const auto& slot : slots) known = known || key == slot.first;
      if (!known) throw std::invalid_argument(where + "unknown weight slot '" + key + "'");
    }
  }
}

template <typename Slots>
py::tuple slot_names(const Slots& slots) {
  py::list names;
  for (const auto& slot : slots) names.append(slot.first);
  return py::tuple(names);
}

using Placement = std::vector<std::tuple<std::string, int, int>>;

Placement placement_tuples(const std::vector<PlacedLayers>& placement) {
  Placement out;
  for (const PlacedLayers& r : placement) out.emplace_back(r.backend, r.first, r.last);
  return out;
}

PyModel make_model(const HParams& hp, const py::dict& tensors, const py::list& layers,
                   bool repack, bool release_source, int n_threads, const Placement& placement,
                   const py::object& repack_image, uint64_t repack_image_plan,
                   const std::optional<std::pair<int, int64_t>>& embedding_file) {
  if (static_cast<int64_t>(py::len(layers)) != hp.n_layer) {
    throw std::invalid_argument("hparams.n_layer is " + std::to_string(hp.n_layer) + " but " +
                                std::to_string(py::len(layers)) + " layers were given");
  }
  ModelWeights w;
  fill_slots(w, tensors, kModelSlots, "");
  w.layers.resize(hp.n_layer);
  for (int i = 0; i < hp.n_layer; ++i) {
    fill_slots(w.layers[i], layers[i].cast<py::dict>(), kLayerSlots<WeightView>,
               "layer " + std::to_string(i) + " ");
  }
  PyModel m;
  ModelOptions opt;
  opt.repack = repack;
  opt.release_source = release_source;
  if (embedding_file) std::tie(opt.embedding_fd, opt.embedding_offset) = *embedding_file;
  opt.n_threads = n_threads;
  for (const auto& [backend, first, last] : placement) {
    opt.placement.push_back(PlacedLayers{backend, first, last});
  }
  if (!repack_image.is_none()) {
    py::buffer_info info = repack_image.cast<py::buffer>().request();
    if (info.ndim != 1 || info.itemsize != 1 || (info.strides.size() && info.strides[0] != 1)) {
      throw std::invalid_argument("repack_image must be a flat contiguous byte buffer");
    }
    opt.repack_image = static_cast<const uint8_t*>(info.ptr);
    opt.repack_image_bytes = info.size;
    opt.repack_image_plan = repack_image_plan;
  }
  {
    py::gil_scoped_release nogil;  // repacking is a pass over the weights
    m.model = std::make_shared<const Model>(hp, std::move(w), opt);
  }
  m.keep_alive = py::make_tuple(tensors, layers, repack_image);
  return m;
}

// Context::activation_stats() as plain Python data (copies: the context may go on collecting).
py::object activation_stats_dict(const Context& ctx) {
  const ActivationStats* st = ctx.activation_stats();
  if (st == nullptr) return py::none();
  auto array = [](const std::vector<double>& v) {
    py::array_t<double> a(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  py::list layers;
  static const char* const kNames[kStatSlots] = {"attn_in", "attn_out", "ffn_in", "ffn_down"};
  for (const ActivationStats::Layer& l : st->layers) {
    py::dict d;
    for (int s = 0; s < kStatSlots; ++s) d[kNames[s]] = array(l.sums[s]);
    d["n_tokens"] = l.n_tokens;
    layers.append(d);
  }
  py::dict out;
  out["layers"] = layers;
  out["output"] = array(st->output);
  out["n_output"] = st->n_output;
  return out;
}

}  // namespace

void register_model(py::module_& m) {
  // The enums cross as themselves; their names are the spellings users and GGUF files use
  // (pyllm.formats.arch maps rope.scaling.type to RopeScaling, pyllm.runtime.footprint checks kv_type names).
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
  m.attr("STATE_HEADER_BYTES") = Context::state_header_bytes();
  m.def("backends", &backend_names, "The backends this build has (\"cpu\" always).");
  m.def(
      "trim_heap",
      [] {
#if defined(__GLIBC__)
        // Loading leaves freed blocks between live ones (the tokenizer's build tables, the
        // parse's lists): still resident until malloc is told to hand whole free pages back.
        return malloc_trim(0) != 0;
#else
        return false;
#endif
      },
      "Hand the allocator's free pages back to the system (glibc's malloc_trim); True when "
      "some were. pyllm.runtime.loaded calls it once a load's temporary tables are gone.");
  m.def(
      "devices",
      [] {
        py::list out;
        for (const DeviceInfo& d : device_infos()) {
          py::dict e;
          e["backend"] = d.backend;
          e["name"] = d.name;
          e["details"] = d.details;
          e["memory"] = d.memory;
          out.append(e);
        }
        return out;
      },
      "Every device of every backend of this build: dicts of backend (the name a placement "
      "uses), name, details, memory (bytes; 0 for the host).");

  // Every field read-write: pyllm.formats.arch.HParams.to_core fills them in one loop over its own
  // dataclass fields, and tests/test_model.py checks that both sides have the same fields.
  py::class_<HParams>(m, "HParams", "Hyper-parameters of a Llama-family model.")
      .def(py::init<>())
      .def_readwrite("arch", &HParams::arch)
      .def_readwrite("n_vocab", &HParams::n_vocab)
      .def_readwrite("n_embd", &HParams::n_embd)
      .def_readwrite("n_layer", &HParams::n_layer)
      .def_readwrite("n_head", &HParams::n_head)
      .def_readwrite("n_head_kv", &HParams::n_head_kv)
      .def_readwrite("head_dim", &HParams::head_dim)
      .def_readwrite("n_ff", &HParams::n_ff)
      .def_readwrite("n_rot", &HParams::n_rot)
      .def_readwrite("n_ctx_train", &HParams::n_ctx_train)
      .def_readwrite("rms_eps", &HParams::rms_eps)
      .def_readwrite("rope_base", &HParams::rope_base)
      .def_readwrite("rope_neox", &HParams::rope_neox)
      .def_readwrite("rope_scaling", &HParams::rope_scaling)
      .def_readwrite("rope_factor", &HParams::rope_factor)
      .def_readwrite("rope_orig_ctx", &HParams::rope_orig_ctx)
      .def_readwrite("yarn_beta_fast", &HParams::yarn_beta_fast)
      .def_readwrite("yarn_beta_slow", &HParams::yarn_beta_slow)
      .def_readwrite("yarn_attn_factor", &HParams::yarn_attn_factor)
      .def_readwrite("yarn_ext_factor", &HParams::yarn_ext_factor);
  m.attr("MODEL_WEIGHT_SLOTS") = slot_names(kModelSlots);
  m.attr("LAYER_WEIGHT_SLOTS") = slot_names(kLayerSlots<WeightView>);

  py::class_<PyModel>(m, "Model", "Llama-family weights (views into the memory-mapped GGUF).")
      .def(py::init(&make_model), py::arg("hparams"), py::arg("tensors"), py::arg("layers"),
           py::arg("repack") = false, py::arg("release_source") = false, py::arg("n_threads") = 0,
           py::arg("placement") = Placement{}, py::arg("repack_image") = py::none(),
           py::arg("repack_image_plan") = 0, py::arg("embedding_file") = py::none(),
           "hparams: HParams; tensors: model slot (MODEL_WEIGHT_SLOTS) -> (ggml type id, flat "
           "uint8 buffer, cols, rows, name in the file); layers: one dict per layer, layer slot "
           "(LAYER_WEIGHT_SLOTS) -> the same tuples. repack: copy the matrices into the rows16 layout where the CPU has "
           "kernels for it (faster decode). release_source: drop the repacked tensors' pages "
           "from this process afterwards; ONLY for buffers of a read-only file mapping. "
           "placement: (backend, first, last) layer ranges in layer order covering every layer, "
           "the head with the last (which may be empty); [] = all on the CPU; see backends(). "
           "repack_image, repack_image_plan: the bytes of an earlier load's rows16 copies "
           "(repack_image() of a model of the same file) and their plan; used instead of "
           "repacking when the plan is this load's, else ignored. Kept referenced. "
           "embedding_file: (fd, offset) of the file the embedding table's view maps, the table "
           "at offset; with release_source the rows a forward looks up are read from it "
           "(the model keeps a duplicate of fd), so they are never mapped in.")
      .def_property_readonly(
          "placement", [](const PyModel& m) { return placement_tuples(m.model->placement()); },
          "The resolved (backend, first, last) layer ranges; the head is with the last.")
      .def_property_readonly("repacked_bytes",
                             [](const PyModel& m) { return m.model->repacked_bytes(); })
      .def(
          "repack_image",
          [](const PyModel& m) -> py::object {
            const RepackImage* image = m.model->repack_image();
            if (image == nullptr) return py::none();
            // read-only bytes owned by the model: valid only while it lives
            py::memoryview view = py::memoryview::from_memory(
                const_cast<uint8_t*>(image->data), image->bytes, /*readonly=*/true);
            return py::make_tuple(view, image->plan, image->reused);
          },
          "(memoryview of the CPU's rows16 copies, their plan, reused) or None when nothing "
          "was repacked; the view is valid only while this model lives. reused: they came "
          "from repack_image rather than from repacking.")
      .def_property_readonly("n_vocab", [](const PyModel& m) { return m.model->hparams().n_vocab; })
      .def_property_readonly("n_embd", [](const PyModel& m) { return m.model->hparams().n_embd; })
      .def_property_readonly("n_layer", [](const PyModel& m) { return m.model->hparams().n_layer; });

  py::class_<Context> context(m, "Context",
                              "KV cache + forward pass; not thread-safe (one per thread).");
  register_context_lora(context);
  context
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
           // the defaults are ContextParams's (pyllm.runtime.llm.LLM passes every value itself)
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
          "decode_list",
          // decode's 'last' without numpy (pybind11 imports it for any array argument or
          // result): the decode loop's path, which a cold start reaches before numpy would
          // be needed for anything else
          [](Context& ctx, const std::vector<int32_t>& tokens) {
            const auto n_vocab = static_cast<Py_ssize_t>(ctx.model().hparams().n_vocab);
            py::object out = py::reinterpret_steal<py::object>(
                PyByteArray_FromStringAndSize(nullptr, n_vocab * Py_ssize_t{sizeof(float)}));
            if (!out) throw py::error_already_set();
            auto* dst = reinterpret_cast<float*>(PyByteArray_AS_STRING(out.ptr()));
            {
              py::gil_scoped_release release;
              ctx.decode(tokens.data(), static_cast<int64_t>(tokens.size()), dst, false);
            }
            return out;
          },
          py::arg("tokens"),
          "Evaluate tokens (a list of ids) after the cached ones; returns the last token's "
          "logits as a bytearray of n_vocab float32.")
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
          "decode_part",
          [](Context& ctx, std::optional<IntArray> tokens, std::optional<FloatArray> hidden,
             IntArray seq, ByteArray want, int min_seq_len) {
            const int64_t n = seq.shape(0);
            if (seq.ndim() != 1 || want.ndim() != 1 || want.shape(0) != n) {
              throw std::invalid_argument("seq and want_logits must be 1-D, same length");
            }
            if (tokens && (tokens->ndim() != 1 || tokens->shape(0) != n)) {
              throw std::invalid_argument("tokens must be 1-D, as long as seq");
            }
            const int64_t d = ctx.model().hparams().n_embd;
            if (hidden && (hidden->ndim() != 2 || hidden->shape(0) != n || hidden->shape(1) != d)) {
              throw std::invalid_argument("hidden must have shape (n, n_embd)");
            }
            const uint8_t* w = want.data();
            int64_t rows = n;
            int64_t width = d;
            if (ctx.has_head()) {
              rows = 0;
              for (int64_t i = 0; i < n; ++i) rows += w[i] ? 1 : 0;
              width = ctx.model().hparams().n_vocab;
            }
            py::array_t<float> out({rows, width});
            float* dst = out.mutable_data();
            const int32_t* t = tokens ? tokens->data() : nullptr;
            const float* h = hidden ? hidden->data() : nullptr;
            const int32_t* s = seq.data();
            {
              py::gil_scoped_release release;
              ctx.decode_part(t, h, s, n, w, dst, min_seq_len);
            }
            return out;
          },
          py::arg("tokens"), py::arg("hidden"), py::arg("seq"), py::arg("want_logits"),
          py::arg("min_seq_len") = 0,
          "One process's part of a layer pipeline: tokens (this process embeds) or hidden rows "
          "(n, n_embd) from the process before; returns the wanted tokens' logits (rows, "
          "n_vocab) where this process holds the head, else every token's hidden rows (n, "
          "n_embd) for the next. min_seq_len: the whole batch's RoPE sequence length.")
      .def(
          "check_batch",
          [](const Context& ctx, std::optional<IntArray> tokens, IntArray seq) {
            if (seq.ndim() != 1 || (tokens && (tokens->ndim() != 1 ||
                                               tokens->shape(0) != seq.shape(0)))) {
              throw std::invalid_argument("tokens and seq must be 1-D, same length");
            }
            ctx.check_batch(tokens ? tokens->data() : nullptr, seq.data(), seq.shape(0));
          },
          py::arg("tokens"), py::arg("seq"),
          "Raise what decode_batch would for these tokens (ids, sequences, room) without "
          "running anything.")
      .def_property_readonly("embeds_tokens", &Context::embeds_tokens,
                             "Whether the first layers run here (not on another process).")
      .def_property_readonly("has_head", &Context::has_head,
                             "Whether the head (output norm + matrix) runs here.")
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
      .def_property_readonly(
          "placement",
          [](const Context& ctx) { return placement_tuples(ctx.placement()); },
          "The model's (backend, first, last) layer ranges; the head is with the last.")
      .def("truncate", &Context::truncate, py::arg("n"), "Forget cached positions >= n.")
      .def("seq_shift", &Context::seq_shift, py::arg("seq"), py::arg("keep"),
           py::arg("n_discard"), py::call_guard<py::gil_scoped_release>(),
           "Context shift: drop positions [keep, keep + n_discard) of one sequence and move "
           "the later ones down, keys re-rotated (ValueError for a RoPE mode that cannot be "
           "moved, IndexError for bad bounds, DeviceError for offloaded layers).")
      .def("collect_activation_stats", &Context::collect_activation_stats, py::arg("on"),
           "Start (a fresh) or stop collecting importance-matrix statistics: the sums over "
           "tokens of every matmul input column's square (pyllm/activation_stats.h).")
      .def_property_readonly("collecting_activation_stats",
                             &Context::collecting_activation_stats)
      .def("activation_stats", &activation_stats_dict,
           "The last collection: {'layers': [{'attn_in', 'attn_out', 'ffn_in', 'ffn_down': "
           "float64 sums, 'n_tokens'}], 'output': float64 sums, 'n_output'}; None before any.")
      .def("save_state", [](const Context& ctx, int seq) {
        std::vector<uint8_t> s = ctx.save_state(seq);
        return py::bytes(reinterpret_cast<const char*>(s.data()), s.size());
      }, py::arg("seq") = 0, "Sequence seq's cached K/V (a state, see load_state).")
      .def("load_state", [](Context& ctx, const py::bytes& b, int seq) {
        std::string_view v = b;
        ctx.load_state(reinterpret_cast<const uint8_t*>(v.data()), static_cast<int64_t>(v.size()),
                       seq);
      }, py::arg("state"), py::arg("seq") = 0,
         "Load a state of this model and KV type into sequence seq (ValueError if it cannot).");
}

}  // namespace pyllm::bindings
