// The Node-API addon over ferry_core. Its whole surface is described for TypeScript in
// lib/native/AddonTypes.ts; keep the two in step.
#include <napi.h>

#include <cmath>
#include <cstring>

#include "common.h"
#include "cpu_device_wrap.h"
#include "ferry/arch.h"
#include "ferry/ggml_support.h"
#include "ferry/measure.h"
#include "ggml-cpu.h"
#include "gpu_device_wrap.h"
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

JobShape job_arg(const Napi::Value& value, const std::string& where) {
  Napi::Object o = object_arg(value, where);
  JobShape job;
  job.batch = static_cast<int64_t>(uint_field(o, "batch", where));
  job.tokens = static_cast<int64_t>(uint_field(o, "tokens", where));
  job.context_tokens = static_cast<int64_t>(uint_field_or(o, "contextTokens", where, 0));
  return job;
}

// measureSegments(arch, config, job): Promise<SegmentMeasure[]> — each base segment's graph built
// for the job and measured (ggml_gallocr's compute buffer for ggml's CPU buffer type, the
// activations it reads and writes, its FLOPs), without weights.
class MeasureWorker : public Napi::AsyncWorker {
 public:
  MeasureWorker(Napi::Env env, std::string arch, std::map<std::string, double> config, JobShape job)
      : Napi::AsyncWorker(env, "ferry.measureSegments"),
        arch_(std::move(arch)),
        config_(std::move(config)),
        job_(job),
        deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      ggml_setup();
      auto arch = arch_from_config(arch_, config_);
      result_ = measure_segments(*arch, job_);
    } catch (...) {
      error_ = capture_exception(std::current_exception());
      SetError(error_.message);
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    Napi::Array out = Napi::Array::New(env, result_.size());
    for (size_t i = 0; i < result_.size(); i++) {
      const SegmentMeasure& m = result_[i];
      Napi::Object o = Napi::Object::New(env);
      o.Set("name", m.name);
      o.Set("kind", m.kind);
      o.Set("computeBufferBytes", size_value(env, m.compute_buffer_bytes));
      o.Set("outputBytes", size_value(env, m.output_bytes));
      o.Set("prevCutBytes", size_value(env, m.prev_cut_bytes));
      o.Set("externalBytes", size_value(env, m.external_bytes));
      o.Set("flops", m.flops);
      out.Set(i, o);
    }
    deferred_.Resolve(out);
  }
  void OnError(const Napi::Error&) override {
    deferred_.Reject(to_js_error(Env(), error_).Value());
  }

 private:
  std::string arch_;
  std::map<std::string, double> config_;
  JobShape job_;
  Napi::Promise::Deferred deferred_;
  std::vector<SegmentMeasure> result_;
  CapturedError error_;
};

std::map<std::string, double> config_arg(Napi::Env env, const Napi::Value& value,
                                         const std::string& where) {
  Napi::Object config_object = object_arg(value, where);
  std::map<std::string, double> config;
  Napi::Array keys = config_object.GetPropertyNames();
  for (uint32_t i = 0; i < keys.Length(); i++) {
    const std::string key = keys.Get(i).As<Napi::String>().Utf8Value();
    Napi::Value v = config_object.Get(key);
    if (!v.IsNumber()) throw_invalid_argument(env, where + "." + key + " must be a number");
    config[key] = v.As<Napi::Number>().DoubleValue();
  }
  return config;
}

