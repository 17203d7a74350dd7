// The Node-API addon over ferry_core. Its whole surface is described for TypeScript in
// services/executor/native/AddonTypes.ts; keep the two in step.
#include <napi.h>

#include "common.h"
#include "cpu_device_wrap.h"
#include "cuda_device_wrap.h"
#include "ferry/kernels.h"
#include "model_wrap.h"
#include "run.h"

#ifndef FERRY_VERSION
#define FERRY_VERSION "0.0.0-dev"
#endif

namespace ferry {
namespace addon {
namespace {

Napi::Value version(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), FERRY_VERSION);
}

// scratchBytes(kind, dims): the compute buffer the kernels need for one base segment.
Napi::Value scratch_bytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw_invalid_argument(env, "scratchBytes: kind must be a string");
  const std::string kind = info[0].As<Napi::String>().Utf8Value();
  const std::string where = "scratchBytes dims";
  Napi::Object o = object_arg(info[1], where);
  DitDims d;
  d.hidden = static_cast<int64_t>(uint_field(o, "hidden", where));
  d.heads = static_cast<int64_t>(uint_field(o, "heads", where));
  d.channels = static_cast<int64_t>(uint_field(o, "channels", where));
  d.batch = static_cast<int64_t>(uint_field(o, "batch", where));
  d.tokens = static_cast<int64_t>(uint_field(o, "tokens", where));
  return guarded(env, [&]() -> Napi::Value {
    if (kind == "prelude") return size_value(env, kernels::prelude_scratch_bytes(d));
    if (kind == "block") return size_value(env, kernels::block_scratch_bytes(d));
    if (kind == "final") return size_value(env, kernels::final_scratch_bytes(d));
    throw_invalid_argument(
        env,
        "scratchBytes: kind must be \"prelude\", \"block\" or \"final\", got \"" + kind + "\"");
  });
}

// At environment teardown (worker exit, process exit): mark the registry so finalizers stop
// talking to V8, and free every device and model still alive. Runs are stopped and joined
// earlier by their own hooks (registered later, so run first).
void teardown(Registry* registry) {
  registry->tearing_down = true;
  for (DeviceWrapBase* d : registry->devices) d->release(Napi::Env(nullptr), false);
  for (ModelWrap* m : registry->models) m->release(Napi::Env(nullptr), false);
}

Napi::Object init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData<AddonData>(data);
  Napi::Function device_class = CpuDeviceWrap::define(env);
  Napi::Function cuda_device_class = CudaDeviceWrap::define(env);
  Napi::Function model_class = ModelWrap::define(env);
  data->device_class = Napi::Persistent(device_class);
  data->cuda_device_class = Napi::Persistent(cuda_device_class);
  data->model_class = Napi::Persistent(model_class);
  env.AddCleanupHook(teardown, data->registry.get());

  exports.Set("version", Napi::Function::New(env, version, "version"));
  exports.Set("CpuDevice", device_class);
  exports.Set("CudaDevice", cuda_device_class);
  exports.Set("cudaAvailable", Napi::Function::New(env, cuda_available, "cudaAvailable"));
  exports.Set("Model", model_class);
  exports.Set("openModel", Napi::Function::New(env, open_model, "openModel"));
  exports.Set("scratchBytes", Napi::Function::New(env, scratch_bytes, "scratchBytes"));
  exports.Set("startRun", Napi::Function::New(env, start_run, "startRun"));
  return exports;
}

}  // namespace
}  // namespace addon
}  // namespace ferry

// NODE_API_MODULE wants an unqualified function name.
static Napi::Object InitFerryNative(Napi::Env env, Napi::Object exports) {
  return ferry::addon::init(env, exports);
}

NODE_API_MODULE(ferry_native, InitFerryNative)
