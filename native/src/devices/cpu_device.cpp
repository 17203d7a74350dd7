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
#include "ggml-cpu.h"

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

using CpuEvent = CompletableEvent;

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
        if (task.wait_for) {
          task.wait_for->wait();
          // Transfers queued behind the wait start on the link only now, not when queued.
          link_free_ = std::max(link_free_, Clock::now());
        }
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

namespace {

double checked_link_gbps(double gbps) {
  if (!std::isfinite(gbps) || gbps < 0) {
    throw InvalidArgumentError("cpu: linkGbps must be a finite number ≥ 0 (0 = unlimited), got " +
                               std::to_string(gbps));
  }
  return gbps;
}

unsigned checked_threads(unsigned threads) {
  if (threads > 512) {
    throw InvalidArgumentError("cpu: threads must be between 0 (one per core) and 512, got " +
                               std::to_string(threads));
  }
  if (threads != 0) return threads;
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware == 0 ? 1 : hardware;
}

}  // namespace

CpuDevice::CpuDevice(const CpuDeviceOptions& options)
    : Device("cpu"),
      link_gbps_(checked_link_gbps(options.link_gbps)),
      threads_(checked_threads(options.threads)) {
  auto arena = std::make_unique<Arena>(options.capacity_bytes, "cpu");
  if (options.commit_memory) arena->commit();
  ggml_backend_t backend = ggml_backend_cpu_init();
  if (!backend) throw DeviceUnavailableError("cpu: ggml's CPU backend failed to initialise");
  // The arena's region is the device memory; ggml sees it as one CPU buffer.
  ggml_backend_buffer_t memory = ggml_backend_cpu_buffer_from_ptr(arena->base(), arena->usable());
  if (!memory) {
    ggml_backend_free(backend);
    throw DeviceUnavailableError("cpu: ggml could not wrap the arena as a CPU buffer");
  }
  attach(backend, memory, std::move(arena));
  // A threadpool that lives as long as the device: without one, ggml starts threads for every
  // graph. Idle workers sleep rather than poll, leaving the cores to the copy and loader threads.
  ggml_threadpool_params params = ggml_threadpool_params_default(static_cast<int>(threads_));
  params.poll = options.poll;
  threadpool_ = ggml_threadpool_new(&params);
  if (!threadpool_) throw DeviceUnavailableError("cpu: ggml could not start its threadpool");
  ggml_backend_cpu_set_n_threads(backend, static_cast<int>(threads_));
  ggml_backend_cpu_set_threadpool(backend, threadpool_);
  copy_stream_ = std::make_unique<CpuCopyStream>(link_gbps_);
}

CpuDevice::~CpuDevice() {
  // Nothing may still be copying into the arena, and cached weights go back to it, before it goes.
  copy_stream_.reset();
  release_memory();
  // The backend (freed by ~Device) must not outlive its threadpool's last use: detach it first.
  ggml_backend_cpu_set_threadpool(backend(), nullptr);
  ggml_threadpool_free(threadpool_);
}

Stream& CpuDevice::copy_stream() { return *copy_stream_; }

EventPtr CpuDevice::compute(ggml_cgraph* graph) {
  auto event = std::make_shared<CpuEvent>();
  std::unique_lock<std::mutex> turn(compute_mutex());
  const double start = wall_clock_us();
  const ggml_status status = ggml_backend_graph_compute(backend(), graph);
  const double end = wall_clock_us();
  turn.unlock();
  std::exception_ptr error;
  if (status != GGML_STATUS_SUCCESS) {
    error = std::make_exception_ptr(InvalidArgumentError(
        std::string("cpu: ggml graph compute failed: ") + ggml_status_to_string(status)));
  }
  event->complete(start, end, error);
  return event;
}

void CpuDevice::compute_wait(const EventPtr& event) { event->wait(); }

}  // namespace ferry
