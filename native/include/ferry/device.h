#pragma once
// A device: a ggml backend that computes, the device memory it computes in — held under a budget —
// a copy stream that moves weights host→device while the backend computes, and a residency cache
// of weights kept on the device between jobs. The runner is written against this interface only;
// device code knows no model.
//
// Memory. All of a device's memory is one ggml buffer of the budget's size (the CPU device: a
// CPU buffer over Ferry's arena region; a GPU: one allocation in the backend's own buffer type),
// carved by Ferry's Arena (first fit, refuses past capacity, counts allocations and peaks). Weights
// and job activations are placed in pieces of it with place(); graph intermediates come from
// ggml_gallocr through scratch_buffer_type(), a ggml buffer type whose buffers are pieces of the
// same arena — so everything a job touches on the device is inside the budget.
//
// Copies and compute. copy_stream() queues host→device transfers and signals events with real
// timestamps; compute() runs a graph on the backend. The CPU backend has no streams of its own:
// its copy stream is a thread (with an optional emulated link rate) and compute() runs on the
// caller's thread. A GPU backend copies with ggml_backend_tensor_set_async on a second backend
// instance (its own stream), ordered against compute with ggml_backend_event_record/wait, so
// neither side blocks the host.
//
// Sharing. Several jobs may run on a device at once, each on its own thread: their computes take
// turns on the backend (compute_mutex()), their copies share the copy stream, and memory is
// arbitrated. The budget (at most the device memory; an operator may lower it while jobs run)
// caps what all of them hold together. A job makes its allocations at its start — and when its
// plan is swapped at a step boundary — under admit(), evicting cached weights of idle models
// least recently used to make room; one that does not fit even then is refused with a
// DeviceOutOfMemoryError that names what it needed and what the budget had left.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "ferry/arena.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace ferry {

enum class DeviceKind : uint8_t { kCpu, kGpu };
const char* device_kind_name(DeviceKind kind);  // "cpu", "gpu"

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

// An event a host thread completes (the CPU device's copy thread, a GPU device's watcher) and
// others wait on.
class CompletableEvent : public Event {
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

// One piece of a batched copy: host memory → device memory (a place inside Device::memory()).
struct CopyRegion {
  void* dst = nullptr;
  const void* src = nullptr;
  size_t bytes = 0;
};

// An in-order queue of host→device transfers.
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
  // Transfers queued after this call start only once `event` (e.g. the compute that last read a
  // staging slot) is ready. A GPU stream waits on the device; the CPU copy thread in turn.
  virtual void wait_event(const EventPtr& event) = 0;
  void synchronize() { record()->wait(); }
};

class Device;

