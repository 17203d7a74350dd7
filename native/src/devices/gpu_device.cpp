#include "ferry/gpu_device.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "ferry/errors.h"
#include "ferry/events.h"
#include "ferry/ggml_support.h"

namespace ferry {

namespace {

constexpr size_t kDefaultHeadroom = size_t{512} << 20;

std::vector<ggml_backend_dev_t> gpus() {
  ggml_setup();
  std::vector<ggml_backend_dev_t> out;
  for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
    ggml_backend_dev_t dev = ggml_backend_dev_get(i);
    if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) out.push_back(dev);
  }
  return out;
}

// An event recorded on a backend's stream; the engine's watcher completes it.
class GpuEvent final : public CompletableEvent {
 public:
  explicit GpuEvent(ggml_backend_event_t event, double queued_us)
      : event_(event), queued_us_(queued_us) {}
  ~GpuEvent() override { ggml_backend_event_free(event_); }

  ggml_backend_event_t handle() const { return event_; }
  double queued_us() const { return queued_us_; }

 private:
  ggml_backend_event_t event_;
  double queued_us_;
};

}  // namespace

// One in-order engine (a backend instance's stream) and the thread that watches its events
// complete, in the order they were recorded: an event's work started when it was queued or when
// the previous one ended, whichever was later, and ended when its synchronisation returned.
class GpuEngine {
 public:
  GpuEngine(ggml_backend_dev_t dev, ggml_backend_t backend) : dev_(dev), backend_(backend) {
    thread_ = std::thread([this] { watch(); });
  }
  ~GpuEngine() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  ggml_backend_t backend() const { return backend_; }

  std::shared_ptr<GpuEvent> record(double queued_us) {
    ggml_backend_event_t handle = ggml_backend_event_new(dev_);
    if (!handle) throw DeviceUnavailableError("gpu: the backend cannot create events");
    auto event = std::make_shared<GpuEvent>(handle, queued_us);
    ggml_backend_event_record(handle, backend_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(event);
    }
    cv_.notify_one();
    return event;
  }

 private:
  void watch() {
    double last_end = 0;
    for (;;) {
      std::shared_ptr<GpuEvent> event;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // drained: nobody waits forever
        event = std::move(queue_.front());
        queue_.pop_front();
      }
      std::exception_ptr error;
      try {
        ggml_backend_event_synchronize(event->handle());
      } catch (...) {
        error = std::current_exception();
      }
      const double end = wall_clock_us();
      const double start = std::min(end, std::max(event->queued_us(), last_end));
      last_end = end;
      event->complete(start, end, error);
    }
  }

  ggml_backend_dev_t dev_;
  ggml_backend_t backend_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<GpuEvent>> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

namespace {

class GpuCopyStream final : public Stream {
 public:
  GpuCopyStream(GpuEngine& engine, ggml_backend_buffer_t memory)
      : engine_(engine), memory_(memory) {}

  // Several jobs' copy threads share the stream: a batch and its event are queued as one.
  EventPtr copy_batch_async(const CopyRegion* regions, size_t count) override {
    std::lock_guard<std::mutex> lock(mu_);
    const double queued = wall_clock_us();
    for (size_t i = 0; i < count; i++) {
      if (regions[i].bytes == 0) continue;
      ggml_tensor span = byte_span(memory_, regions[i].dst, regions[i].bytes);
      ggml_backend_tensor_set_async(engine_.backend(), &span, regions[i].src, 0, regions[i].bytes);
    }
    return engine_.record(queued);
  }

  EventPtr record() override {
    std::lock_guard<std::mutex> lock(mu_);
    return engine_.record(wall_clock_us());
  }

  void wait_event(const EventPtr& event) override {
    if (auto* gpu = dynamic_cast<GpuEvent*>(event.get())) {
      std::lock_guard<std::mutex> lock(mu_);
      ggml_backend_event_wait(engine_.backend(), gpu->handle());
    } else {
      event->wait();
    }
  }

 private:
  GpuEngine& engine_;
  ggml_backend_buffer_t memory_;
  std::mutex mu_;
};

}  // namespace

int gpu_device_count() { return static_cast<int>(gpus().size()); }

