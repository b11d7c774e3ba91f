// Bindings for reading GGUF files faster than Python can: the string arrays of a vocabulary,
// walked at parse time and decoded when read (pyllm/formats/gguf/reader.py uses these when the
// extension is there, and its own loops, which also word every error, when it is not or when
// these find a problem).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "bindings/gguf_strings.h"
#include "bindings/register.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

// count strings from byte pos of buf: (list of str, end position), or None when one would run
// past the end. Bytes that are not UTF-8 decode with surrogateescape, as the reader does
// (lossless: its writer encodes them back to the same bytes).
py::object gguf_string_array(const py::buffer& buf, int64_t pos, int64_t count) {
  const py::buffer_info info = buf.request();
  py::list out(count < 0 ? 0 : count);
  const int64_t end = walk_gguf_strings(info, pos, count, [&](int64_t i, uint64_t,
                                                              std::string_view text) {
    PyObject* s = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()),
                                       "surrogateescape");
    if (s == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), i, s);  // steals the reference
  });
  if (end < 0) return py::none();
  return py::make_tuple(out, end);
}

// The end position of count strings from byte pos of buf (nothing decoded), or None.
py::object gguf_string_array_end(const py::buffer& buf, int64_t pos, int64_t count) {
  const int64_t end = walk_gguf_strings(buf.request(), pos, count,
                                        [](int64_t, uint64_t, std::string_view) {});
  return end < 0 ? py::object(py::none()) : py::object(py::int_(end));
}

// The byte position of each of count strings from byte pos of buf, as bytes of u64 (what
// StringArray indexes by), or None.
py::object gguf_string_offsets(const py::buffer& buf, int64_t pos, int64_t count) {
  std::vector<uint64_t> offsets(static_cast<size_t>(count < 0 ? 0 : count));
  const int64_t end = walk_gguf_strings(buf.request(), pos, count,
                                        [&](int64_t i, uint64_t at, std::string_view) {
                                          offsets[static_cast<size_t>(i)] = at;
                                        });
  if (end < 0) return py::none();
  return py::bytes(reinterpret_cast<const char*>(offsets.data()), offsets.size() * 8);
}

// The index of the first of count strings from byte pos of buf whose bytes are `text`'s, -1
// when none is, or None.
py::object gguf_string_find(const py::buffer& buf, int64_t pos, int64_t count,
                            const py::bytes& text) {
  const std::string_view want(text);
  int64_t found = -1;
  const int64_t end = walk_gguf_strings(buf.request(), pos, count,
                                        [&](int64_t i, uint64_t, std::string_view s) {
                                          if (found < 0 && s == want) found = i;
                                        });
  return end < 0 ? py::object(py::none()) : py::object(py::int_(found));
}

// The first of count strings from byte pos of buf that repeats an earlier one: (the earlier's
// index, its index); None when all differ or one would run past the end (the caller's slow
// path tells these apart). Equal bytes are equal texts: the reader's decoding is one to one.
py::object gguf_string_duplicate(const py::buffer& buf, int64_t pos, int64_t count) {
  std::unordered_map<std::string_view, int64_t> seen;
  seen.reserve(static_cast<size_t>(count < 0 ? 0 : count));
  py::object twice = py::none();
  const int64_t end = walk_gguf_strings(buf.request(), pos, count,
                                        [&](int64_t i, uint64_t, std::string_view s) {
                                          if (!twice.is_none()) return;  // walking on: checks
                                          const auto [at, fresh] = seen.emplace(s, i);
                                          if (!fresh) twice = py::make_tuple(at->second, i);
                                        });
  return end < 0 ? py::none() : twice;
}

}  // namespace

void register_gguf(py::module_& m) {
  m.def("gguf_string_array", &gguf_string_array, py::arg("buf"), py::arg("pos"),
        py::arg("count"),
        "count GGUF strings (u64 length, then UTF-8 bytes; others with surrogateescape) from "
        "byte pos of buf: (list of str, end position), or None when one runs past the end.");
  m.def("gguf_string_array_end", &gguf_string_array_end, py::arg("buf"), py::arg("pos"),
        py::arg("count"),
        "The end position of count GGUF strings from byte pos of buf (nothing decoded), or "
        "None when one runs past the end.");
  m.def("gguf_string_offsets", &gguf_string_offsets, py::arg("buf"), py::arg("pos"),
        py::arg("count"),
        "The byte position of each of count GGUF strings from byte pos of buf (bytes of u64), "
        "or None when one runs past the end.");
  m.def("gguf_string_find", &gguf_string_find, py::arg("buf"), py::arg("pos"), py::arg("count"),
        py::arg("text"),
        "The index of the first of count GGUF strings from byte pos of buf that is text (UTF-8 "
        "bytes), -1 when none is, or None when one runs past the end.");
  m.def("gguf_string_duplicate", &gguf_string_duplicate, py::arg("buf"), py::arg("pos"),
        py::arg("count"),
        "(earlier index, index) of the first of count GGUF strings from byte pos of buf that "
        "repeats an earlier one, or None (all differ, or one runs past the end).");
}

}  // namespace pyllm::bindings
