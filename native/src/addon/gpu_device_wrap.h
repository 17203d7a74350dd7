#pragma once
// JS class GpuDevice: owns a ferry::GpuDevice (a ggml GPU backend: CUDA when built with
// FERRY_CUDA=1). Constructing one without a GPU (or in a build without a GPU backend) throws
// DeviceUnavailableError; gpuDeviceCount() says so first.
#include <napi.h>

#include <memory>

#include "common.h"
#include "ferry/gpu_device.h"

namespace ferry {
namespace addon {

class GpuDeviceWrap : public Napi::ObjectWrap<GpuDeviceWrap>, public DeviceWrapBase {
 public:
  static Napi::Function define(Napi::Env env);
  explicit GpuDeviceWrap(const Napi::CallbackInfo& info);
  ~GpuDeviceWrap() override;

  std::shared_ptr<GpuDevice> device(Napi::Env env) const;  // InvalidArgumentError if disposed
  std::shared_ptr<Device> device_or_null() const override { return device_; }
  // GPU memory is not host memory: nothing for V8 to count.
  void sync_external_memory(Napi::Env) override {}
  void release(Napi::Env env, bool adjust_external) override;

 private:
  Napi::Value info(const Napi::CallbackInfo& info);
  Napi::Value stats(const Napi::CallbackInfo& info);
  Napi::Value measure_copy_rate(const Napi::CallbackInfo& info);
  Napi::Value clear_residency(const Napi::CallbackInfo& info);
  Napi::Value set_budget(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);

  std::shared_ptr<Registry> registry_;
  std::shared_ptr<GpuDevice> device_;
};

// gpuDeviceCount(): GPUs ggml can drive in this build on this machine.
Napi::Value gpu_device_count(const Napi::CallbackInfo& info);

}  // namespace addon
}  // namespace ferry