GpuDevice::GpuDevice(const GpuDeviceOptions& options)
    : Device("gpu:" + std::to_string(options.ordinal)), ordinal_(options.ordinal) {
  const auto devices = gpus();
  if (devices.empty()) {
    throw DeviceUnavailableError(
        "gpu: no GPU backend in this build or no GPU on this machine (build with FERRY_CUDA=1 "
        "where the CUDA toolkit and cuBLAS are installed)");
  }
  if (ordinal_ < 0 || static_cast<size_t>(ordinal_) >= devices.size()) {
    throw DeviceUnavailableError("gpu: no GPU " + std::to_string(ordinal_) + " (this machine has " +
                                 std::to_string(devices.size()) + ")");
  }
  dev_ = devices[static_cast<size_t>(ordinal_)];
  ggml_backend_dev_props props;
  ggml_backend_dev_get_props(dev_, &props);
  description_ = props.description ? props.description : ggml_backend_dev_name(dev_);
  if (!props.caps.events || !props.caps.async) {
    throw DeviceUnavailableError("gpu: " + description_ +
                                 ": its ggml backend lacks async copies or events");
  }
  size_t free = 0, total = 0;
  ggml_backend_dev_memory(dev_, &free, &total);
  size_t capacity = options.capacity_bytes;
  if (capacity == 0) capacity = free > kDefaultHeadroom ? free - kDefaultHeadroom : 0;
  if (capacity == 0 || capacity > free) {
    throw DeviceOutOfMemoryError("gpu: " + description_ + ": cannot hold a budget of " +
                                 std::to_string(capacity) + " bytes (" + std::to_string(free) +
                                 " free of " + std::to_string(total) + ")");
  }
  ggml_backend_t backend = ggml_backend_dev_init(dev_, nullptr);
  if (!backend) throw DeviceUnavailableError("gpu: " + description_ + ": backend init failed");
  copy_backend_ = ggml_backend_dev_init(dev_, nullptr);
  if (!copy_backend_) {
    ggml_backend_free(backend);
    throw DeviceUnavailableError("gpu: " + description_ + ": second backend init failed");
  }
  ggml_backend_buffer_t memory =
      ggml_backend_buft_alloc_buffer(ggml_backend_dev_buffer_type(dev_), capacity);
  if (!memory) {
    ggml_backend_free(copy_backend_);
    ggml_backend_free(backend);
    throw DeviceOutOfMemoryError("gpu: " + description_ + ": could not allocate the budget of " +
                                 std::to_string(capacity) + " bytes");
  }
  auto arena = std::make_unique<Arena>(ggml_backend_buffer_get_base(memory),
                                       ggml_backend_buffer_get_size(memory), name());
  attach(backend, memory, std::move(arena));
  host_buft_ = props.caps.host_buffer ? ggml_backend_dev_host_buffer_type(dev_) : nullptr;
  compute_engine_ = std::make_unique<GpuEngine>(dev_, backend);
  copy_engine_ = std::make_unique<GpuEngine>(dev_, copy_backend_);
  copy_stream_ = std::make_unique<GpuCopyStream>(*copy_engine_, memory);
}

GpuDevice::~GpuDevice() {
  ggml_backend_synchronize(copy_backend_);
  ggml_backend_synchronize(backend());
  copy_stream_.reset();
  copy_engine_.reset();
  compute_engine_.reset();
  release_memory();
  ggml_backend_free(copy_backend_);
}

Stream& GpuDevice::copy_stream() { return *copy_stream_; }

EventPtr GpuDevice::compute(ggml_cgraph* graph) {
  std::lock_guard<std::mutex> turn(compute_mutex());
  const double queued = wall_clock_us();
  const ggml_status status = ggml_backend_graph_compute_async(backend(), graph);
  if (status != GGML_STATUS_SUCCESS) {
    throw InvalidArgumentError("gpu: " + description_ +
                               ": ggml graph compute failed: " + ggml_status_to_string(status));
  }
  return compute_engine_->record(queued);
}

void GpuDevice::compute_wait(const EventPtr& event) {
  if (auto* gpu = dynamic_cast<GpuEvent*>(event.get())) {
    std::lock_guard<std::mutex> turn(compute_mutex());
    ggml_backend_event_wait(backend(), gpu->handle());
  } else {
    event->wait();
  }
}

void GpuDevice::tensor_set(ggml_tensor* tensor, const void* data, size_t offset, size_t bytes) {
  // ggml's synchronous set runs on its own stream: order it after the queued compute.
  ggml_backend_synchronize(backend());
  ggml_backend_tensor_set(tensor, data, offset, bytes);
}

void GpuDevice::tensor_get(const ggml_tensor* tensor, void* data, size_t offset, size_t bytes) {
  ggml_backend_synchronize(backend());
  ggml_backend_tensor_get(tensor, data, offset, bytes);
}

void* GpuDevice::alloc_host_raw(size_t bytes, void** handle) {
  if (!host_buft_) return Device::alloc_host_raw(bytes, handle);
  ggml_backend_buffer_t buffer =
      ggml_backend_buft_alloc_buffer(host_buft_, std::max<size_t>(bytes, 1));
  if (!buffer) throw std::bad_alloc();
  *handle = buffer;
  return ggml_backend_buffer_get_base(buffer);
}

void GpuDevice::free_host_raw(void* data, void* handle) noexcept {
  if (!handle) return Device::free_host_raw(data, handle);
  ggml_backend_buffer_free(static_cast<ggml_backend_buffer_t>(handle));
}

}  // namespace ferry
