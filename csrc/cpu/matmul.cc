// Owns the matmul entry points: argument checks, the choice between the matvec and matmat
// kernels, the ISA table of active_isa(), and the split of output rows across threads.
#include "cpu/matmul.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/kernel_table.h"
#include "pyllm/quant.h"
#include "pyllm/repack.h"

namespace pyllm {
namespace {

struct Layout {
  int64_t block;  // elements per block
  int64_t bytes;  // bytes per block
};

// Block geometry of the weight types matmul handles, from the traits table (csrc/quant/registry.cc,
// which takes it from the block structs of qtype.h); ids past the kernel tables are refused.
bool weight_layout(QType t, Layout* out) {
  const uint32_t id = static_cast<uint32_t>(t);
  const TypeTraits* tr = find_type_traits(id);
  if (tr == nullptr || !tr->is_weight || id >= static_cast<uint32_t>(kMaxTypeId)) return false;
  *out = {tr->block_size, tr->type_size};
  return true;
}

// Whether isa's kernels are compiled into this build (table_for falls back to scalar otherwise).
bool compiled(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return true;
#ifdef PYLLM_HAVE_ISA_AVX512
    case Isa::Avx512: return true;
#endif
#ifdef PYLLM_HAVE_ISA_AVX2
    case Isa::Avx2: return true;
#endif
#ifdef PYLLM_HAVE_ISA_NEON
    case Isa::Neon: return true;
#endif
    default: return false;
  }
}

const KernelTable& table_for(Isa isa) {
  switch (isa) {
#ifdef PYLLM_HAVE_ISA_AVX512
    case Isa::Avx512: return avx512::kernel_table();
#endif
#ifdef PYLLM_HAVE_ISA_AVX2
    case Isa::Avx2: return avx2::kernel_table();
#endif
#ifdef PYLLM_HAVE_ISA_NEON
    case Isa::Neon: return neon::kernel_table();
#endif
    default: return scalar::kernel_table();
  }
}

MatArgs to_args(const MatmulParams& p, int64_t row_bytes) {
  MatArgs a;
  a.w = static_cast<const uint8_t*>(p.w);
  a.row_bytes = row_bytes;
  a.k = p.k;
  a.x = p.x;
  a.ldx = p.ldx > 0 ? p.ldx : p.k;
  a.n_tokens = p.n_tokens;
  a.y = p.y;
  a.ldy = p.ldy > 0 ? p.ldy : p.n_out;
  return a;
}

// The kernel for p and the row granularity of the thread split. The grain does not depend on
// the ISA (32 is a multiple of every table's matmat_rows), so threads that see different
// active ISAs during a concurrent set_active_isa still split the rows identically.
RowsFn pick(const MatmulParams& p, int64_t* grain) {
  const KernelTable& t = table_for(active_isa());
  const int id = static_cast<int>(p.wtype);
  if (p.n_tokens >= t.matmat_min_tokens) {
    *grain = 32;
    return t.matmat[id];
  }
  *grain = 4;
  return t.matvec[id];
}

template <class T>
bool aligned_for(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(T) == 0;
}

int64_t row_bytes_of(QType t, int64_t k) {
  Layout l{};
  weight_layout(t, &l);
  return k / l.block * l.bytes;
}

// The arguments for threads that share the rows of a rows16 product through p.queue: nth * m
// chunks of about equal size (a multiple of `unit` rows), m <= 8 and each chunk at least
// min_rows where the matrix allows. A whole number of chunks per thread keeps small matrices
// split as evenly as a fixed split would (three chunks for two threads left one idle a third
// of the time).
MatArgs shared_rows(const MatArgs& a, const MatmulParams& p, int nth, int64_t unit,
                    int64_t min_rows) {
  MatArgs s = a;
  s.queue = p.queue;
  const int64_t per_thread = p.n_out / nth;
  const int64_t m = std::clamp<int64_t>(per_thread / std::max<int64_t>(1, min_rows), 1, 8);
  const int64_t chunks = m * nth;
  const int64_t rows = (p.n_out + chunks - 1) / chunks;
  s.chunk_rows = (rows + unit - 1) / unit * unit;
  return s;
}

// Rows16 weights: the ISA's rows16 kernels where it has them; otherwise the thread's
// rows are unpacked to GGUF rows in thread-local scratch, piece by piece, and handed to the
// usual kernel (one copy of the rows, small next to a matmat's per-token work).
void rows16_part(const MatmulParams& p, const MatArgs& a, int ith, int nth) {
  const KernelTable& t = table_for(active_isa());
  const int id = static_cast<int>(p.wtype);
  int64_t b, e;
  if (p.n_tokens < t.matmat_min_tokens && t.matvec_r16[id] != nullptr) {
    // Shared work: chunks of >= 64 KiB where the matrix allows. The kernels run passes of >= 2
    // tokens, so up to 2 * kPasses tokens fit the queue's counters.
    if (p.queue != nullptr && nth > 1 && p.n_tokens <= 2 * MatmulQueue::kPasses) {
      t.matvec_r16[id](shared_rows(a, p, nth, kRepackRows, (int64_t{64} << 10) / a.row_bytes),
                       0, p.n_out);
      return;
    }
    split_range(p.n_out, kRepackRows, ith, nth, &b, &e);
    if (b < e) t.matvec_r16[id](a, b, e);
    return;
  }
  if (p.n_tokens >= t.matmat_min_tokens && t.matmat_r16[id] != nullptr) {
    if (p.queue != nullptr && nth > 1) {  // chunks of whole 32-row panels
      t.matmat_r16[id](shared_rows(a, p, nth, 32, 128), 0, p.n_out);
      return;
    }
    split_range(p.n_out, 32, ith, nth, &b, &e);  // 32-row panels; the last may have 16
    if (b < e) t.matmat_r16[id](a, b, e);
    return;
  }
  int64_t grain = 1;
  const RowsFn fn = pick(p, &grain);
  split_range(p.n_out, std::max<int64_t>(kRepackRows, grain), ith, nth, &b, &e);
  // Pieces of up to 8 MiB of rows (a whole thread's share of most matrices): the kernels
  // prepare the activations once per call, which a many-token call must not repeat for every
  // 16 rows (that halved prefill speed; 1024-row pieces still cost ~8 %).
  const int64_t budget = std::max<int64_t>(kRepackRows, (int64_t{8} << 20) / a.row_bytes);
  const int64_t chunk = std::min<int64_t>(budget / kRepackRows * kRepackRows, e - b);
  thread_local std::vector<uint8_t> rows;
  if (chunk > 0) rows.resize(static_cast<size_t>(chunk * a.row_bytes));
  for (int64_t r = b; r < e; r += chunk) {
    const int64_t n = std::min(chunk, e - r);
    for (int64_t g = 0; g < n / kRepackRows; ++g) {
      unpack_rows16_group(p.wtype, p.w, p.k, r / kRepackRows + g,
                          rows.data() + g * kRepackRows * a.row_bytes);
    }
    MatArgs sub = a;
    sub.w = rows.data();
    sub.y = a.y + r;
    fn(sub, 0, n);
  }
}

int64_t weight_bytes(const MatmulParams& p) {
  return p.layout == WeightLayout::Rows16 ? repacked_size(p.wtype, p.n_out, p.k)
                                          : p.n_out * row_bytes_of(p.wtype, p.k);
}

}  // namespace

