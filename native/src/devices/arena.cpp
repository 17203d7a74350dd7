#include "ferry/arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>

#include "ferry/errors.h"

namespace ferry {

namespace {
// From <linux/mman.h> (Linux 5.14); spelled out for older headers.
constexpr int kMadvPopulateWrite = 23;
}  // namespace

Arena::Arena(size_t capacity, std::string owner) : owner_(std::move(owner)), capacity_(capacity) {
  usable_ = capacity / kAlignment * kAlignment;
  if (usable_ == 0) {
    throw InvalidArgumentError(owner_ + ": device memory capacity must be at least " +
                               std::to_string(kAlignment) + " bytes (got " +
                               std::to_string(capacity) + ")");
  }
  // MAP_NORESERVE: reserve address space only; pages are committed as allocations touch them, so
  // an executor with a 24 GB budget does not take 24 GB of RAM before it runs anything.
  void* p = mmap(nullptr, usable_, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    throw DeviceOutOfMemoryError(
        owner_ + ": could not reserve " + std::to_string(usable_) +
        " bytes of address space for device memory: " + std::strerror(errno));
  }
  base_ = static_cast<uint8_t*>(p);
  mapped_ = usable_;
  limit_ = usable_;
#if defined(MADV_HUGEPAGE)
  // Transparent huge pages where the kernel offers them only on request (THP "madvise"): the
  // first touch of each 2 MiB then costs one fault, not 512 — on a VM where faults are expensive,
  // the difference between a first step's copies running at link speed or at fault speed.
  madvise(p, usable_, MADV_HUGEPAGE);
#endif
  free_.emplace(0, usable_);
}

Arena::Arena(void* base, size_t capacity, std::string owner)
    : owner_(std::move(owner)), capacity_(capacity) {
  usable_ = capacity / kAlignment * kAlignment;
  if (usable_ == 0 || base == nullptr) {
    throw InvalidArgumentError(owner_ + ": device memory capacity must be at least " +
                               std::to_string(kAlignment) + " bytes (got " +
                               std::to_string(capacity) + ")");
  }
  if (reinterpret_cast<uintptr_t>(base) % kAlignment != 0) {
    throw InvalidArgumentError(owner_ + ": device memory must be " + std::to_string(kAlignment) +
                               "-byte aligned");
  }
  base_ = static_cast<uint8_t*>(base);
  limit_ = usable_;
  free_.emplace(0, usable_);
}

Arena::~Arena() {
  if (base_ && mapped_ != 0) munmap(base_, mapped_);
}

double Arena::commit() {
  const auto started = std::chrono::steady_clock::now();
  if (mapped_ != 0) {
    // MADV_POPULATE_WRITE (Linux 5.14) faults the pages in without writing them from user space;
    // where the kernel lacks it, one write per page does the same.
    if (madvise(base_, mapped_, kMadvPopulateWrite) != 0) {
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      for (size_t offset = 0; offset < mapped_; offset += page) {
        reinterpret_cast<volatile uint8_t*>(base_)[offset] = 0;
      }
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
}

void* Arena::allocate(size_t bytes) {
  const size_t request = bytes == 0 ? 1 : bytes;
  std::lock_guard<std::mutex> lock(mu_);
  // Rounding every block to the alignment keeps every offset aligned (the base is page-aligned).
  const size_t size = request > usable_ ? 0 : (request + kAlignment - 1) / kAlignment * kAlignment;
  if (size != 0 && in_use_ + size <= limit_) {
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < size) continue;
      const size_t offset = it->first;
      const size_t remaining = it->second - size;
      free_.erase(it);
      if (remaining > 0) free_.emplace(offset + size, remaining);
      used_.emplace(offset, size);
      allocations_++;
      in_use_ += size;
      peak_ = std::max(peak_, in_use_);
      window_peak_ = std::max(window_peak_, in_use_);
      high_water_ = std::max(high_water_, offset + size);
      return base_ + offset;
    }
  }
  const std::string of = limit_ < usable_
                             ? std::to_string(limit_) + " bytes (the budget; capacity " +
                                   std::to_string(capacity_) + ")"
                             : std::to_string(capacity_) + " bytes";
  throw DeviceOutOfMemoryError(owner_ + ": out of device memory: requested " +
                               std::to_string(bytes) + " bytes, " + std::to_string(in_use_) +
                               " of " + of + " in use, largest free block " +
                               std::to_string(largest_free_locked()) + " bytes");
}

bool Arena::release(void* ptr) noexcept {
  if (ptr == nullptr) return false;
  std::lock_guard<std::mutex> lock(mu_);
  const auto p = static_cast<uint8_t*>(ptr);
  if (p < base_ || p >= base_ + usable_) return false;
  auto used = used_.find(static_cast<size_t>(p - base_));
  if (used == used_.end()) return false;
  size_t offset = used->first;
  size_t size = used->second;
  used_.erase(used);
  in_use_ -= size;
  // Merge with the free neighbours so large blocks come back for the next step's large segment.
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && offset + size == next->first) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      prev->second += size;
      return true;
    }
  }
  free_.emplace(offset, size);
  return true;
}

size_t Arena::largest_free_locked() const {
  size_t largest = 0;
  for (const auto& block : free_) largest = std::max(largest, block.second);
  return largest;
}

size_t Arena::free_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  // The capacity rounded down to the alignment is all it hands out; a limit, less.
  return limit_ > in_use_ ? limit_ - in_use_ : 0;
}

void Arena::set_limit(size_t bytes) {
  if (bytes == 0 || bytes > usable_) {
    throw InvalidArgumentError(
        owner_ + ": a memory budget must be between 1 byte and the device's " +
        std::to_string(usable_) + " bytes (got " + std::to_string(bytes) + ")");
  }
  std::lock_guard<std::mutex> lock(mu_);
  limit_ = bytes;
}

size_t Arena::limit() const {
  std::lock_guard<std::mutex> lock(mu_);
  return limit_;
}

void Arena::reset_peak() {
  std::lock_guard<std::mutex> lock(mu_);
  peak_ = in_use_;
}

MemoryStats Arena::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  MemoryStats s;
  s.allocations = allocations_;
  s.in_use_bytes = in_use_;
  s.peak_bytes = peak_;
  s.window_peak_bytes = window_peak_;
  s.committed_bytes = high_water_;
  s.capacity_bytes = capacity_;
  s.limit_bytes = limit_;
  s.largest_free_block = largest_free_locked();
  return s;
}

void Arena::reset_window_peak() {
  std::lock_guard<std::mutex> lock(mu_);
  window_peak_ = in_use_;
}

bool Arena::owns(const void* ptr) const {
  std::lock_guard<std::mutex> lock(mu_);
  const auto p = static_cast<const uint8_t*>(ptr);
  return p >= base_ && p < base_ + usable_ && used_.count(static_cast<size_t>(p - base_)) != 0;
}

}  // namespace ferry
