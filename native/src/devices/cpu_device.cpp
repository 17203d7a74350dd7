#include "ferry/cpu_device.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "ferry/errors.h"

namespace ferry {

namespace {

class CpuEvent final : public Event {
 public:
  bool ready() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  void wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return done_; });
    if (error_) std::rethrow_exception(error_);
  }
  void complete(std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      error_ = std::move(error);
    }
    cv_.notify_all();
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

}  // namespace

// The CPU device's copy engine: one thread draining a FIFO of copies, like a DMA engine beside
// the compute units. With a link rate set, each copy takes at least bytes / rate: the bytes are
// really copied, then the engine sleeps out the remainder, as a PCIe transfer would occupy it.
class CpuCopyStream final : public Stream {
 public:
  explicit CpuCopyStream(double link_gbps) : link_gbps_(link_gbps) {
    thread_ = std::thread([this] { loop(); });
  }

  ~CpuCopyStream() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  EventPtr copy_async(void* dst, const void* src, size_t bytes) override {
    auto event = std::make_shared<CpuEvent>();
    enqueue(Task{dst, src, bytes, event});
    return event;
  }

  EventPtr record() override {
    auto event = std::make_shared<CpuEvent>();
    enqueue(Task{nullptr, nullptr, 0, event});
    return event;
  }

 private:
  struct Task {
    void* dst;
    const void* src;
    size_t bytes;
    std::shared_ptr<CpuEvent> event;
  };

  void enqueue(Task task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

  void loop() {
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        // Drain what is queued before stopping, so nobody waits forever on an event.
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      std::exception_ptr error;
      try {
        run(task);
      } catch (...) {
        error = std::current_exception();
      }
      task.event->complete(error);
    }
  }

  void run(const Task& task) {
    if (task.bytes == 0) return;
    const auto start = std::chrono::steady_clock::now();
    std::memcpy(task.dst, task.src, task.bytes);
    if (link_gbps_ > 0) {
      const double seconds = static_cast<double>(task.bytes) / (link_gbps_ * 1e9);
      std::this_thread::sleep_until(start +
                                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                        std::chrono::duration<double>(seconds)));
    }
  }

  const double link_gbps_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

namespace {

double checked_link_gbps(double gbps) {
  if (!std::isfinite(gbps) || gbps < 0) {
    throw InvalidArgumentError("cpu: linkGbps must be a finite number ≥ 0 (0 = unlimited), got " +
                               std::to_string(gbps));
  }
  return gbps;
}

}  // namespace

CpuDevice::CpuDevice(const CpuDeviceOptions& options)
    : name_("cpu"),
      link_gbps_(checked_link_gbps(options.link_gbps)),
      arena_(options.capacity_bytes, "cpu"),
      pool_(options.threads),
      copy_stream_(std::make_unique<CpuCopyStream>(link_gbps_)) {}

CpuDevice::~CpuDevice() = default;

Stream& CpuDevice::copy_stream() { return *copy_stream_; }

void CpuDevice::prelude_forward(const DitDims& dims, const PreludeWeights& w, const float* z,
                                float* x, void* scratch) {
  kernels::prelude_forward(pool_, dims, w, z, x, scratch);
}

void CpuDevice::block_forward(const DitDims& dims, const BlockWeights& w, float* x, void* scratch) {
  kernels::block_forward(pool_, dims, w, x, scratch);
}

void CpuDevice::final_forward(const DitDims& dims, const FinalWeights& w, const float* x, float* y,
                              void* scratch) {
  kernels::final_forward(pool_, dims, w, x, y, scratch);
}

void CpuDevice::euler_update(float* z, const float* y, size_t n, float dt) {
  // Element-wise with no reduction, so the split across threads cannot change the result.
  pool_.parallel_for(static_cast<int64_t>(n), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) z[i] = z[i] - dt * y[i];
  });
}

}  // namespace ferry
