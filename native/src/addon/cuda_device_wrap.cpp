#include "cuda_device_wrap.h"

namespace ferry {
namespace addon {

Napi::Function CudaDeviceWrap::define(Napi::Env env) {
  return DefineClass(env, "CudaDevice",
                     {
                         InstanceMethod<&CudaDeviceWrap::info>("info"),
                         InstanceMethod<&CudaDeviceWrap::stats>("stats"),
                         InstanceMethod<&CudaDeviceWrap::measure_copy_rate>("measureCopyRate"),
                         InstanceMethod<&CudaDeviceWrap::clear_residency>("clearResidency"),
                         InstanceMethod<&CudaDeviceWrap::dispose>("dispose"),
                     });
}

CudaDeviceWrap::CudaDeviceWrap(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<CudaDeviceWrap>(info) {
  Napi::Env env = info.Env();
  registry_ = addon_data(env).registry;
  const std::string where = "CudaDevice options";
  CudaDeviceOptions o;
  if (!info[0].IsUndefined()) {
    Napi::Object options = object_arg(info[0], where);
    const uint64_t ordinal = uint_field_or(options, "ordinal", where, 0);
    if (ordinal > 1024) throw_invalid_argument(env, where + ".ordinal is out of range");
    o.ordinal = static_cast<int>(ordinal);
    o.capacity_bytes = uint_field_or(options, "capacityBytes", where, 0);
  }
  ordinal_ = o.ordinal;
  device_ = guarded(env, [&] { return make_cuda_device(o); });
  registry_->devices.insert(this);
}

CudaDeviceWrap::~CudaDeviceWrap() {
  registry_->devices.erase(this);
  release(Env(), false);
}

std::shared_ptr<Device> CudaDeviceWrap::device(Napi::Env env) const {
  if (!device_) throw_invalid_argument(env, "CudaDevice has been disposed");
  return device_;
}

void CudaDeviceWrap::release(Napi::Env, bool) { device_.reset(); }

Napi::Value CudaDeviceWrap::info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto d = device(env);
  Napi::Object out = Napi::Object::New(env);
  set_device_info(env, out, *d);
  out.Set("ordinal", ordinal_);
  out.Set("cublas", cuda_has_cublas());
  return out;
}

Napi::Value CudaDeviceWrap::stats(const Napi::CallbackInfo& info) {
  return device_stats(info.Env(), *device(info.Env()));
}

Napi::Value CudaDeviceWrap::measure_copy_rate(const Napi::CallbackInfo& info) {
  return addon::measure_copy_rate(info, *device(info.Env()));
}

Napi::Value CudaDeviceWrap::clear_residency(const Napi::CallbackInfo& info) {
  device(info.Env())->residency().clear();
  return info.Env().Undefined();
}

Napi::Value CudaDeviceWrap::dispose(const Napi::CallbackInfo& info) {
  release(info.Env(), true);
  return info.Env().Undefined();
}

Napi::Value cuda_available(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), cuda_device_count() > 0);
}

}  // namespace addon
}  // namespace ferry
