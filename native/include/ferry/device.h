#pragma once
// The device interface, in the spirit of ggml-backend: a device owns memory (device buffers and
// pinned host buffers), a copy stream that moves bytes asynchronously and signals events, a
// compute stream the model's operations are queued on, and a residency cache of weights kept on
// the device between jobs. The runner is written against this interface only, so the CUDA device
// (cudaMalloc arena, cudaMemcpyAsync on a copy stream, cudaEvent, CUDA kernels / cuBLAS) and the
// CPU reference device are interchangeable.
//
// Optional operations have a synchronous fallback in this base class (Stream::wait_event blocks
// the caller; Device::checksum reads device memory as host memory), so a device only overrides
// what it can do better.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

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
  // Wall-clock times (Unix epoch, µs) at which the engine began and finished the work this event
  // marks (for a copy: the transfer itself, not the time it waited in the queue). Valid once
  // wait() returned; a marker event (Stream::record) reports its completion time for both.
  virtual double start_us() const = 0;
  virtual double end_us() const = 0;
};
using EventPtr = std::shared_ptr<Event>;

// One piece of a batched copy. Either side may be host or device memory.
struct CopyRegion {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
};

// An in-order queue of asynchronous operations (a CUDA stream; the CPU device's copy thread).
class Stream {
 public:
  virtual ~Stream() = default;
  // Queues `count` copies as one transfer (a merged segment's tensors): one event, ready once all
  // of them landed, whose times span them. Memory on both sides must stay valid until then.
  virtual EventPtr copy_batch_async(const CopyRegion* regions, size_t count) = 0;
  EventPtr copy_async(void* dst, const void* src, size_t bytes) {
    const CopyRegion region{dst, src, bytes};
    return copy_batch_async(&region, 1);
  }
  // An event that is ready once everything queued before it has finished.
  virtual EventPtr record() = 0;
  // Work queued on this stream after this call starts only once `event` is ready (CUDA:
  // cudaStreamWaitEvent). The fallback blocks the caller until then, which orders the work too.
  virtual void wait_event(const EventPtr& event) { event->wait(); }
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

// An owned block of host memory the device copies from at full speed (CUDA: page-locked by
// cudaHostAlloc; CPU: 64-byte aligned). Returns itself to its device when destroyed.
class HostBuffer {
 public:
  HostBuffer() = default;
  HostBuffer(Device* device, void* data, size_t size) : device_(device), data_(data), size_(size) {}
  ~HostBuffer() { reset(); }
  HostBuffer(HostBuffer&& other) noexcept { *this = std::move(other); }
  HostBuffer& operator=(HostBuffer&& other) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  explicit operator bool() const { return data_ != nullptr; }
  void reset() noexcept;

 private:
  Device* device_ = nullptr;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Weights kept on a device after the job that uploaded them, so the next job with the same model
// and a plan that keeps the same base segment resident copies nothing for it. Keyed by the
// model's identity (ResidencyCache::model_key) and the base segment index; tagged with the model
// instance that uploaded them so disposing that model evicts them. Entries a running job holds
// are never evicted; the others go least recently used first, when a new plan needs the memory.
// Thread-safe.
class ResidencyCache {
 public:
  struct Entry {
    DeviceBuffer buffer;
    const void* owner = nullptr;  // the model instance (for evict_owner)
    uint64_t param_bytes = 0;
  };
  using EntryPtr = std::shared_ptr<Entry>;

  // The identity of the weights a model file holds: its path and what stat says about it, so a
  // file replaced in place (new inode, size or mtime) never matches an older entry.
  static std::string model_key(const std::string& path);

  EntryPtr find(const std::string& model, size_t base, const void* owner);
  void insert(const std::string& model, size_t base, EntryPtr entry);
  // Evicts the least recently used entry no job holds; false if there is none.
  bool evict_one_unused();
  // Evicts every entry the model instance `owner` uploaded (a job holding one keeps its buffer
  // until the job ends).
  void evict_owner(const void* owner);
  void clear();

  size_t entries() const;
  uint64_t bytes() const;            // device bytes the entries hold
  uint64_t evictable_bytes() const;  // of which no job holds

