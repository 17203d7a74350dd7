#pragma once
// The device interface, in the spirit of ggml-backend: a device owns memory (buffers), a copy
// stream that moves bytes asynchronously and signals events, and the compute operations of the
// model. The runner is written against this interface only, so a CUDA device (cudaMalloc,
// cudaMemcpyAsync on a copy stream, cudaEvent, cuBLAS) slots in beside the CPU reference device.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "ferry/arena.h"
#include "ferry/kernels.h"

namespace ferry {

enum class DeviceKind : uint8_t { kCpu, kCuda };
const char* device_kind_name(DeviceKind kind);

// Completion of work queued on a stream.
class Event {
 public:
  virtual ~Event() = default;
  virtual bool ready() const = 0;
  // Blocks the calling thread until the work is done; rethrows its failure, if any.
  virtual void wait() = 0;
};
using EventPtr = std::shared_ptr<Event>;

// An in-order queue of asynchronous operations (a CUDA stream; the CPU device's copy thread).
class Stream {
 public:
  virtual ~Stream() = default;
  // Queues a copy of `bytes` from `src` to `dst`; either side may be host or device memory. Both
  // must stay valid until the returned event is ready.
  virtual EventPtr copy_async(void* dst, const void* src, size_t bytes) = 0;
  // An event that is ready once everything queued before it has finished.
  virtual EventPtr record() = 0;
  void synchronize() { record()->wait(); }
};

class Device;

// An owned block of device memory; returns itself to its device when destroyed.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Device* device, void* data, size_t size)
      : device_(device), data_(data), size_(size) {}
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  explicit operator bool() const { return data_ != nullptr; }
  void reset() noexcept;

 private:
  Device* device_ = nullptr;
  void* data_ = nullptr;
  size_t size_ = 0;
};

class Device {
 public:
  virtual ~Device() = default;

  virtual const std::string& name() const = 0;
  virtual DeviceKind kind() const = 0;
  virtual size_t total_bytes() const = 0;
  virtual size_t free_bytes() const = 0;
  virtual MemoryStats memory_stats() const = 0;
  virtual void reset_window_peak() = 0;

  // Device memory; throws DeviceOutOfMemoryError when it does not fit.
  DeviceBuffer alloc(size_t bytes) { return DeviceBuffer(this, alloc_raw(bytes), bytes); }

  // The stream host↔device copies run on, concurrently with compute.
  virtual Stream& copy_stream() = 0;
  void wait(const EventPtr& event) { event->wait(); }

  // The model's operations on device memory (see kernels.h). They have finished when they return,
  // so buffers they used may be freed right after.
  virtual void prelude_forward(const DitDims& dims, const PreludeWeights& w, const float* z,
                               float* x, void* scratch) = 0;
  virtual void block_forward(const DitDims& dims, const BlockWeights& w, float* x,
                             void* scratch) = 0;
  virtual void final_forward(const DitDims& dims, const FinalWeights& w, const float* x, float* y,
                             void* scratch) = 0;
  // The sampler's update z[i] ← z[i] − dt·y[i], in float32.
  virtual void euler_update(float* z, const float* y, size_t n, float dt) = 0;

  // One job at a time: the runner's stream, buffers and kernel threads are not shared.
  bool try_begin_job() { return !busy_.exchange(true); }
  void end_job() { busy_.store(false); }
  bool busy() const { return busy_.load(); }

 protected:
  virtual void* alloc_raw(size_t bytes) = 0;
  virtual void free_raw(void* data) noexcept = 0;

 private:
  friend class DeviceBuffer;
  std::atomic<bool> busy_{false};
};

// Holds a device for one job; throws DeviceBusyError if another job holds it.
class DeviceLease {
 public:
  DeviceLease() = default;
  explicit DeviceLease(Device& device);
  ~DeviceLease() { reset(); }
  DeviceLease(DeviceLease&& other) noexcept : device_(other.device_) { other.device_ = nullptr; }
  DeviceLease& operator=(DeviceLease&& other) noexcept;
  DeviceLease(const DeviceLease&) = delete;
  DeviceLease& operator=(const DeviceLease&) = delete;

  Device& device() const;
  explicit operator bool() const { return device_ != nullptr; }
  void reset() noexcept;

 private:
  Device* device_ = nullptr;
};

}  // namespace ferry
