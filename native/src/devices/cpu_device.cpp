#include "ferry/cpu_device.h"

#if defined(__linux__)
#include <sys/prctl.h>
#endif

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ferry/errors.h"
#include "ferry/events.h"

namespace ferry {

namespace {

using Clock = std::chrono::steady_clock;

// Wall-clock µs of a steady_clock time point: the run's events are wall-clock (events.h), while
// pacing needs a clock that never jumps.
class WallClock {
 public:
  WallClock() : steady0_(Clock::now()), wall0_(wall_clock_us()) {}
  double us(Clock::time_point t) const {
    return wall0_ + std::chrono::duration<double, std::micro>(t - steady0_).count();
  }

 private:
  Clock::time_point steady0_;
  double wall0_;
};

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
  double start_us() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return start_us_;
  }
  double end_us() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return end_us_;
  }
  void complete(double start_us, double end_us, std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      start_us_ = start_us;
      end_us_ = end_us;
      error_ = std::move(error);
    }
    cv_.notify_all();
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  double start_us_ = 0;
  double end_us_ = 0;
  std::exception_ptr error_;
};

}  // namespace

// The CPU device's copy engine: one thread draining a FIFO of transfers, like a DMA engine beside
// the compute units. With a link rate set it emulates the link's timeline: a transfer starts when
// it has been queued and the link is free, occupies the link for bytes / rate, and completes at
// the end of that (or when the bytes are really copied, if memcpy is slower). Because the next
// transfer's start is taken from the link's timeline rather than from when this thread woke up,
// scheduler latency does not accumulate into the link rate, as it would not on real hardware.
// The thread sleeps (not spins) while the link is "busy", so compute overlaps it fully.
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

  EventPtr copy_batch_async(const CopyRegion* regions, size_t count) override {
    Task task;
    task.regions.assign(regions, regions + count);
    task.event = std::make_shared<CpuEvent>();
    EventPtr event = task.event;
    enqueue(std::move(task));
    return event;
  }

  EventPtr record() override {
    Task task;
    task.event = std::make_shared<CpuEvent>();
    EventPtr event = task.event;
    enqueue(std::move(task));
    return event;
  }

  void wait_event(const EventPtr& event) override {
    // Queued, not blocking the caller: the copy thread waits for it in turn.
    Task task;
    task.wait_for = event;
    task.event = std::make_shared<CpuEvent>();
    enqueue(std::move(task));
  }

 private:
  struct Task {
    std::vector<CopyRegion> regions;
    EventPtr wait_for;
    std::shared_ptr<CpuEvent> event;
    Clock::time_point queued;
  };

  void enqueue(Task task) {
    task.queued = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

  void loop() {
#if defined(__linux__)
    // Sleeps end within ~1 µs of their deadline instead of the default 50 µs slack, so the
    // emulated link's completions are punctual.
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
#endif
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
      Clock::time_point start = Clock::now();
      try {
        if (task.wait_for) task.wait_for->wait();
        if (!task.regions.empty()) start = transfer(task);
      } catch (...) {
        error = std::current_exception();
      }
      const Clock::time_point end = Clock::now();
      if (task.regions.empty()) start = end;
      task.event->complete(clock_.us(start), clock_.us(end), error);
    }
  }

  // Copies the task's regions; returns when the transfer started on the (emulated) link.
  Clock::time_point transfer(const Task& task) {
    const Clock::time_point began = Clock::now();
    size_t bytes = 0;
    for (const CopyRegion& r : task.regions) {
      if (r.bytes != 0) std::memcpy(r.dst, r.src, r.bytes);
      bytes += r.bytes;
    }
    if (link_gbps_ <= 0) return began;
    // The link picks the transfer up once it is queued and the previous one has finished.
    const Clock::time_point start = std::max(task.queued, link_free_);
    const auto duration = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(static_cast<double>(bytes) / (link_gbps_ * 1e9)));
    const Clock::time_point deadline = start + duration;
    std::this_thread::sleep_until(deadline);
    // memcpy slower than the link: the copy itself is the timeline.
    link_free_ = std::max(deadline, Clock::now());
    return start;
  }

  const double link_gbps_;
  const WallClock clock_;
  Clock::time_point link_free_{};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

// The compute "stream" of the CPU device: its operations run on the caller's thread (over the
// kernel thread pool), so everything is done when queued and events are born complete.
class CpuComputeStream final : public Stream {
 public:
  EventPtr copy_batch_async(const CopyRegion* regions, size_t count) override {
    auto event = std::make_shared<CpuEvent>();
    const double start = wall_clock_us();
    for (size_t i = 0; i < count; i++) {
      if (regions[i].bytes != 0) std::memcpy(regions[i].dst, regions[i].src, regions[i].bytes);
    }
    event->complete(start, wall_clock_us(), nullptr);
    return event;
  }
  EventPtr record() override {
    auto event = std::make_shared<CpuEvent>();
    const double now = wall_clock_us();
    event->complete(now, now, nullptr);
    return event;
  }
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
      copy_stream_(std::make_unique<CpuCopyStream>(link_gbps_)),
      compute_stream_(std::make_unique<CpuComputeStream>()) {}

CpuDevice::~CpuDevice() {
  // Nothing may still be copying into the arena, and cached weights go back to it, before it goes.
  copy_stream_.reset();
  release_residency();
}

Stream& CpuDevice::copy_stream() { return *copy_stream_; }
Stream& CpuDevice::compute_stream() { return *compute_stream_; }

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
