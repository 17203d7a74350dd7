#pragma once
#include <napi.h>

namespace ferry {
namespace addon {

// startRun(device, model, request, onStep?): { done: Promise<RunOutput>, cancel(): void }
Napi::Value start_run(const Napi::CallbackInfo& info);

}  // namespace addon
}  // namespace ferry
