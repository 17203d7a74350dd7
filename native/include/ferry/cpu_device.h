#pragma once
// The CPU device: ggml's CPU backend computes; device memory is a host arena capped at the budget;
// the copy stream is a dedicated thread. An optional link rate paces the copy thread like a PCIe
// link, so transfer/compute overlap can be studied and tested on a machine without a GPU.
#include <memory>
#include <string>

#include "ferry/device.h"

struct ggml_threadpool;

namespace ferry {

struct CpuDeviceOptions {
  size_t capacity_bytes = 0;  // the arena: the "VRAM" budget
  double link_gbps = 0;       // emulated host→device link, GB/s (1e9 bytes/s); 0 = memory speed
  unsigned threads = 0;       // ggml compute threads; 0 = one per hardware thread
  // ggml's threadpool polling between graphs (0..100): 0 sleeps at once, freeing the cores for
  // the copy and loader threads at the cost of a wake-up per graph.
  int poll = 0;
  // Commit the whole arena at construction (Arena::commit) rather than on first touch: the
  // executor process does, so its first job's copies run at link speed; tests and tools that make
  // many short-lived devices do not.
  bool commit_memory = false;
};

class CpuCopyStream;

class CpuDevice final : public Device {
 public:
  explicit CpuDevice(const CpuDeviceOptions& options);  // InvalidArgumentError on bad options
  ~CpuDevice() override;

  DeviceKind kind() const override { return DeviceKind::kCpu; }
  Stream& copy_stream() override;
  EventPtr compute(ggml_cgraph* graph) override;
  void compute_wait(const EventPtr& event) override;

  double link_gbps() const { return link_gbps_; }
  unsigned threads() const { return threads_; }

 private:
  double link_gbps_;
  unsigned threads_;
  ggml_threadpool* threadpool_ = nullptr;
  std::unique_ptr<CpuCopyStream> copy_stream_;
};

}  // namespace ferry
