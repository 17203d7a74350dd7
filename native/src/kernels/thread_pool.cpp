// A fixed pool of workers for the kernels' parallel_for.
//
// A job is published as one 64-bit ticket: (generation, chunk count, next chunk). Threads claim
// chunks by compare-and-swap on the ticket, so a worker that wakes late for a finished job sees a
// stale generation and does nothing — the caller never waits for idle workers to check in, only
// for the chunks to finish. That matters on shared, oversubscribed machines where a sleeping
// worker may not be scheduled for milliseconds.
#include "ferry/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ferry {

namespace {

using Fn = std::function<void(int64_t, int64_t)>;

// Ticket layout: generation (24 bits) | chunks (20 bits) | next chunk (20 bits). The generation
// wraps; a collision needs 2²⁴ jobs between a worker's load and its CAS, which cannot happen.
constexpr int kChunkBits = 20;
constexpr uint64_t kChunkMask = (uint64_t{1} << kChunkBits) - 1;
constexpr uint64_t kGenMask = (uint64_t{1} << 24) - 1;
constexpr int64_t kMaxChunks = int64_t{1} << 16;  // well inside kChunkMask
// Chunks per thread: a few, so a thread that got descheduled or landed on slower work does not
// hold up the rest, while each chunk stays large enough to amortize its claim.
constexpr int64_t kChunksPerThread = 4;
// How long a thread spins before sleeping, for the next job (workers) or for the last chunk
// (caller). Kernels issue parallel_for calls back to back, so a short spin saves a futex wake per
// call; a long one would steal a shared core from whoever else runs there.
constexpr int kSpinIterations = 2000;

uint64_t pack(uint64_t gen, uint64_t chunks, uint64_t next) {
  return (gen << (2 * kChunkBits)) | (chunks << kChunkBits) | next;
}
uint64_t gen_of(uint64_t t) { return t >> (2 * kChunkBits); }
uint64_t chunks_of(uint64_t t) { return (t >> kChunkBits) & kChunkMask; }
uint64_t next_of(uint64_t t) { return t & kChunkMask; }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Set while a thread runs chunks, so a nested parallel_for runs inline instead of deadlocking.
thread_local bool tls_in_pool = false;

}  // namespace

struct ThreadPool::Impl {
  unsigned threads = 1;
  std::vector<std::thread> workers;

  std::mutex mu;  // guards sleeping/waking; the job itself is published through `ticket`
  std::condition_variable work_cv;
  std::condition_variable done_cv;
  std::atomic<bool> stop{false};

  std::atomic<uint64_t> ticket{0};
  // The current job. Written by the caller before the ticket's release store; read only by a
  // thread that has claimed one of its chunks, and rewritten only after every chunk finished.
  const Fn* fn = nullptr;
  int64_t n = 0;
  std::atomic<int64_t> remaining{0};  // chunks not finished yet

  std::mutex error_mu;
  std::exception_ptr error;

  std::mutex call_mu;  // one parallel_for at a time from outside the pool
  uint64_t generation = 0;

  void worker_loop() {
    tls_in_pool = true;
    uint64_t seen = 0;
    for (;;) {
      uint64_t gen = gen_of(ticket.load(std::memory_order_acquire));
      for (int i = 0; i < kSpinIterations && gen == seen; i++) {
        if (stop.load(std::memory_order_relaxed)) return;
        cpu_relax();
        gen = gen_of(ticket.load(std::memory_order_acquire));
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(mu);
        work_cv.wait(lock, [&] {
          return stop.load() || gen_of(ticket.load(std::memory_order_acquire)) != seen;
        });
        if (stop.load()) return;
        gen = gen_of(ticket.load(std::memory_order_acquire));
      }
      seen = gen;
      run_chunks(gen);
    }
  }

  // Claims and runs chunks of generation `gen` until none are left.
  void run_chunks(uint64_t gen) {
    uint64_t t = ticket.load(std::memory_order_acquire);
    for (;;) {
      if (gen_of(t) != gen || next_of(t) >= chunks_of(t)) return;
      if (!ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        continue;  // t was reloaded
      }
      const int64_t chunks = static_cast<int64_t>(chunks_of(t));
      const int64_t index = static_cast<int64_t>(next_of(t));
      // Contiguous, near-equal chunks; the split never affects results (see thread_pool.h).
      const int64_t begin = n * index / chunks;
      const int64_t end = n * (index + 1) / chunks;
      try {
        (*fn)(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
      }
      if (remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // Last chunk: wake the caller if it went to sleep. Taking mu orders this notify after the
        // caller's predicate check, so the wake-up cannot be lost.
        std::lock_guard<std::mutex> lock(mu);
        done_cv.notify_all();
      }
      t = ticket.load(std::memory_order_acquire);
    }
  }
};

ThreadPool::ThreadPool(unsigned threads) : impl_(new Impl) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  impl_->threads = threads;
  try {
    impl_->workers.reserve(threads - 1);
    for (unsigned i = 1; i < threads; i++) {
      impl_->workers.emplace_back([impl = impl_] { impl->worker_loop(); });
    }
  } catch (...) {
    // Could not start every thread: stop those that did, then report the failure.
    impl_->stop.store(true);
    { std::lock_guard<std::mutex> lock(impl_->mu); }
    impl_->work_cv.notify_all();
    for (auto& w : impl_->workers) w.join();
    delete impl_;
    throw;
  }
}

ThreadPool::~ThreadPool() {
  impl_->stop.store(true);
  { std::lock_guard<std::mutex> lock(impl_->mu); }
  impl_->work_cv.notify_all();
  for (auto& w : impl_->workers) w.join();
  delete impl_;
}

unsigned ThreadPool::size() const { return impl_->threads; }

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  Impl& p = *impl_;
  if (p.workers.empty() || n == 1 || tls_in_pool) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> call_lock(p.call_mu);
  const int64_t chunks =
      std::min({n, static_cast<int64_t>(p.threads) * kChunksPerThread, kMaxChunks});
  p.fn = &fn;
  p.n = n;
  p.error = nullptr;
  p.remaining.store(chunks, std::memory_order_relaxed);
  p.generation = (p.generation + 1) & kGenMask;
  if (p.generation == 0) p.generation = 1;  // workers start having "seen" generation 0
  // Release: a thread that claims a chunk of this generation sees fn, n and remaining above.
  p.ticket.store(pack(p.generation, static_cast<uint64_t>(chunks), 0), std::memory_order_release);
  { std::lock_guard<std::mutex> lock(p.mu); }
  p.work_cv.notify_all();

  tls_in_pool = true;
  p.run_chunks(p.generation);
  tls_in_pool = false;

  for (int i = 0; i < kSpinIterations; i++) {
    if (p.remaining.load(std::memory_order_acquire) == 0) break;
    cpu_relax();
  }
  if (p.remaining.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lock(p.mu);
    p.done_cv.wait(lock, [&] { return p.remaining.load(std::memory_order_acquire) == 0; });
  }
  if (p.error) {
    std::exception_ptr e = p.error;
    p.error = nullptr;
    std::rethrow_exception(e);
  }
}

}  // namespace ferry
