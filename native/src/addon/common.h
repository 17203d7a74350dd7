#pragma once
// Shared pieces of the Node-API addon: native errors → JS Errors with `.name`, argument readers,
// and the per-environment registry that frees native objects at environment teardown.
#include <napi.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <set>
#include <string>

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

class CpuDeviceWrap;
class ModelWrap;

// Live wraps of one environment. Shared with every wrap so its lifetime does not depend on the
// order in which Node finalizes the wraps and the instance data at teardown.
struct Registry {
  bool tearing_down = false;
  std::set<CpuDeviceWrap*> devices;
  std::set<ModelWrap*> models;
};

struct AddonData {
  std::shared_ptr<Registry> registry = std::make_shared<Registry>();
  Napi::FunctionReference device_class;
  Napi::FunctionReference model_class;
};

AddonData& addon_data(Napi::Env env);

// A uint64 byte count as a JS number (exact below 2^53, which covers any real memory size).
inline Napi::Number size_value(Napi::Env env, uint64_t n) {
  return Napi::Number::New(env, static_cast<double>(n));
}

}  // namespace addon
}  // namespace ferry
