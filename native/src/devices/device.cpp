#include "ferry/device.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "device_memory.h"
#include "ferry/errors.h"
#include "ferry/ggml_support.h"

namespace ferry {

const char* device_kind_name(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::kCpu:
      return "cpu";
    case DeviceKind::kGpu:
      return "gpu";
  }
  return "unknown";
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    device_ = other.device_;
    data_ = other.data_;
    size_ = other.size_;
    other.device_ = nullptr;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void DeviceBuffer::reset() noexcept {
  if (device_ && data_) device_->arena_->release(data_);
  device_ = nullptr;
  data_ = nullptr;
  size_ = 0;
}

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
  if (this != &other) {
    reset();
    device_ = other.device_;
    data_ = other.data_;
    size_ = other.size_;
    handle_ = other.handle_;
    other.device_ = nullptr;
    other.data_ = nullptr;
    other.size_ = 0;
    other.handle_ = nullptr;
  }
  return *this;
}

void HostBuffer::reset() noexcept {
  if (device_ && data_) device_->free_host_raw(data_, handle_);
  device_ = nullptr;
  data_ = nullptr;
  size_ = 0;
  handle_ = nullptr;
}

// ---- residency cache ----

std::string ResidencyCache::model_key(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return std::string();
  return path + "|" + std::to_string(static_cast<uint64_t>(st.st_dev)) + ":" +
         std::to_string(static_cast<uint64_t>(st.st_ino)) + ":" +
         std::to_string(static_cast<uint64_t>(st.st_size)) + ":" +
         std::to_string(static_cast<int64_t>(st.st_mtim.tv_sec)) + "." +
         std::to_string(static_cast<int64_t>(st.st_mtim.tv_nsec));
}

std::string ResidencyCache::key(const std::string& model, size_t base) {
  return model + "#" + std::to_string(base);
}

ResidencyCache::EntryPtr ResidencyCache::find(const std::string& model, size_t base,
                                              const void* owner) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key(model, base));
  if (it == map_.end()) return nullptr;
  it->second.last_used = ++clock_;
  // The same file opened again: the newest instance owns the weights now, so disposing it (not
  // the one that uploaded them, which may be long gone) evicts them.
  it->second.entry->owner = owner;
  return it->second.entry;
}

void ResidencyCache::insert(const std::string& model, size_t base, EntryPtr entry) {
  std::lock_guard<std::mutex> lock(mu_);
  Slot& slot = map_[key(model, base)];
  slot.entry = std::move(entry);
  slot.last_used = ++clock_;
}

bool ResidencyCache::evict_one_unused() {
  EntryPtr victim;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto oldest = map_.end();
    for (auto it = map_.begin(); it != map_.end(); ++it) {
      // Only find() (under this lock) adds holders, so a count of 1 means no job holds it.
      if (it->second.entry.use_count() != 1) continue;
      if (oldest == map_.end() || it->second.last_used < oldest->second.last_used) oldest = it;
    }
    if (oldest == map_.end()) return false;
    victim = std::move(oldest->second.entry);
    map_.erase(oldest);
  }
  return true;  // `victim` frees its buffer here, outside the lock
}

void ResidencyCache::evict_owner(const void* owner) {
  std::vector<EntryPtr> victims;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = map_.begin(); it != map_.end();) {
      if (it->second.entry->owner == owner) {
        victims.push_back(std::move(it->second.entry));
        it = map_.erase(it);
      } else {
        ++it;
      }
    }
  }
}

void ResidencyCache::clear() {
  std::unordered_map<std::string, Slot> victims;
  {
    std::lock_guard<std::mutex> lock(mu_);
    victims.swap(map_);
  }
}

size_t ResidencyCache::entries() const {
  std::lock_guard<std::mutex> lock(mu_);
  return map_.size();
}

uint64_t ResidencyCache::bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t total = 0;
  for (const auto& [k, slot] : map_) total += slot.entry->buffer.size();
  return total;
}

uint64_t ResidencyCache::evictable_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t total = 0;
  for (const auto& [k, slot] : map_) {
    if (slot.entry.use_count() == 1) total += slot.entry->buffer.size();
  }
  return total;
}

// ---- the device ----

Device::Device(std::string name) : name_(std::move(name)) { ggml_setup(); }

Device::~Device() {
  release_memory();
  if (scratch_buft_) destroy_scratch_buffer_type(scratch_buft_);
  if (memory_) ggml_backend_buffer_free(memory_);
  arena_.reset();
  if (backend_) ggml_backend_free(backend_);
}

void Device::attach(ggml_backend_t backend, ggml_backend_buffer_t memory,
                    std::unique_ptr<Arena> arena) {
  backend_ = backend;
  memory_ = memory;
  arena_ = std::move(arena);
  scratch_buft_ = create_scratch_buffer_type(this);
}

void Device::release_memory() noexcept { residency_.clear(); }

std::string Device::backend_name() const {
  return backend_ ? ggml_backend_name(backend_) : std::string("none");
}

size_t Device::tensor_alignment() const {
  return std::max<size_t>(ggml_backend_buffer_get_alignment(memory_), Arena::kAlignment);
}

size_t Device::tensor_alloc_size(const ggml_tensor* tensor) const {
  return ggml_backend_buffer_get_alloc_size(memory_, tensor);
}

DeviceBuffer Device::alloc(size_t bytes) {
  return DeviceBuffer(this, arena_->allocate(bytes), bytes);
}

