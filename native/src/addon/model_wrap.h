#pragma once
// JS class Model (created only by openModel): owns a ferry::Model and its host params cache.
#include <napi.h>

#include <memory>

#include "common.h"
#include "ferry/model.h"

namespace ferry {
namespace addon {

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static Napi::Function define(Napi::Env env);
  static Napi::Object create(Napi::Env env, std::shared_ptr<Model> model);
  explicit ModelWrap(const Napi::CallbackInfo& info);
  ~ModelWrap() override;

  std::shared_ptr<Model> model(Napi::Env env) const;  // InvalidArgumentError if disposed
  void sync_external_memory(Napi::Env env);           // reports the host params cache
  void release(Napi::Env env, bool adjust_external);

 private:
  Napi::Value info(const Napi::CallbackInfo& info);
  Napi::Value host_cache_bytes(const Napi::CallbackInfo& info);
  Napi::Value load_stats(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);

  std::shared_ptr<Registry> registry_;
  std::shared_ptr<Model> model_;
  int64_t reported_external_ = 0;
};

// openModel(path, {device?}): Promise<Model>, laid out for `device`'s memory (the CPU's by
// default).
Napi::Value open_model(const Napi::CallbackInfo& info);

}  // namespace addon
}  // namespace ferry
