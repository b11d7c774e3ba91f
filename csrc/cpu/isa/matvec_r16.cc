// AVX-512 VNNI matvec kernels over the rows16 weight layout (pyllm/repack.h) for Q4_0, Q4_1,
// Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS: one row per 32-bit lane, 16 rows per register.
//
// Activations are rounded exactly as in matvec_vnni.cc: each block of 32 to int16 steps of
// dx = amax / 32767 and split into xi = 256 * hi + lo (hi signed, lo unsigned bytes), so two
// VPDPBUSD give the exact integer dot product of the weights' integer codes with xi; the
// accuracy bound of matmul.h is unchanged. What changes is the data movement: a VPDPBUSD takes
// one 64-byte register of weight codes (4 codes of each of 16 rows) against 4 activations
// broadcast from memory, the 16 per-row integer sums of a (sub-)block come out in the lanes of
// one register, and the block scales of the 16 rows are one contiguous vector. Per 512 weights
// of Q4_0 that is 16 VPDPBUSD, 12 unpacking and ~7 rescaling instructions, against ~70 for the
// GGUF-layout kernel, which puts decode at the memory wall instead of under it.
//
// Integer ranges (per lane, before the conversion to float): Q4_0 / Q4_K |256 * sum(u hi)|
// <= 256 * 32 * 15 * 128 < 2^24 (Q5_K, codes < 32: < 2^25); Q8_0 and the IQ4 levels
// 256 * sum((w + 128) hi) < 2^29; Q6_K per sub-block of 16
// 256 * 16 * 63 * 128 < 2^25; offsets (-8, -128, -32 times sums of xi) stay below 2^28.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/isa/kernels.h"
#include "cpu/isa/rows16_simd.h"
#include "cpu/isa/simd.h"
#include "cpu/kernel_table.h"
#include "pyllm/repack.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in its headers
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#if !defined(PYLLM_ISA_AVX512)
#error "matvec_r16.cc is part of the AVX-512 build only (CMakeLists.txt, PYLLM_ISA_SOURCES_avx512)"
#endif

namespace pyllm {
namespace PYLLM_ISA {

namespace {

// One token's activations, in natural element order.
struct Act {
  std::vector<int8_t> hi;     // k
  std::vector<uint8_t> lo;    // k
  std::vector<float> dx;      // per block of 32
  std::vector<float> xsum;    // exact F32 sum per block of 32 (Q4_K mins)
  std::vector<int32_t> s16;   // sum of xi per 16 elements (offset corrections)
  std::vector<int32_t> shi;   // sum of hi per 32 elements (Q8_0's sign correction)
};

void prepare(const float* x, int64_t k, Act& s) {
  const int64_t nb = k / 32;
  s.hi.resize(static_cast<size_t>(k));
  s.lo.resize(static_cast<size_t>(k));
  s.dx.resize(static_cast<size_t>(nb));
  s.xsum.resize(static_cast<size_t>(nb));
  s.s16.resize(static_cast<size_t>(2 * nb));
  s.shi.resize(static_cast<size_t>(nb));
  const __m512i m255 = _mm512_set1_epi32(255);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 va = _mm512_loadu_ps(x + 32 * b), vb = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(va), _mm512_abs_ps(vb)));
    s.xsum[b] = _mm512_reduce_add_ps(_mm512_add_ps(va, vb));
    const float id = amax > 0.0f ? 32767.0f / amax : 0.0f;
    s.dx[b] = amax / 32767.0f;
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(va, vid));  // round to nearest even
    const __m512i ib = _mm512_cvtps_epi32(_mm512_mul_ps(vb, vid));
    const __m512i ha = _mm512_srai_epi32(ia, 8), hb = _mm512_srai_epi32(ib, 8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(s.hi.data() + 32 * b), _mm512_cvtepi32_epi8(ha));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(s.hi.data() + 32 * b + 16),
                     _mm512_cvtepi32_epi8(hb));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(s.lo.data() + 32 * b),
                     _mm512_cvtepi32_epi8(_mm512_and_si512(ia, m255)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(s.lo.data() + 32 * b + 16),
                     _mm512_cvtepi32_epi8(_mm512_and_si512(ib, m255)));
    s.s16[2 * b] = _mm512_reduce_add_epi32(ia);
    s.s16[2 * b + 1] = _mm512_reduce_add_epi32(ib);
    s.shi[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(ha, hb));
  }
}

