#pragma once
// A fixed pool of worker threads for the kernels. parallel_for splits [0, n) into contiguous
// chunks; the caller's thread takes part. Results must never depend on the number of threads:
// kernels give each output element to exactly one thread and reduce in a fixed order.
#include <cstdint>
#include <functional>

namespace ferry {

class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads);  // 0 = std::thread::hardware_concurrency()
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const;
  // Runs fn(begin, end) over chunks covering [0, n); returns when all are done. Not reentrant.
  void parallel_for(int64_t n, const std::function<void(int64_t begin, int64_t end)>& fn);

 private:
  struct Impl;
  Impl* impl_;
};

}  // namespace ferry
