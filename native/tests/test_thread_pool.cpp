// ThreadPool: covers every index exactly once in contiguous chunks, the caller takes part, errors
// come back to the caller and leave the pool usable, nested calls run inline, concurrent callers
// are serialized, and shutdown is clean.
#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"
#include "ferry/thread_pool.h"

using namespace ferry;

namespace {

void test_size() {
  KCHECK(ThreadPool(1).size() == 1);
  KCHECK(ThreadPool(3).size() == 3);
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  KCHECK(ThreadPool(0).size() == hw);
}

void test_covers_each_index_once() {
  for (unsigned threads : {1u, 2u, 3u, 8u}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 2, 3, 7, 8, 31, 32, 33, 100, 1000, 100003}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      std::mutex mu;
      std::vector<std::pair<int64_t, int64_t>> chunks;
      pool.parallel_for(n, [&](int64_t begin, int64_t end) {
        {
          std::lock_guard<std::mutex> lock(mu);
          chunks.emplace_back(begin, end);
        }
        for (int64_t i = begin; i < end; i++) hits[static_cast<size_t>(i)]++;
      });
      bool once = true;
      for (auto& h : hits) once = once && h.load() == 1;
      KCHECKF(once, "threads %u n %lld", threads, static_cast<long long>(n));
      for (auto [b, e] : chunks)
        KCHECKF(b < e && b >= 0 && e <= n, "chunk [%lld, %lld)", static_cast<long long>(b),
                static_cast<long long>(e));
      KCHECK(n > 0 || chunks.empty());
    }
  }
}

void test_caller_participates() {
  ThreadPool pool(4);
  const auto caller = std::this_thread::get_id();
  std::mutex mu;
  std::set<std::thread::id> ids;
  // Slow chunks: the caller claims one right after publishing the job, before workers drain it.
  pool.parallel_for(16, [&](int64_t, int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  KCHECK(ids.count(caller) == 1);
  KCHECK(ids.size() >= 2);  // and the workers too

  // A one-thread pool runs everything on the caller.
  ThreadPool one(1);
  bool on_caller = true;
  one.parallel_for(100, [&](int64_t, int64_t) {
    on_caller = on_caller && std::this_thread::get_id() == caller;
  });
  KCHECK(on_caller);
}

void test_exceptions() {
  ThreadPool pool(3);
  bool caught = false;
  try {
    pool.parallel_for(64, [&](int64_t begin, int64_t) {
      if (begin >= 32) throw std::runtime_error("chunk failed");
    });
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "chunk failed";
  }
  KCHECK(caught);
  // The pool still works, and every chunk of the failed job had finished before it threw.
  std::atomic<int64_t> sum{0};
  pool.parallel_for(1000, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) sum += i;
  });
  KCHECK(sum.load() == 999 * 1000 / 2);
}

void test_nested_runs_inline() {
  ThreadPool pool(3);
  std::atomic<int64_t> total{0};
  pool.parallel_for(6, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      pool.parallel_for(10, [&](int64_t b2, int64_t e2) { total += e2 - b2; });
    }
  });
  KCHECK(total.load() == 60);
}

void test_many_small_jobs() {
  // Back-to-back jobs exercise the generation handoff (workers waking late for finished jobs).
  ThreadPool pool(4);
  int64_t expected = 0;
  std::atomic<int64_t> sum{0};
  for (int job = 0; job < 20000; job++) {
    const int64_t n = 1 + job % 13;
    expected += n;
    pool.parallel_for(n, [&](int64_t b, int64_t e) { sum += e - b; });
  }
  KCHECK(sum.load() == expected);
}

void test_concurrent_callers() {
  ThreadPool pool(3);
  std::atomic<int64_t> sum{0};
  auto caller = [&] {
    for (int j = 0; j < 2000; j++) {
      pool.parallel_for(17, [&](int64_t b, int64_t e) { sum += e - b; });
    }
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  KCHECK(sum.load() == 2 * 2000 * 17);
}

void test_shutdown() {
  // Destroying pools right away, after a job, and after the workers went to sleep.
  for (int i = 0; i < 50; i++) ThreadPool pool(4);
  {
    ThreadPool pool(4);
    pool.parallel_for(100, [](int64_t, int64_t) {});
  }
  {
    ThreadPool pool(4);
    pool.parallel_for(100, [](int64_t, int64_t) {});
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  KCHECK(true);
}

}  // namespace

int main() {
  return ferry_check::run({
      {"size", test_size},
      {"covers_each_index_once", test_covers_each_index_once},
      {"caller_participates", test_caller_participates},
      {"exceptions", test_exceptions},
      {"nested_runs_inline", test_nested_runs_inline},
      {"many_small_jobs", test_many_small_jobs},
      {"concurrent_callers", test_concurrent_callers},
      {"shutdown", test_shutdown},
  });
}
