// The kernel table of the AVX-512 build (with VNNI): int16-split VNNI kernels for the legacy,
// k-quant and IQ4 block types (matvec_vnni.cc, matmat_vnni.cc), for the grid i-quants and
// ternary types (matvec_vnni_iq.cc, matmat_vnni_iq.cc), rows16 kernels for the types with a rows16 layout (matvec_r16.cc,
// matmat_vnni.cc), F32 math for the float types and for Q2_K's prefill.
#include "cpu/isa/kernels.h"

#if !defined(PYLLM_ISA_AVX512)
#error "table_avx512.cc is the table of the AVX-512 build (CMakeLists.txt)"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {

// From this many tokens on, matmat beats matvec. Measured (Q4_K, 1024 x 2048): VNNI matvec
// ~0.07 ms per token in groups of 4 vs matmat 1.7 ms at 8 tokens and 2.4 ms at 32 tokens.
constexpr int kMatmatMinTokens = 32;
static_assert(kMatmatF32Rows == kMatmatVnniRows, "both prefill kernels take 32-row panels");

using Q = QType;
constexpr TypeKernels kRows[] = {
    // type   matvec (decode)       matmat (prefill)       matvec_r16                matmat_r16
    {Q::F32,  matvec_float<Q::F32>, matmat_f32<Q::F32>,    nullptr,                  nullptr},
    {Q::F16,  matvec_float<Q::F16>, matmat_f32<Q::F16>,    nullptr,                  nullptr},
    {Q::BF16, matvec_float<Q::BF16>, matmat_f32<Q::BF16>,  nullptr,                  nullptr},
    {Q::Q4_0, matvec_vnni<Q::Q4_0>, matmat_vnni<Q::Q4_0>,  matvec_vnni_r16<Q::Q4_0>, matmat_vnni_r16<Q::Q4_0>},
    {Q::Q4_1, matvec_vnni<Q::Q4_1>, matmat_vnni<Q::Q4_1>,  matvec_vnni_r16<Q::Q4_1>, matmat_vnni_r16<Q::Q4_1>},
    {Q::Q5_0, matvec_vnni<Q::Q5_0>, matmat_vnni<Q::Q5_0>,  nullptr,                  nullptr},
    {Q::Q5_1, matvec_vnni<Q::Q5_1>, matmat_vnni<Q::Q5_1>,  nullptr,                  nullptr},
    {Q::Q8_0, matvec_vnni<Q::Q8_0>, matmat_vnni<Q::Q8_0>,  matvec_vnni_r16<Q::Q8_0>, matmat_vnni_r16<Q::Q8_0>},
    {Q::Q2_K, matvec_vnni<Q::Q2_K>, matmat_f32<Q::Q2_K>,   nullptr,                  nullptr},
    {Q::Q3_K, matvec_vnni<Q::Q3_K>, matmat_vnni<Q::Q3_K>,  nullptr,                  nullptr},
    {Q::Q4_K, matvec_vnni<Q::Q4_K>, matmat_vnni<Q::Q4_K>,  matvec_vnni_r16<Q::Q4_K>, matmat_vnni_r16<Q::Q4_K>},
    {Q::Q5_K, matvec_vnni<Q::Q5_K>, matmat_vnni<Q::Q5_K>,  matvec_vnni_r16<Q::Q5_K>, matmat_vnni_r16<Q::Q5_K>},
    {Q::Q6_K, matvec_vnni<Q::Q6_K>, matmat_vnni<Q::Q6_K>,  matvec_vnni_r16<Q::Q6_K>, matmat_vnni_r16<Q::Q6_K>},
    {Q::IQ4_NL, matvec_vnni<Q::IQ4_NL>, matmat_vnni<Q::IQ4_NL>, matvec_vnni_r16<Q::IQ4_NL>, matmat_vnni_r16<Q::IQ4_NL>},
    {Q::IQ4_XS, matvec_vnni<Q::IQ4_XS>, matmat_vnni<Q::IQ4_XS>, matvec_vnni_r16<Q::IQ4_XS>, matmat_vnni_r16<Q::IQ4_XS>},
    // grid i-quants and ternary types: prefill panels from the SIMD expansion of their values
    // (matmat_vnni_iq.cc). Measured on a 1.1B IQ2_XXS, pp64 at 1 thread: 15 t/s with panels from
    // the scalar decoder, 27.5 t/s with the decode kernel in passes of 4 tokens, 160 t/s with
    // these panels (llama.cpp 154).
    {Q::IQ2_XXS, matvec_vnni_iq<Q::IQ2_XXS>, matmat_vnni_iq<Q::IQ2_XXS>, nullptr, nullptr},
    {Q::IQ2_XS, matvec_vnni_iq<Q::IQ2_XS>, matmat_vnni_iq<Q::IQ2_XS>, nullptr, nullptr},
    {Q::IQ2_S, matvec_vnni_iq<Q::IQ2_S>, matmat_vnni_iq<Q::IQ2_S>, nullptr, nullptr},
    {Q::IQ3_XXS, matvec_vnni_iq<Q::IQ3_XXS>, matmat_vnni_iq<Q::IQ3_XXS>, nullptr, nullptr},
    {Q::IQ3_S, matvec_vnni_iq<Q::IQ3_S>, matmat_vnni_iq<Q::IQ3_S>, nullptr, nullptr},
    {Q::IQ1_S, matvec_vnni_iq<Q::IQ1_S>, matmat_vnni_iq<Q::IQ1_S>, nullptr, nullptr},
    {Q::IQ1_M, matvec_vnni_iq<Q::IQ1_M>, matmat_vnni_iq<Q::IQ1_M>, nullptr, nullptr},
    {Q::TQ1_0, matvec_vnni_iq<Q::TQ1_0>, matmat_vnni_iq<Q::TQ1_0>, nullptr, nullptr},
    {Q::TQ2_0, matvec_vnni_iq<Q::TQ2_0>, matmat_vnni_iq<Q::TQ2_0>, nullptr, nullptr},
};

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable table =
      make_kernel_table(Isa::Avx512, kMatmatVnniRows, kMatmatMinTokens, kRows);
  return table;
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
