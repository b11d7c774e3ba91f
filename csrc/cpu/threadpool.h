// A persistent thread pool for the CPU kernels and the forward pass.
//
// Workers are created once (no thread creation per call) and wait for jobs with a short bounded
// spin, then a few yields, then a sleep, so back-to-back kernel calls during decoding hand over
// in about a microsecond while an idle pool costs no CPU, and a thread waiting for a descheduled
// peer gives the core away. The calling thread always takes part (as share 0, and it also runs
// the shares no running worker has taken, so nobody waits a time slice for a descheduled one).
//
// Two ways to use it:
//   * pool.run(fn): runs fn(ith, nth) for every share ith < nth and returns when all are done;
//     inside fn, pool.barrier() synchronizes the nth shares (one barrier per dependent step).
//   * pool.parallel_for(n, grain, fn): splits [0, n) into nth contiguous ranges (multiples of
//     grain) and runs fn(begin, end) on each.
// An exception thrown by fn on any thread is rethrown by run()/parallel_for() on the caller (the
// first one wins); with barriers inside fn, the job must not throw on one thread only.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

namespace pyllm {

class ThreadPool {
 public:
  static constexpr int kMaxThreads = 1024;

  // n_threads <= 0 means default_thread_count(). Throws std::invalid_argument above kMaxThreads
  // and std::runtime_error if the OS refuses to start the threads.
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int n_threads() const;

  // Runs fn(ith, nth) once for every ith in [0, nth) and returns when all are done. The caller
  // runs ith = 0; the other shares go to whichever threads get to them first, so a thread may
  // run several shares one after another (the caller takes those of workers that are not
  // running), and a share may not assume which thread runs it. Concurrent run() calls from
  // different threads are serialized. Called from inside a job of this same pool it runs
  // fn(0, 1) inline on the calling thread (no deadlock, no parallelism).
  void run(const std::function<void(int ith, int nth)>& fn);

  // Waits until all nth shares of the running job have reached it. Only valid inside run(). Each
  // share runs on its own thread while any share waits at a barrier (a thread takes another
  // share only after finishing one), so barriers cannot deadlock.
  void barrier();

  // Runs fn(begin, end) over nth contiguous sub-ranges of [0, n); range boundaries are multiples
  // of grain (except the end). Ranges may be empty when n is small; fn is not called for those.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void shutdown();  // stops and joins the workers

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Physical cores of this machine, capped at available_cpus() (cpu.h: the affinity mask and a
// cgroup CPU quota), at least 1: what the default pool uses. A pool may still be made larger
// on purpose; it stays correct and makes progress (see run()), only slower.
int default_thread_count();

// The process-wide pool the C ABI and the bindings use; created on first use with
// default_thread_count() threads, or with what set_default_pool_threads() asked for.
ThreadPool& default_pool();

// The same pool, co-owned: a caller holding it is safe against a concurrent resize (the old
// pool lives until its last holder lets go). The bindings and the C ABI use this one.
std::shared_ptr<ThreadPool> default_pool_shared();

// Replaces the default pool by one with n threads (n <= 0: default_thread_count()); no-op when
// the size is unchanged. Holders of default_pool_shared() keep the old pool; a plain
// default_pool() reference must not be held across this call.
void set_default_pool_threads(int n);

// The [begin, end) share of thread ith among nth over n items in multiples of grain.
inline void split_range(int64_t n, int64_t grain, int ith, int nth, int64_t* begin, int64_t* end) {
  if (grain < 1) grain = 1;
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t c0 = chunks * ith / nth;
  const int64_t c1 = chunks * (ith + 1) / nth;
  *begin = c0 * grain < n ? c0 * grain : n;
  *end = c1 * grain < n ? c1 * grain : n;
}

}  // namespace pyllm
