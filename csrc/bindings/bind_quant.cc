// Python bindings of the quantization formats: type traits, dequantize (raw block bytes ->
// float32) and quantize (float32 -> raw block bytes). pyllm/formats/qtypes.py wraps these with shape
// handling; sizes are validated there and re-checked here, and every size error surfaces as
// pyllm.errors.QuantError. The loops run with the GIL released, split over the default pool.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "bindings/errors.h"
#include "bindings/register.h"
#include "cpu/threadpool.h"
#include "pyllm/quant.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

// Below this many elements a call runs on the calling thread: handing work to the pool costs
// more than converting a few thousand values.
constexpr int64_t kParallelMinElements = int64_t{1} << 16;

const TypeTraits& traits_or_raise(uint32_t qtype) {
  const TypeTraits* t = find_type_traits(qtype);
  if (t == nullptr) raise_quant_error("unknown or unsupported tensor type id " + std::to_string(qtype));
  return *t;
}

// Byte size of a C-contiguous buffer; anything strided is rejected (the caller copies first).
int64_t contiguous_nbytes(const py::buffer_info& info, const char* what) {
  int64_t expected_stride = info.itemsize;
  for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] > 1 && info.strides[d] != expected_stride) {
      raise_quant_error(std::string(what) + " must be a C-contiguous buffer");
    }
    expected_stride *= info.shape[d];
  }
  return static_cast<int64_t>(info.size) * info.itemsize;
}

// Splits a conversion of n elements into whole blocks across the default pool.
template <typename Fn>
void run_blocks(const TypeTraits& t, int64_t n, const Fn& fn) {
  if (n < kParallelMinElements) {
    fn(int64_t{0}, n / t.block_size);
    return;
  }
  const std::shared_ptr<ThreadPool> pool = default_pool_shared();
  pool->parallel_for(n / t.block_size, 1, [&](int64_t b0, int64_t b1) { fn(b0, b1); });
}

py::array_t<float> py_dequantize(uint32_t qtype, const py::buffer& src, int64_t n) {
  const TypeTraits& t = traits_or_raise(qtype);
  const py::buffer_info info = src.request();
  const int64_t nbytes = contiguous_nbytes(info, "dequantize: data");
  const QType type = t.type;
  try {
    const int64_t need = row_size(type, n);
    if (nbytes != need) {
      throw std::invalid_argument(std::string(t.name) + ": " + std::to_string(n) + " elements need " +
                                  std::to_string(need) + " bytes, got " + std::to_string(nbytes));
    }
  } catch (const std::invalid_argument& e) {
    raise_quant_error(e.what());
  }
  py::array_t<float> out(n);
  const auto* sp = static_cast<const uint8_t*>(info.ptr);
  float* dp = out.mutable_data();
  try {
    py::gil_scoped_release nogil;
    run_blocks(t, n, [&](int64_t b0, int64_t b1) {
      // pyllm::dequantize re-checks the sizes of each slice (defence in depth).
      dequantize(type, sp + b0 * t.type_size, (b1 - b0) * t.type_size, dp + b0 * t.block_size,
                 (b1 - b0) * t.block_size);
    });
  } catch (const std::invalid_argument& e) {
    raise_quant_error(e.what());
  }
  return out;
}

py::array_t<uint8_t> py_quantize(uint32_t qtype, const py::buffer& src) {
  const TypeTraits& t = traits_or_raise(qtype);
  const py::buffer_info info = src.request();
  if (info.itemsize != 4 || info.format != py::format_descriptor<float>::format()) {
    raise_quant_error("quantize: input must be float32, got buffer format '" + info.format + "'");
  }
  contiguous_nbytes(info, "quantize: input");
  const int64_t n = static_cast<int64_t>(info.size);
  const QType type = t.type;
  int64_t out_bytes = 0;
  try {
    check_quantizable(type);  // before any work: the grid i-quants have no quantizer yet
    out_bytes = row_size(type, n);
  } catch (const std::invalid_argument& e) {
    raise_quant_error(e.what());
  }
  py::array_t<uint8_t> out(out_bytes);
  const auto* sp = static_cast<const float*>(info.ptr);
  uint8_t* dp = out.mutable_data();
  try {
    py::gil_scoped_release nogil;
    run_blocks(t, n, [&](int64_t b0, int64_t b1) {
      quantize(type, sp + b0 * t.block_size, (b1 - b0) * t.block_size, dp + b0 * t.type_size,
               (b1 - b0) * t.type_size);
    });
  } catch (const std::invalid_argument& e) {
    raise_quant_error(e.what());
  }
  return out;
}

