#include "common.h"

#include <cmath>

#include "cpu_device_wrap.h"
#include "ferry/errors.h"
#include "gpu_device_wrap.h"

namespace ferry {
namespace addon {

CapturedError capture_exception(std::exception_ptr error) {
  CapturedError out;
  try {
    std::rethrow_exception(error);
  } catch (const IoError& e) {
    out.name = e.name();
    out.message = e.what();
    out.code = e.code();
    out.syscall = e.syscall();
    out.path = e.path();
    out.error_number = e.error_number();
  } catch (const ferry::Error& e) {
    out.name = e.name();
    out.message = e.what();
  } catch (const std::bad_alloc&) {
    out.message = "out of host memory";
  } catch (const std::exception& e) {
    out.message = e.what();
  } catch (...) {
    out.message = "unknown native error";
  }
  return out;
}

Napi::Error to_js_error(Napi::Env env, const CapturedError& error) {
  Napi::Error e = Napi::Error::New(env, error.message);
  Napi::Object o = e.Value();
  o.Set("name", error.name);
  if (!error.code.empty()) {
    o.Set("code", error.code);
    o.Set("errno", Napi::Number::New(env, -error.error_number));  // libuv's sign, as fs errors
    o.Set("syscall", error.syscall);
    o.Set("path", error.path);
  }
  // The stack was captured with the name "Error"; restate its first line with the real name.
  Napi::Value stack = o.Get("stack");
  if (stack.IsString()) {
    std::string s = stack.As<Napi::String>().Utf8Value();
    const std::string prefix = "Error: ";
    if (s.compare(0, prefix.size(), prefix) == 0) {
      o.Set("stack", error.name + ": " + s.substr(prefix.size()));
    }
  }
  return e;
}

void throw_invalid_argument(Napi::Env env, const std::string& message) {
  CapturedError e;
  e.name = "InvalidArgumentError";
  e.message = message;
  throw to_js_error(env, e);
}

Napi::Object object_arg(const Napi::Value& value, const std::string& where) {
  if (!value.IsObject() || value.IsArray() || value.IsFunction()) {
    throw_invalid_argument(value.Env(), where + " must be an object");
  }
  return value.As<Napi::Object>();
}

bool has_field(const Napi::Object& object, const char* key) {
  Napi::Value v = object.Get(key);
  return !v.IsUndefined() && !v.IsNull();
}

uint64_t uint_field(const Napi::Object& object, const char* key, const std::string& where) {
  Napi::Value v = object.Get(key);
  const double max = 9007199254740992.0;  // 2^53
  if (!v.IsNumber()) throw_invalid_argument(object.Env(), where + "." + key + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d < 0 || d > max || std::floor(d) != d) {
    throw_invalid_argument(
        object.Env(),
        where + "." + key + " must be a non-negative integer, got " + v.ToString().Utf8Value());
  }
  return static_cast<uint64_t>(d);
}

uint64_t uint_field_or(const Napi::Object& object, const char* key, const std::string& where,
                       uint64_t fallback) {
  return has_field(object, key) ? uint_field(object, key, where) : fallback;
}

double number_field_or(const Napi::Object& object, const char* key, const std::string& where,
                       double fallback) {
  if (!has_field(object, key)) return fallback;
  Napi::Value v = object.Get(key);
  if (!v.IsNumber()) throw_invalid_argument(object.Env(), where + "." + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

bool bool_field(const Napi::Object& object, const char* key, const std::string& where) {
  Napi::Value v = object.Get(key);
  if (!v.IsBoolean())
    throw_invalid_argument(object.Env(), where + "." + key + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

std::string string_field_or(const Napi::Object& object, const char* key, const std::string& where,
                            const std::string& fallback) {
  if (!has_field(object, key)) return fallback;
  Napi::Value v = object.Get(key);
  if (!v.IsString()) throw_invalid_argument(object.Env(), where + "." + key + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

AddonData& addon_data(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

DeviceWrapBase* unwrap_device(Napi::Env env, const Napi::Value& value) {
  if (!value.IsObject()) return nullptr;
  AddonData& data = addon_data(env);
  Napi::Object o = value.As<Napi::Object>();
  if (o.InstanceOf(data.device_class.Value())) return CpuDeviceWrap::Unwrap(o);
  if (o.InstanceOf(data.gpu_device_class.Value())) return GpuDeviceWrap::Unwrap(o);
  return nullptr;
}

void set_device_info(Napi::Env env, Napi::Object out, const Device& device) {
  out.Set("name", device.name());
  out.Set("kind", device_kind_name(device.kind()));
  out.Set("backend", device.backend_name());
  out.Set("totalBytes", size_value(env, device.total_bytes()));
  // What a job can have: cached resident weights no job holds are evicted on demand.
  out.Set("freeBytes", size_value(env, device.available_bytes()));
  out.Set("peakCopyGbps", device.peak_copy_gbps());
  out.Set("budgetBytes", size_value(env, device.budget_bytes()));
  out.Set("runningJobs", device.jobs());
}

Napi::Object device_stats(Napi::Env env, const Device& device) {
  const MemoryStats s = device.memory_stats();
  Napi::Object out = Napi::Object::New(env);
  out.Set("allocations", size_value(env, s.allocations));
  out.Set("inUseBytes", size_value(env, s.in_use_bytes));
  out.Set("peakBytes", size_value(env, s.peak_bytes));
  out.Set("committedBytes", size_value(env, s.committed_bytes));
  out.Set("largestFreeBlock", size_value(env, s.largest_free_block));
  out.Set("residentCacheBytes", size_value(env, device.residency().bytes()));
  out.Set("residentCacheEntries", size_value(env, device.residency().entries()));
  out.Set("busy", device.busy());
  out.Set("budgetBytes", size_value(env, s.limit_bytes));
  return out;
}

Napi::Value measure_copy_rate(const Napi::CallbackInfo& info, Device& device) {
  Napi::Env env = info.Env();
  size_t bytes = size_t{64} << 20;
  if (!info[0].IsUndefined()) {
    if (!info[0].IsNumber() || info[0].As<Napi::Number>().DoubleValue() < 4096 ||
        info[0].As<Napi::Number>().DoubleValue() > 9007199254740992.0) {
      throw_invalid_argument(env, "measureCopyRate(bytes): bytes must be a number ≥ 4096");
    }
    bytes = static_cast<size_t>(info[0].As<Napi::Number>().DoubleValue());
  }
  return guarded(env, [&] { return Napi::Number::New(env, device.measure_copy_rate(bytes)); });
}

Napi::Value set_budget(const Napi::CallbackInfo& info, Device& device) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || info[0].As<Napi::Number>().DoubleValue() < 1 ||
      info[0].As<Napi::Number>().DoubleValue() > 9007199254740992.0) {
    throw_invalid_argument(env, "setBudget(bytes): bytes must be a number ≥ 1");
  }
  const auto bytes = static_cast<size_t>(info[0].As<Napi::Number>().DoubleValue());
  return guarded(env, [&] {
    const Device::BudgetChange change = device.set_budget(bytes);
    Napi::Object out = Napi::Object::New(env);
    out.Set("budgetBytes", size_value(env, change.budget_bytes));
    out.Set("inUseBytes", size_value(env, change.in_use_bytes));
    out.Set("evictedBytes", size_value(env, change.evicted_bytes));
    out.Set("overBytes", size_value(env, change.over_bytes));
    return out;
  });
}

}  // namespace addon
}  // namespace ferry
