#pragma once
// Runs a job — S sampler steps of a DiT model over z [B, T, C] — on a device, following a plan of
// merged segments. The execution policy is sd.cpp's serial one (per segment: prepare params,
// allocate, copy, compute, free), which Ferry reproduces as its baseline; the phases are separate
// functions so a prefetching policy can reorder them later.
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <vector>

#include "ferry/device.h"
#include "ferry/events.h"
#include "ferry/model.h"

namespace ferry {

// Base segments first_base..last_base (inclusive) run as one unit.
struct PlanSegment {
  int64_t first_base = 0;
  int64_t last_base = 0;
  bool resident = false;              // keep its weights on the device for the whole job
  uint64_t compute_buffer_bytes = 0;  // scratch to allocate; ≥ what its kernels need
};

struct RunRequest {
  int64_t batch = 1;
  int64_t tokens = 1;
  int64_t steps = 1;
  uint64_t seed = 0;
  std::vector<float> input;  // z [B, T, C]; empty = initial_input(seed)
  std::vector<PlanSegment> segments;
};

struct RunOutput {
  std::vector<float> output;  // z after the last step, [B, T, C]
  std::array<int64_t, 3> shape{};
};

using StepObserver = std::function<void(StepReport&& report)>;

// Runs the job on the leased device. `cancel` (may be null) is checked between segments; a set
// flag ends the run with CancelledError. `on_step` (may be empty) gets each step's report on the
// run's thread. Everything allocated on the device is freed when this returns or throws.
// Throws InvalidArgumentError (bad request or plan), DeviceOutOfMemoryError, CancelledError,
// ModelFormatError / IoError (reading weights).
RunOutput run_job(DeviceLease& lease, DitModel& model, const RunRequest& request,
                  const std::atomic<bool>* cancel, const StepObserver& on_step);

// SplitMix64's finaliser of x + γ, mod 2^64.
uint64_t splitmix64(uint64_t x);
// The job's initial latent: out[i] = ((splitmix64(seed + i) >> 40) / 2^24)·2 − 1, for i < n.
// Same values as lib/model/initialInput.ts, bit for bit.
void initial_input(uint64_t seed, float* out, size_t n);

}  // namespace ferry
