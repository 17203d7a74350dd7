#pragma once
// Step drivers: what happens between two forwards of the model. A driver sets the per-step inputs
// (a timestep) before a step and builds the update of the latent from the model's output after
// it, as a ggml graph on the device. It knows activations by role, not tensor names of weights.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/arch.h"
#include "ggml.h"

namespace ferry {

class StepDriver {
 public:
  virtual ~StepDriver() = default;
  virtual std::string name() const = 0;
  // Values of the kStepInput activations for step `step` (1-based), by name.
  virtual HostTensors step_inputs(int64_t step) const = 0;
  // Adds the latent's update after step `step` to `graph`.
  virtual void build_update(ggml_context* ctx, ggml_cgraph* graph, const Activations& act,
                            int64_t step) const = 0;
};

// Ferry's DiT sampler: `latent` ← `latent` − (1/S)·`output`, S times (ggml_scale then ggml_sub).
std::unique_ptr<StepDriver> euler_drift_sampler(std::string latent, std::string output,
                                                int64_t steps);

// Flow matching, Euler: t = linspace(1, 0, S+1) (or BFL's shifted schedule);
// `latent` ← `latent` + (t[i+1] − t[i])·`output`, with `timestep` = t[i] (one per sample) during
// step i. `batch` samples.
std::unique_ptr<StepDriver> flow_match_euler_sampler(std::string latent, std::string output,
                                                     std::string timestep,
                                                     std::vector<double> schedule, int64_t batch);

}  // namespace ferry
