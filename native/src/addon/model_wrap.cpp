#include "model_wrap.h"

namespace ferry {
namespace addon {

namespace {

// Passed to the constructor by create(); JS code cannot make one, so `new Model()` fails.
struct ModelToken {
  std::shared_ptr<Model> model;
};

Napi::Array shape_array(Napi::Env env, const std::vector<int64_t>& shape) {
  Napi::Array a = Napi::Array::New(env, shape.size());
  for (size_t i = 0; i < shape.size(); i++)
    a.Set(i, Napi::Number::New(env, static_cast<double>(shape[i])));
  return a;
}

// Parses and validates the file off the main thread: the header of a large model is megabytes
// of JSON.
class OpenModelWorker : public Napi::AsyncWorker {
 public:
  OpenModelWorker(Napi::Env env, std::string path, std::shared_ptr<Device> device)
      : Napi::AsyncWorker(env, "ferry.openModel"),
        path_(std::move(path)),
        device_(std::move(device)),
        deferred_(Napi::Promise::Deferred::New(env)) {}

  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      Model::Options options;
      if (device_) options.layout = ggml_backend_buffer_get_type(device_->memory());
      if (device_ && device_->kind() == DeviceKind::kGpu) {
        // A GPU copies from pinned host memory asynchronously: read into pinned buffers.
        options.allocator = device_host_allocator(device_);
      } else {
        // The CPU device copies with memcpy: the file's mapping is the params cache, so a warm
        // file costs no copy and no page faults (a GPU needs pinned buffers instead).
        options.loader.map = true;
      }
      model_ = Model::open(path_, options);
    } catch (...) {
      error_ = capture_exception(std::current_exception());
      SetError(error_.message);
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    try {
      deferred_.Resolve(ModelWrap::create(env, std::move(model_)));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }

  void OnError(const Napi::Error&) override {
    deferred_.Reject(to_js_error(Env(), error_).Value());
  }

 private:
  std::string path_;
  std::shared_ptr<Device> device_;  // held until the model is laid out for it
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<Model> model_;
  CapturedError error_;
};

}  // namespace

Napi::Function ModelWrap::define(Napi::Env env) {
  return DefineClass(env, "Model",
                     {
                         InstanceMethod<&ModelWrap::info>("info"),
                         InstanceMethod<&ModelWrap::host_cache_bytes>("hostCacheBytes"),
                         InstanceMethod<&ModelWrap::load_stats>("loadStats"),
                         InstanceMethod<&ModelWrap::dispose>("dispose"),
                     });
}

Napi::Object ModelWrap::create(Napi::Env env, std::shared_ptr<Model> model) {
  ModelToken token{std::move(model)};
  return addon_data(env).model_class.New({Napi::External<ModelToken>::New(env, &token)});
}

ModelWrap::ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
  Napi::Env env = info.Env();
  registry_ = addon_data(env).registry;
  if (info.Length() != 1 || !info[0].IsExternal()) {
    throw_invalid_argument(env, "Model cannot be constructed directly; use openModel(path)");
  }
  model_ = info[0].As<Napi::External<ModelToken>>().Data()->model;
  registry_->models.insert(this);
}

ModelWrap::~ModelWrap() {
  registry_->models.erase(this);
  release(Env(), !registry_->tearing_down);
}

std::shared_ptr<Model> ModelWrap::model(Napi::Env env) const {
  if (!model_) throw_invalid_argument(env, "Model has been disposed");
  return model_;
}

void ModelWrap::sync_external_memory(Napi::Env env) {
  if (!model_ || registry_->tearing_down) return;
  const int64_t held = static_cast<int64_t>(model_->host_cache_bytes());
  if (held != reported_external_) {
    Napi::MemoryManagement::AdjustExternalMemory(env, held - reported_external_);
    reported_external_ = held;
  }
}

void ModelWrap::release(Napi::Env env, bool adjust_external) {
  if (adjust_external && reported_external_ != 0) {
    Napi::MemoryManagement::AdjustExternalMemory(env, -reported_external_);
  }
  reported_external_ = 0;
  if (model_) {
    // Its weights kept resident on devices go with it (a run holding them keeps them until it
    // ends).
    for (DeviceWrapBase* d : registry_->devices) {
      if (auto device = d->device_or_null()) device->residency().evict_owner(model_.get());
    }
  }
  model_.reset();
}

Napi::Value ModelWrap::info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = model(env);
  const ModelFile& file = m->file();
  Napi::Object out = Napi::Object::New(env);
  out.Set("path", m->path());
  out.Set("format", model_format_name(m->format()));
  out.Set("arch", m->arch().name());
  out.Set("description", m->arch().describe());
  out.Set("layout", m->layout_name());
  Napi::Object config = Napi::Object::New(env);
  for (const auto& [key, value] : m->arch().config()) config.Set(key, value);
  out.Set("config", config);