Act* token_scratch() {
  thread_local Act scratch[4];
  return scratch;
}

// Four activation bytes, broadcast to every lane.
inline __m512i bcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline __m512i load64(const uint8_t* p) { return _mm512_loadu_si512(p); }

// Software prefetch 8 KiB ahead of the weight stream, one line per line read: the hardware
// prefetcher alone keeps too few lines in flight for one core to stream from DRAM at its rate.
// Measured with bench_kernels (32768 x 4096 from DRAM, 1 thread, alternating builds on a busy
// machine, GB/s): no prefetch / 2 KiB / 8 KiB / 32 KiB ahead: Q4_0 18-27 / 23-25 / 35-36 /
// 34-38, Q8_0 23-26 / 28 / 31-33 / 31, Q4_K (2 KiB before) 18-19 / 18-19 / 28-30 / 27-29, Q6_K
// 12-15 / 21-23 / 33 / 30-33; 2 threads 8 KiB: 36-51 against 21-35 without. Reading a second
// group's stream at the same time instead (more streams, 2 KiB ahead) gave Q4_K 27-29 and made
// Q6_K spill registers.
constexpr int64_t kPrefetchAhead = 8192;
inline void prefetch_ahead(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchAhead), _MM_HINT_T0);
}

// Calls body(g) for each 16-row group this thread takes in one pass (see for_row_chunks).
template <class Body>
inline void for_groups(const MatArgs& a, int64_t r0, int64_t r1, std::atomic<int64_t>* counter,
                       Body&& body) {
  for_row_chunks(a, r0, r1, counter, [&](int64_t b, int64_t e) {
    for (int64_t g = b / 16; g < e / 16; ++g) body(g);
  });
}

// The per-token pointers a kernel reads.
template <int NT>
struct Tokens {
  const int8_t* hi[NT];
  const uint8_t* lo[NT];
  const float* dx[NT];
  const float* xsum[NT];
  const int32_t* s16[NT];
  const int32_t* shi[NT];

  Tokens(const MatArgs& a, int64_t t0) {
    Act* s = token_scratch();
    for (int t = 0; t < NT; ++t) {
      prepare(a.x + (t0 + t) * a.ldx, a.k, s[t]);
      hi[t] = s[t].hi.data();
      lo[t] = s[t].lo.data();
      dx[t] = s[t].dx.data();
      xsum[t] = s[t].xsum.data();
      s16[t] = s[t].s16.data();
      shi[t] = s[t].shi.data();
    }
  }

  // ih += w * hi, il += lo * w for the 4 elements at e: codes w in 0..127 (unsigned and signed
  // operand at once).
  void dot(__m512i w, int64_t e, __m512i* ih, __m512i* il) const {
    for (int t = 0; t < NT; ++t) {
      ih[t] = _mm512_dpbusd_epi32(ih[t], w, bcast4(hi[t] + e));
      il[t] = _mm512_dpbusd_epi32(il[t], bcast4(lo[t] + e), w);
    }
  }

  // The same for signed codes w (-128..127): hi is dotted with w + 128 (unsigned), so the
  // caller corrects the total by -128 * 256 * sum(hi).
  void dot_signed(__m512i w, int64_t e, __m512i* ih, __m512i* il) const {
    const __m512i wu = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
    for (int t = 0; t < NT; ++t) {
      ih[t] = _mm512_dpbusd_epi32(ih[t], wu, bcast4(hi[t] + e));
      il[t] = _mm512_dpbusd_epi32(il[t], bcast4(lo[t] + e), w);
    }
  }
};

inline __m512i lanes_total(__m512i ih, __m512i il, int32_t offset) {
  return _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(ih, 8), il),
                          _mm512_set1_epi32(offset));
}

template <int NT>
void store(const MatArgs& a, int64_t t0, int64_t row, const __m512* acc) {
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(a.y + (t0 + t) * a.ldy + row, acc[t]);
}

