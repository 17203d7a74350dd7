#pragma once
// Device memory of the CPU device: one reserved region of `capacity` bytes with a first-fit
// free-list allocator. It stands in for VRAM under a budget, so it refuses (rather than grows
// past) its capacity, and it counts what a VRAM allocator would be judged by: allocations made,
// bytes in use, peak. A limit below the capacity (the device's budget, which an operator may lower
// while jobs run) is refused past the same way.
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace ferry {

struct MemoryStats {
  uint64_t allocations = 0;      // allocations ever made (a measure of per-step churn)
  size_t in_use_bytes = 0;       // bytes currently allocated (after rounding to the alignment)
  size_t peak_bytes = 0;         // highest in_use_bytes since created (or reset_peak())
  size_t window_peak_bytes = 0;  // highest in_use_bytes since the last reset_window_peak()
  size_t committed_bytes = 0;    // bytes of the region ever touched by an allocation
  size_t capacity_bytes = 0;
  size_t limit_bytes = 0;  // what allocations may take in all (≤ capacity; the budget)
  size_t largest_free_block = 0;
};

class Arena {
 public:
  static constexpr size_t kAlignment =
      256;  // every ggml backend's tensor alignment (CUDA 128) and then some

  // Reserves address space only (pages are committed when first written), so a large budget
  // costs nothing until used. `owner` names the device in error messages.
  Arena(size_t capacity, std::string owner);
  // Manages `capacity` bytes at `base`, owned by the caller (the CUDA device's one cudaMalloc):
  // the arena only hands out pieces of it and never frees it.
  Arena(void* base, size_t capacity, std::string owner);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Returns kAlignment-aligned memory of at least `bytes` (0 is treated as 1). Throws
  // DeviceOutOfMemoryError naming the request, bytes in use, capacity (and limit) and the largest
  // free block when no free block is large enough or the limit would be passed.
  void* allocate(size_t bytes);
  // Commits every page of the region now (an arena this object mapped; a no-op on one it was
  // given). The first write to fresh memory is a page fault the hypervisor may also have to
  // serve — 0.3–0.8 GB/s on this project's VMs — so a device that commits at start-up copies at
  // memory speed from its first job on, as a GPU's memory does. Returns the seconds it took.
  double commit();
  // Returns a block to the free list, merging it with free neighbours. False (and no change) if
  // `ptr` is not a live allocation of this arena.
  bool release(void* ptr) noexcept;

  size_t capacity() const { return capacity_; }
  // The region's first byte (kAlignment-aligned) and its usable size (capacity rounded down).
  void* base() const { return base_; }
  size_t usable() const { return usable_; }
  // Bytes that may still be allocated: the limit minus what is in use (0 when over the limit).
  size_t free_bytes() const;
  // At most `usable()`; allocations already made stay (in use may exceed a lowered limit until
  // they are released). InvalidArgumentError for 0 or more than the capacity.
  void set_limit(size_t bytes);
  size_t limit() const;
  MemoryStats stats() const;
  // Starts a new high-water mark at what is in use now (peak_bytes).
  void reset_peak();
  // Starts a new window for window_peak_bytes (the runner opens one per step).
  void reset_window_peak();
  bool owns(const void* ptr) const;

 private:
  size_t largest_free_locked() const;

  std::string owner_;
  size_t capacity_ = 0;
  size_t usable_ = 0;  // capacity rounded down to the alignment
  size_t limit_ = 0;   // ≤ usable_
  uint8_t* base_ = nullptr;
  size_t mapped_ = 0;  // bytes this arena mapped itself (0: external memory)

  mutable std::mutex mu_;
  std::map<size_t, size_t> free_;            // offset → size, ordered for first fit and merging
  std::unordered_map<size_t, size_t> used_;  // offset → size
  uint64_t allocations_ = 0;
  size_t in_use_ = 0;
  size_t peak_ = 0;
  size_t window_peak_ = 0;
  size_t high_water_ = 0;
};

}  // namespace ferry
