// C-level kernel benchmark: matrix x vector (GB/s of weights streamed) and matrix x matrix
// (GOP/s, 2 ops per multiply-add) for each weight type and ISA, with 1 and N threads.
//
//   bench_kernels [--types Q4_0,Q4_K,...] [--isa avx512,...] [--threads N] [--rows 5632]
//                 [--k 2048] [--tokens 512] [--min-time 0.3] [--no-matmat] [--no-matvec]
//                 [--rows16]   (weights repacked into the interleaved layout models load into)
//
// Weights are random blocks with finite scales; timings are the median of repeated runs lasting
// at least --min-time seconds in total. The matrix is 2048 x 5632 by default (TinyLlama's FFN),
// which fits in a large L3: numbers for a warm cache are what decoding a small model sees.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <ctime>
#include <memory>
#include <vector>

#include <sys/mman.h>

#include "cpu/cpu.h"
#include "cpu/matmul.h"
#include "cpu/threadpool.h"
#include "pyllm/fp16.h"
#include "pyllm/quant.h"

using namespace pyllm;

namespace {

struct TypeGeom {
  QType type;
  const char* name;
  int block, bytes;
  std::vector<int> halves;  // f16 scale fields inside a block
};

const std::vector<TypeGeom>& all_types() {
  static const std::vector<TypeGeom> t = {
      {QType::F32, "F32", 1, 4, {}},
      {QType::F16, "F16", 1, 2, {0}},
      {QType::BF16, "BF16", 1, 2, {}},
      {QType::Q4_0, "Q4_0", 32, sizeof(BlockQ4_0), {0}},
      {QType::Q4_1, "Q4_1", 32, sizeof(BlockQ4_1), {0, 2}},
      {QType::Q5_0, "Q5_0", 32, sizeof(BlockQ5_0), {0}},
      {QType::Q5_1, "Q5_1", 32, sizeof(BlockQ5_1), {0, 2}},
      {QType::Q8_0, "Q8_0", 32, sizeof(BlockQ8_0), {0}},
      {QType::Q2_K, "Q2_K", 256, sizeof(BlockQ2_K), {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)}},
      {QType::Q3_K, "Q3_K", 256, sizeof(BlockQ3_K), {offsetof(BlockQ3_K, d)}},
      {QType::Q4_K, "Q4_K", 256, sizeof(BlockQ4_K), {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)}},
      {QType::Q5_K, "Q5_K", 256, sizeof(BlockQ5_K), {offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)}},
      {QType::Q6_K, "Q6_K", 256, sizeof(BlockQ6_K), {offsetof(BlockQ6_K, d)}},
      {QType::IQ4_NL, "IQ4_NL", 32, sizeof(BlockIQ4_NL), {offsetof(BlockIQ4_NL, d)}},
      {QType::IQ4_XS, "IQ4_XS", 256, sizeof(BlockIQ4_XS), {offsetof(BlockIQ4_XS, d)}},
      {QType::IQ2_XXS, "IQ2_XXS", 256, sizeof(BlockIQ2_XXS), {offsetof(BlockIQ2_XXS, d)}},
      {QType::IQ2_XS, "IQ2_XS", 256, sizeof(BlockIQ2_XS), {offsetof(BlockIQ2_XS, d)}},
      {QType::IQ2_S, "IQ2_S", 256, sizeof(BlockIQ2_S), {offsetof(BlockIQ2_S, d)}},
      {QType::IQ3_XXS, "IQ3_XXS", 256, sizeof(BlockIQ3_XXS), {offsetof(BlockIQ3_XXS, d)}},
      {QType::IQ3_S, "IQ3_S", 256, sizeof(BlockIQ3_S), {offsetof(BlockIQ3_S, d)}},
      {QType::IQ1_S, "IQ1_S", 256, sizeof(BlockIQ1_S), {offsetof(BlockIQ1_S, d)}},
      {QType::IQ1_M, "IQ1_M", 256, sizeof(BlockIQ1_M), {}},  // d spread over its scale words
      {QType::TQ1_0, "TQ1_0", 256, sizeof(BlockTQ1_0), {offsetof(BlockTQ1_0, d)}},
      {QType::TQ2_0, "TQ2_0", 256, sizeof(BlockTQ2_0), {offsetof(BlockTQ2_0, d)}},
  };
  return t;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

std::vector<uint8_t> random_weights(const TypeGeom& g, int64_t rows, int64_t k) {
  std::mt19937 rng(42);
  const int64_t n_blocks = rows * (k / g.block);
  std::vector<uint8_t> w(static_cast<size_t>(n_blocks * g.bytes));
  for (auto& b : w) b = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> val(-1.0f, 1.0f);
  for (int64_t i = 0; i < n_blocks; ++i) {
    uint8_t* blk = w.data() + i * g.bytes;
    if (g.type == QType::F32) {
      const float f = val(rng);
      std::memcpy(blk, &f, 4);
    } else if (g.type == QType::BF16) {
      const bf16_t h = f32_to_bf16(val(rng));
      std::memcpy(blk, &h, 2);
    }
    for (int off : g.halves) {
      const f16_t h = f32_to_f16(val(rng) * 0.05f);
      std::memcpy(blk + off, &h, 2);
    }
    if (g.type == QType::IQ1_M) {  // nibble w of d is the top nibble of scale word w
      const f16_t h = f32_to_f16(val(rng) * 0.05f);
      uint8_t* sc = blk + offsetof(BlockIQ1_M, scales);
      for (int j = 0; j < 4; ++j) {
        const int top = ((h >> (4 * j)) & 0xF) << 4;
        sc[2 * j + 1] = static_cast<uint8_t>((sc[2 * j + 1] & 0x0F) | top);
      }
    }
  }
  return w;
}

