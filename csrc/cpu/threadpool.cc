// Owns the persistent thread pool: worker lifecycle, job hand-off, the spin-then-sleep barrier
// and the process-wide default pool.
//
// Hand-off protocol: run() publishes the job pointer, then bumps `job_gen_`; workers wait for
// the generation to change, run their share and decrement `pending_`; the caller runs share 0
// and waits for `pending_` to reach zero. Every wait spins briefly (a decode step is a few
// hundred jobs of ~10-100 us, so a sleeping hand-off would cost more than the work) and then
// sleeps on a condition variable (so an idle pool, or an oversubscribed machine, burns no CPU).
#include "pyllm/threadpool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
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

#include "pyllm/cpu.h"

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

// How long a waiter spins before it sleeps.
constexpr auto kSpinTime = std::chrono::microseconds(100);

// A condition variable with a sleeper count, so that the notifier only takes the mutex when
// somebody actually sleeps. Both sides use seq_cst: either the notifier sees sleepers > 0, or
// the sleeper's predicate check (under the mutex) sees the new state.
struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int> sleepers{0};

  template <class Pred>
  void wait(Pred ready) {
    if (ready()) return;
    const auto deadline = std::chrono::steady_clock::now() + kSpinTime;
    for (int i = 1;; ++i) {
      PYLLM_CPU_RELAX();
      if (ready()) return;
      if ((i & 63) == 0 && std::chrono::steady_clock::now() > deadline) break;
    }
    std::unique_lock<std::mutex> lk(mu);
    sleepers.fetch_add(1);
    cv.wait(lk, ready);
    sleepers.fetch_sub(1);
  }

  void notify() {
    if (sleepers.load() > 0) {
      { std::lock_guard<std::mutex> lk(mu); }
      cv.notify_all();
    }
  }
};

thread_local const void* t_current_pool = nullptr;
thread_local int t_inline_depth = 0;  // > 0 while a nested run() executes inline

}  // namespace

struct ThreadPool::Impl {
  int nth = 1;
  std::vector<std::thread> workers;
  std::mutex run_mu;  // serializes run() calls from different threads

  const std::function<void(int, int)>* job = nullptr;
  std::atomic<uint64_t> job_gen{0};
  std::atomic<int> pending{0};
  std::atomic<bool> stop{false};
  Waiter job_waiter, done_waiter, barrier_waiter;

  std::atomic<int> barrier_count{0};
  std::atomic<uint64_t> barrier_phase{0};

  std::mutex err_mu;
  std::exception_ptr error;

  void run_share(int ith) {
    t_current_pool = this;
    try {
      (*job)(ith, nth);
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu);
      if (!error) error = std::current_exception();
    }
    t_current_pool = nullptr;
  }

  void worker_main(int ith) {
    uint64_t seen = 0;
    for (;;) {
      job_waiter.wait([&] { return job_gen.load() != seen || stop.load(); });
      if (stop.load()) return;
      seen = job_gen.load();
      run_share(ith);
      if (pending.fetch_sub(1) == 1) done_waiter.notify();
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
      impl_->workers.emplace_back([this, i] { impl_->worker_main(i); });
    }
  } catch (const std::system_error& e) {
    // The OS refused a thread: stop the ones already started (never leave joinable threads).
    shutdown();
    throw std::runtime_error(std::string("thread pool: cannot start threads: ") + e.what());
  }
}

void ThreadPool::shutdown() {
  impl_->stop.store(true);
  impl_->job_gen.fetch_add(1);
  {
    std::lock_guard<std::mutex> lk(impl_->job_waiter.mu);
  }
  impl_->job_waiter.cv.notify_all();
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
  p.pending.store(p.nth - 1);
  p.job_gen.fetch_add(1);
  p.job_waiter.notify();
  p.run_share(0);
  p.done_waiter.wait([&] { return p.pending.load() == 0; });
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
    p.barrier_waiter.notify();
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
  int n = cpu_features().physical_cores;
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
