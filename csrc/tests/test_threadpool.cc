// C++ tests of the thread pool: every share of a job runs exactly once (share 0 on the caller),
// barriers order dependent steps, parallel_for covers a range exactly once, exceptions reach
// the caller, nested run() does not deadlock, concurrent callers are serialized, thousands of
// back-to-back jobs (the decode pattern) complete, also with far more threads than CPUs; jobs
// complete while every worker is stopped (the caller takes their shares); the default thread
// count stays within the process's CPU affinity. Exit status 0 = pass (csrc/tests/run.sh runs
// it under a timeout, so a deadlock fails too).
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cpu/cpu.h"
#include "cpu/threadpool.h"
#include "tests/check.h"

using namespace pyllm;

namespace {

void check_pool(int n, int jobs = 500) {
  ThreadPool pool(n);
  CHECK(pool.n_threads() == n, "n_threads %d != %d", pool.n_threads(), n);

  // Each share appears exactly once per job, and the caller runs share 0.
  std::vector<std::atomic<int>> seen(n);
  const std::thread::id caller = std::this_thread::get_id();
  bool share0_on_caller = false;
  pool.run([&](int ith, int nth) {
    CHECK(nth == n, "nth %d", nth);
    seen[ith].fetch_add(1);
    if (ith == 0) share0_on_caller = std::this_thread::get_id() == caller;
  });
  for (int i = 0; i < n; ++i) CHECK(seen[i].load() == 1, "share %d ran %d times", i, seen[i].load());
  CHECK(share0_on_caller, "share 0 did not run on the caller");

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

  // Many tiny jobs back to back, and two external threads sharing the pool; every share of
  // every job runs exactly once (a share taken twice or skipped shows in the per-share sums).
  std::vector<std::atomic<int64_t>> per_share(n);
  auto hammer = [&] {
    for (int i = 0; i < jobs; ++i) pool.run([&](int ith, int) { per_share[ith].fetch_add(1); });
  };
  std::thread other(hammer);
  hammer();
  other.join();
  for (int i = 0; i < n; ++i) {
    CHECK(per_share[i].load() == 2 * jobs, "share %d ran %lld times of %d", i,
          static_cast<long long>(per_share[i].load()), 2 * jobs);
  }
}

// Parks a worker: the signal handler blocks on a pipe until the test writes to it. Only
// async-signal-safe calls (read/write) in the handler.
int g_parked_pipe[2];
int g_release_pipe[2];

void park_handler(int) {
  char c = 'p';
  if (write(g_parked_pipe[1], &c, 1) != 1) _exit(3);
  if (read(g_release_pipe[0], &c, 1) != 1) _exit(3);
}

// Every worker stopped (the way a descheduled thread is, but for as long as the test wants):
// jobs must still complete, on the caller alone, each share exactly once. The old pool, where
// each share belonged to one worker, waited here forever.
void check_stopped_workers(int n) {
  ThreadPool pool(n);
  // Learn the workers' thread handles: in a job with a barrier every share has its own thread.
  std::vector<pthread_t> handles(n);
  pool.run([&](int ith, int) {
    handles[ith] = pthread_self();
    pool.barrier();
  });
  const pthread_t self = pthread_self();
  int stopped = 0;
  for (int i = 0; i < n; ++i) {
    if (pthread_equal(handles[i], self)) continue;
    CHECK(pthread_kill(handles[i], SIGUSR1) == 0, "pthread_kill");
    ++stopped;
  }
  CHECK(stopped == n - 1, "%d workers found of %d", stopped, n - 1);
  for (int i = 0; i < stopped; ++i) {
    char c;
    CHECK(read(g_parked_pipe[0], &c, 1) == 1, "park ack");
  }
  // All workers are parked now. Barrier-free jobs of every kind the forward pass uses.
  constexpr int kJobs = 2000;
  std::vector<std::atomic<int64_t>> per_share(n);
  std::atomic<int> off_caller{0};
  for (int j = 0; j < kJobs; ++j) {
    pool.run([&](int ith, int) {
      per_share[ith].fetch_add(1);
      if (!pthread_equal(pthread_self(), self)) off_caller.fetch_add(1);
    });
  }
  for (int i = 0; i < n; ++i) {
    CHECK(per_share[i].load() == kJobs, "stopped workers: share %d ran %lld times of %d", i,
          static_cast<long long>(per_share[i].load()), kJobs);
  }
  CHECK(off_caller.load() == 0, "%d shares ran on a stopped worker", off_caller.load());
  std::vector<std::atomic<int>> hits(1000);
  pool.parallel_for(1000, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
  });
  for (int i = 0; i < 1000; ++i) CHECK(hits[i].load() == 1, "item %d hit %d times", i, hits[i].load());