int64_t matmul_row_bytes(QType wtype, int64_t k) {
  check_matmul(MatmulParams{wtype, nullptr, 0, k, nullptr, 0, 0, nullptr, 0});
  return row_bytes_of(wtype, k);
}

int64_t matmat_min_tokens() { return table_for(active_isa()).matmat_min_tokens; }

bool matmul_has_rows16_kernel(QType wtype) {
  const uint32_t id = static_cast<uint32_t>(wtype);
  return id < static_cast<uint32_t>(kMaxTypeId) && repack_supported(wtype) &&
         table_for(active_isa()).matvec_r16[id] != nullptr;
}

std::vector<MatmulKernels> matmul_kernels(Isa isa) {
  if (!compiled(isa)) {
    throw std::invalid_argument(std::string("ISA ") + isa_name(isa) + " is not in this build");
  }
  const KernelTable& t = table_for(isa);
  std::vector<MatmulKernels> out;
  for (int id = 0; id < kMaxTypeId; ++id) {
    const MatmulKernels k{static_cast<QType>(id), t.matvec[id] != nullptr,
                          t.matmat[id] != nullptr, t.matvec_r16[id] != nullptr,
                          t.matmat_r16[id] != nullptr};
    if (k.matvec || k.matmat || k.matvec_r16 || k.matmat_r16) out.push_back(k);
  }
  return out;
}

bool matmul_supports(QType wtype) {
  Layout l{};
  return weight_layout(wtype, &l);
}