void Device::place(ggml_tensor* tensor, void* addr) {
  // Not ggml_backend_tensor_alloc: a weight's tensor moves from slot to slot, and every backend
  // reads tensor->data when it runs the graph. The range check is what that call would assert.
  const auto* base = static_cast<const uint8_t*>(ggml_backend_buffer_get_base(memory_));
  const auto* at = static_cast<const uint8_t*>(addr);
  const size_t size = ggml_backend_buffer_get_size(memory_);
  if (at < base || at > base + size || tensor_alloc_size(tensor) > size_t(base + size - at)) {
    throw InvalidArgumentError(name_ + ": tensor \"" + std::string(ggml_get_name(tensor)) +
                               "\" does not fit at that place in device memory");
  }
  tensor->buffer = memory_;
  tensor->data = addr;
}

HostBuffer Device::alloc_host(size_t bytes) {
  void* handle = nullptr;
  void* data = alloc_host_raw(bytes, &handle);
  return HostBuffer(this, data, bytes, handle);
}

void* Device::alloc_host_raw(size_t bytes, void** handle) {
  *handle = nullptr;
  void* p = nullptr;
  if (posix_memalign(&p, 4096, std::max<size_t>(bytes, 1)) != 0) throw std::bad_alloc();
  return p;
}

void Device::free_host_raw(void* data, void*) noexcept { std::free(data); }

void Device::tensor_set(ggml_tensor* tensor, const void* data, size_t offset, size_t bytes) {
  ggml_backend_tensor_set(tensor, data, offset, bytes);
}

void Device::tensor_get(const ggml_tensor* tensor, void* data, size_t offset, size_t bytes) {
  ggml_backend_tensor_get(tensor, data, offset, bytes);
}

void Device::read(const void* addr, void* dst, size_t bytes) {
  copy_stream().synchronize();
  // A byte tensor over the range: ggml's own path out of device memory, whatever the backend.
  ggml_tensor span = byte_span(memory_, const_cast<void*>(addr), bytes);
  tensor_get(&span, dst, 0, bytes);
}

Device::BudgetChange Device::set_budget(size_t bytes) {
  std::unique_lock<std::mutex> admission = admit();
  arena_->set_limit(bytes);
  BudgetChange change;
  change.budget_bytes = arena_->limit();
  // Idle models' weights go first, least recently used; what running jobs hold stays until their
  // plans shrink or they end.
  for (;;) {
    const size_t in_use = arena_->stats().in_use_bytes;
    if (in_use <= change.budget_bytes) break;
    const uint64_t before = residency_.bytes();
    if (!residency_.evict_one_unused()) break;
    change.evicted_bytes += before - residency_.bytes();
  }
  change.in_use_bytes = arena_->stats().in_use_bytes;
  change.over_bytes =
      change.in_use_bytes > change.budget_bytes ? change.in_use_bytes - change.budget_bytes : 0;
  arena_->reset_peak();
  return change;
}

std::string Device::describe_memory() const {
  const MemoryStats s = arena_->stats();
  return "budget " + std::to_string(s.limit_bytes) + " bytes, " + std::to_string(s.in_use_bytes) +
         " in use (" + std::to_string(jobs()) + " job(s) running; cached weights " +
         std::to_string(residency_.bytes()) + ", of which idle " +
         std::to_string(residency_.evictable_bytes()) + "), " + std::to_string(free_bytes()) +
         " left";
}

bool Device::try_begin_job(bool exclusive) {
  int jobs = jobs_.load();
  for (;;) {
    if (jobs < 0 || (exclusive && jobs > 0)) return false;
    if (jobs_.compare_exchange_weak(jobs, exclusive ? -1 : jobs + 1)) return true;
  }
}

void Device::end_job() {
  int jobs = jobs_.load();
  while (!jobs_.compare_exchange_weak(jobs, jobs < 0 ? 0 : jobs - 1)) {
  }
}

double Device::measure_copy_rate(size_t bytes) {
  DeviceLease lease(*this, /*exclusive=*/true);
  // Large enough that per-copy overheads vanish, small enough to fit beside nothing else.
  size_t n = std::min(bytes, free_bytes() / 2) / 4096 * 4096;
  if (n == 0) {
    throw DeviceOutOfMemoryError(name() + ": no free device memory to measure the copy rate with");
  }
  DeviceBuffer dst = alloc(n);
  HostBuffer src = alloc_host(n);
  std::memset(src.data(), 0x5A, n);  // commit the pages before timing
  Stream& stream = copy_stream();
  stream.copy_async(dst.data(), src.data(), n)->wait();  // warm-up: first touch of the pages
  double best = 0;
  for (int i = 0; i < 3; i++) {
    EventPtr e = stream.copy_async(dst.data(), src.data(), n);
    e->wait();
    const double us = e->end_us() - e->start_us();
    if (us > 0) best = std::max(best, static_cast<double>(n) / us / 1e3);
  }
  peak_copy_gbps_.store(best);
  return best;
}

DeviceLease::DeviceLease(Device& device, bool exclusive) {
  if (!device.try_begin_job(exclusive)) {
    throw DeviceBusyError(device.name() +
                          (exclusive ? ": the device is already running a job (this needs it idle)"
                                     : ": the device is held exclusively (a measurement runs)"));
  }
  device_ = &device;
}

DeviceLease& DeviceLease::operator=(DeviceLease&& other) noexcept {
  if (this != &other) {
    reset();
    device_ = other.device_;
    other.device_ = nullptr;
  }
  return *this;
}

Device& DeviceLease::device() const {
  if (!device_) throw InvalidArgumentError("DeviceLease: no device held");
  return *device_;
}

void DeviceLease::reset() noexcept {
  if (device_) device_->end_job();
  device_ = nullptr;
}

}  // namespace ferry