  // Wake them up: the pool is whole again, barriers included.
  for (int i = 0; i < stopped; ++i) {
    char c = 'r';
    CHECK(write(g_release_pipe[1], &c, 1) == 1, "release");
  }
  std::vector<int> slots(n, -1);
  std::atomic<int> bad{0};
  pool.run([&](int ith, int nth) {
    for (int phase = 0; phase < 50; ++phase) {
      slots[ith] = phase;
      pool.barrier();
      for (int k = 0; k < nth; ++k) {
        if (slots[k] != phase) bad.fetch_add(1);
      }
      pool.barrier();
    }
  });
  CHECK(bad.load() == 0, "barrier after release let %d reads through early", bad.load());
}

// The default thread count never exceeds the CPUs this process may run on.
void check_affinity_cap() {
  CHECK(available_cpus() >= 1, "available_cpus %d", available_cpus());
  CHECK(default_thread_count() <= available_cpus(), "default %d > available %d",
        default_thread_count(), available_cpus());
  cpu_set_t old_set;
  CHECK(sched_getaffinity(0, sizeof(old_set), &old_set) == 0, "sched_getaffinity");
  int first = -1;
  for (int c = 0; c < CPU_SETSIZE && first < 0; ++c) {
    if (CPU_ISSET(c, &old_set)) first = c;
  }
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  CHECK(sched_setaffinity(0, sizeof(one), &one) == 0, "sched_setaffinity");
  CHECK(available_cpus() == 1, "pinned to one CPU: available_cpus %d", available_cpus());
  CHECK(default_thread_count() == 1, "pinned to one CPU: default_thread_count %d",
        default_thread_count());
  {
    // A pool asked for more threads than that still works (here: 16 threads on one CPU).
    ThreadPool pool(16);
    std::vector<std::atomic<int64_t>> per_share(16);
    for (int j = 0; j < 300; ++j) {
      pool.run([&](int ith, int) {
        per_share[ith].fetch_add(1);
        pool.barrier();
      });
    }
    for (int i = 0; i < 16; ++i) CHECK(per_share[i].load() == 300, "1 CPU: share %d ran %lld",
                                       i, static_cast<long long>(per_share[i].load()));
  }
  CHECK(sched_setaffinity(0, sizeof(old_set), &old_set) == 0, "restore affinity");
}

}  // namespace

int main() {
  for (int n : {1, 2, 3, 5}) check_pool(n);
  // Far more threads than CPUs (2 in CI): correct, and it does not livelock.
  check_pool(8 * available_cpus(), 200);
  check_pool(64, 50);

  struct sigaction sa = {};
  sa.sa_handler = park_handler;
  sigemptyset(&sa.sa_mask);
  if (pipe(g_parked_pipe) != 0 || pipe(g_release_pipe) != 0 ||
      sigaction(SIGUSR1, &sa, nullptr) != 0) {
    std::printf("FAIL: cannot set up the parking signal\n");
    return 1;
  }
  for (int n : {2, 4, 9}) check_stopped_workers(n);
  check_affinity_cap();
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
  return pyllm::testing::test_exit_status();
}
