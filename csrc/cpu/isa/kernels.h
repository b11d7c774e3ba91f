// The matmul kernels of one ISA, by the file that defines them; the ISA's table file
// (table_<isa>.cc) picks among them per weight type.
//
// Each kernel is a function template over the weight type, explicitly instantiated in its file for
// exactly the types it implements: a table row naming a type a kernel lacks fails to link. The
// declarations of kernels that exist only for some ISAs are visible only in those ISAs' builds
// (the files are compiled only for them, see CMakeLists.txt).
//
// Included only by csrc/cpu/isa/*.cc, which the build compiles once per ISA with PYLLM_ISA_<NAME>.
#pragma once

#include <cstdint>

#include "cpu/isa/simd.h"
#include "cpu/kernel_table.h"

namespace pyllm {
namespace PYLLM_ISA {

// ---- kernels.cc (every ISA): F32 math, activations unrounded ---------------------------------
// Decode, float weights (F32, F16, BF16): vector loads straight from the row.
template <QType T>
void matvec_float(const MatArgs& a, int64_t r0, int64_t r1);
// Decode, block types: each block decoded into a buffer, dotted with up to 4 tokens.
template <QType T>
void matvec_blocks(const MatArgs& a, int64_t r0, int64_t r1);
// Prefill, every type: a panel of kMatmatF32Rows rows decoded to F32 once, reused by all tokens.
template <QType T>
void matmat_f32(const MatArgs& a, int64_t r0, int64_t r1);
constexpr int kMatmatF32Rows = 2 * VN;

#if defined(PYLLM_ISA_AVX2)
// ---- matvec_avx2.cc (AVX2 only) ---------------------------------------------------------------
// Decode, block types of at most 6 bits: int16-split activations, VPMADDUBSW.
template <QType T>
void matvec_avx2_int16(const MatArgs& a, int64_t r0, int64_t r1);
// Decode, Q8_0, IQ4_NL, IQ4_XS: int8 lanes (quants or table levels) widened to F32 in registers
// (8-bit weights saturate VPMADDUBSW).
template <QType T>
void matvec_avx2_int8_f32(const MatArgs& a, int64_t r0, int64_t r1);
#endif

#if defined(PYLLM_ISA_AVX512)
// ---- matvec_vnni.cc (AVX-512 only) ------------------------------------------------------------
// Decode, every block type: int16-split activations, VPDPBUSD.
template <QType T>
void matvec_vnni(const MatArgs& a, int64_t r0, int64_t r1);

// ---- matvec_vnni_iq.cc (AVX-512 only) ---------------------------------------------------------
// Decode, grid i-quants and ternary types: int8 lanes decoded in SIMD (register table lookups,
// gathers, digit arithmetic), int16-split activations, VPDPBUSD.
template <QType T>
void matvec_vnni_iq(const MatArgs& a, int64_t r0, int64_t r1);

// ---- matmat_vnni.cc (AVX-512 only) ------------------------------------------------------------
// Prefill: int16 weight panels from GGUF rows / from the rows16 layout, VPDPWSSD.
template <QType T>
void matmat_vnni(const MatArgs& a, int64_t r0, int64_t r1);
template <QType T>
void matmat_vnni_r16(const MatArgs& a, int64_t r0, int64_t r1);
constexpr int kMatmatVnniRows = 32;

// ---- matmat_vnni_iq.cc (AVX-512 only) ---------------------------------------------------------
// Prefill, grid i-quants: int16 panels from the SIMD grid expansion, the same register tile.
template <QType T>
void matmat_vnni_iq(const MatArgs& a, int64_t r0, int64_t r1);

// ---- matvec_r16.cc (AVX-512 only) -------------------------------------------------------------
// Decode over the rows16 layout: one row per 32-bit lane, 16 rows per register.
template <QType T>
void matvec_vnni_r16(const MatArgs& a, int64_t r0, int64_t r1);
#endif

}  // namespace PYLLM_ISA
}  // namespace pyllm

namespace pyllm {
// False for every type: the static_assert of a kernel's `if constexpr` chain for a type it lacks.
template <QType T>
constexpr bool kNoKernelFor = false;
}  // namespace pyllm

// Explicit instantiation of a kernel template for one type, in the kernel's own file.
#define PYLLM_KERNEL_FOR(KERNEL, T) \
  template void KERNEL<QType::T>(const MatArgs& a, int64_t r0, int64_t r1);
