// Python bindings of the CPU kernels, for tests and benchmarks: matmul over raw GGUF weight
// bytes and the size of the default thread pool. The forward pass calls the kernels from C++.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/errors.h"
#include "bindings/register.h"
#include "cpu/cpu.h"
#include "cpu/matmul.h"
#include "cpu/ops.h"
#include "cpu/threadpool.h"
#include "pyllm/repack.h"

namespace py = pybind11;

namespace pyllm::bindings {
namespace {

py::array_t<float> py_matmul(uint32_t qtype, const py::array& w, int64_t n_out, int64_t k,
                             const py::array& x_in, bool rows16) {
  const QType type = static_cast<QType>(qtype);
  int64_t row_bytes = 0;
  try {
    if (n_out < 0) throw std::invalid_argument("matmul: n_out must be >= 0");
    row_bytes = matmul_row_bytes(type, k);
  } catch (const std::invalid_argument& e) {
    raise_quant_error(e.what());
  }
  if (!py::isinstance<py::array_t<uint8_t>>(w) || !(w.flags() & py::array::c_style)) {
    raise_quant_error("matmul: weights must be a C-contiguous uint8 array");
  }
  if (row_bytes > 0 && n_out > INT64_MAX / row_bytes) raise_quant_error("matmul: size overflow");
  if (static_cast<int64_t>(w.nbytes()) != n_out * row_bytes) {
    raise_quant_error("matmul: weights hold " + std::to_string(w.nbytes()) + " bytes, expected " +
                      std::to_string(n_out * row_bytes) + " for " + std::to_string(n_out) +
                      " rows of " + std::to_string(k) + " elements");
  }
  if (!py::isinstance<py::array_t<float>>(x_in)) {
    raise_quant_error("matmul: activations must be a float32 array");
  }
  const bool vector = x_in.ndim() == 1;
  if (!vector && x_in.ndim() != 2) raise_quant_error("matmul: activations must be 1-D or 2-D");
  const int64_t n_tokens = vector ? 1 : x_in.shape(0);
  const int64_t xk = x_in.shape(vector ? 0 : 1);
  if (xk != k) {
    raise_quant_error("matmul: activations have " + std::to_string(xk) + " columns, expected k = " +
                      std::to_string(k));
  }
  // A C-contiguous view (copies only if the caller passed a strided array).
  auto x = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(x_in);
  py::array_t<float> y = vector ? py::array_t<float>({n_out})
                                : py::array_t<float>({n_tokens, n_out});
  const void* wp = w.data();
  const float* xp = x.data();
  float* yp = y.mutable_data();
  try {
    py::gil_scoped_release nogil;
    MatmulParams p{type, wp, n_out, k, xp, 0, n_tokens, yp, 0};
    std::vector<uint8_t> packed;  // rows16: the weights repacked here, as the model does at load
    if (rows16) {
      packed.resize(static_cast<size_t>(repacked_size(type, n_out, k)));
      repack_rows16(type, wp, k, 0, n_out / kRepackRows, packed.data());
      p.w = packed.data();
      p.layout = WeightLayout::Rows16;
    }
    const std::shared_ptr<ThreadPool> pool = default_pool_shared();
    matmul(p, *pool);
  } catch (const std::invalid_argument& e) {
    raise_quant_error(e.what());
  }
  return y;
}

}  // namespace

void register_kernels(py::module_& m) {
  m.def("matmul", &py_matmul, py::arg("qtype"), py::arg("w"), py::arg("n_out"), py::arg("k"),
        py::arg("x"), py::arg("rows16") = false,
        "Y = X @ W.T for raw GGUF weight bytes w (n_out rows of k elements of type qtype, a ggml "
        "type id) and float32 activations x of shape (n_tokens, k) or (k,). Runs the kernels of "
        "the active ISA on the default thread pool with the GIL released. rows16=True first "
        "repacks w into the interleaved layout the model uses for its matrices (Q4_0, Q8_0, "
        "Q4_K, Q6_K; n_out a multiple of 16) and runs the rows16 path. Raises "
        "pyllm.errors.QuantError on bad types or sizes.");
  m.def(
      "repack_roundtrip",
      [](uint32_t qtype, const py::array_t<uint8_t, py::array::c_style>& w, int64_t n_out,
         int64_t k) {
        const QType type = static_cast<QType>(qtype);
        std::vector<uint8_t> packed;
        py::array_t<uint8_t> out(w.size());
        try {
          const int64_t row_bytes = matmul_row_bytes(type, k);
          if (static_cast<int64_t>(w.size()) != n_out * row_bytes) {
            throw std::invalid_argument("repack: weights do not match n_out x k");
          }
          packed.resize(static_cast<size_t>(repacked_size(type, n_out, k)));
          repack_rows16(type, w.data(), k, 0, n_out / kRepackRows, packed.data());
          for (int64_t g = 0; g < n_out / kRepackRows; ++g) {
            unpack_rows16_group(type, packed.data(), k, g,
                                out.mutable_data() + g * kRepackRows * row_bytes);
          }
        } catch (const std::invalid_argument& e) {
          raise_quant_error(e.what());
        }
        return py::make_tuple(py::array_t<uint8_t>(static_cast<py::ssize_t>(packed.size()),
                                                   packed.data()),
                              out);
      },
      py::arg("qtype"), py::arg("w"), py::arg("n_out"), py::arg("k"),
      "(rows16 bytes, GGUF bytes unpacked from them) of GGUF weights w (tests: the layout is a "
      "lossless permutation).");
  m.def(
      "swiglu",
      [](const py::array_t<float, py::array::c_style | py::array::forcecast>& gate,
         const py::array_t<float, py::array::c_style | py::array::forcecast>& up) {
        if (gate.ndim() != 1 || up.ndim() != 1 || gate.size() != up.size()) {
          raise_quant_error("swiglu: gate and up must be 1-D arrays of the same length");
        }
        py::array_t<float> out(gate.size());
        ops().swiglu(gate.data(), up.data(), out.mutable_data(), gate.size());
        return out;
      },
      py::arg("gate"), py::arg("up"),
      "silu(gate) * up with the active ISA's element-wise kernel (tests: its vectorized exp).");
  m.def(
      "kernel_table",
      [](const std::string& isa) {
        py::dict out;
        for (const MatmulKernels& k : matmul_kernels(parse_isa(isa))) {
          py::list slots;
          if (k.matvec) slots.append("matvec");
          if (k.matmat) slots.append("matmat");
          if (k.matvec_r16) slots.append("matvec_r16");
          if (k.matmat_r16) slots.append("matmat_r16");
          out[py::int_(static_cast<uint32_t>(k.type))] = py::tuple(slots);
        }
        return out;
      },
      py::arg("isa"),
      "The kernels the table of a compiled ISA has: ggml type id -> tuple of slot names "
      "('matvec', 'matmat', 'matvec_r16', 'matmat_r16'); the tables are "
      "csrc/cpu/isa/table_<isa>.cc.");
  m.def("set_num_threads", [](int n) { set_default_pool_threads(n); }, py::arg("n"),
        "Resize the default thread pool (n <= 0: physical cores, at most the available CPUs).");
  m.def("get_num_threads", [] { return default_pool().n_threads(); },
        "Threads of the default pool.");
}

}  // namespace pyllm::bindings