  Napi::Object metadata = Napi::Object::New(env);
  for (const auto& [key, value] : file.metadata()) metadata.Set(key, value);
  out.Set("metadata", metadata);

  Napi::Array tensors = Napi::Array::New(env, file.tensors().size());
  for (size_t i = 0; i < file.tensors().size(); i++) {
    const TensorInfo& t = file.tensors()[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", t.name);
    o.Set("dtype", t.ggml_type >= 0 ? t.ggml_type_name : std::string(st_dtype_name(t.dtype)));
    o.Set("shape", shape_array(env, t.shape));
    o.Set("offset", size_value(env, t.begin));
    o.Set("bytes", size_value(env, t.nbytes()));
    tensors.Set(i, o);
  }
  out.Set("tensors", tensors);

  const auto& segments = m->base_segments();
  Napi::Array base = Napi::Array::New(env, segments.size());
  for (size_t i = 0; i < segments.size(); i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", segments[i].name);
    o.Set("kind", segments[i].kind);
    o.Set("paramBytes", size_value(env, segments[i].param_bytes));
    o.Set("packedBytes", size_value(env, segments[i].packed_bytes));
    Napi::Array names = Napi::Array::New(env, segments[i].tensors.size());
    for (size_t j = 0; j < segments[i].tensors.size(); j++)
      names.Set(j, segments[i].tensors[j].name);
    o.Set("tensorNames", names);
    base.Set(i, o);
  }
  out.Set("baseSegments", base);
  return out;
}

Napi::Value ModelWrap::host_cache_bytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = model(env);
  sync_external_memory(env);
  return size_value(env, m->host_cache_bytes());
}

Napi::Value ModelWrap::load_stats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const LoadStats st = model(env)->load_stats();
  Napi::Object out = Napi::Object::New(env);
  out.Set("bytesRead", size_value(env, st.bytes_read));
  out.Set("directBytes", size_value(env, st.direct_bytes));
  out.Set("readSeconds", st.read_seconds);
  out.Set("segmentReads", size_value(env, st.segment_reads));
  out.Set("hits", size_value(env, st.hits));
  out.Set("misses", size_value(env, st.misses));
  out.Set("hostBytes", size_value(env, st.host_bytes));
  out.Set("directIo", st.direct_io);
  out.Set("mapped", st.mapped);
  return out;
}

Napi::Value ModelWrap::dispose(const Napi::CallbackInfo& info) {
  release(info.Env(), true);
  return info.Env().Undefined();
}

Napi::Value open_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw_invalid_argument(env, "openModel(path): path must be a string");
  std::shared_ptr<Device> device;
  if (!info[1].IsUndefined()) {
    Napi::Object options = object_arg(info[1], "openModel options");
    if (has_field(options, "device")) {
      DeviceWrapBase* wrap = unwrap_device(env, options.Get("device"));
      if (!wrap || !(device = wrap->device_or_null())) {
        throw_invalid_argument(env,
                               "openModel options.device must be a live CpuDevice or GpuDevice");
      }
    }
  }
  auto* worker = new OpenModelWorker(env, info[0].As<Napi::String>().Utf8Value(), device);
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

}  // namespace addon
}  // namespace ferry
