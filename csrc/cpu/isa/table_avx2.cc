// The kernel table of the AVX2 build: int16-split decode kernels (matvec_avx2.cc) for the block
// types of at most 6 bits, int8 lanes widened to F32 for the 8-bit ones (Q8_0, the IQ4 levels,
// the grid i-quants' values, TQ2_0's digits), F32 math for the rest (the float types, TQ1_0)
// and for every
// prefill; no rows16 kernels (rows16 weights are unpacked to GGUF rows for these kernels, see
// matmul.cc).
#include "cpu/isa/kernels.h"

#if !defined(PYLLM_ISA_AVX2)
#error "table_avx2.cc is the table of the AVX2 build (CMakeLists.txt)"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {

// From this many tokens on, matmat beats matvec (8 tokens of Q4_K: 2.1 ms by the F32 panel
// kernel vs ~1.2 ms by matvec).
constexpr int kMatmatMinTokens = 16;

using Q = QType;
constexpr TypeKernels kRows[] = {
    // type   matvec (decode)             matmat (prefill)     matvec_r16  matmat_r16
    {Q::F32,  matvec_float<Q::F32>,       matmat_f32<Q::F32>,  nullptr,    nullptr},
    {Q::F16,  matvec_float<Q::F16>,       matmat_f32<Q::F16>,  nullptr,    nullptr},
    {Q::BF16, matvec_float<Q::BF16>,      matmat_f32<Q::BF16>, nullptr,    nullptr},
    {Q::Q4_0, matvec_avx2_int16<Q::Q4_0>, matmat_f32<Q::Q4_0>, nullptr,    nullptr},
    {Q::Q4_1, matvec_avx2_int16<Q::Q4_1>, matmat_f32<Q::Q4_1>, nullptr,    nullptr},
    {Q::Q5_0, matvec_avx2_int16<Q::Q5_0>, matmat_f32<Q::Q5_0>, nullptr,    nullptr},
    {Q::Q5_1, matvec_avx2_int16<Q::Q5_1>, matmat_f32<Q::Q5_1>, nullptr,    nullptr},
    {Q::Q8_0, matvec_avx2_int8_f32<Q::Q8_0>, matmat_f32<Q::Q8_0>, nullptr, nullptr},
    {Q::Q2_K, matvec_avx2_int16<Q::Q2_K>, matmat_f32<Q::Q2_K>, nullptr,    nullptr},
    {Q::Q3_K, matvec_avx2_int16<Q::Q3_K>, matmat_f32<Q::Q3_K>, nullptr,    nullptr},
    {Q::Q4_K, matvec_avx2_int16<Q::Q4_K>, matmat_f32<Q::Q4_K>, nullptr,    nullptr},
    {Q::Q5_K, matvec_avx2_int16<Q::Q5_K>, matmat_f32<Q::Q5_K>, nullptr,    nullptr},
    {Q::Q6_K, matvec_avx2_int16<Q::Q6_K>, matmat_f32<Q::Q6_K>, nullptr,    nullptr},
    {Q::IQ4_NL, matvec_avx2_int8_f32<Q::IQ4_NL>, matmat_f32<Q::IQ4_NL>, nullptr, nullptr},
    {Q::IQ4_XS, matvec_avx2_int8_f32<Q::IQ4_XS>, matmat_f32<Q::IQ4_XS>, nullptr, nullptr},
    // grid types and TQ2_0: their values as int8 lanes widened to F32 for decode; TQ1_0: F32
    // math (decode_iq.h); prefill: F32 panels
    {Q::IQ2_XXS, matvec_avx2_int8_f32<Q::IQ2_XXS>, matmat_f32<Q::IQ2_XXS>, nullptr, nullptr},
    {Q::IQ2_XS, matvec_avx2_int8_f32<Q::IQ2_XS>, matmat_f32<Q::IQ2_XS>, nullptr, nullptr},
    {Q::IQ2_S, matvec_avx2_int8_f32<Q::IQ2_S>, matmat_f32<Q::IQ2_S>, nullptr, nullptr},
    {Q::IQ3_XXS, matvec_avx2_int8_f32<Q::IQ3_XXS>, matmat_f32<Q::IQ3_XXS>, nullptr, nullptr},
    {Q::IQ3_S, matvec_avx2_int8_f32<Q::IQ3_S>, matmat_f32<Q::IQ3_S>, nullptr, nullptr},
    {Q::IQ1_S, matvec_avx2_int8_f32<Q::IQ1_S>, matmat_f32<Q::IQ1_S>, nullptr, nullptr},
    {Q::IQ1_M, matvec_avx2_int8_f32<Q::IQ1_M>, matmat_f32<Q::IQ1_M>, nullptr, nullptr},
    {Q::TQ1_0, matvec_blocks<Q::TQ1_0>, matmat_f32<Q::TQ1_0>, nullptr, nullptr},
    {Q::TQ2_0, matvec_avx2_int8_f32<Q::TQ2_0>, matmat_f32<Q::TQ2_0>, nullptr, nullptr},
};

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table =
      make_kernel_table(Isa::Avx2, kMatmatF32Rows, kMatmatMinTokens, kRows);
  return table;
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