// Q4_0: w = d (u - 8), group block d[16] f16 then 4 chunks of 16 rows x 4 code bytes.
// Q4_1: w = d u + m, group block d[16], m[16] f16 then the same chunks; the min term uses the
// exact F32 block sums of x.
template <bool kMin>
struct R16Q4 {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0,
                    std::atomic<int64_t>* counter) {
      constexpr int64_t hdr = kMin ? 64 : 32;
      const int64_t nb = a.k / 32, gbb = hdr + 256;
      const Tokens<NT> tk(a, t0);
      const __m512i m4 = _mm512_set1_epi8(0x0F);
      for_groups(a, r0, r1, counter, [&](int64_t g) {
        const uint8_t* p = a.w + g * nb * gbb;
        __m512 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b, p += gbb) {
          const __m512 d = f16x16(p);
          __m512i ih[NT], il[NT];
          for (int t = 0; t < NT; ++t) ih[t] = il[t] = _mm512_setzero_si512();
          for (int c = 0; c < 4; ++c) {
            prefetch_ahead(p + hdr + 64 * c);
            const __m512i z = load64(p + hdr + 64 * c);
            tk.dot(_mm512_and_si512(z, m4), 32 * b + 4 * c, ih, il);
            tk.dot(_mm512_and_si512(_mm512_srli_epi16(z, 4), m4), 32 * b + 16 + 4 * c, ih, il);
          }
          for (int t = 0; t < NT; ++t) {
            const int32_t off = kMin ? 0 : -8 * (tk.s16[t][2 * b] + tk.s16[t][2 * b + 1]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes_total(ih[t], il[t], off)),
                                     _mm512_mul_ps(d, _mm512_set1_ps(tk.dx[t][b])), acc[t]);
            if constexpr (kMin) {
              acc[t] = _mm512_fmadd_ps(f16x16(p + 32), _mm512_set1_ps(tk.xsum[t][b]), acc[t]);
            }
          }
        }
        store<NT>(a, t0, 16 * g, acc);
      });
    }
  };
};

// Q8_0: w = d q, q signed. hi is dotted with q + 128 (unsigned) and corrected by -128 sum(hi).
template <int NT>
struct R16Q8_0 {
  static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0,
                  std::atomic<int64_t>* counter) {
    const int64_t nb = a.k / 32, gbb = 32 + 512;
    const Tokens<NT> tk(a, t0);
    const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
    for_groups(a, r0, r1, counter, [&](int64_t g) {
      const uint8_t* p = a.w + g * nb * gbb;
      __m512 acc[NT];
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b, p += gbb) {
        const __m512 d = f16x16(p);
        __m512i ih[NT], il[NT];
        for (int t = 0; t < NT; ++t) ih[t] = il[t] = _mm512_setzero_si512();
        for (int c = 0; c < 8; ++c) {
          prefetch_ahead(p + 32 + 64 * c);
          const __m512i q = load64(p + 32 + 64 * c);
          const __m512i qu = _mm512_xor_si512(q, sign);
          const int64_t e = 32 * b + 4 * c;
          for (int t = 0; t < NT; ++t) {
            ih[t] = _mm512_dpbusd_epi32(ih[t], qu, bcast4(tk.hi[t] + e));
            il[t] = _mm512_dpbusd_epi32(il[t], bcast4(tk.lo[t] + e), q);
          }
        }
        for (int t = 0; t < NT; ++t) {
          const int32_t off = -32768 * tk.shi[t][b];
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes_total(ih[t], il[t], off)),
                                   _mm512_mul_ps(d, _mm512_set1_ps(tk.dx[t][b])), acc[t]);
        }
      }
      store<NT>(a, t0, 16 * g, acc);
    });
  }
};

