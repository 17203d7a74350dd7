#include "gpu_device_wrap.h"

namespace ferry {
namespace addon {

Napi::Function GpuDeviceWrap::define(Napi::Env env) {
  return DefineClass(env, "GpuDevice",
                     {
                         InstanceMethod<&GpuDeviceWrap::info>("info"),
                         InstanceMethod<&GpuDeviceWrap::stats>("stats"),
                         InstanceMethod<&GpuDeviceWrap::measure_copy_rate>("measureCopyRate"),
                         InstanceMethod<&GpuDeviceWrap::clear_residency>("clearResidency"),
                         InstanceMethod<&GpuDeviceWrap::set_budget>("setBudget"),
                         InstanceMethod<&GpuDeviceWrap::dispose>("dispose"),
                     });
}

GpuDeviceWrap::GpuDeviceWrap(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<GpuDeviceWrap>(info) {
  Napi::Env env = info.Env();
  registry_ = addon_data(env).registry;
  const std::string where = "GpuDevice options";
  GpuDeviceOptions o;
  if (!info[0].IsUndefined()) {
    Napi::Object options = object_arg(info[0], where);
    const uint64_t ordinal = uint_field_or(options, "ordinal", where, 0);
    if (ordinal > 1024) throw_invalid_argument(env, where + ".ordinal is out of range");
    o.ordinal = static_cast<int>(ordinal);
    o.capacity_bytes = uint_field_or(options, "capacityBytes", where, 0);
  }
  device_ = guarded(env, [&] { return std::make_shared<GpuDevice>(o); });
  registry_->devices.insert(this);
}

GpuDeviceWrap::~GpuDeviceWrap() {
  registry_->devices.erase(this);
  release(Env(), false);
}

std::shared_ptr<GpuDevice> GpuDeviceWrap::device(Napi::Env env) const {
  if (!device_) throw_invalid_argument(env, "GpuDevice has been disposed");
  return device_;
}

void GpuDeviceWrap::release(Napi::Env, bool) { device_.reset(); }

Napi::Value GpuDeviceWrap::info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto d = device(env);
  Napi::Object out = Napi::Object::New(env);
  set_device_info(env, out, *d);
  out.Set("ordinal", d->ordinal());
  out.Set("description", d->description());
  return out;
}

Napi::Value GpuDeviceWrap::stats(const Napi::CallbackInfo& info) {
  return device_stats(info.Env(), *device(info.Env()));
}

Napi::Value GpuDeviceWrap::measure_copy_rate(const Napi::CallbackInfo& info) {
  return addon::measure_copy_rate(info, *device(info.Env()));
}

Napi::Value GpuDeviceWrap::clear_residency(const Napi::CallbackInfo& info) {
  device(info.Env())->residency().clear();
  return info.Env().Undefined();
}

Napi::Value GpuDeviceWrap::set_budget(const Napi::CallbackInfo& info) {
  return addon::set_budget(info, *device(info.Env()));
}

Napi::Value GpuDeviceWrap::dispose(const Napi::CallbackInfo& info) {
  release(info.Env(), true);
  return info.Env().Undefined();
}

Napi::Value gpu_device_count(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), ferry::gpu_device_count());
}

}  // namespace addon
}  // namespace ferry