 private:
  struct Slot {
    EntryPtr entry;
    uint64_t last_used = 0;
  };
  static std::string key(const std::string& model, size_t base);
  mutable std::mutex mu_;
  std::unordered_map<std::string, Slot> map_;
  uint64_t clock_ = 0;
};

class Device {
 public:
  virtual ~Device() = default;

  virtual const std::string& name() const = 0;
  virtual DeviceKind kind() const = 0;
  virtual size_t total_bytes() const = 0;
  // Device memory not allocated to anything (weights in the residency cache count as used).
  virtual size_t free_bytes() const = 0;
  // What a new job can have: free memory plus cached weights no job holds (evicted on demand).
  size_t available_bytes() const { return free_bytes() + residency_.evictable_bytes(); }
  virtual MemoryStats memory_stats() const = 0;
  virtual void reset_window_peak() = 0;

  // Device memory; throws DeviceOutOfMemoryError when it does not fit.
  DeviceBuffer alloc(size_t bytes) { return DeviceBuffer(this, alloc_raw(bytes), bytes); }
  // Host memory the copy engine reads at full speed (pinned).
  HostBuffer alloc_host(size_t bytes) { return HostBuffer(this, alloc_host_raw(bytes), bytes); }

  // The stream host↔device copies run on, concurrently with compute.
  virtual Stream& copy_stream() = 0;
  // The stream the model's operations below are queued on, in order. A device may run them
  // asynchronously: they are done once compute_stream().synchronize() returns (the CPU device
  // runs them on the calling thread, so they are done when they return).
  virtual Stream& compute_stream() = 0;
  void wait(const EventPtr& event) { event->wait(); }

  // The model's operations on device memory (see kernels.h), queued on the compute stream.
  virtual void prelude_forward(const DitDims& dims, const PreludeWeights& w, const float* z,
                               float* x, void* scratch) = 0;
  virtual void block_forward(const DitDims& dims, const BlockWeights& w, float* x,
                             void* scratch) = 0;
  virtual void final_forward(const DitDims& dims, const FinalWeights& w, const float* x, float* y,
                             void* scratch) = 0;
  // The sampler's update z[i] ← z[i] − dt·y[i], in float32.
  virtual void euler_update(float* z, const float* y, size_t n, float dt) = 0;

  // checksum64 (checksum.h) of `bytes` of device memory, after everything queued so far on the
  // copy stream. Used to verify transfers. The fallback reads device memory as host memory.
  virtual uint64_t checksum(const void* device_data, size_t bytes);

  // Measures the copy stream's host→device rate (GB/s, 10^9 bytes/s) with a few copies of up to
  // `bytes` from pinned host memory into device memory, and remembers it as peak_copy_gbps().
  // Needs the device idle (DeviceBusyError otherwise) and takes the device memory it copies into
  // only for the measurement.
  double measure_copy_rate(size_t bytes = size_t{64} << 20);
  // The last measure_copy_rate() result; 0 until measured.
  double peak_copy_gbps() const { return peak_copy_gbps_.load(); }

  ResidencyCache& residency() { return residency_; }
  const ResidencyCache& residency() const { return residency_; }

  // One job at a time: the runner's streams, buffers and kernel threads are not shared.
  bool try_begin_job() { return !busy_.exchange(true); }
  void end_job() { busy_.store(false); }
  bool busy() const { return busy_.load(); }

 protected:
  virtual void* alloc_raw(size_t bytes) = 0;
  virtual void free_raw(void* data) noexcept = 0;
  // Defaults: 64-byte aligned host memory from the C library.
  virtual void* alloc_host_raw(size_t bytes);
  virtual void free_host_raw(void* data) noexcept;

  // Derived destructors call this first: cached weights must go back to the device's allocator
  // while it still exists (this base class is destroyed after the derived members).
  void release_residency() noexcept { residency_.clear(); }

 private:
  friend class DeviceBuffer;
  friend class HostBuffer;
  std::atomic<bool> busy_{false};
  std::atomic<double> peak_copy_gbps_{0};
  ResidencyCache residency_;
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