void check_matmul(const MatmulParams& p) {
  Layout l{};
  if (!weight_layout(p.wtype, &l)) {
    throw std::invalid_argument("matmul: unsupported weight type id " +
                                std::to_string(static_cast<uint32_t>(p.wtype)));
  }
  if (p.n_out < 0 || p.k < 0 || p.n_tokens < 0) {
    throw std::invalid_argument("matmul: negative size");
  }
  if (p.layout == WeightLayout::Rows16) {
    if (!repack_supported(p.wtype)) {
      throw std::invalid_argument("matmul: no rows16 layout for weight type id " +
                                  std::to_string(static_cast<uint32_t>(p.wtype)));
    }
    if (p.n_out % kRepackRows != 0) {
      throw std::invalid_argument("matmul: rows16 weights need n_out to be a multiple of 16");
    }
  } else if (p.layout != WeightLayout::Gguf) {
    throw std::invalid_argument("matmul: unknown weight layout");
  }
  if (p.k % l.block != 0) {
    throw std::invalid_argument("matmul: k = " + std::to_string(p.k) +
                                " is not a multiple of the block size " + std::to_string(l.block));
  }
  if ((p.ldx != 0 && p.ldx < p.k) || (p.ldy != 0 && p.ldy < p.n_out) || p.ldx < 0 || p.ldy < 0) {
    throw std::invalid_argument("matmul: row stride shorter than the row");
  }
  const bool empty = p.n_out == 0 || p.n_tokens == 0;
  if (!empty && (p.y == nullptr || (p.k > 0 && (p.w == nullptr || p.x == nullptr)))) {
    throw std::invalid_argument("matmul: null buffer");
  }
  if (!aligned_for<float>(p.x) || !aligned_for<float>(p.y)) {
    throw std::invalid_argument("matmul: activations and outputs must be 4-byte aligned floats");
  }
  if (p.k > (int64_t{1} << 40) || p.n_out > (int64_t{1} << 40) || p.n_tokens > (int64_t{1} << 40)) {
    throw std::invalid_argument("matmul: size out of range");
  }
}

void matmul_part(const MatmulParams& p, int ith, int nth) {
  if (p.n_out == 0 || p.n_tokens == 0) return;
  const MatArgs a = to_args(p, row_bytes_of(p.wtype, p.k));
  if (p.k == 0) {
    int64_t b, e;
    split_range(p.n_tokens, 1, ith, nth, &b, &e);
    for (int64_t t = b; t < e; ++t) {
      for (int64_t o = 0; o < p.n_out; ++o) a.y[t * a.ldy + o] = 0.0f;
    }
    return;
  }
  if (p.layout == WeightLayout::Rows16) {
    rows16_part(p, a, ith, nth);
    return;
  }
  int64_t grain = 1;
  const RowsFn fn = pick(p, &grain);
  int64_t b, e;
  split_range(p.n_out, grain, ith, nth, &b, &e);
  if (b < e) fn(a, b, e);
}

void matmul(const MatmulParams& p_in, ThreadPool& pool) {
  check_matmul(p_in);
  if (p_in.n_out == 0 || p_in.n_tokens == 0) return;
  MatmulParams p = p_in;
  // Block structs hold f16 fields (2-byte alignment) and F32 rows floats; a weight buffer at an
  // odd address (e.g. a byte slice from Python or C) is copied once rather than read misaligned.
  std::vector<uint8_t> aligned_copy;
  const bool w_ok = p.wtype == QType::F32 ? aligned_for<float>(p.w) : aligned_for<uint16_t>(p.w);
  if (!w_ok && p.k > 0) {
    const int64_t bytes = weight_bytes(p);
    aligned_copy.assign(static_cast<const uint8_t*>(p.w), static_cast<const uint8_t*>(p.w) + bytes);
    p.w = aligned_copy.data();
  }
  // Small problems are not worth waking the workers for.
  const double work = static_cast<double>(p.n_out) * static_cast<double>(p.k) *
                      static_cast<double>(p.n_tokens);
  if (work < 32768.0 || pool.n_threads() == 1) {
    matmul_part(p, 0, 1);
    return;
  }
  MatmulQueue queue;
  if (p.queue == nullptr) p.queue = &queue;
  pool.run([&](int ith, int nth) { matmul_part(p, ith, nth); });
}

void matmul(QType wtype, const void* w, int64_t n_out, int64_t k, const float* x, int64_t n_tokens,
            float* y, ThreadPool& pool) {
  matmul(MatmulParams{wtype, w, n_out, k, x, 0, n_tokens, y, 0}, pool);
}

}  // namespace pyllm
