// The quantization-format API: a traits table over every tensor type (block size, bytes per
// block, reference to-float / from-float, the activation type its dot product consumes), the
// overflow-checked size helpers, and the scalar reference quantize/dequantize routines.
//
// The reference routines are the specification of each format: dequantization is bit-exact with
// the gguf package, quantization of F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/TQ1_0/TQ2_0 is bit-exact
// with it too, the k-quant and IQ4 quantizers reproduce llama.cpp's, and the grid i-quants
// (IQ1/IQ2/IQ3) have no quantizer yet (they need an importance-matrix search). SIMD kernels
// (csrc/cpu) must agree with these. Implementations: csrc/quant/ref.cc (float and legacy block
// types), csrc/quant/kquants.cc (k-quants and Q8_K), csrc/quant/iquants.cc (IQ4_NL, IQ4_XS),
// csrc/quant/iquants_grid.cc (grid i-quants, TQ1_0, TQ2_0), csrc/quant/registry.cc (the table
// and helpers).
#pragma once

#include <cstddef>
#include <cstdint>

#include "pyllm/qtype.h"

namespace pyllm {

// Dequantize n elements (a whole number of blocks) from raw block bytes.
using ToFloatFn = void (*)(const void* src, float* dst, int64_t n);
// Quantize n floats (a whole number of blocks) into raw block bytes.
using FromFloatFn = void (*)(const float* src, void* dst, int64_t n);

struct TypeTraits {
  QType type;
  const char* name;         // the ggml name, e.g. "Q4_K"
  int64_t block_size;       // elements per block (1 for F32/F16/BF16)
  int64_t type_size;        // bytes per block
  bool is_quantized;        // block-quantized (false for F32/F16/BF16)
  bool is_weight;           // a weight type of GGUF files (false for the activation-only Q8_1, Q8_K)
  ToFloatFn to_float;       // reference dequantize; never null
  FromFloatFn from_float;   // reference quantize; null when pyllm has no quantizer for the type
                            // (the grid i-quants): quantize() then throws, see check_quantizable
  QType vec_dot_type;       // activation format the type's dot kernels take (ggml's convention):
                            // F32->F32, F16->F16, BF16->BF16, Q4_0/Q5_0/Q8_0/IQ4_NL->Q8_0,
                            // Q4_1/Q5_1->Q8_1, Q2_K..Q6_K, IQ4_XS, the grid i-quants, TQ1_0 and
                            // TQ2_0->Q8_K (Q8_1, Q8_K themselves: F32).
};

// Every type in the table, in id order.
inline constexpr QType kAllQTypes[] = {
    QType::F32,    QType::F16,    QType::Q4_0,    QType::Q4_1,   QType::Q5_0,    QType::Q5_1,
    QType::Q8_0,   QType::Q8_1,   QType::Q2_K,    QType::Q3_K,   QType::Q4_K,    QType::Q5_K,
    QType::Q6_K,   QType::Q8_K,   QType::IQ2_XXS, QType::IQ2_XS, QType::IQ3_XXS, QType::IQ1_S,
    QType::IQ4_NL, QType::IQ3_S,  QType::IQ2_S,   QType::IQ4_XS, QType::IQ1_M,   QType::BF16,
    QType::TQ1_0,  QType::TQ2_0,
};

// Traits of a type; throws std::invalid_argument if it is not in the table.
const TypeTraits& type_traits(QType type);
// nullptr when the id / name is unknown (no exception; for validating untrusted input).
const TypeTraits* find_type_traits(uint32_t id) noexcept;
const TypeTraits* find_type_traits_by_name(const char* name) noexcept;

// Bytes used by n elements of `type`. Throws std::invalid_argument when n < 0, n is not a
// multiple of the block size, or the count overflows int64.
int64_t row_size(QType type, int64_t n);
// Bytes of a tensor of n_rows rows of n_per_row elements each (same checks, product checked too).
int64_t tensor_size(QType type, int64_t n_rows, int64_t n_per_row);

// Checked entry points used by the bindings and the C ABI: validate n against the block size and
// the given buffer sizes (std::invalid_argument on mismatch), then run the reference routine.
void dequantize(QType type, const void* src, int64_t src_bytes, float* dst, int64_t n);
void quantize(QType type, const float* src, int64_t n, void* dst, int64_t dst_bytes);
// Quantization guided by an importance matrix (pyllm/formats/imatrix.py): src holds n_rows
// rows of n_per_row elements, qw the importance of each of the n_per_row columns. Throws
// std::invalid_argument for a type without such a quantizer (has_weighted_quantizer: the legacy
// 4/5-bit types, the k-quants, IQ4_NL, IQ4_XS, IQ2_XXS) or sizes that do not fit.
bool has_weighted_quantizer(QType type);
void quantize_weighted(QType type, const float* src, int64_t n_rows, int64_t n_per_row,
                       const float* qw, void* dst, int64_t dst_bytes);
// Throws std::invalid_argument naming the type when pyllm cannot quantize to it (from_float is
// null); quantize() checks this first, callers that split the work check it up front.
void check_quantizable(QType type);

// ---- reference routines, a pair per type (IQ2_XXS, IQ2_XS, IQ1_S: weighted only); n: blocks
void dequantize_row_f32(const float* x, float* y, int64_t n);
void quantize_row_f32(const float* x, float* y, int64_t n);
void dequantize_row_f16(const f16_t* x, float* y, int64_t n);
void quantize_row_f16(const float* x, f16_t* y, int64_t n);
void dequantize_row_bf16(const bf16_t* x, float* y, int64_t n);
void quantize_row_bf16(const float* x, bf16_t* y, int64_t n);

void dequantize_row_q4_0(const BlockQ4_0* x, float* y, int64_t n);
void quantize_row_q4_0(const float* x, BlockQ4_0* y, int64_t n);
void dequantize_row_q4_1(const BlockQ4_1* x, float* y, int64_t n);
void quantize_row_q4_1(const float* x, BlockQ4_1* y, int64_t n);
void dequantize_row_q5_0(const BlockQ5_0* x, float* y, int64_t n);
void quantize_row_q5_0(const float* x, BlockQ5_0* y, int64_t n);
void dequantize_row_q5_1(const BlockQ5_1* x, float* y, int64_t n);
void quantize_row_q5_1(const float* x, BlockQ5_1* y, int64_t n);
void dequantize_row_q8_0(const BlockQ8_0* x, float* y, int64_t n);
void quantize_row_q8_0(const float* x, BlockQ8_0* y, int64_t n);   // also the activation quantizer
void dequantize_row_q8_1(const BlockQ8_1* x, float* y, int64_t n);
void quantize_row_q8_1(const float* x, BlockQ8_1* y, int64_t n);   // d = amax/127, s = d * sum(qs)
// i-quants (csrc/quant/iquants.cc)
void dequantize_row_iq4_nl(const BlockIQ4_NL* x, float* y, int64_t n);
void quantize_row_iq4_nl(const float* x, BlockIQ4_NL* y, int64_t n);
void dequantize_row_iq4_xs(const BlockIQ4_XS* x, float* y, int64_t n);
void quantize_row_iq4_xs(const float* x, BlockIQ4_XS* y, int64_t n);
// The same guided by an importance matrix: qw holds the importance of each of the n elements
// (the mean square of its column's activations), nullptr for none.
void quantize_row_iq4_nl_weighted(const float* x, BlockIQ4_NL* y, int64_t n, const float* qw);
void quantize_row_iq4_xs_weighted(const float* x, BlockIQ4_XS* y, int64_t n, const float* qw);
// IQ2_XXS, IQ2_XS and IQ1_S have only this form: their grid search needs an importance matrix
// (qw non-null; csrc/quant/iquants_search.cc, IQ1_S in iquants_search_iq1.cc).
void quantize_row_iq2_xxs_weighted(const float* x, BlockIQ2_XXS* y, int64_t n, const float* qw);
void quantize_row_iq2_xs_weighted(const float* x, BlockIQ2_XS* y, int64_t n, const float* qw);
void quantize_row_iq1_s_weighted(const float* x, BlockIQ1_S* y, int64_t n, const float* qw);
// IQ3_XXS, IQ3_S, IQ2_S and IQ1_M, with an importance matrix (qw) or without (weights x^2;
// IQ2_S: sigma2 / 4 + x^2), as llama.cpp's (which quantizes these without one too).
void quantize_row_iq2_s(const float* x, BlockIQ2_S* y, int64_t n);
void quantize_row_iq2_s_weighted(const float* x, BlockIQ2_S* y, int64_t n, const float* qw);
void quantize_row_iq1_m(const float* x, BlockIQ1_M* y, int64_t n);
void quantize_row_iq1_m_weighted(const float* x, BlockIQ1_M* y, int64_t n, const float* qw);
void quantize_row_iq3_xxs(const float* x, BlockIQ3_XXS* y, int64_t n);
void quantize_row_iq3_xxs_weighted(const float* x, BlockIQ3_XXS* y, int64_t n, const float* qw);
void quantize_row_iq3_s(const float* x, BlockIQ3_S* y, int64_t n);
void quantize_row_iq3_s_weighted(const float* x, BlockIQ3_S* y, int64_t n, const float* qw);
// The legacy and k-quant types (not Q8_0) guided by an importance matrix, one row of n
// (csrc/quant/kquants_weighted.cc; Q6_K in kquants.cc; qw null there: the plain quantizer).
void quantize_row_q4_0_weighted(const float* x, BlockQ4_0* y, int64_t n, const float* qw);
void quantize_row_q4_1_weighted(const float* x, BlockQ4_1* y, int64_t n, const float* qw);
void quantize_row_q5_0_weighted(const float* x, BlockQ5_0* y, int64_t n, const float* qw);
void quantize_row_q5_1_weighted(const float* x, BlockQ5_1* y, int64_t n, const float* qw);
void quantize_row_q3_K_weighted(const float* x, BlockQ3_K* y, int64_t n, const float* qw);
void quantize_row_q2_K_weighted(const float* x, BlockQ2_K* y, int64_t n, const float* qw);
void quantize_row_q4_K_weighted(const float* x, BlockQ4_K* y, int64_t n, const float* qw);
void quantize_row_q5_K_weighted(const float* x, BlockQ5_K* y, int64_t n, const float* qw);
void quantize_row_q6_K_weighted(const float* x, BlockQ6_K* y, int64_t n, const float* qw);
// grid i-quants and ternary types (csrc/quant/iquants_grid.cc): dequantizers
void dequantize_row_iq2_xxs(const BlockIQ2_XXS* x, float* y, int64_t n);
void dequantize_row_iq2_xs(const BlockIQ2_XS* x, float* y, int64_t n);
void dequantize_row_iq2_s(const BlockIQ2_S* x, float* y, int64_t n);
void dequantize_row_iq3_xxs(const BlockIQ3_XXS* x, float* y, int64_t n);
void dequantize_row_iq3_s(const BlockIQ3_S* x, float* y, int64_t n);
void dequantize_row_iq1_s(const BlockIQ1_S* x, float* y, int64_t n);
void dequantize_row_iq1_m(const BlockIQ1_M* x, float* y, int64_t n);
void dequantize_row_tq1_0(const BlockTQ1_0* x, float* y, int64_t n);
void quantize_row_tq1_0(const float* x, BlockTQ1_0* y, int64_t n);
void dequantize_row_tq2_0(const BlockTQ2_0* x, float* y, int64_t n);
void quantize_row_tq2_0(const float* x, BlockTQ2_0* y, int64_t n);

void dequantize_row_q2_K(const BlockQ2_K* x, float* y, int64_t n);
void quantize_row_q2_K(const float* x, BlockQ2_K* y, int64_t n);
void dequantize_row_q3_K(const BlockQ3_K* x, float* y, int64_t n);
void quantize_row_q3_K(const float* x, BlockQ3_K* y, int64_t n);
void dequantize_row_q4_K(const BlockQ4_K* x, float* y, int64_t n);
void quantize_row_q4_K(const float* x, BlockQ4_K* y, int64_t n);
void dequantize_row_q5_K(const BlockQ5_K* x, float* y, int64_t n);
void quantize_row_q5_K(const float* x, BlockQ5_K* y, int64_t n);
void dequantize_row_q6_K(const BlockQ6_K* x, float* y, int64_t n);
void quantize_row_q6_K(const float* x, BlockQ6_K* y, int64_t n);
void dequantize_row_q8_K(const BlockQ8_K* x, float* y, int64_t n);
void quantize_row_q8_K(const float* x, BlockQ8_K* y, int64_t n);   // d = max / -127 (float), + bsums

// Unpack the 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K block's scales[12].
inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *min = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

}  // namespace pyllm
