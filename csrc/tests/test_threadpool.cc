// C++ tests of the thread pool: every thread runs each job once, barriers order dependent
// steps, parallel_for covers a range exactly once, exceptions reach the caller, nested run()
// does not deadlock, concurrent callers are serialized, and thousands of back-to-back jobs
// (the decode pattern) complete. Exit status 0 = pass.
#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <thread>
#include <vector>

#include "pyllm/threadpool.h"

using namespace pyllm;

namespace {

int g_failures = 0;

#define CHECK(cond, ...)                               \
  do {                                                 \
    if (!(cond)) {                                     \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
      ++g_failures;                                    \
    }                                                  \
  } while (0)

void check_pool(int n) {
  ThreadPool pool(n);
  CHECK(pool.n_threads() == n, "n_threads %d != %d", pool.n_threads(), n);

  // Each thread id appears exactly once per job.
  std::vector<std::atomic<int>> seen(n);
  pool.run([&](int ith, int nth) {
    CHECK(nth == n, "nth %d", nth);
    seen[ith].fetch_add(1);
  });
  for (int i = 0; i < n; ++i) CHECK(seen[i].load() == 1, "thread %d ran %d times", i, seen[i].load());

  // Barriers: phase p writes, phase p+1 reads every other thread's write.
  std::vector<int> slots(n, -1);
  std::atomic<int> bad{0};
  pool.run([&](int ith, int nth) {
    for (int phase = 0; phase < 200; ++phase) {
      slots[ith] = phase;
      pool.barrier();
      for (int j = 0; j < nth; ++j) {
        if (slots[j] != phase) bad.fetch_add(1);
      }
      pool.barrier();
    }
  });
  CHECK(bad.load() == 0, "barrier let %d reads through early", bad.load());

  // parallel_for covers [0, n) exactly once, with grain-aligned boundaries.
  for (int64_t count : {0, 1, 7, 64, 1000, 1001}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(count));
    pool.parallel_for(count, 8, [&](int64_t b, int64_t e) {
      CHECK(b % 8 == 0, "range start %lld not aligned", static_cast<long long>(b));
      for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
    });
    for (int64_t i = 0; i < count; ++i) CHECK(hits[i].load() == 1, "item %lld hit %d times",
                                             static_cast<long long>(i), hits[i].load());
  }

  // An exception on a worker (or the caller) reaches the caller; the pool stays usable.
  bool caught = false;
  try {
    pool.run([&](int ith, int nth) {
      if (ith == nth - 1) throw std::runtime_error("boom");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  CHECK(caught, "exception not propagated");

  // Nested run from inside a job runs inline (single thread), barrier inside it is a no-op.
  std::atomic<int> inner{0};
  pool.run([&](int, int) {
    pool.run([&](int ith, int nth) {
      CHECK(ith == 0 && nth == 1, "nested run got %d/%d", ith, nth);
      pool.barrier();
      inner.fetch_add(1);
    });
  });
  CHECK(inner.load() == n, "nested runs %d", inner.load());

  // Many tiny jobs back to back, and two external threads sharing the pool.
  std::atomic<int64_t> total{0};
  auto hammer = [&] {
    for (int i = 0; i < 500; ++i) pool.run([&](int, int) { total.fetch_add(1); });
  };
  std::thread other(hammer);
  hammer();
  other.join();
  CHECK(total.load() == 2 * 500 * static_cast<int64_t>(n), "jobs ran %lld times",
        static_cast<long long>(total.load()));
}

}  // namespace

int main() {
  for (int n : {1, 2, 3, 5}) check_pool(n);
  CHECK(default_thread_count() >= 1, "default_thread_count");
  set_default_pool_threads(3);
  CHECK(default_pool().n_threads() == 3, "default pool resize");
  std::shared_ptr<ThreadPool> held = default_pool_shared();
  set_default_pool_threads(2);  // the held pool stays alive
  held->run([](int, int) {});
  CHECK(default_pool().n_threads() == 2, "default pool resize while held");
  bool rejected = false;
  try {
    ThreadPool too_many(ThreadPool::kMaxThreads + 1);
  } catch (const std::invalid_argument&) {
    rejected = true;
  }
  CHECK(rejected, "absurd thread count accepted");
  std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "OK", g_failures);
  return g_failures ? 1 : 0;
}