// Q4_K: w = d sc_j u - dmin m_j for sub-block j of 32. Group block: d[16], dmin[16] f16,
// sc[8][16], m[8][16] bytes, then 32 chunks; chunk 8 c2 + c holds bytes qs[32 c2 + 4 c ..],
// whose low nibbles are elements 64 c2 + 4 c .. of sub-block 2 c2 and high nibbles those of
// sub-block 2 c2 + 1: both sub-blocks of a chunk are accumulated from one load.
// Q5_K (kQ5): the same with a fifth bit, u = nibble | h << 4 in 0..31: between the header and
// the 32 chunks, 8 qh chunks (chunk c: bytes qh[4 c ..] of each row, whose bits 2 c2 and
// 2 c2 + 1 are the high bits of elements 64 c2 + 4 c .. and 64 c2 + 32 + 4 c ..).
template <bool kQ5>
struct R16K4 {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0,
                    std::atomic<int64_t>* counter) {
      constexpr int64_t qh_bytes = kQ5 ? 512 : 0;
      const int64_t nsb = a.k / QK_K, gbb = 64 + 256 + qh_bytes + 2048;
      const Tokens<NT> tk(a, t0);
      const __m512i m4 = _mm512_set1_epi8(0x0F), bit4 = _mm512_set1_epi8(0x10);
      for_groups(a, r0, r1, counter, [&](int64_t g) {
        const uint8_t* p = a.w + g * nsb * gbb;
        __m512 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t sb = 0; sb < nsb; ++sb, p += gbb) {
          const __m512 d = f16x16(p), dmin = f16x16(p + 32);
          const uint8_t* qh = p + 320;
          for (int c2 = 0; c2 < 4; ++c2) {
            const uint8_t* chunks = qh + qh_bytes + 64 * 8 * c2;
            const int64_t e0 = QK_K * sb + 64 * c2;  // first element of sub-block 2 c2
            __m512i ih0[NT], il0[NT], ih1[NT], il1[NT];
            for (int t = 0; t < NT; ++t) {
              ih0[t] = il0[t] = ih1[t] = il1[t] = _mm512_setzero_si512();
            }
            for (int c = 0; c < 8; ++c) {
              prefetch_ahead(chunks + 64 * c);
              const __m512i z = load64(chunks + 64 * c);
              __m512i u0 = _mm512_and_si512(z, m4);
              __m512i u1 = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
              if constexpr (kQ5) {
                if (c2 == 0) prefetch_ahead(qh + 64 * c);
                const __m512i h = load64(qh + 64 * c);
                // bit 2 c2 (2 c2 + 1) of each byte moved to bit 4 of that byte, OR-ed in
                const __m512i h0 = c2 < 2 ? _mm512_slli_epi16(h, 4 - 2 * c2)
                                          : _mm512_srli_epi16(h, 2 * c2 - 4);
                const __m512i h1 = c2 < 2 ? _mm512_slli_epi16(h, 3 - 2 * c2)
                                          : _mm512_srli_epi16(h, 2 * c2 - 3);
                u0 = _mm512_ternarylogic_epi32(u0, h0, bit4, 0xF8);
                u1 = _mm512_ternarylogic_epi32(u1, h1, bit4, 0xF8);
              }
              tk.dot(u0, e0 + 4 * c, ih0, il0);
              tk.dot(u1, e0 + 32 + 4 * c, ih1, il1);
            }
            for (int h = 0; h < 2; ++h) {
              const int j = 2 * c2 + h;
              const __m512 scale = _mm512_mul_ps(d, u8x16(p + 64 + 16 * j));
              const __m512 mins = _mm512_mul_ps(dmin, u8x16(p + 192 + 16 * j));
              const int64_t blk = e0 / 32 + h;
              for (int t = 0; t < NT; ++t) {
                const __m512i tot =
                    h ? lanes_total(ih1[t], il1[t], 0) : lanes_total(ih0[t], il0[t], 0);
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot),
                                         _mm512_mul_ps(scale, _mm512_set1_ps(tk.dx[t][blk])),
                                         acc[t]);
                acc[t] = _mm512_fnmadd_ps(mins, _mm512_set1_ps(tk.xsum[t][blk]), acc[t]);
              }
            }
          }
        }
        store<NT>(a, t0, 16 * g, acc);
      });
    }
  };
};