Napi::Value measure_segments(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw_invalid_argument(env, "measureSegments: arch must be a string");
  auto config = config_arg(env, info[1], "measureSegments config");
  auto* worker = new MeasureWorker(env, info[0].As<Napi::String>().Utf8Value(), std::move(config),
                                   job_arg(info[2], "measureSegments job"));
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

Napi::Array row_major(Napi::Env env, const int64_t* ne, int n_dims) {
  Napi::Array shape = Napi::Array::New(env, static_cast<size_t>(n_dims));
  for (int d = 0; d < n_dims; d++) {
    shape.Set(static_cast<uint32_t>(d), Napi::Number::New(env, double(ne[n_dims - 1 - d])));
  }
  return shape;
}

const char* role_name(ActivationSpec::Role role) {
  switch (role) {
    case ActivationSpec::Role::kInput:
      return "input";
    case ActivationSpec::Role::kLatent:
      return "latent";
    case ActivationSpec::Role::kOutput:
      return "output";
    case ActivationSpec::Role::kState:
      return "state";
    case ActivationSpec::Role::kStepInput:
      return "stepInput";
    case ActivationSpec::Role::kJobState:
      return "jobState";
  }
  return "state";
}

// describeArch(arch, config, job?): an architecture's layout from its configuration — each base
// segment's weights (names, row-major shapes) and, for a job, its activations — the one source
// of these facts for TypeScript (gen-model, the header-only planner, request checks).
Napi::Value describe_arch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw_invalid_argument(env, "describeArch: arch must be a string");
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  const auto config = config_arg(env, info[1], "describeArch config");
  const bool with_job = info.Length() > 2 && !info[2].IsUndefined();
  const JobShape job = with_job ? job_arg(info[2], "describeArch job") : JobShape{};
  return guarded(env, [&] {
    const auto arch = arch_from_config(name, config);
    Napi::Object out = Napi::Object::New(env);
    out.Set("arch", arch->name());
    out.Set("description", arch->describe());
    Napi::Object cfg = Napi::Object::New(env);
    for (const auto& [key, value] : arch->config()) cfg.Set(key, value);
    out.Set("config", cfg);
    Napi::Array segments = Napi::Array::New(env, arch->segments().size());
    for (size_t i = 0; i < arch->segments().size(); i++) {
      const SegmentSpec& spec = arch->segments()[i];
      Napi::Object seg = Napi::Object::New(env);
      seg.Set("name", spec.name);
      seg.Set("kind", spec.kind);
      Napi::Array weights = Napi::Array::New(env, spec.weights.size());
      for (size_t k = 0; k < spec.weights.size(); k++) {
        const WeightSpec& w = spec.weights[k];
        Napi::Object o = Napi::Object::New(env);
        o.Set("name", w.name);
        o.Set("shape", row_major(env, w.ne, w.n_dims));
        o.Set("matrix", w.matrix);
        weights.Set(static_cast<uint32_t>(k), o);
      }
      seg.Set("weights", weights);
      segments.Set(static_cast<uint32_t>(i), seg);
    }
    out.Set("segments", segments);
    if (with_job) {
      arch->check_job(job);
      const auto specs = arch->activations(job);
      Napi::Array acts = Napi::Array::New(env, specs.size());
      for (size_t i = 0; i < specs.size(); i++) {
        Napi::Object o = Napi::Object::New(env);
        o.Set("name", specs[i].name);
        o.Set("role", role_name(specs[i].role));
        o.Set("shape", row_major(env, specs[i].ne, specs[i].n_dims));
        acts.Set(static_cast<uint32_t>(i), o);
      }
      out.Set("activations", acts);
    }
    return out;
  });
}

ggml_type type_arg(Napi::Env env, const Napi::Value& value, const std::string& where) {
  if (!value.IsString()) throw_invalid_argument(env, where + " must be a ggml type name");
  const std::string name = value.As<Napi::String>().Utf8Value();
  ggml_type type;
  if (!ggml_type_from_name(name, &type)) {
    throw_invalid_argument(env, where + ": unknown ggml type \"" + name + "\"");
  }
  return type;
}