double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Timing {
  double wall;  // median wall seconds per call
  double cpu;   // process CPU seconds per call / threads: what an unloaded machine would take
};

// Times fn over runs totalling at least min_time. On a shared machine the wall time includes
// waiting for a core; CPU time per thread does not (spinning workers count as busy, so it never
// flatters the multi-threaded case).
template <class Fn>
Timing time_it(Fn fn, double min_time, int threads) {
  fn();  // warm-up (page faults, thread wake-up, thread_local scratch)
  std::vector<double> times;
  double total = 0.0;
  const double c0 = cpu_seconds();
  while (total < min_time || times.size() < 3) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    times.push_back(dt);
    total += dt;
    if (times.size() >= 1000) break;
  }
  const double cpu = (cpu_seconds() - c0) / static_cast<double>(times.size()) / threads;
  std::sort(times.begin(), times.end());
  return {times[times.size() / 2], cpu};
}

}  // namespace

int main(int argc, char** argv) {
  std::string types_arg, isa_arg;
  int n_threads = default_thread_count();
  int64_t rows = 5632, k = 2048, tokens = 512;
  double min_time = 0.3;
  bool do_matvec = true, do_matmat = true, rows16 = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--types") types_arg = next();
    else if (a == "--isa") isa_arg = next();
    else if (a == "--threads") n_threads = std::atoi(next().c_str());
    else if (a == "--rows") rows = std::atoll(next().c_str());
    else if (a == "--k") k = std::atoll(next().c_str());
    else if (a == "--tokens") tokens = std::atoll(next().c_str());
    else if (a == "--min-time") min_time = std::atof(next().c_str());
    else if (a == "--no-matvec") do_matvec = false;
    else if (a == "--no-matmat") do_matmat = false;
    else if (a == "--rows16") rows16 = true;
    else {
      std::fprintf(stderr, "usage: %s [--types A,B] [--isa a,b] [--threads N] [--rows R] [--k K] "
                   "[--tokens T] [--min-time S] [--no-matvec] [--no-matmat] [--rows16]\n", argv[0]);
      return 2;
    }
  }
  std::vector<Isa> isas;
  if (isa_arg.empty()) {
    isas = available_isas();
  } else {
    for (const std::string& s : split(isa_arg)) isas.push_back(parse_isa(s));
  }
  std::vector<TypeGeom> types;
  for (const TypeGeom& g : all_types()) {
    const std::vector<std::string> want = split(types_arg);
    if (want.empty() || std::find(want.begin(), want.end(), g.name) != want.end()) types.push_back(g);
  }
  std::vector<int> thread_counts = {1};
  if (n_threads > 1) thread_counts.push_back(n_threads);

  std::printf("matrix %lld x %lld (rows x k), matmat tokens %lld\n", static_cast<long long>(rows),
              static_cast<long long>(k), static_cast<long long>(tokens));
  std::printf("wall = median wall time; cpu = process CPU time per thread (unloaded estimate)\n");
  std::printf("%-9s %-7s %3s %9s %9s %9s %9s %9s %9s\n", "type", "isa", "thr", "mv_us",
              "mv_GB/s", "cpuGB/s", "mm_ms", "mm_GOP/s", "cpuGOP/s");
  std::vector<float> x(static_cast<size_t>(tokens * k));
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : x) v = nd(rng);
  std::vector<float> y(static_cast<size_t>(tokens * rows));
  for (const TypeGeom& g : types) {
    if (k % g.block != 0) continue;
    const std::vector<uint8_t> w = random_weights(g, rows, k);
    std::unique_ptr<uint8_t, void (*)(void*)> packed(nullptr, std::free);
    MatmulParams base{g.type, nullptr, rows, k, x.data(), 0, 1, y.data(), 0};
    std::string name = g.name;
    if (rows16) {  // the interleaved layout the model loads its matrices into
      if (!repack_supported(g.type) || rows % kRepackRows != 0) continue;
      // In 2 MiB transparent huge pages, as the model allocates its rows16 arena.
      const size_t n = static_cast<size_t>(repacked_size(g.type, rows, k));
      const size_t huge = size_t{1} << 21;
      packed.reset(static_cast<uint8_t*>(std::aligned_alloc(huge, (n + huge - 1) / huge * huge)));
#ifdef MADV_HUGEPAGE
      madvise(packed.get(), (n + huge - 1) / huge * huge, MADV_HUGEPAGE);
#endif
      repack_rows16(g.type, w.data(), k, 0, rows / kRepackRows, packed.get());
      base.layout = WeightLayout::Rows16;
      name += "/r16";
    }
    base.w = rows16 ? static_cast<const void*>(packed.get()) : w.data();
    for (Isa isa : isas) {
      if (!isa_available(isa)) continue;
      set_active_isa(isa);
      for (int nt : thread_counts) {
        ThreadPool pool(nt);
        Timing mv{NAN, NAN}, mm{NAN, NAN};
        if (do_matvec) {
          mv = time_it([&] { matmul(base, pool); }, min_time, nt);
        }
        if (do_matmat) {
          MatmulParams p = base;
          p.n_tokens = tokens;
          mm = time_it([&] { matmul(p, pool); }, min_time, nt);
        }
        const double bytes = static_cast<double>(w.size());
        const double ops = 2.0 * static_cast<double>(rows) * static_cast<double>(k) *
                           static_cast<double>(tokens);
        std::printf("%-9s %-7s %3d %9.1f %9.2f %9.2f %9.2f %9.1f %9.1f\n", name.c_str(), isa_name(isa),
                    nt, mv.wall * 1e6, bytes / mv.wall / 1e9, bytes / mv.cpu / 1e9,
                    mm.wall * 1e3, ops / mm.wall / 1e9, ops / mm.cpu / 1e9);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