// Q6_K: w = d sc_j (q - 32) for sub-block j of 16, q = 4 low bits from ql | 2 high bits from qh.
// Group block: d[16] f16, sc[16][16] int8, then for each half h and c < 8 the chunks
// A = ql[64 h + 4 c ..], B = ql[64 h + 32 + 4 c ..], H = qh[32 h + 4 c ..]; for l = 4 c .. 4 c + 3:
//   element 128 h + l      = A & 15 | (H & 3) << 4          (sub-block 8 h + c / 4)
//   element 128 h + 32 + l = B & 15 | (H >> 2 & 3) << 4     (sub-block 8 h + 2 + c / 4)
//   element 128 h + 64 + l = A >> 4 | (H >> 4 & 3) << 4     (sub-block 8 h + 4 + c / 4)
//   element 128 h + 96 + l = B >> 4 | (H >> 6) << 4         (sub-block 8 h + 6 + c / 4)
// Four sub-blocks are accumulated at once, so at most 2 tokens per pass fit the registers.
template <int NT>
struct R16Q6_K {
  static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0,
                  std::atomic<int64_t>* counter) {
    const int64_t nsb = a.k / QK_K, gbb = 32 + 256 + 3072;
    const Tokens<NT> tk(a, t0);
    for_groups(a, r0, r1, counter, [&](int64_t g) {
      const uint8_t* p = a.w + g * nsb * gbb;
      __m512 acc[NT];
      for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t sb = 0; sb < nsb; ++sb, p += gbb) {
        const uint8_t* body = p + 288;
        __m512 sacc[NT];
        for (int t = 0; t < NT; ++t) sacc[t] = _mm512_setzero_ps();
        for (int h = 0; h < 2; ++h) {
          for (int cc = 0; cc < 2; ++cc) {
            __m512i ih[4][NT], il[4][NT];  // sub-blocks 8 h + 2 m + cc, m < 4
            for (int m = 0; m < 4; ++m) {
              for (int t = 0; t < NT; ++t) ih[m][t] = il[m][t] = _mm512_setzero_si512();
            }
            for (int ci = 0; ci < 4; ++ci) {
              const int c = 4 * cc + ci;
              const uint8_t* ch = body + 64 * (24 * h + 3 * c);
              for (int l = 0; l < 3; ++l) prefetch_ahead(ch + 64 * l);
              const __m512i A = load64(ch), B = load64(ch + 64), H = load64(ch + 128);
              __m512i q[4];
              q6k_codes(A, B, H, q);
              const int64_t e = QK_K * sb + 128 * h + 4 * c;
              for (int m = 0; m < 4; ++m) tk.dot(q[m], e + 32 * m, ih[m], il[m]);
            }
            for (int m = 0; m < 4; ++m) {
              const int j = 8 * h + 2 * m + cc;
              const __m512 sc = s8x16(p + 32 + 16 * j);
              const int64_t s16 = (QK_K * sb) / 16 + j;
              for (int t = 0; t < NT; ++t) {
                const int32_t off = -32 * tk.s16[t][s16];
                sacc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes_total(ih[m][t], il[m][t], off)),
                                          _mm512_mul_ps(sc, _mm512_set1_ps(tk.dx[t][s16 / 2])),
                                          sacc[t]);
              }
            }
          }
        }
        const __m512 d = f16x16(p);
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(sacc[t], d, acc[t]);
      }
      store<NT>(a, t0, 16 * g, acc);
    });
  }
};

