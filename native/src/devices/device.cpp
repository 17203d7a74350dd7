#include "ferry/device.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ferry/checksum.h"
#include "ferry/errors.h"

namespace ferry {

const char* device_kind_name(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::kCpu:
      return "cpu";
    case DeviceKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

uint64_t checksum64(const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  const size_t words = bytes / 8;
  uint64_t sum = 0;
  for (size_t i = 0; i < words; i++) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, 8);
    sum += checksum_term(w, i);
  }
  if (bytes % 8 != 0) {
    uint64_t w = 0;
    std::memcpy(&w, p + 8 * words, bytes % 8);
    sum += checksum_term(w, words);
  }
  return sum + checksum_term(static_cast<uint64_t>(bytes), ~uint64_t{0});
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
  if (device_ && data_) device_->free_raw(data_);
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
    other.device_ = nullptr;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

void HostBuffer::reset() noexcept {
  if (device_ && data_) device_->free_host_raw(data_);
  device_ = nullptr;
  data_ = nullptr;
  size_ = 0;
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

// ---- device defaults ----

void* Device::alloc_host_raw(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, std::max<size_t>(bytes, 1)) != 0) throw std::bad_alloc();
  return p;
}

void Device::free_host_raw(void* data) noexcept { std::free(data); }

uint64_t Device::checksum(const void* device_data, size_t bytes) {
  copy_stream().synchronize();
  return checksum64(device_data, bytes);
}

double Device::measure_copy_rate(size_t bytes) {
  DeviceLease lease(*this);
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

DeviceLease::DeviceLease(Device& device) {
  if (!device.try_begin_job()) {
    throw DeviceBusyError(device.name() +
                          ": the device is already running a job (it runs one at a time)");
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