// quantize(type, values, rowLength): Uint8Array — `values` (whole rows of rowLength) in ggml type
// `type`, by ggml's own quantizer (ggml_quantize_chunk), written straight into the JS buffer.
Napi::Value quantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const ggml_type type = type_arg(env, info[0], "quantize type");
  if (!info[1].IsTypedArray() ||
      info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
    throw_invalid_argument(env, "quantize: values must be a Float32Array");
  }
  Napi::Float32Array values = info[1].As<Napi::Float32Array>();
  if (!info[2].IsNumber()) throw_invalid_argument(env, "quantize: rowLength must be a number");
  const double row_length = info[2].As<Napi::Number>().DoubleValue();
  const int64_t block = ggml_blck_size(type);
  const auto n = static_cast<int64_t>(values.ElementLength());
  if (!(row_length >= 1) || row_length != std::floor(row_length) ||
      static_cast<int64_t>(row_length) % block != 0 || n % static_cast<int64_t>(row_length) != 0) {
    throw_invalid_argument(env, "quantize: " + std::to_string(n) + " values in rows of " +
                                    std::to_string(row_length) + " (rows must be whole " +
                                    ggml_type_name(type) + " blocks of " + std::to_string(block) +
                                    ")");
  }
  if (ggml_quantize_requires_imatrix(type)) {
    throw_invalid_argument(env, std::string("quantize: ") + ggml_type_name(type) +
                                    " needs an importance matrix, which Ferry does not make");
  }
  const auto per_row = static_cast<int64_t>(row_length);
  const int64_t rows = n / per_row;
  Napi::Uint8Array out = Napi::Uint8Array::New(env, ggml_row_size(type, per_row) * rows);
  guarded(env, [&] {
    ggml_setup();
    ggml_quantize_init(type);
    ggml_quantize_chunk(type, values.Data(), out.Data(), 0, rows, per_row, nullptr);
    return 0;
  });
  return out;
}

// ggmlTypes(): ggml's type table as this build has it.
Napi::Value ggml_types(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ggml_setup();
  Napi::Array out = Napi::Array::New(env);
  uint32_t k = 0;
  for (int i = 0; i < GGML_TYPE_COUNT; i++) {
    const auto type = static_cast<ggml_type>(i);
    if (ggml_blck_size(type) == 0) continue;
    Napi::Object o = Napi::Object::New(env);
    o.Set("id", i);
    o.Set("name", ggml_type_name(type));
    o.Set("blockSize", Napi::Number::New(env, static_cast<double>(ggml_blck_size(type))));
    o.Set("typeSize", size_value(env, ggml_type_size(type)));
    o.Set("quantized", ggml_is_quantized(type));
    o.Set("weight", ggml_type_is_weight_type(type));
    o.Set("quantizable", ggml_get_type_traits_cpu(type)->from_float != nullptr ||
                             ggml_get_type_traits(type)->from_float_ref != nullptr);
    o.Set("requiresImatrix", ggml_quantize_requires_imatrix(type));
    out.Set(k++, o);
  }
  return out;
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
  Napi::Function gpu_device_class = GpuDeviceWrap::define(env);
  Napi::Function model_class = ModelWrap::define(env);
  data->device_class = Napi::Persistent(device_class);
  data->gpu_device_class = Napi::Persistent(gpu_device_class);
  data->model_class = Napi::Persistent(model_class);
  env.AddCleanupHook(teardown, data->registry.get());

  exports.Set("version", Napi::Function::New(env, version, "version"));
  exports.Set("CpuDevice", device_class);
  exports.Set("GpuDevice", gpu_device_class);
  exports.Set("gpuDeviceCount", Napi::Function::New(env, gpu_device_count, "gpuDeviceCount"));
  exports.Set("Model", model_class);
  exports.Set("openModel", Napi::Function::New(env, open_model, "openModel"));
  exports.Set("measureSegments", Napi::Function::New(env, measure_segments, "measureSegments"));
  exports.Set("describeArch", Napi::Function::New(env, describe_arch, "describeArch"));
  exports.Set("quantize", Napi::Function::New(env, quantize, "quantize"));
  exports.Set("ggmlTypes", Napi::Function::New(env, ggml_types, "ggmlTypes"));
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