// IQ4_NL (kXs false): w = d level[u], the layout of Q4_0 (d[16] f16, then 4 chunks of 16 rows x
// 4 code bytes per block of 32). IQ4_XS: w = d (ls_j - 32) level[u] per sub-block j of 32; group
// block d[16] f16, the 8 scales ls_j - 32 as int8 [j][16], then 32 chunks, 4 per sub-block.
// The levels (VPSHUFB of the nibbles in the 16-entry table) are signed, handled as Q8_0's.
template <bool kXs>
struct R16Iq4 {
  template <int NT>
  struct K {
    static void run(const MatArgs& a, int64_t r0, int64_t r1, int64_t t0,
                    std::atomic<int64_t>* counter) {
      constexpr int64_t hdr = kXs ? 32 + 128 : 32, bsize = kXs ? QK_K : 32;
      const int64_t nb = a.k / bsize, gbb = hdr + 16 * bsize / 2;
      const Tokens<NT> tk(a, t0);
      const __m512i m4 = _mm512_set1_epi8(0x0F);
      const __m512i levels =
          _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Levels)));
      for_groups(a, r0, r1, counter, [&](int64_t g) {
        const uint8_t* p = a.w + g * nb * gbb;
        __m512 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b, p += gbb) {
          const __m512 d = f16x16(p);
          for (int j = 0; j < bsize / 32; ++j) {
            const uint8_t* chunks = p + hdr + 256 * j;
            const int64_t blk = b * (bsize / 32) + j;  // block of 32 of the row
            __m512i ih[NT], il[NT];
            for (int t = 0; t < NT; ++t) ih[t] = il[t] = _mm512_setzero_si512();
            for (int c = 0; c < 4; ++c) {
              prefetch_ahead(chunks + 64 * c);
              const __m512i z = load64(chunks + 64 * c);
              tk.dot_signed(_mm512_shuffle_epi8(levels, _mm512_and_si512(z, m4)),
                            32 * blk + 4 * c, ih, il);
              tk.dot_signed(
                  _mm512_shuffle_epi8(levels, _mm512_and_si512(_mm512_srli_epi16(z, 4), m4)),
                  32 * blk + 16 + 4 * c, ih, il);
            }
            const __m512 scale = kXs ? _mm512_mul_ps(d, s8x16(p + 32 + 16 * j)) : d;
            for (int t = 0; t < NT; ++t) {
              const int32_t off = -32768 * tk.shi[t][blk];
              acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes_total(ih[t], il[t], off)),
                                       _mm512_mul_ps(scale, _mm512_set1_ps(tk.dx[t][blk])),
                                       acc[t]);
            }
          }
        }
        store<NT>(a, t0, 16 * g, acc);
      });
    }
  };
};

// Tokens in passes of up to kMax (each pass streams the weights once). With a queue, pass i
// hands out its row chunks from queue->next[i] (the caller makes sure the passes fit).
template <template <int> class K, int kMax = 4>
void by_groups(const MatArgs& a, int64_t r0, int64_t r1) {
  for (int64_t t0 = 0, pass = 0; t0 < a.n_tokens; t0 += kMax, ++pass) {
    std::atomic<int64_t>* counter = a.queue != nullptr ? &a.queue->next[pass] : nullptr;
    switch (std::min<int64_t>(kMax, a.n_tokens - t0)) {
      case 1: K<1>::run(a, r0, r1, t0, counter); break;
      case 2: K<2>::run(a, r0, r1, t0, counter); break;
      case 3: K<3>::run(a, r0, r1, t0, counter); break;
      default: K<4>::run(a, r0, r1, t0, counter); break;
    }
  }
}

}  // namespace

template <QType T>
void matvec_vnni_r16(const MatArgs& a, int64_t r0, int64_t r1) {
  if constexpr (T == QType::Q4_0) {
    by_groups<R16Q4<false>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q4_1) {
    by_groups<R16Q4<true>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q8_0) {
    by_groups<R16Q8_0>(a, r0, r1);
  } else if constexpr (T == QType::Q4_K) {
    by_groups<R16K4<false>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q5_K) {
    by_groups<R16K4<true>::K>(a, r0, r1);
  } else if constexpr (T == QType::Q6_K) {
    by_groups<R16Q6_K, 2>(a, r0, r1);
  } else if constexpr (T == QType::IQ4_NL) {
    by_groups<R16Iq4<false>::K>(a, r0, r1);
  } else if constexpr (T == QType::IQ4_XS) {
    by_groups<R16Iq4<true>::K>(a, r0, r1);
  } else {
    static_assert(kNoKernelFor<T>, "no rows16 matvec for this type");
  }
}

PYLLM_KERNEL_FOR(matvec_vnni_r16, Q4_0)
PYLLM_KERNEL_FOR(matvec_vnni_r16, Q4_1)
PYLLM_KERNEL_FOR(matvec_vnni_r16, Q8_0)
PYLLM_KERNEL_FOR(matvec_vnni_r16, Q4_K)
PYLLM_KERNEL_FOR(matvec_vnni_r16, Q5_K)
PYLLM_KERNEL_FOR(matvec_vnni_r16, Q6_K)
PYLLM_KERNEL_FOR(matvec_vnni_r16, IQ4_NL)
PYLLM_KERNEL_FOR(matvec_vnni_r16, IQ4_XS)

}  // namespace PYLLM_ISA
}  // namespace pyllm
