#pragma once
// The reference device: device memory is a host arena capped at the budget, the copy stream is a
// dedicated thread, compute is the kernels on a thread pool, run on the caller's thread. An
// optional link rate paces the copy thread like a PCIe link, so transfer/compute overlap can be
// studied and tested on a machine without a GPU.
#include <memory>
#include <string>

#include "ferry/arena.h"
#include "ferry/device.h"
#include "ferry/thread_pool.h"

namespace ferry {

struct CpuDeviceOptions {
  size_t capacity_bytes = 0;  // the arena: the "VRAM" budget
  double link_gbps = 0;       // emulated host→device link, GB/s (1e9 bytes/s); 0 = memory speed
  unsigned threads = 0;       // kernel threads; 0 = one per hardware thread
};

class CpuCopyStream;
class CpuComputeStream;

class CpuDevice final : public Device {
 public:
  explicit CpuDevice(const CpuDeviceOptions& options);  // InvalidArgumentError on bad options
  ~CpuDevice() override;

  const std::string& name() const override { return name_; }
  DeviceKind kind() const override { return DeviceKind::kCpu; }
  size_t total_bytes() const override { return arena_.capacity(); }
  size_t free_bytes() const override { return arena_.free_bytes(); }
  MemoryStats memory_stats() const override { return arena_.stats(); }
  void reset_window_peak() override { arena_.reset_window_peak(); }
  Stream& copy_stream() override;
  Stream& compute_stream() override;

  void prelude_forward(const DitDims& dims, const PreludeWeights& w, const float* z, float* x,
                       void* scratch) override;
  void block_forward(const DitDims& dims, const BlockWeights& w, float* x, void* scratch) override;
  void final_forward(const DitDims& dims, const FinalWeights& w, const float* x, float* y,
                     void* scratch) override;
  void euler_update(float* z, const float* y, size_t n, float dt) override;

  double link_gbps() const { return link_gbps_; }
  unsigned threads() const { return pool_.size(); }
  Arena& arena() { return arena_; }

 protected:
  void* alloc_raw(size_t bytes) override { return arena_.allocate(bytes); }
  void free_raw(void* data) noexcept override { arena_.release(data); }

 private:
  std::string name_;
  double link_gbps_;
  Arena arena_;
  ThreadPool pool_;
  std::unique_ptr<CpuCopyStream> copy_stream_;
  std::unique_ptr<CpuComputeStream> compute_stream_;
};

}  // namespace ferry
