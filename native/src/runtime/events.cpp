#include "ferry/events.h"

#include <chrono>

namespace ferry {

const char* event_kind_name(EventKind kind) {
  switch (kind) {
    case EventKind::kSegment:
      return "segment";
    case EventKind::kPrepareParams:
      return "prepare_params";
    case EventKind::kH2D:
      return "h2d";
    case EventKind::kCompute:
      return "compute";
    case EventKind::kRead:
      return "read";
  }
  return "unknown";
}

const char* param_source_name(ParamSource source) {
  switch (source) {
    case ParamSource::kNone:
      return nullptr;
    case ParamSource::kDisk:
      return "disk";
    case ParamSource::kHost:
      return "host";
    case ParamSource::kResident:
      return "resident";
  }
  return nullptr;
}

double wall_clock_us() {
  using namespace std::chrono;
  // Nanoseconds / 1000: sub-microsecond resolution survives in the double (≈0.25 µs today).
  return static_cast<double>(
             duration_cast<nanoseconds>(system_clock::now().time_since_epoch()).count()) /
         1e3;
}

}  // namespace ferry
