/* pyllm C ABI: the quantization formats and CPU kernels of pyllm for C programs and non-pybind
 * clients (cffi, ctypes, other languages). Plain C89-compatible declarations; the library is
 * libpyllm_c.so (installed next to pyllm/_core as pyllm/libpyllm_c.so, this header as
 * pyllm/include/pyllm.h).
 *
 * Conventions
 *   - Types are ggml type ids (as in GGUF tensor infos): 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 6 Q5_0,
 *     7 Q5_1, 8 Q8_0, 9 Q8_1, 10 Q2_K, 11 Q3_K, 12 Q4_K, 13 Q5_K, 14 Q6_K, 15 Q8_K, 30 BF16.
 *   - Functions returning int return PYLLM_OK (0) or a negative PYLLM_E_* code; the message of the
 *     last failure on the calling thread is pyllm_last_error(). No function aborts on bad input.
 *   - Buffer sizes are passed explicitly and checked; arrays are row-major.
 *   - Compute runs on a process-wide thread pool (default: one thread per physical core).
 */
#ifndef PYLLM_H_
#define PYLLM_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define PYLLM_API __declspec(dllexport)
#else
#define PYLLM_API __attribute__((visibility("default")))
#endif

#define PYLLM_OK 0
#define PYLLM_E_INVALID (-1)  /* bad argument: unknown type, size mismatch, null buffer */
#define PYLLM_E_RUNTIME (-2)  /* the operation failed (e.g. an ISA not available here) */

typedef struct pyllm_type_info {
  uint32_t type;        /* ggml type id */
  const char* name;     /* "Q4_K", ... (static storage) */
  int64_t block_size;   /* elements per block (1 for F32/F16/BF16) */
  int64_t type_size;    /* bytes per block */
  int is_quantized;     /* block-quantized (0 for F32/F16/BF16) */
  int matmul_weight;    /* usable as a pyllm_matmul weight type */
} pyllm_type_info;

/* Library version, e.g. "0.1.0". */
PYLLM_API const char* pyllm_version(void);

/* Message of the last error on this thread ("" if none). Valid until the next call. */
PYLLM_API const char* pyllm_last_error(void);

/* Traits of a type id. */
PYLLM_API int pyllm_type_info_get(uint32_t type, pyllm_type_info* out);

/* Bytes needed by n elements of `type` (n a multiple of the block size), or a negative code. */
PYLLM_API int64_t pyllm_row_size(uint32_t type, int64_t n);

/* Dequantize n elements from src (src_bytes long) into dst (n floats). Bit-exact with the
 * reference dequantizer (the gguf package). */
PYLLM_API int pyllm_dequantize(uint32_t type, const void* src, size_t src_bytes, float* dst,
                               int64_t n);

/* Quantize n floats into dst (dst_bytes long; exactly pyllm_row_size(type, n) are written).
 * PYLLM_E_INVALID for a type pyllm writes only with an importance matrix (the grid i-quants
 * IQ2_XXS, IQ2_XS and IQ1_S, as llama.cpp). */
PYLLM_API int pyllm_quantize(uint32_t type, const float* src, int64_t n, void* dst,
                             size_t dst_bytes);

/* Y[t][o] = sum_i W[o][i] * X[t][i]: W is n_out rows of k elements of `type` in GGUF layout
 * (w_bytes == n_out * pyllm_row_size(type, k)), X is n_tokens x k floats, Y n_tokens x n_out
 * floats. Activations are used unrounded (F32 accumulation; see csrc/cpu/matmul.h). */
PYLLM_API int pyllm_matmul(uint32_t type, const void* w, size_t w_bytes, int64_t n_out, int64_t k,
                           const float* x, int64_t n_tokens, float* y);

/* pyllm_matmul with n_tokens = 1: y[o] = sum_i W[o][i] * x[i]. */
PYLLM_API int pyllm_matvec(uint32_t type, const void* w, size_t w_bytes, int64_t n_out, int64_t k,
                           const float* x, float* y);

/* Threads of the process-wide pool; n <= 0 means one per physical core. */
PYLLM_API int pyllm_set_num_threads(int n);
PYLLM_API int pyllm_get_num_threads(void);

/* Kernel ISA: the one in use ("scalar", "avx2", "avx512", "neon"), the ones usable here
 * (comma-separated, best last), and a switch to another usable one (PYLLM_E_RUNTIME if it is not
 * available, PYLLM_E_INVALID for an unknown name). PYLLM_FORCE_ISA sets the initial choice. */
PYLLM_API const char* pyllm_active_isa(void);
PYLLM_API const char* pyllm_available_isas(void);
PYLLM_API int pyllm_set_isa(const char* name);

#ifdef __cplusplus
}
#endif

#endif /* PYLLM_H_ */
