// Model: checks the hyper-parameters and every weight view against each other before any
// forward pass may read them (defence in depth behind the Python-side GGUF validation), and
// owns the rows16 copies of the matrices it repacks at load.
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define PYLLM_HAVE_MADVISE 1
#endif

#include "pyllm/matmul.h"
#include "pyllm/model.h"
#include "pyllm/quant.h"
#include "pyllm/threadpool.h"

namespace pyllm {
namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// `where` names the slot ("layer 3 wq") for a tensor that is missing or has no name of its own.
void check_weight(const WeightView& w, const std::string& where, int64_t cols, int64_t rows,
                  bool required, bool f32_only = false) {
  if (!w.present()) {
    if (required) fail("missing tensor for " + where);
    return;
  }
  const std::string& name = w.name.empty() ? where : w.name;
  const TypeTraits* tt = find_type_traits(static_cast<uint32_t>(w.type));
  if (!tt || !tt->is_weight) fail(name + ": unsupported tensor type id " +
                                  std::to_string(static_cast<uint32_t>(w.type)));
  if (f32_only && w.type != QType::F32) fail(name + ": expected an F32 tensor, got " + tt->name);
  if (w.cols != cols || w.rows != rows) {
    fail(name + ": shape " + std::to_string(w.cols) + "x" + std::to_string(w.rows) +
         ", expected " + std::to_string(cols) + "x" + std::to_string(rows));
  }
  if (w.nbytes != tensor_size(w.type, rows, cols)) {
    fail(name + ": " + std::to_string(w.nbytes) + " bytes do not match its shape and type");
  }
}

}  // namespace

Model::Model(const HParams& hp, ModelWeights weights, const ModelOptions& options)
    : hp_(hp), w_(std::move(weights)) {
  if (hp.n_vocab <= 0 || hp.n_embd <= 0 || hp.n_layer <= 0 || hp.n_head <= 0 ||
      hp.n_head_kv <= 0 || hp.head_dim <= 0 || hp.n_ff <= 0) {
    fail("hyper-parameters must be positive");
  }
  if (hp.n_head % hp.n_head_kv) fail("n_head must be a multiple of n_head_kv");
  if (hp.n_rot <= 0 || hp.n_rot > hp.head_dim || hp.n_rot % 2) {
    fail("rope dimension count must be even and within the head size");
  }
  if (hp.head_dim > 512) fail("head sizes above 512 are not supported");
  if (!(hp.rms_eps > 0.0f) || !(hp.rope_base > 0.0f)) fail("rms_eps and rope base must be > 0");
  if (hp.rope_scaling != RopeScaling::None && !(hp.rope_factor > 0.0f)) {
    fail("rope scaling factor must be > 0");
  }
  if (static_cast<int>(w_.layers.size()) != hp.n_layer) fail("layer count mismatch");

  const int64_t d = hp.n_embd, q_dim = int64_t(hp.n_head) * hp.head_dim;
  const int64_t kv_dim = int64_t(hp.n_head_kv) * hp.head_dim;
  check_weight(w_.tok_embd, "tok_embd", d, hp.n_vocab, true);
  check_weight(w_.output_norm, "output_norm", d, 1, true, true);
  check_weight(w_.output, "output", d, hp.n_vocab, false);
  check_weight(w_.rope_freqs, "rope_freqs", hp.n_rot / 2, 1, false, true);
  for (int i = 0; i < hp.n_layer; ++i) {
    const LayerWeights& l = w_.layers[i];
    const std::string p = "layer " + std::to_string(i) + " ";
    check_weight(l.attn_norm, p + "attn_norm", d, 1, true, true);
    check_weight(l.wq, p + "wq", d, q_dim, true);
    check_weight(l.wk, p + "wk", d, kv_dim, true);
    check_weight(l.wv, p + "wv", d, kv_dim, true);
    check_weight(l.wo, p + "wo", q_dim, d, true);
    check_weight(l.bq, p + "bq", q_dim, 1, false, true);
    check_weight(l.bk, p + "bk", kv_dim, 1, false, true);
    check_weight(l.bv, p + "bv", kv_dim, 1, false, true);
    check_weight(l.bo, p + "bo", d, 1, false, true);
    check_weight(l.b_gate, p + "b_gate", hp.n_ff, 1, false, true);
    check_weight(l.b_up, p + "b_up", hp.n_ff, 1, false, true);
    check_weight(l.b_down, p + "b_down", d, 1, false, true);
    check_weight(l.ffn_norm, p + "ffn_norm", d, 1, true, true);
    check_weight(l.w_gate, p + "w_gate", d, hp.n_ff, true);
    check_weight(l.w_up, p + "w_up", d, hp.n_ff, true);
    check_weight(l.w_down, p + "w_down", hp.n_ff, d, true);
  }
  if (options.repack) repack(options);
}

Model::~Model() {
  for (void* p : owned_) std::free(p);
}

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

}  // namespace

void Model::repack(const ModelOptions& options) {
  std::vector<WeightView*> todo;
  auto consider = [&](WeightView& w) {
    if (w.present() && w.layout == WeightLayout::Gguf && w.rows % kRepackRows == 0 &&
        matmul_has_rows16_kernel(w.type)) {
      todo.push_back(&w);
    }
  };
  for (LayerWeights& l : w_.layers) {
    for (WeightView* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) consider(*w);
  }
  // A tied output (no output.weight) is also the embedding table, which is read by rows: the
  // output matmul gets its own rows16 copy and the lookups keep reading the GGUF rows (with
  // release_source only the rows of tokens actually seen come back into memory).
  if (!w_.output.present() && w_.tok_embd.rows % kRepackRows == 0 &&
      matmul_has_rows16_kernel(w_.tok_embd.type)) {
    w_.output = w_.tok_embd;
  }
  consider(w_.output);
  if (todo.empty()) return;
  // One arena for all copies, in 2 MiB transparent huge pages where the kernel allows: a
  // fraction of the page faults and zeroing work at load, and fewer TLB misses while streaming.
  std::vector<int64_t> offset;
  int64_t total = 0;
  for (WeightView* w : todo) {
    offset.push_back(total);
    total += (repacked_size(w->type, w->rows, w->cols) + 63) / 64 * 64;
  }
  constexpr int64_t kHuge = int64_t{1} << 21;
  uint8_t* arena = static_cast<uint8_t*>(
      std::aligned_alloc(static_cast<size_t>(kHuge), static_cast<size_t>((total + kHuge - 1) / kHuge * kHuge)));
  if (arena == nullptr) throw std::bad_alloc();
  owned_.push_back(arena);
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
    repacked_bytes_ += bytes;
  }
}

}  // namespace pyllm
