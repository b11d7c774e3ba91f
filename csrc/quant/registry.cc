// The type-traits table (one row per tensor type) and the checked size / quantize / dequantize
// helpers every caller (bindings, C ABI, model loader) goes through.
//
// Sizes come from untrusted files, so every byte count is computed with explicit overflow checks
// and every mismatch is reported as std::invalid_argument naming the type and the numbers.
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "pyllm/quant.h"

namespace pyllm {

namespace {

// Adapts a typed reference routine to the table's untyped signature.
template <typename Block, void (*Fn)(const Block*, float*, int64_t)>
void to_float_adapter(const void* src, float* dst, int64_t n) {
  Fn(static_cast<const Block*>(src), dst, n);
}

template <typename Block, void (*Fn)(const float*, Block*, int64_t)>
void from_float_adapter(const float* src, void* dst, int64_t n) {
  Fn(src, static_cast<Block*>(dst), n);
}

// One row: the type, its block struct and block size, whether it is block-quantized, whether
// it may be a model weight, the suffix of its reference routines and its vec_dot type.
#define PYLLM_TRAITS(TYPE, BLOCK, BS, QUANTIZED, WEIGHT, SUFFIX, DOT)                       \
  TypeTraits {                                                                              \
    QType::TYPE, #TYPE, BS, static_cast<int64_t>(sizeof(BLOCK)), QUANTIZED, WEIGHT,         \
        &to_float_adapter<BLOCK, &dequantize_row_##SUFFIX>,                                 \
        &from_float_adapter<BLOCK, &quantize_row_##SUFFIX>, QType::DOT                      \
  }
// A row for a type pyllm writes only with an importance matrix (from_float null): IQ2_XXS,
// IQ2_XS and IQ1_S, whose grid searches llama.cpp runs only with one (quantize_weighted).
#define PYLLM_TRAITS_DEQUANT_ONLY(TYPE, BLOCK, BS, WEIGHT, SUFFIX, DOT)                     \
  TypeTraits {                                                                              \
    QType::TYPE, #TYPE, BS, static_cast<int64_t>(sizeof(BLOCK)), true, WEIGHT,              \
        &to_float_adapter<BLOCK, &dequantize_row_##SUFFIX>, nullptr, QType::DOT             \
  }

const TypeTraits kTraits[] = {
    PYLLM_TRAITS(F32, float, 1, false, true, f32, F32),
    PYLLM_TRAITS(F16, f16_t, 1, false, true, f16, F16),
    PYLLM_TRAITS(Q4_0, BlockQ4_0, QK4_0, true, true, q4_0, Q8_0),
    PYLLM_TRAITS(Q4_1, BlockQ4_1, QK4_1, true, true, q4_1, Q8_1),
    PYLLM_TRAITS(Q5_0, BlockQ5_0, QK5_0, true, true, q5_0, Q8_0),
    PYLLM_TRAITS(Q5_1, BlockQ5_1, QK5_1, true, true, q5_1, Q8_1),
    PYLLM_TRAITS(Q8_0, BlockQ8_0, QK8_0, true, true, q8_0, Q8_0),
    PYLLM_TRAITS(Q8_1, BlockQ8_1, QK8_1, true, false, q8_1, F32),
    PYLLM_TRAITS(Q2_K, BlockQ2_K, QK_K, true, true, q2_K, Q8_K),
    PYLLM_TRAITS(Q3_K, BlockQ3_K, QK_K, true, true, q3_K, Q8_K),
    PYLLM_TRAITS(Q4_K, BlockQ4_K, QK_K, true, true, q4_K, Q8_K),
    PYLLM_TRAITS(Q5_K, BlockQ5_K, QK_K, true, true, q5_K, Q8_K),
    PYLLM_TRAITS(Q6_K, BlockQ6_K, QK_K, true, true, q6_K, Q8_K),
    PYLLM_TRAITS(Q8_K, BlockQ8_K, QK_K, true, false, q8_K, F32),
    PYLLM_TRAITS_DEQUANT_ONLY(IQ2_XXS, BlockIQ2_XXS, QK_K, true, iq2_xxs, Q8_K),
    PYLLM_TRAITS_DEQUANT_ONLY(IQ2_XS, BlockIQ2_XS, QK_K, true, iq2_xs, Q8_K),
    PYLLM_TRAITS(IQ3_XXS, BlockIQ3_XXS, QK_K, true, true, iq3_xxs, Q8_K),
    PYLLM_TRAITS_DEQUANT_ONLY(IQ1_S, BlockIQ1_S, QK_K, true, iq1_s, Q8_K),
    PYLLM_TRAITS(IQ4_NL, BlockIQ4_NL, QK4_NL, true, true, iq4_nl, Q8_0),
    PYLLM_TRAITS(IQ3_S, BlockIQ3_S, QK_K, true, true, iq3_s, Q8_K),
    PYLLM_TRAITS(IQ2_S, BlockIQ2_S, QK_K, true, true, iq2_s, Q8_K),
    PYLLM_TRAITS(IQ4_XS, BlockIQ4_XS, QK_K, true, true, iq4_xs, Q8_K),
    PYLLM_TRAITS(IQ1_M, BlockIQ1_M, QK_K, true, true, iq1_m, Q8_K),
    PYLLM_TRAITS(BF16, bf16_t, 1, false, true, bf16, BF16),
    PYLLM_TRAITS(TQ1_0, BlockTQ1_0, QK_K, true, true, tq1_0, Q8_K),
    PYLLM_TRAITS(TQ2_0, BlockTQ2_0, QK_K, true, true, tq2_0, Q8_K),
};

#undef PYLLM_TRAITS
#undef PYLLM_TRAITS_DEQUANT_ONLY

static_assert(sizeof(kTraits) / sizeof(kTraits[0]) == sizeof(kAllQTypes) / sizeof(kAllQTypes[0]),
              "kAllQTypes and the traits table must list the same types");

// Dense lookup by id: ids are small (< 64), unknown ids map to nullptr.
constexpr uint32_t kMaxId = 64;

struct IdIndex {
  const TypeTraits* by_id[kMaxId] = {};
  IdIndex() {
    for (const TypeTraits& t : kTraits) by_id[static_cast<uint32_t>(t.type)] = &t;
  }
};

const IdIndex& id_index() {
  static const IdIndex index;
  return index;
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

int64_t checked_mul(int64_t a, int64_t b, const char* what, const TypeTraits& t) {
  if (a != 0 && b > std::numeric_limits<int64_t>::max() / a) {
    fail(std::string(t.name) + ": " + what + " overflows (" + std::to_string(a) + " x " +
         std::to_string(b) + ")");
  }
  return a * b;
}

}  // namespace

const TypeTraits* find_type_traits(uint32_t id) noexcept {
  return id < kMaxId ? id_index().by_id[id] : nullptr;
}

const TypeTraits* find_type_traits_by_name(const char* name) noexcept {
  if (name == nullptr) return nullptr;
  for (const TypeTraits& t : kTraits) {
    if (std::strcmp(t.name, name) == 0) return &t;
  }
  return nullptr;
}

const TypeTraits& type_traits(QType type) {
  const TypeTraits* t = find_type_traits(static_cast<uint32_t>(type));
  if (t == nullptr) fail("unknown tensor type id " + std::to_string(static_cast<uint32_t>(type)));
  return *t;
}

int64_t row_size(QType type, int64_t n) {
  const TypeTraits& t = type_traits(type);
  if (n < 0) fail(std::string(t.name) + ": negative element count " + std::to_string(n));
  if (n % t.block_size != 0) {
    fail(std::string(t.name) + ": " + std::to_string(n) + " elements is not a multiple of the block size " +
         std::to_string(t.block_size));
  }
  return checked_mul(n / t.block_size, t.type_size, "byte count", t);
}

int64_t tensor_size(QType type, int64_t n_rows, int64_t n_per_row) {
  const TypeTraits& t = type_traits(type);
  if (n_rows < 0) fail(std::string(t.name) + ": negative row count " + std::to_string(n_rows));
  return checked_mul(n_rows, row_size(type, n_per_row), "tensor byte count", t);
}

void dequantize(QType type, const void* src, int64_t src_bytes, float* dst, int64_t n) {
  const TypeTraits& t = type_traits(type);
  const int64_t need = row_size(type, n);
  if (src_bytes != need) {
    fail(std::string(t.name) + ": " + std::to_string(n) + " elements need " + std::to_string(need) +
         " bytes, got " + std::to_string(src_bytes));
  }
  if (n == 0) return;
  if (src == nullptr || dst == nullptr) fail(std::string(t.name) + ": null buffer");
  t.to_float(src, dst, n);
}

void check_quantizable(QType type) {
  const TypeTraits& t = type_traits(type);
  if (t.from_float == nullptr && has_weighted_quantizer(type)) {
    fail(std::string(t.name) + " can only be quantized with an importance matrix: its grid "
         "search needs one (pyllm imatrix; quantize(..., importance=))");
  }
  if (t.from_float == nullptr) {
    fail(std::string("no quantizer for ") + t.name +
         " yet: quantize from an importance matrix (pyllm imatrix) is not implemented");
  }
}

void quantize(QType type, const float* src, int64_t n, void* dst, int64_t dst_bytes) {
  check_quantizable(type);
  const TypeTraits& t = type_traits(type);
  const int64_t need = row_size(type, n);
  if (dst_bytes != need) {
    fail(std::string(t.name) + ": " + std::to_string(n) + " elements need " + std::to_string(need) +
         " bytes of output, got " + std::to_string(dst_bytes));
  }
  if (n == 0) return;
  if (src == nullptr || dst == nullptr) fail(std::string(t.name) + ": null buffer");
  t.from_float(src, dst, n);
}

bool has_weighted_quantizer(QType type) {
  switch (type) {
    case QType::Q4_0: case QType::Q4_1: case QType::Q5_0: case QType::Q5_1:
    case QType::Q2_K: case QType::Q3_K: case QType::Q4_K: case QType::Q5_K: case QType::Q6_K:
    case QType::IQ4_NL: case QType::IQ4_XS: case QType::IQ2_XXS: case QType::IQ2_XS:
    case QType::IQ3_XXS: case QType::IQ3_S: case QType::IQ2_S: case QType::IQ1_S:
    case QType::IQ1_M:
      return true;
    default:
      return false;
  }
}

void quantize_weighted(QType type, const float* src, int64_t n_rows, int64_t n_per_row,
                       const float* qw, void* dst, int64_t dst_bytes) {
  const TypeTraits& t = type_traits(type);
  if (!has_weighted_quantizer(type)) {
    fail(t.from_float == nullptr
             ? std::string("quantizing to ") + t.name + " is not implemented yet"
             : std::string(t.name) + " has no importance-guided quantizer (its rounding does not "
                                     "use one, in llama.cpp either)");
  }
  if (n_rows < 0) fail(std::string(t.name) + ": negative row count");
  const int64_t row_bytes = row_size(type, n_per_row);  // checks whole blocks
  const int64_t need = tensor_size(type, n_rows, n_per_row);
  if (dst_bytes != need) {
    fail(std::string(t.name) + ": " + std::to_string(n_rows) + " rows of " +
         std::to_string(n_per_row) + " need " + std::to_string(need) + " bytes of output, got " +
         std::to_string(dst_bytes));
  }
  if (n_rows == 0 || n_per_row == 0) return;
  if (src == nullptr || dst == nullptr || qw == nullptr) {
    fail(std::string(t.name) + ": null buffer");
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* x = src + r * n_per_row;
    void* out = static_cast<uint8_t*>(dst) + r * row_bytes;
    switch (type) {
      case QType::Q4_0:
        quantize_row_q4_0_weighted(x, static_cast<BlockQ4_0*>(out), n_per_row, qw);
        break;
      case QType::Q4_1:
        quantize_row_q4_1_weighted(x, static_cast<BlockQ4_1*>(out), n_per_row, qw);
        break;
      case QType::Q5_0:
        quantize_row_q5_0_weighted(x, static_cast<BlockQ5_0*>(out), n_per_row, qw);
        break;
      case QType::Q5_1:
        quantize_row_q5_1_weighted(x, static_cast<BlockQ5_1*>(out), n_per_row, qw);
        break;
      case QType::Q2_K:
        quantize_row_q2_K_weighted(x, static_cast<BlockQ2_K*>(out), n_per_row, qw);
        break;
      case QType::Q3_K:
        quantize_row_q3_K_weighted(x, static_cast<BlockQ3_K*>(out), n_per_row, qw);
        break;
      case QType::Q4_K:
        quantize_row_q4_K_weighted(x, static_cast<BlockQ4_K*>(out), n_per_row, qw);
        break;
      case QType::Q5_K:
        quantize_row_q5_K_weighted(x, static_cast<BlockQ5_K*>(out), n_per_row, qw);
        break;
      case QType::Q6_K:
        quantize_row_q6_K_weighted(x, static_cast<BlockQ6_K*>(out), n_per_row, qw);
        break;
      case QType::IQ4_NL:
        quantize_row_iq4_nl_weighted(x, static_cast<BlockIQ4_NL*>(out), n_per_row, qw);
        break;
      case QType::IQ4_XS:
        quantize_row_iq4_xs_weighted(x, static_cast<BlockIQ4_XS*>(out), n_per_row, qw);
        break;
      case QType::IQ3_XXS:
        quantize_row_iq3_xxs_weighted(x, static_cast<BlockIQ3_XXS*>(out), n_per_row, qw);
        break;
      case QType::IQ2_XS:
        quantize_row_iq2_xs_weighted(x, static_cast<BlockIQ2_XS*>(out), n_per_row, qw);
        break;
      case QType::IQ3_S:
        quantize_row_iq3_s_weighted(x, static_cast<BlockIQ3_S*>(out), n_per_row, qw);
        break;
      case QType::IQ2_S:
        quantize_row_iq2_s_weighted(x, static_cast<BlockIQ2_S*>(out), n_per_row, qw);
        break;
      case QType::IQ1_S:
        quantize_row_iq1_s_weighted(x, static_cast<BlockIQ1_S*>(out), n_per_row, qw);
        break;
      case QType::IQ1_M:
        quantize_row_iq1_m_weighted(x, static_cast<BlockIQ1_M*>(out), n_per_row, qw);
        break;
      default:
        quantize_row_iq2_xxs_weighted(x, static_cast<BlockIQ2_XXS*>(out), n_per_row, qw);
        break;
    }
  }
}

}  // namespace pyllm
