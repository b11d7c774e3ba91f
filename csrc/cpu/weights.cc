// prepare_cpu_weights: the rows16 repack of the CPU's layers at load (see weights.h).
#include "cpu/weights.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define PYLLM_HAVE_MADVISE 1
#endif

#include "cpu/matmul.h"
#include "cpu/threadpool.h"
#include "pyllm/repack.h"

namespace pyllm {
namespace {

// Drops the whole pages inside [p, p + n) from this process's mapping (see ModelOptions).
void release_pages(const void* p, int64_t n) {
#ifdef PYLLM_HAVE_MADVISE
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(n)) / page * page;
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);  // advisory: ignore errors
#else
  (void)p;
  (void)n;
#endif
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// The rows16 copies: an arena of their own, or an earlier load's image (not owned: the caller
// keeps its mapping alive as long as the model).
class CpuWeights final : public WeightStore {
 public:
  int64_t bytes() const override { return image.bytes; }
  const RepackImage* repack_image() const override { return &image; }
  std::unique_ptr<uint8_t, FreeDeleter> arena;
  RepackImage image;
  std::vector<float> vectors;  // the layers' norm weights and biases (own_vectors)
};

// Norm weights and biases are read on every token: a few KB each, spread over the file, and
// each first read maps at least the 64 KB of file around it into the process (the kernel's
// fault-around; a whole page-cache folio, up to 2 MiB, where the kernel maps folios whole) --
// ~4 MB or more of a small model's file resident for ~140 KB of floats. With release_source
// they are copied here and their pages dropped, so nothing of the file stays resident (the
// context reads the embedding rows it looks up from the file: model/embedding_file.h).
void own_vectors(ModelWeights& weights, const std::vector<LayerRange>& ranges, bool head,
                 std::vector<float>& out) {
  std::vector<WeightView*> views;
  auto consider = [&](WeightView& w) {
    if (w.present() && w.type == QType::F32 && w.rows == 1 &&
        w.nbytes == w.cols * static_cast<int64_t>(sizeof(float))) {
      views.push_back(&w);
    }
  };
  for (const LayerRange& r : ranges) {
    for (int il = r.first; il < r.last; ++il) {
      LayerWeights& l = weights.layers[il];
      for (WeightView* w : {&l.attn_norm, &l.ffn_norm, &l.bq, &l.bk, &l.bv, &l.bo, &l.b_gate,
                            &l.b_up, &l.b_down}) {
        consider(*w);
      }
    }
  }
  if (head) consider(weights.output_norm);
  size_t total = 0;
  for (const WeightView* w : views) total += static_cast<size_t>(w->cols);
  out.resize(total);  // sized once: the views below point into it
  float* dst = out.data();
  for (WeightView* w : views) {
    std::memcpy(dst, w->data, static_cast<size_t>(w->nbytes));
    release_pages(w->data, w->nbytes);
    w->data = dst;
    dst += w->cols;
  }
}

// FNV-1a over 64-bit words: the plan's fingerprint (not a security boundary: the image's file
// name already binds it to one model file; this catches another layout or tensor set).
uint64_t mix(uint64_t h, uint64_t v) {
  for (int i = 0; i < 8; ++i) {
    h ^= (v >> (8 * i)) & 0xff;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace

std::unique_ptr<WeightStore> prepare_cpu_weights(ModelWeights& weights,
                                                 const std::vector<LayerRange>& ranges,
                                                 const ModelOptions& options) {
  auto store = std::make_unique<CpuWeights>();
  bool head = false;
  for (const LayerRange& r : ranges) head = head || r.head;
  if (options.release_source) own_vectors(weights, ranges, head, store->vectors);
  if (!options.repack) return store;
  std::vector<WeightView*> todo;
  auto consider = [&](WeightView& w) {
    if (w.present() && w.layout == WeightLayout::Gguf && w.rows % kRepackRows == 0 &&
        matmul_has_rows16_kernel(w.type)) {
      todo.push_back(&w);
    }
  };
  for (const LayerRange& r : ranges) {
    for (int il = r.first; il < r.last; ++il) {
      LayerWeights& l = weights.layers[il];
      for (WeightView* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) consider(*w);
    }
  }
  // A tied output (no output.weight) is also the embedding table, which is read by rows: the
  // output matmul gets its own rows16 copy and the lookups keep reading the GGUF's rows (from
  // the file, not the mapping, when the model has an EmbeddingFile).
  if (head) {
    if (!weights.output.present() && weights.tok_embd.rows % kRepackRows == 0 &&
        matmul_has_rows16_kernel(weights.tok_embd.type)) {
      weights.output = weights.tok_embd;
    }
    consider(weights.output);
  }
  if (todo.empty()) return store;
  // One arena for all copies, in 2 MiB transparent huge pages where the kernel allows: a
  // fraction of the page faults and zeroing work at load, and fewer TLB misses while streaming.
  std::vector<int64_t> offset;
  int64_t total = 0;
  uint64_t plan = mix(0xcbf29ce484222325ULL, kRepackLayoutVersion);
  for (WeightView* w : todo) {
    offset.push_back(total);
    for (int64_t v : {static_cast<int64_t>(w->type), w->rows, w->cols, total}) {
      plan = mix(plan, static_cast<uint64_t>(v));
    }
    total += (repacked_size(w->type, w->rows, w->cols) + 63) / 64 * 64;
  }
  plan = mix(plan, static_cast<uint64_t>(total));
  store->image.plan = plan;
  store->image.bytes = total;
  if (options.repack_image != nullptr && options.repack_image_plan == plan &&
      options.repack_image_bytes == total &&
      reinterpret_cast<uintptr_t>(options.repack_image) % 64 == 0) {
    // An earlier load's copies of these very tensors: point at them; the source pages are
    // never touched (nothing to release).
    for (size_t i = 0; i < todo.size(); ++i) {
      WeightView* w = todo[i];
      w->data = options.repack_image + offset[i];
      w->nbytes = repacked_size(w->type, w->rows, w->cols);
      w->layout = WeightLayout::Rows16;
    }
    store->image.data = options.repack_image;
    store->image.reused = true;
    return store;
  }
  constexpr int64_t kHuge = int64_t{1} << 21;
  uint8_t* arena = static_cast<uint8_t*>(
      std::aligned_alloc(static_cast<size_t>(kHuge), static_cast<size_t>((total + kHuge - 1) / kHuge * kHuge)));
  if (arena == nullptr) throw std::bad_alloc();
  store->arena.reset(arena);
  store->image.data = arena;
#if defined(PYLLM_HAVE_MADVISE) && defined(MADV_HUGEPAGE)
  madvise(arena, static_cast<size_t>((total + kHuge - 1) / kHuge * kHuge), MADV_HUGEPAGE);
#endif
  ThreadPool pool(options.n_threads);
  for (size_t i = 0; i < todo.size(); ++i) {
    WeightView* w = todo[i];
    const int64_t bytes = repacked_size(w->type, w->rows, w->cols);
    uint8_t* dst = arena + offset[i];
    const WeightView src = *w;
    pool.parallel_for(src.rows / kRepackRows, 1, [&](int64_t g0, int64_t g1) {
      repack_rows16(src.type, src.data, src.cols, g0, g1, dst);
    });
    if (options.release_source) release_pages(src.data, src.nbytes);
    w->data = dst;
    w->nbytes = bytes;
    w->layout = WeightLayout::Rows16;
  }
  return store;
}

}  // namespace pyllm
