// Owns the persistent thread pool: worker lifecycle, job hand-off, the waits (bounded spin, then
// yield, then sleep) and the process-wide default pool.
//
// Hand-off protocol: run() publishes the job pointer and then a new `claim_` word (generation in
// the high bits, next unclaimed share in the low bits, share 0 reserved for the caller). Any
// thread that sees the new generation claims shares with one fetch_add each and runs them;
// `done` counts finished shares and the caller returns when all nth are done. Shares are not
// tied to threads: the caller, after its own share 0, takes every share nobody has claimed yet,
// and so does a worker after finishing one. So when a worker is descheduled (a busy neighbour on
// its core, more threads than CPUs) the threads that do run finish the job instead of waiting a
// whole time slice for it. barrier() still works: no thread finishes a share of a job with
// barriers before every share has reached the last barrier, i.e. before all shares are claimed,
// so no thread ever holds two shares of such a job at once.
//
// Every wait spins briefly (a decode step is a few hundred jobs of ~10-100 us, so a sleeping
// hand-off would cost more than the work), then yields the CPU (to whatever else is runnable on
// this core, e.g. the peer thread we wait for), then sleeps (a futex on Linux; so an idle pool,
// or an oversubscribed machine, burns no CPU).
#include "cpu/threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu/cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYLLM_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define PYLLM_CPU_RELAX() __asm__ __volatile__("yield")
#else
#define PYLLM_CPU_RELAX() ((void)0)
#endif

namespace pyllm {
namespace {

// A waiter first spins this many CPU-relax iterations (a pause is ~25-50 ns on the Zen4 dev box,
// so ~25-50 us: longer than the gap between two kernels of a decode step, shorter than a
// scheduler time slice) ...
constexpr int kSpinIters = 1024;
// ... then yields this many times (each ~2 us when nothing else wants the core; when something
// does, e.g. the descheduled peer we wait for, it runs instead) and then sleeps.
constexpr int kYields = 16;

// Bits of the claim word that hold the next share (the rest is the job generation). A share
// index only grows past nth by one failed claim per thread per job, far below 2^20.
constexpr int kShareBits = 20;
constexpr uint64_t kShareMask = (uint64_t{1} << kShareBits) - 1;

// Spin, then yield, then sleep until ready() holds. notify_*() must be called after every
// change that can make a sleeper's predicate true. A sleeper count spares the notifier the
// system call when nobody sleeps; both sides use seq_cst: either the notifier sees sleepers > 0,
// or the sleeper's predicate check sees the new state.
//
// On Linux the sleep is a futex on an epoch counter the notifier bumps: no lock anywhere, so a
// thread stopped at any point (preempted, or stopped by a signal handler as in the tests) never
// blocks another one. Elsewhere a mutex + condition variable.
struct Waiter {
  std::atomic<int> sleepers{0};
#if defined(__linux__)
  std::atomic<uint32_t> epoch{0};
  static_assert(sizeof(std::atomic<uint32_t>) == 4 && std::atomic<uint32_t>::is_always_lock_free,
                "the futex word must be a plain 32-bit integer");
#else
  std::mutex mu;
  std::condition_variable cv;
#endif

  template <class Pred>
  void wait(Pred ready) {
    if (ready()) return;
    for (int i = 0; i < kSpinIters; ++i) {
      PYLLM_CPU_RELAX();
      if (ready()) return;
    }
    for (int i = 0; i < kYields; ++i) {
      std::this_thread::yield();
      if (ready()) return;
    }
#if defined(__linux__)
    sleepers.fetch_add(1);
    for (;;) {
      const uint32_t e = epoch.load();
      if (ready()) break;
      // Returns at once if a notify bumped the epoch after we read it (EAGAIN); spurious
      // returns (EINTR) just loop.
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&epoch), FUTEX_WAIT_PRIVATE, e, nullptr,
              nullptr, 0);
    }
    sleepers.fetch_sub(1);
#else
    std::unique_lock<std::mutex> lk(mu);
    sleepers.fetch_add(1);
    cv.wait(lk, ready);
    sleepers.fetch_sub(1);
#endif
  }

