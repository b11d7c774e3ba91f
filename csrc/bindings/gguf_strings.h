// Walking a GGUF string array in a byte buffer (each string a u64 length, then its bytes; GGUF
// is little-endian, as every supported host): shared by the GGUF reader's bindings and the BPE
// table builder, both of which read vocabularies straight from a mapped file.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string_view>

namespace pyllm::bindings {

// Calls visit(index, position, text) for each of count strings from byte pos of a 1-D byte
// buffer; returns the position after the last, or -1 when the buffer is not one or a string
// would run past its end (the caller's Python path then words the error).
template <typename Visit>
int64_t walk_gguf_strings(const pybind11::buffer_info& info, int64_t pos, int64_t count,
                          Visit&& visit) {
  if (info.ndim != 1 || info.itemsize != 1 || pos < 0 || count < 0) return -1;
  const auto* data = static_cast<const char*>(info.ptr);
  const auto size = static_cast<uint64_t>(info.size);
  auto at = static_cast<uint64_t>(pos);
  // a count the buffer cannot hold (8 bytes a string at least) fails before any work
  if (at > size || static_cast<uint64_t>(count) > (size - at) / 8) return -1;
  for (int64_t i = 0; i < count; ++i) {
    if (size - at < 8) return -1;
    uint64_t length;
    std::memcpy(&length, data + at, 8);
    if (length > size - at - 8) return -1;
    visit(i, at, std::string_view(data + at + 8, static_cast<size_t>(length)));
    at += 8 + length;
  }
  return static_cast<int64_t>(at);
}

}  // namespace pyllm::bindings
