#include "cpu_device_wrap.h"

namespace ferry {
namespace addon {

Napi::Function CpuDeviceWrap::define(Napi::Env env) {
  return DefineClass(env, "CpuDevice",
                     {
                         InstanceMethod<&CpuDeviceWrap::info>("info"),
                         InstanceMethod<&CpuDeviceWrap::stats>("stats"),
                         InstanceMethod<&CpuDeviceWrap::measure_copy_rate>("measureCopyRate"),
                         InstanceMethod<&CpuDeviceWrap::clear_residency>("clearResidency"),
                         InstanceMethod<&CpuDeviceWrap::set_budget>("setBudget"),
                         InstanceMethod<&CpuDeviceWrap::dispose>("dispose"),
                     });
}

CpuDeviceWrap::CpuDeviceWrap(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<CpuDeviceWrap>(info) {
  Napi::Env env = info.Env();
  registry_ = addon_data(env).registry;
  const std::string where = "CpuDevice options";
  Napi::Object options = object_arg(info[0], where);
  CpuDeviceOptions o;
  o.capacity_bytes = uint_field(options, "capacityBytes", where);
  o.link_gbps = number_field_or(options, "linkGbps", where, 0);
  o.commit_memory =
      has_field(options, "commitMemory") && bool_field(options, "commitMemory", where);
  const uint64_t threads = uint_field_or(options, "threads", where, 0);
  if (threads > 4096) throw_invalid_argument(env, where + ".threads must be at most 4096");
  o.threads = static_cast<unsigned>(threads);
  device_ = guarded(env, [&] { return std::make_shared<CpuDevice>(o); });
  registry_->devices.insert(this);
}

CpuDeviceWrap::~CpuDeviceWrap() {
  registry_->devices.erase(this);
  release(Env(), !registry_->tearing_down);
}

std::shared_ptr<CpuDevice> CpuDeviceWrap::device(Napi::Env env) const {
  if (!device_) throw_invalid_argument(env, "CpuDevice has been disposed");
  return device_;
}

void CpuDeviceWrap::sync_external_memory(Napi::Env env) {
  if (!device_ || registry_->tearing_down) return;
  const int64_t committed = static_cast<int64_t>(device_->memory_stats().committed_bytes);
  if (committed != reported_external_) {
    Napi::MemoryManagement::AdjustExternalMemory(env, committed - reported_external_);
    reported_external_ = committed;
  }
}

void CpuDeviceWrap::release(Napi::Env env, bool adjust_external) {
  if (adjust_external && reported_external_ != 0) {
    Napi::MemoryManagement::AdjustExternalMemory(env, -reported_external_);
  }
  reported_external_ = 0;
  device_.reset();
}

Napi::Value CpuDeviceWrap::info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto d = device(env);
  Napi::Object out = Napi::Object::New(env);
  set_device_info(env, out, *d);
  out.Set("linkGbps", d->link_gbps());
  out.Set("threads", d->threads());
  return out;
}

Napi::Value CpuDeviceWrap::stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto d = device(env);
  sync_external_memory(env);
  return device_stats(env, *d);
}

Napi::Value CpuDeviceWrap::measure_copy_rate(const Napi::CallbackInfo& info) {
  auto d = device(info.Env());
  Napi::Value rate = addon::measure_copy_rate(info, *d);
  sync_external_memory(info.Env());
  return rate;
}

Napi::Value CpuDeviceWrap::clear_residency(const Napi::CallbackInfo& info) {
  device(info.Env())->residency().clear();
  return info.Env().Undefined();
}

Napi::Value CpuDeviceWrap::set_budget(const Napi::CallbackInfo& info) {
  return addon::set_budget(info, *device(info.Env()));
}

Napi::Value CpuDeviceWrap::dispose(const Napi::CallbackInfo& info) {
  release(info.Env(), true);
  return info.Env().Undefined();
}

}  // namespace addon
}  // namespace ferry