  void notify(int n) {
#if defined(__linux__)
    epoch.fetch_add(1);
    if (sleepers.load() > 0) {
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&epoch), FUTEX_WAKE_PRIVATE, n, nullptr,
              nullptr, 0);
    }
#else
    if (sleepers.load() > 0) {
      { std::lock_guard<std::mutex> lk(mu); }
      if (n == 1) {
        cv.notify_one();
      } else {
        cv.notify_all();
      }
    }
#endif
  }
  void notify_one() { notify(1); }
  void notify_all() { notify(std::numeric_limits<int>::max()); }
};

thread_local const void* t_current_pool = nullptr;
thread_local int t_inline_depth = 0;  // > 0 while a nested run() executes inline

}  // namespace

struct ThreadPool::Impl {
  int nth = 1;
  std::vector<std::thread> workers;
  std::mutex run_mu;  // serializes run() calls from different threads

  const std::function<void(int, int)>* job = nullptr;
  // (generation << kShareBits) | next unclaimed share of the current job.
  std::atomic<uint64_t> claim{0};
  std::atomic<int> done{0};  // shares of the current job finished
  std::atomic<bool> stop{false};
  Waiter job_waiter, done_waiter, barrier_waiter;

  std::atomic<int> barrier_count{0};
  std::atomic<uint64_t> barrier_phase{0};

  std::mutex err_mu;
  std::exception_ptr error;

  static uint64_t generation(uint64_t word) { return word >> kShareBits; }

  void run_share(int ith) {
    const void* outer = t_current_pool;
    t_current_pool = this;
    try {
      (*job)(ith, nth);
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu);
      if (!error) error = std::current_exception();
    }
    t_current_pool = outer;
  }

  // Claims and runs shares of the current job until none is left; returns the generation it
  // saw last. A claim that succeeds belongs to the job then published: run() cannot return (nor
  // publish another job) before that share is done, so `job` is still valid.
  uint64_t take_shares() {
    for (;;) {
      const uint64_t word = claim.fetch_add(1);
      const int ith = static_cast<int>(word & kShareMask);
      if (ith >= nth) return generation(word);
      if (ith + 1 < nth) job_waiter.notify_one();  // more left: wake one more helper
      run_share(ith);
      if (done.fetch_add(1) + 1 == nth) done_waiter.notify_all();
    }
  }

  void worker_main() {
    uint64_t seen = 0;
    for (;;) {
      job_waiter.wait([&] { return generation(claim.load()) != seen || stop.load(); });
      if (stop.load()) return;
      seen = take_shares();
    }
  }
};

ThreadPool::ThreadPool(int n_threads) : impl_(new Impl) {
  if (n_threads > kMaxThreads) {
    throw std::invalid_argument("thread pool: " + std::to_string(n_threads) +
                                " threads requested, at most " + std::to_string(kMaxThreads));
  }
  impl_->nth = n_threads > 0 ? n_threads : default_thread_count();
  impl_->workers.reserve(impl_->nth - 1);
  try {
    for (int i = 1; i < impl_->nth; ++i) {
      impl_->workers.emplace_back([this] { impl_->worker_main(); });
    }
  } catch (const std::system_error& e) {
    // The OS refused a thread: stop the ones already started (never leave joinable threads).
    shutdown();
    throw std::runtime_error(std::string("thread pool: cannot start threads: ") + e.what());
  }
}

void ThreadPool::shutdown() {
  impl_->stop.store(true);
  impl_->job_waiter.notify_all();
  for (std::thread& t : impl_->workers) t.join();
  impl_->workers.clear();
}

ThreadPool::~ThreadPool() { shutdown(); }

