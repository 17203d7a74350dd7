#pragma once
// A GPU device: any GPU backend in ggml's registry (CUDA when built with FERRY_CUDA=1), driven
// through ggml-backend's generic interface only, so this file compiles in every build.
//
//   compute   one backend instance; graphs are queued (ggml_backend_graph_compute_async)
//   copies    a second backend instance on the same GPU — its own stream — uploading with
//             ggml_backend_tensor_set_async from pinned host memory
//   ordering  ggml_backend_event_record/wait between the two: a compute waits for its weights'
//             copy, a copy into a staging slot waits for the compute that last read the slot;
//             the host waits for neither
//   memory    one allocation of the budget in the backend's buffer type, carved by the arena
//   host      the params cache in the backend's host buffer type (page-locked)
//
// Event times come from a watcher thread per engine that synchronises each event in queue order
// and stamps its completion: what the host can observe without blocking the hot loop.
#include <memory>
#include <string>

#include "ferry/device.h"

namespace ferry {

struct GpuDeviceOptions {
  int ordinal = 0;  // which GPU among those ggml's registry lists
  // Device memory the budget covers (allocated at once); 0 = free memory − 512 MiB.
  size_t capacity_bytes = 0;
};

// GPUs ggml can drive in this build on this machine (0 without a GPU backend or a GPU).
int gpu_device_count();

class GpuEngine;

class GpuDevice final : public Device {
 public:
  // DeviceUnavailableError when there is no such GPU (or no GPU backend in this build),
  // DeviceOutOfMemoryError when the budget cannot be allocated.
  explicit GpuDevice(const GpuDeviceOptions& options);
  ~GpuDevice() override;

  DeviceKind kind() const override { return DeviceKind::kGpu; }
  Stream& copy_stream() override;
  EventPtr compute(ggml_cgraph* graph) override;
  void compute_wait(const EventPtr& event) override;
  void tensor_set(ggml_tensor* tensor, const void* data, size_t offset, size_t bytes) override;
  void tensor_get(const ggml_tensor* tensor, void* data, size_t offset, size_t bytes) override;

  int ordinal() const { return ordinal_; }
  const std::string& description() const { return description_; }

 protected:
  void* alloc_host_raw(size_t bytes, void** handle) override;
  void free_host_raw(void* data, void* handle) noexcept override;

 private:
  int ordinal_;
  std::string description_;
  ggml_backend_dev_t dev_ = nullptr;
  ggml_backend_t copy_backend_ = nullptr;
  ggml_backend_buffer_type_t host_buft_ = nullptr;
  std::unique_ptr<GpuEngine> compute_engine_;
  std::unique_ptr<GpuEngine> copy_engine_;
  std::unique_ptr<Stream> copy_stream_;
};

}  // namespace ferry
