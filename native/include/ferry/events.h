#pragma once
// What a run records: timestamped events per merged segment and a report per step. Timestamps are
// wall-clock (Unix epoch, microseconds) so TypeScript can turn them into spans with their real
// start and end times; the hot loop never calls into JavaScript to do so.
#include <cstdint>
#include <vector>

namespace ferry {

// kRead: a base segment's weights read from the file ahead of use (eager or background
// loading), which no prepare_params waited for; reported with the step during which it ended.
enum class EventKind : uint8_t { kSegment, kPrepareParams, kH2D, kCompute, kRead };
// Where a segment's weights came from: read from the file ("disk"), the host params cache
// ("host"), or already on the device ("resident").
enum class ParamSource : uint8_t { kNone, kDisk, kHost, kResident };
enum class Cold : uint8_t { kUnset, kFalse, kTrue };

const char* event_kind_name(EventKind kind);
const char* param_source_name(ParamSource source);  // nullptr for kNone

struct RunEvent {
  EventKind kind = EventKind::kSegment;
  int32_t segment = 0;  // index of the merged segment in the plan (kRead: that holds the base)
  double start_us = 0;
  double end_us = 0;
  uint64_t bytes = 0;  // prepare_params: its params, or when cold the bytes it waited to read
  ParamSource source = ParamSource::kNone;
  Cold cold = Cold::kUnset;  // prepare_params only: did it read from disk
  double stall_us = 0;       // compute only: its part of StepReport::stall_us
};

struct StepReport {
  int64_t step = 0;  // 1-based
  double start_us = 0;
  double end_us = 0;
  uint64_t h2d_bytes = 0;
  uint64_t disk_bytes = 0;
  uint64_t arena_peak_bytes = 0;  // device memory high-water mark during this step
  uint64_t allocations = 0;       // device allocations ever made, counted at the step's end
  uint64_t host_peak_bytes = 0;   // the most host memory the model's params cache held this step
  // How long the compute engine waited for weights this step: Σ over segments of the gap between
  // the previous compute's end (or the step's start) and this one's start. Serial runs wait for
  // every prepare and copy; an overlapped run only for what its prefetch did not hide.
  double stall_us = 0;
  // Step 1 only: what the residency cache already held (bytes not copied because an earlier job
  // on this device uploaded them).
  uint64_t resident_hit_bytes = 0;
  std::vector<RunEvent> events;
};

// Microseconds since the Unix epoch, from the system clock.
double wall_clock_us();

}  // namespace ferry