int ThreadPool::n_threads() const { return impl_->nth; }

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  Impl& p = *impl_;
  if (p.nth == 1 || t_current_pool == &p) {
    // Single thread, or a nested call from inside one of our own jobs: run inline (barriers
    // inside it are no-ops since it has one thread).
    ++t_inline_depth;
    try {
      fn(0, 1);
    } catch (...) {
      --t_inline_depth;
      throw;
    }
    --t_inline_depth;
    return;
  }
  std::lock_guard<std::mutex> run_lock(p.run_mu);
  p.job = &fn;
  p.error = nullptr;
  p.done.store(0);
  const uint64_t gen = Impl::generation(p.claim.load()) + 1;
  p.claim.store((gen << kShareBits) | 1);  // share 0 is the caller's
  p.job_waiter.notify_one();  // each claimer wakes the next while shares are left
  p.run_share(0);
  if (p.done.fetch_add(1) + 1 != p.nth) {
    p.take_shares();  // whatever nobody has claimed yet (a descheduled worker's share)
    p.done_waiter.wait([&] { return p.done.load() == p.nth; });
  }
  p.job = nullptr;
  if (p.error) {
    std::exception_ptr e = p.error;
    p.error = nullptr;
    std::rethrow_exception(e);
  }
}

void ThreadPool::barrier() {
  Impl& p = *impl_;
  // Outside a job, or inside an inline (nested) run, there is only one thread to wait for.
  if (p.nth == 1 || t_current_pool != &p || t_inline_depth > 0) return;
  const uint64_t phase = p.barrier_phase.load();
  if (p.barrier_count.fetch_add(1) == p.nth - 1) {
    // Last to arrive: reset the count before releasing, so nobody re-enters early.
    p.barrier_count.store(0);
    p.barrier_phase.store(phase + 1);
    p.barrier_waiter.notify_all();
  } else {
    p.barrier_waiter.wait([&] { return p.barrier_phase.load() != phase; });
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (n <= grain || impl_->nth == 1) {
    fn(0, n);
    return;
  }
  run([&](int ith, int nth) {
    int64_t b, e;
    split_range(n, grain, ith, nth, &b, &e);
    if (b < e) fn(b, e);
  });
}

int default_thread_count() {
  // More threads than the CPUs we may run on only take turns on them (taskset, containers).
  const int n = std::min(cpu_features().physical_cores, available_cpus());
  return n > 0 ? n : 1;
}

namespace {
std::mutex g_default_mu;
std::shared_ptr<ThreadPool> g_default_pool;
int g_default_threads = 0;
}  // namespace

#if defined(__unix__) || defined(__APPLE__)
// After fork() the child has only the forking thread: the inherited pool's workers do not exist
// there, so the child forgets (deliberately leaks) it and creates a fresh one on first use.
void forget_pool_in_child() {
  new (&g_default_mu) std::mutex();  // the parent may have held it at fork time
  new std::shared_ptr<ThreadPool>(std::move(g_default_pool));  // leaked, never destroyed
  g_default_pool.reset();
}
std::once_flag g_atfork_once;
#endif

std::shared_ptr<ThreadPool> default_pool_shared() {
#if defined(__unix__) || defined(__APPLE__)
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
#endif
  std::lock_guard<std::mutex> lk(g_default_mu);
  if (!g_default_pool) g_default_pool = std::make_shared<ThreadPool>(g_default_threads);
  return g_default_pool;
}

ThreadPool& default_pool() { return *default_pool_shared(); }

void set_default_pool_threads(int n) {
  if (n > ThreadPool::kMaxThreads) {
    throw std::invalid_argument("set_default_pool_threads: " + std::to_string(n) +
                                " threads requested, at most " +
                                std::to_string(ThreadPool::kMaxThreads));
  }
  std::lock_guard<std::mutex> lk(g_default_mu);
  const int want = n > 0 ? n : default_thread_count();
  if (g_default_pool && g_default_pool->n_threads() == want) return;
  g_default_threads = want;
  g_default_pool.reset();
}

}  // namespace pyllm
