// Bindings for reading GGUF files faster than Python can: the string arrays of a vocabulary,
// walked at parse time and decoded when read (pyllm/formats/gguf/reader.py uses these when the
// extension is there, and its own loops, which also word every error, when it is not or when
// these find a problem).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "bindings/register.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

// count strings (u64 length, then bytes) from byte pos of buf: (list of str, end position), or
// None when one would run past the end. Bytes that are not UTF-8 decode with surrogateescape,
// as the reader does (lossless: its writer encodes them back to the same bytes).
py::object gguf_string_array(const py::buffer& buf, int64_t pos, int64_t count) {
  py::buffer_info info = buf.request();
  if (info.ndim != 1 || info.itemsize != 1 || pos < 0 || count < 0) return py::none();
  const auto* data = static_cast<const uint8_t*>(info.ptr);
  const auto size = static_cast<uint64_t>(info.size);
  auto at = static_cast<uint64_t>(pos);
  if (at > size) return py::none();
  // a count the file cannot hold (each string takes 8 bytes at least) is the loop's to word
  if (static_cast<uint64_t>(count) > (size - at) / 8) return py::none();
  py::list out(count);
  for (int64_t i = 0; i < count; ++i) {
    if (size - at < 8) return py::none();
    uint64_t length;
    std::memcpy(&length, data + at, 8);  // GGUF is little-endian, as every supported host
    at += 8;
    if (length > size - at) return py::none();
    PyObject* s = PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(data + at),
                                       static_cast<Py_ssize_t>(length), "surrogateescape");
    if (s == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), i, s);  // steals the reference
    at += length;
  }
  return py::make_tuple(out, static_cast<int64_t>(at));
}

// The end position of count strings from byte pos of buf (their lengths walked, nothing
// decoded), or None when one would run past the end.
py::object gguf_string_array_end(const py::buffer& buf, int64_t pos, int64_t count) {
  py::buffer_info info = buf.request();
  if (info.ndim != 1 || info.itemsize != 1 || pos < 0 || count < 0) return py::none();
  const auto* data = static_cast<const uint8_t*>(info.ptr);
  const auto size = static_cast<uint64_t>(info.size);
  auto at = static_cast<uint64_t>(pos);
  if (at > size || static_cast<uint64_t>(count) > (size - at) / 8) return py::none();
  for (int64_t i = 0; i < count; ++i) {
    if (size - at < 8) return py::none();
    uint64_t length;
    std::memcpy(&length, data + at, 8);
    at += 8;
    if (length > size - at) return py::none();
    at += length;
  }
  return py::int_(at);
}

// The byte position of each of count strings from byte pos of buf, as bytes of little-endian
// u64 (what StringArray indexes by), or None when one would run past the end.
py::object gguf_string_offsets(const py::buffer& buf, int64_t pos, int64_t count) {
  py::buffer_info info = buf.request();
  if (info.ndim != 1 || info.itemsize != 1 || pos < 0 || count < 0) return py::none();
  const auto* data = static_cast<const uint8_t*>(info.ptr);
  const auto size = static_cast<uint64_t>(info.size);
  auto at = static_cast<uint64_t>(pos);
  if (at > size || static_cast<uint64_t>(count) > (size - at) / 8) return py::none();
  std::vector<uint64_t> offsets(static_cast<size_t>(count));
  for (uint64_t& offset : offsets) {
    if (size - at < 8) return py::none();
    offset = at;
    uint64_t length;
    std::memcpy(&length, data + at, 8);
    at += 8;
    if (length > size - at) return py::none();
    at += length;
  }
  return py::bytes(reinterpret_cast<const char*>(offsets.data()), offsets.size() * 8);
}

// The strings of a GGUF string array as views of buf, or false when one would run past the end.
bool string_views(const py::buffer_info& info, int64_t pos, int64_t count,
                  std::vector<std::string_view>& out) {
  if (info.ndim != 1 || info.itemsize != 1 || pos < 0 || count < 0) return false;
  const auto* data = static_cast<const char*>(info.ptr);
  const auto size = static_cast<uint64_t>(info.size);
  auto at = static_cast<uint64_t>(pos);
  if (at > size || static_cast<uint64_t>(count) > (size - at) / 8) return false;
  out.resize(static_cast<size_t>(count));
  for (std::string_view& s : out) {
    if (size - at < 8) return false;
    uint64_t length;
    std::memcpy(&length, data + at, 8);
    at += 8;
    if (length > size - at) return false;
    s = std::string_view(data + at, static_cast<size_t>(length));
    at += length;
  }
  return true;
}

// The index of the first of count strings from byte pos of buf whose bytes are `text`'s, -1
// when none is, or None when one would run past the end.
py::object gguf_string_find(const py::buffer& buf, int64_t pos, int64_t count,
                            const py::bytes& text) {
  const py::buffer_info info = buf.request();
  std::vector<std::string_view> all;
  if (!string_views(info, pos, count, all)) return py::none();
  const std::string_view want(text);
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i] == want) return py::int_(i);
  }
  return py::int_(-1);
}

// The first string of count from byte pos of buf that repeats an earlier one: (the earlier's
// index, its index); None when all differ or one would run past the end (the caller's slow
// path tells these apart). Equal bytes are equal texts: the reader's decoding is one to one.
py::object gguf_string_duplicate(const py::buffer& buf, int64_t pos, int64_t count) {
  const py::buffer_info info = buf.request();
  std::vector<std::string_view> all;
  if (!string_views(info, pos, count, all)) return py::none();
  std::unordered_map<std::string_view, size_t> seen;
  seen.reserve(all.size());
  for (size_t i = 0; i < all.size(); ++i) {
    const auto [at, fresh] = seen.emplace(all[i], i);
    if (!fresh) return py::make_tuple(at->second, i);
  }
  return py::none();
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