// A piece of a device's memory; returns itself to the device's arena when destroyed.
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

  // A device address (on a GPU not dereferenceable by the host): use it with Device::place and
  // as a CopyRegion destination.
  void* data() const { return data_; }
  size_t size() const { return size_; }
  explicit operator bool() const { return data_ != nullptr; }
  void reset() noexcept;

 private:
  Device* device_ = nullptr;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Host memory the copy engine reads at full speed (a GPU: page-locked, from the backend's host
// buffer type; the CPU: page-aligned). Returns itself to its device when destroyed.
class HostBuffer {
 public:
  HostBuffer() = default;
  HostBuffer(Device* device, void* data, size_t size, void* handle)
      : device_(device), data_(data), size_(size), handle_(handle) {}
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
  void* handle_ = nullptr;  // the device's own bookkeeping (a ggml host buffer)
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
  virtual ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const std::string& name() const { return name_; }
  virtual DeviceKind kind() const = 0;
  // ggml's name of the backend ("CPU", "CUDA0").
  std::string backend_name() const;

  size_t total_bytes() const { return arena_->capacity(); }
  // Device memory not allocated to anything (weights in the residency cache count as used).
  size_t free_bytes() const { return arena_->free_bytes(); }
  // What a new job can have: free memory plus cached weights no job holds (evicted on demand).
  size_t available_bytes() const { return free_bytes() + residency_.evictable_bytes(); }
  MemoryStats memory_stats() const { return arena_->stats(); }
  void reset_window_peak() { arena_->reset_window_peak(); }
  // Starts a new high-water mark (memory_stats().peak_bytes) at what is in use now.
  void reset_peak() { arena_->reset_peak(); }

  // ---- the memory arbiter ----
  // What everything on the device may hold together: the device memory unless lowered.
  size_t budget_bytes() const { return arena_->limit(); }
  struct BudgetChange {
    size_t budget_bytes = 0;
    size_t in_use_bytes = 0;     // after idle cached weights over the budget were evicted
    uint64_t evicted_bytes = 0;  // of cached weights no job held
    size_t over_bytes = 0;       // still in use beyond the budget: running jobs hold it
  };
  // Sets the budget (1 byte .. total_bytes(); InvalidArgumentError otherwise), evicts idle cached
  // weights least recently used first until what is in use fits it (or nothing idle is left),
  // and starts a new high-water mark. Running jobs keep what they hold until they end or their
  // plans are swapped for ones that fit (RunControl::swap_plan).
  BudgetChange set_budget(size_t bytes);
  // Held while a job makes its allocations, so room one job made by eviction is not taken by
  // another meanwhile, and two jobs each half-allocated cannot refuse each other.
  std::unique_lock<std::mutex> admit() { return std::unique_lock<std::mutex>(admission_mu_); }
  // One line for errors: the budget, what is in use, by how many jobs, what cached weights hold.
  std::string describe_memory() const;

  // ---- ggml ----
  ggml_backend_t backend() const { return backend_; }
  // All of the device's memory: one ggml buffer; every tensor a job uses lives inside it.
  ggml_backend_buffer_t memory() const { return memory_; }
  // For ggml_gallocr: a buffer type whose buffers are pieces of this device's arena.
  ggml_backend_buffer_type_t scratch_buffer_type() const { return scratch_buft_; }
  // Alignment of tensors in memory(), and the bytes `tensor` takes there (padding quantized rows
  // where the backend's kernels read past the end, e.g. CUDA).
  size_t tensor_alignment() const;
  size_t tensor_alloc_size(const ggml_tensor* tensor) const;

  // A piece of device memory; DeviceOutOfMemoryError when it does not fit.
  DeviceBuffer alloc(size_t bytes);
  // Points `tensor` at device address `addr` (inside memory(); a DeviceBuffer's data() plus an
  // offset). A weight's tensor is placed again whenever its segment moves to another slot;
  // InvalidArgumentError if it would not lie inside device memory.
  void place(ggml_tensor* tensor, void* addr);

  // Host memory the copy engine reads at full speed (pinned on a GPU).
  HostBuffer alloc_host(size_t bytes);

  // The stream host→device copies run on, concurrently with compute.
  virtual Stream& copy_stream() = 0;
  // Computes `graph` (its tensors placed in memory(), intermediates allocated) on the backend,
  // after everything queued before on the compute side. Returns an event for its completion,
  // with the compute's start and end times. The CPU device computes on the calling thread and
  // returns a completed event; a GPU queues the work.
  virtual EventPtr compute(ggml_cgraph* graph) = 0;
  // Compute queued after this call starts only once `event` (a copy) is ready; the CPU device
  // blocks the caller until then.
  virtual void compute_wait(const EventPtr& event) = 0;
  // Small synchronous transfers between the host and a tensor in device memory (job inputs and
  // outputs, the checksum of a copy), after everything queued on the compute side.
  virtual void tensor_set(ggml_tensor* tensor, const void* data, size_t offset, size_t bytes);
  virtual void tensor_get(const ggml_tensor* tensor, void* data, size_t offset, size_t bytes);
  // Reads `bytes` of device memory at `addr` into `dst` (after every copy queued so far).
  void read(const void* addr, void* dst, size_t bytes);

  // Measures the copy stream's host→device rate (GB/s, 10^9 bytes/s) with a few copies of up to
  // `bytes` from pinned host memory into device memory, and remembers it as peak_copy_gbps().
  // Needs the device free of jobs (DeviceBusyError otherwise) and takes the device memory it
  // copies into only for the measurement.
  double measure_copy_rate(size_t bytes = size_t{64} << 20);
  // The last measure_copy_rate() result; 0 until measured.
  double peak_copy_gbps() const { return peak_copy_gbps_.load(); }

  ResidencyCache& residency() { return residency_; }
  const ResidencyCache& residency() const { return residency_; }

  // Jobs share the device (each holds a DeviceLease); an exclusive holder (the copy-rate
  // measurement) excludes them. False when the other kind holds it.
  bool try_begin_job(bool exclusive = false);
  void end_job();
  int jobs() const { return std::max(0, jobs_.load()); }
  bool busy() const { return jobs_.load() != 0; }

 protected:
  explicit Device(std::string name);
  // Derived constructors call this once their backend exists: `memory` (owned from now on)
  // becomes the device memory and `arena` carves it.
  void attach(ggml_backend_t backend, ggml_backend_buffer_t memory, std::unique_ptr<Arena> arena);
  // Host buffers: page-aligned C-library memory by default; a GPU uses its host buffer type.
  virtual void* alloc_host_raw(size_t bytes, void** handle);
  virtual void free_host_raw(void* data, void* handle) noexcept;
  // Derived destructors call this first: the copy engine must be idle and cached weights back in
  // the arena before the backend and memory go (released by ~Device, after the derived members).
  void release_memory() noexcept;
  // Computes from several jobs' threads take turns on the backend (its work buffer and stream
  // are one).
  std::mutex& compute_mutex() { return compute_mu_; }

 private:
  friend class DeviceBuffer;
  friend class HostBuffer;
  std::string name_;
  ggml_backend_t backend_ = nullptr;
  ggml_backend_buffer_t memory_ = nullptr;
  std::unique_ptr<Arena> arena_;
  ggml_backend_buffer_type_t scratch_buft_ = nullptr;  // owned (device_memory.cpp)
  std::atomic<int> jobs_{0};                           // running jobs; -1: held exclusively
  std::atomic<double> peak_copy_gbps_{0};
  std::mutex admission_mu_;
  std::mutex compute_mu_;
  ResidencyCache residency_;
};

// Holds a device for one job (several jobs may hold it at once; busy() while any does). An
// exclusive lease waits for nobody: DeviceBusyError if any job holds the device, and a job's
// lease gets DeviceBusyError while an exclusive one is held.
class DeviceLease {
 public:
  DeviceLease() = default;
  explicit DeviceLease(Device& device, bool exclusive = false);
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
