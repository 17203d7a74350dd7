#include "model_wrap.h"

namespace ferry {
namespace addon {

namespace {

// Passed to the constructor by create(); JS code cannot make one, so `new Model()` fails.
struct ModelToken {
  std::shared_ptr<DitModel> model;
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
  OpenModelWorker(Napi::Env env, std::string path)
      : Napi::AsyncWorker(env, "ferry.openModel"),
        path_(std::move(path)),
        deferred_(Napi::Promise::Deferred::New(env)) {}

  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      model_ = DitModel::open(path_);
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
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<DitModel> model_;
  CapturedError error_;
};

}  // namespace

Napi::Function ModelWrap::define(Napi::Env env) {
  return DefineClass(env, "Model",
                     {
                         InstanceMethod<&ModelWrap::info>("info"),
                         InstanceMethod<&ModelWrap::host_cache_bytes>("hostCacheBytes"),
                         InstanceMethod<&ModelWrap::dispose>("dispose"),
                     });
}

Napi::Object ModelWrap::create(Napi::Env env, std::shared_ptr<DitModel> model) {
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

std::shared_ptr<DitModel> ModelWrap::model(Napi::Env env) const {
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
  const SafetensorsFile& file = m->file();
  Napi::Object out = Napi::Object::New(env);
  out.Set("path", m->path());
  const bool gguf = !file.tensors().empty() && file.tensors().front().ggml_type >= 0;
  out.Set("format", gguf ? "gguf" : "safetensors");

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
    o.Set("paramBytes", size_value(env, segments[i].param_bytes));
    Napi::Array names = Napi::Array::New(env, segments[i].tensors.size());
    for (size_t j = 0; j < segments[i].tensors.size(); j++)
      names.Set(j, segments[i].tensors[j].name);
    o.Set("tensorNames", names);
    base.Set(i, o);
  }
  out.Set("baseSegments", base);

  const ModelDims& d = m->dims();
  Napi::Object dims = Napi::Object::New(env);
  dims.Set("hidden", Napi::Number::New(env, static_cast<double>(d.hidden)));
  dims.Set("heads", Napi::Number::New(env, static_cast<double>(d.heads)));
  dims.Set("channels", Napi::Number::New(env, static_cast<double>(d.channels)));
  dims.Set("blocks", Napi::Number::New(env, static_cast<double>(d.blocks)));
  out.Set("dims", dims);
  return out;
}

Napi::Value ModelWrap::host_cache_bytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto m = model(env);
  sync_external_memory(env);
  return size_value(env, m->host_cache_bytes());
}

Napi::Value ModelWrap::dispose(const Napi::CallbackInfo& info) {
  release(info.Env(), true);
  return info.Env().Undefined();
}

Napi::Value open_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw_invalid_argument(env, "openModel(path): path must be a string");
  auto* worker = new OpenModelWorker(env, info[0].As<Napi::String>().Utf8Value());
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

}  // namespace addon
}  // namespace ferry
