// The C ABI of csrc/include/pyllm.h over the C++ core: argument checks, translation of C++
// exceptions into return codes plus a per-thread error message, and the process-wide pool.
#include "pyllm.h"

#include <exception>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include "cpu/cpu.h"
#include "cpu/matmul.h"
#include "cpu/threadpool.h"
#include "pyllm/quant.h"

#ifndef PYLLM_VERSION
#define PYLLM_VERSION "0.1.0"
#endif

namespace {

thread_local std::string t_error;

int fail(int code, const char* what) {
  t_error = what;
  return code;
}

// Runs fn, mapping exceptions to codes: invalid_argument -> PYLLM_E_INVALID, others -> RUNTIME.
template <class Fn>
int guarded(Fn fn) {
  try {
    t_error.clear();
    fn();
    return PYLLM_OK;
  } catch (const std::invalid_argument& e) {
    return fail(PYLLM_E_INVALID, e.what());
  } catch (const std::bad_alloc&) {
    return fail(PYLLM_E_RUNTIME, "out of memory");
  } catch (const std::exception& e) {
    return fail(PYLLM_E_RUNTIME, e.what());
  } catch (...) {
    return fail(PYLLM_E_RUNTIME, "unknown error");
  }
}

}  // namespace

extern "C" {

const char* pyllm_version(void) { return PYLLM_VERSION; }

const char* pyllm_last_error(void) { return t_error.c_str(); }

int pyllm_type_info_get(uint32_t type, pyllm_type_info* out) {
  if (out == nullptr) return fail(PYLLM_E_INVALID, "pyllm_type_info_get: out is NULL");
  const pyllm::TypeTraits* t = pyllm::find_type_traits(type);
  if (t == nullptr) return fail(PYLLM_E_INVALID, "pyllm_type_info_get: unknown type id");
  out->type = type;
  out->name = t->name;
  out->block_size = t->block_size;
  out->type_size = t->type_size;
  out->is_quantized = t->is_quantized ? 1 : 0;
  out->matmul_weight = pyllm::matmul_supports(static_cast<pyllm::QType>(type)) ? 1 : 0;
  t_error.clear();
  return PYLLM_OK;
}

int64_t pyllm_row_size(uint32_t type, int64_t n) {
  int64_t out = 0;
  const int rc = guarded([&] {
    if (pyllm::find_type_traits(type) == nullptr) {
      throw std::invalid_argument("pyllm_row_size: unknown type id");
    }
    out = pyllm::row_size(static_cast<pyllm::QType>(type), n);
  });
  return rc == PYLLM_OK ? out : rc;
}

int pyllm_dequantize(uint32_t type, const void* src, size_t src_bytes, float* dst, int64_t n) {
  return guarded([&] {
    if (pyllm::find_type_traits(type) == nullptr) {
      throw std::invalid_argument("pyllm_dequantize: unknown type id");
    }
    if (n > 0 && (src == nullptr || dst == nullptr)) {
      throw std::invalid_argument("pyllm_dequantize: NULL buffer");
    }
    pyllm::dequantize(static_cast<pyllm::QType>(type), src, static_cast<int64_t>(src_bytes), dst,
                      n);
  });
}

int pyllm_quantize(uint32_t type, const float* src, int64_t n, void* dst, size_t dst_bytes) {
  return guarded([&] {
    if (pyllm::find_type_traits(type) == nullptr) {
      throw std::invalid_argument("pyllm_quantize: unknown type id");
    }
    if (n > 0 && (src == nullptr || dst == nullptr)) {
      throw std::invalid_argument("pyllm_quantize: NULL buffer");
    }
    pyllm::quantize(static_cast<pyllm::QType>(type), src, n, dst, static_cast<int64_t>(dst_bytes));
  });
}

int pyllm_matmul(uint32_t type, const void* w, size_t w_bytes, int64_t n_out, int64_t k,
                 const float* x, int64_t n_tokens, float* y) {
  return guarded([&] {
    const pyllm::QType qt = static_cast<pyllm::QType>(type);
    if (n_out < 0 || n_tokens < 0) throw std::invalid_argument("pyllm_matmul: negative size");
    const int64_t row_bytes = pyllm::matmul_row_bytes(qt, k);
    if (row_bytes > 0 && n_out > INT64_MAX / row_bytes) {
      throw std::invalid_argument("pyllm_matmul: size overflow");
    }
    if (static_cast<int64_t>(w_bytes) != n_out * row_bytes) {
      throw std::invalid_argument("pyllm_matmul: w_bytes = " + std::to_string(w_bytes) +
                                  ", expected " + std::to_string(n_out * row_bytes));
    }
    const std::shared_ptr<pyllm::ThreadPool> pool = pyllm::default_pool_shared();
    pyllm::matmul(qt, w, n_out, k, x, n_tokens, y, *pool);
  });
}

int pyllm_matvec(uint32_t type, const void* w, size_t w_bytes, int64_t n_out, int64_t k,
                 const float* x, float* y) {
  return pyllm_matmul(type, w, w_bytes, n_out, k, x, 1, y);
}

int pyllm_set_num_threads(int n) {
  return guarded([&] { pyllm::set_default_pool_threads(n); });
}

int pyllm_get_num_threads(void) {
  int n = 0;
  const int rc = guarded([&] { n = pyllm::default_pool_shared()->n_threads(); });
  return rc == PYLLM_OK ? n : rc;
}

const char* pyllm_active_isa(void) {
  try {
    return pyllm::isa_name(pyllm::active_isa());
  } catch (const std::exception& e) {
    t_error = e.what();
    return "";
  }
}

const char* pyllm_available_isas(void) {
  static const std::string list = [] {
    std::string s;
    for (pyllm::Isa isa : pyllm::available_isas()) {
      if (!s.empty()) s += ",";
      s += pyllm::isa_name(isa);
    }
    return s;
  }();
  return list.c_str();
}

int pyllm_set_isa(const char* name) {
  if (name == nullptr) return fail(PYLLM_E_INVALID, "pyllm_set_isa: name is NULL");
  return guarded([&] { pyllm::set_active_isa(pyllm::parse_isa(name)); });
}

}  // extern "C"
