#pragma once
// Shared pieces of the Node-API addon: native errors → JS Errors with `.name`, argument readers,
// and the per-environment registry that frees native objects at environment teardown.
#include <napi.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <set>
#include <string>

#include "ferry/device.h"

namespace ferry {
namespace addon {

// A native failure captured on a worker thread, to become a JS Error on the main thread.
struct CapturedError {
  std::string name = "Error";
  std::string message;
  // IoError only, mirroring Node's fs errors so callers can test `.code === "ENOENT"`.
  std::string code;
  std::string syscall;
  std::string path;
  int error_number = 0;
};

CapturedError capture_exception(std::exception_ptr error);
Napi::Error to_js_error(Napi::Env env, const CapturedError& error);
// An InvalidArgumentError thrown into JS.
[[noreturn]] void throw_invalid_argument(Napi::Env env, const std::string& message);

// Runs `fn`, turning any C++ exception into a JS exception with the native error's name (an
// exception other than Napi::Error escaping a callback would terminate the process).
template <typename F>
auto guarded(Napi::Env env, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (...) {
    throw to_js_error(env, capture_exception(std::current_exception()));
  }
}

// Readers for option objects; each throws InvalidArgumentError naming `where` and the field.
Napi::Object object_arg(const Napi::Value& value, const std::string& where);
bool has_field(const Napi::Object& object, const char* key);
// A non-negative integer number (≤ 2^53) field.
uint64_t uint_field(const Napi::Object& object, const char* key, const std::string& where);
uint64_t uint_field_or(const Napi::Object& object, const char* key, const std::string& where,
                       uint64_t fallback);
double number_field_or(const Napi::Object& object, const char* key, const std::string& where,
                       double fallback);
bool bool_field(const Napi::Object& object, const char* key, const std::string& where);
std::string string_field_or(const Napi::Object& object, const char* key, const std::string& where,
                            const std::string& fallback);

class ModelWrap;

// What the run, the registry and the model wraps need of a JS device (CpuDevice, GpuDevice).
class DeviceWrapBase {
 public:
  virtual ~DeviceWrapBase() = default;
  // The device, or nullptr once disposed.
  virtual std::shared_ptr<Device> device_or_null() const = 0;
  // Tells V8 how much of the device's memory is host memory it should count (CPU device only).
  virtual void sync_external_memory(Napi::Env env) = 0;
  // Drops this wrap's reference; a run still holding the device keeps it until the run ends.
  virtual void release(Napi::Env env, bool adjust_external) = 0;
};

// Live wraps of one environment. Shared with every wrap so its lifetime does not depend on the
// order in which Node finalizes the wraps and the instance data at teardown.
struct Registry {
  bool tearing_down = false;
  std::set<DeviceWrapBase*> devices;
  std::set<ModelWrap*> models;
};

struct AddonData {
  std::shared_ptr<Registry> registry = std::make_shared<Registry>();
  Napi::FunctionReference device_class;  // CpuDevice
  Napi::FunctionReference gpu_device_class;
  Napi::FunctionReference model_class;
};

AddonData& addon_data(Napi::Env env);

// The device wrap behind a JS CpuDevice or GpuDevice; nullptr if `value` is neither.
DeviceWrapBase* unwrap_device(Napi::Env env, const Napi::Value& value);

// The parts of info() and stats() every device kind reports.
void set_device_info(Napi::Env env, Napi::Object out, const Device& device);
Napi::Object device_stats(Napi::Env env, const Device& device);
// device.measureCopyRate(bytes?): GB/s, measured on the copy stream (DeviceBusyError mid-run).
Napi::Value measure_copy_rate(const Napi::CallbackInfo& info, Device& device);
// device.setBudget(bytes): { budgetBytes, inUseBytes, evictedBytes, overBytes }
// (Device::set_budget).
Napi::Value set_budget(const Napi::CallbackInfo& info, Device& device);

// A uint64 byte count as a JS number (exact below 2^53, which covers any real memory size).
inline Napi::Number size_value(Napi::Env env, uint64_t n) {
  return Napi::Number::New(env, static_cast<double>(n));
}

}  // namespace addon
}  // namespace ferry
