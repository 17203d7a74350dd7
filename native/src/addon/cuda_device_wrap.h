#pragma once
// JS class CudaDevice: owns a GPU opened by ferry::make_cuda_device. Constructing one without a
// GPU (or in a build without CUDA) throws DeviceUnavailableError; cudaAvailable() says so first.
#include <napi.h>

#include <memory>

#include "common.h"
#include "ferry/cuda_device.h"

namespace ferry {
namespace addon {

class CudaDeviceWrap : public Napi::ObjectWrap<CudaDeviceWrap>, public DeviceWrapBase {
 public:
  static Napi::Function define(Napi::Env env);
  explicit CudaDeviceWrap(const Napi::CallbackInfo& info);
  ~CudaDeviceWrap() override;

  std::shared_ptr<Device> device(Napi::Env env) const;  // InvalidArgumentError if disposed
  std::shared_ptr<Device> device_or_null() const override { return device_; }
  // GPU memory is not host memory: nothing for V8 to count.
  void sync_external_memory(Napi::Env) override {}
  void release(Napi::Env env, bool adjust_external) override;

 private:
  Napi::Value info(const Napi::CallbackInfo& info);
  Napi::Value stats(const Napi::CallbackInfo& info);
  Napi::Value measure_copy_rate(const Napi::CallbackInfo& info);
  Napi::Value clear_residency(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);

  std::shared_ptr<Registry> registry_;
  std::shared_ptr<Device> device_;
  int ordinal_ = 0;
};

// cudaAvailable(): whether this build has CUDA support and sees at least one GPU.
Napi::Value cuda_available(const Napi::CallbackInfo& info);

}  // namespace addon
}  // namespace ferry