// quantize() guided by an importance matrix: data (float32, rows of n_per_row = weights.size)
py::array_t<uint8_t> py_quantize_weighted(uint32_t qtype, const py::buffer& src,
                                          const py::buffer& weights) {
  const TypeTraits& t = traits_or_raise(qtype);
  const py::buffer_info info = src.request(), winfo = weights.request();
  for (const py::buffer_info* b : {&info, &winfo}) {
    if (b->itemsize != 4 || b->format != py::format_descriptor<float>::format()) {
      raise_quant_error("quantize_weighted: data and weights must be float32");
    }
  }
  contiguous_nbytes(info, "quantize_weighted: input");
  contiguous_nbytes(winfo, "quantize_weighted: weights");
  const int64_t n = static_cast<int64_t>(info.size), n_per_row = static_cast<int64_t>(winfo.size);
  int64_t out_bytes = 0;
  try {
    if (!has_weighted_quantizer(t.type)) {
      check_quantizable(t.type);  // a type without any quantizer: that message
      throw std::invalid_argument(std::string(t.name) + " has no importance-guided quantizer "
                                  "(its rounding does not use one, in llama.cpp either)");
    }
    if (n_per_row == 0 || n % n_per_row) {
      throw std::invalid_argument("quantize_weighted: " + std::to_string(n) +
                                  " elements are not whole rows of " + std::to_string(n_per_row));
    }
    out_bytes = row_size(t.type, n);
    row_size(t.type, n_per_row);  // whole blocks per row
  } catch (const std::invalid_argument& e) {
    raise_quant_error(e.what());
  }
  py::array_t<uint8_t> out(out_bytes);
  const auto* sp = static_cast<const float*>(info.ptr);
  const auto* qw = static_cast<const float*>(winfo.ptr);
  uint8_t* dp = out.mutable_data();
  const int64_t n_rows = n / n_per_row;
  if (n_rows == 0) return out;
  try {
    py::gil_scoped_release nogil;
    // whole rows per share: some formats scale by statistics of the whole row
    const auto rows = [&](int64_t r0, int64_t r1) {
      quantize_weighted(t.type, sp + r0 * n_per_row, r1 - r0, n_per_row, qw,
                        dp + r0 * (out_bytes / n_rows), (r1 - r0) * (out_bytes / n_rows));
    };
    if (n < kParallelMinElements) {
      rows(0, n_rows);
    } else {
      default_pool_shared()->parallel_for(n_rows, 1, rows);
    }
  } catch (const std::invalid_argument& e) {
    raise_quant_error(e.what());
  }
  return out;
}

py::dict py_type_traits(uint32_t qtype) {
  const TypeTraits& t = traits_or_raise(qtype);
  py::dict d;
  d["id"] = static_cast<uint32_t>(t.type);
  d["name"] = std::string(t.name);
  d["block_size"] = t.block_size;
  d["type_size"] = t.type_size;
  d["is_quantized"] = t.is_quantized;
  d["is_weight"] = t.is_weight;
  d["can_quantize"] = t.from_float != nullptr;
  d["imatrix_quantize"] = has_weighted_quantizer(t.type);
  d["vec_dot_type"] = static_cast<uint32_t>(t.vec_dot_type);
  return d;
}

}  // namespace

void register_quant(py::module_& m) {
  m.def("dequantize", &py_dequantize, py::arg("qtype"), py::arg("data"), py::arg("n"),
        "Decode n elements of ggml type id qtype from the C-contiguous buffer data (exactly the "
        "right number of bytes; read-only memmaps are fine and are not copied) into a new 1-D "
        "float32 array. Raises pyllm.errors.QuantError on unknown types or wrong sizes.");
  m.def("quantize", &py_quantize, py::arg("qtype"), py::arg("data"),
        "Encode the C-contiguous float32 buffer data (size a multiple of the block size) as ggml "
        "type id qtype; returns the raw block bytes as a 1-D uint8 array. Raises "
        "pyllm.errors.QuantError on unknown types, types pyllm cannot quantize to (the grid "
        "i-quants: can_quantize false in type_traits) or wrong sizes.");
  m.def("quantize_weighted", &py_quantize_weighted, py::arg("qtype"), py::arg("data"),
        py::arg("weights"),
        "quantize() guided by an importance matrix: data holds rows of weights.size elements, "
        "weights the importance of each column (float32). Raises pyllm.errors.QuantError for a "
        "type without such a quantizer (see type_traits' imatrix_quantize) or wrong sizes.");
  m.def("type_traits", &py_type_traits, py::arg("qtype"),
        "Traits of ggml type id qtype: id, name, block_size, type_size, is_quantized, is_weight, "
        "can_quantize (quantize supports it), vec_dot_type (the activation type its dot kernels "
        "take).");
  m.def("quant_type_ids", [] {
    py::list ids;
    for (QType t : kAllQTypes) ids.append(static_cast<uint32_t>(t));
    return ids;
  }, "ggml type ids that dequantize/quantize support, in id order.");
}

}  // namespace pyllm::bindings
