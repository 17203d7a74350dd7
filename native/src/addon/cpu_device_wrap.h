#pragma once
// JS class CpuDevice: owns a ferry::CpuDevice (arena, copy thread, kernel threads).
#include <napi.h>

#include <memory>

#include "common.h"
#include "ferry/cpu_device.h"

namespace ferry {
namespace addon {

class CpuDeviceWrap : public Napi::ObjectWrap<CpuDeviceWrap>, public DeviceWrapBase {
 public:
  static Napi::Function define(Napi::Env env);
  explicit CpuDeviceWrap(const Napi::CallbackInfo& info);
  ~CpuDeviceWrap() override;

  // The device, or an InvalidArgumentError if disposed.
  std::shared_ptr<CpuDevice> device(Napi::Env env) const;
  std::shared_ptr<Device> device_or_null() const override { return device_; }
  // Tells V8 how much device memory is committed (it is host memory on this device).
  void sync_external_memory(Napi::Env env) override;
  void release(Napi::Env env, bool adjust_external) override;

 private:
  Napi::Value info(const Napi::CallbackInfo& info);
  Napi::Value stats(const Napi::CallbackInfo& info);
  Napi::Value measure_copy_rate(const Napi::CallbackInfo& info);
  Napi::Value clear_residency(const Napi::CallbackInfo& info);
  Napi::Value set_budget(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);

  std::shared_ptr<Registry> registry_;
  std::shared_ptr<CpuDevice> device_;
  int64_t reported_external_ = 0;
};

}  // namespace addon
}  // namespace ferry
