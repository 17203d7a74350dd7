// The step drivers (sampler.h).
#include <cmath>

#include "ferry/errors.h"
#include "ferry/sampler.h"

namespace ferry {

namespace {

class EulerDrift final : public StepDriver {
 public:
  EulerDrift(std::string latent, std::string output, int64_t steps)
      : latent_(std::move(latent)), output_(std::move(output)), steps_(steps) {
    if (steps_ < 1) throw InvalidArgumentError("sampler: steps must be ≥ 1");
  }
  std::string name() const override { return "euler-drift"; }
  HostTensors step_inputs(int64_t) const override { return {}; }
  void build_update(ggml_context* ctx, ggml_cgraph* graph, const Activations& act,
                    int64_t) const override {
    ggml_tensor* z = act.get(latent_);
    ggml_tensor* scaled = ggml_scale(ctx, act.get(output_), 1.0f / static_cast<float>(steps_));
    ggml_build_forward_expand(graph, ggml_cpy(ctx, ggml_sub(ctx, z, scaled), z));
  }

 private:
  std::string latent_, output_;
  int64_t steps_;
};

class FlowMatchEuler final : public StepDriver {
 public:
  FlowMatchEuler(std::string latent, std::string output, std::string timestep,
                 std::vector<double> schedule, int64_t batch)
      : latent_(std::move(latent)),
        output_(std::move(output)),
        timestep_(std::move(timestep)),
        t_(std::move(schedule)),
        batch_(batch) {
    if (t_.size() < 2) throw InvalidArgumentError("sampler: the schedule needs ≥ 2 points");
  }
  std::string name() const override { return "flow-match-euler"; }
  HostTensors step_inputs(int64_t step) const override {
    return {
        {timestep_, std::vector<float>(static_cast<size_t>(batch_),
                                       static_cast<float>(t_.at(static_cast<size_t>(step - 1))))}};
  }
  void build_update(ggml_context* ctx, ggml_cgraph* graph, const Activations& act,
                    int64_t step) const override {
    const auto i = static_cast<size_t>(step - 1);
    const float dt = static_cast<float>(t_.at(i + 1) - t_.at(i));
    ggml_tensor* img = act.get(latent_);
    ggml_tensor* delta = ggml_scale(ctx, act.get(output_), dt);
    ggml_build_forward_expand(graph, ggml_cpy(ctx, ggml_add(ctx, img, delta), img));
  }

 private:
  std::string latent_, output_, timestep_;
  std::vector<double> t_;
  int64_t batch_;
};

}  // namespace

std::unique_ptr<StepDriver> euler_drift_sampler(std::string latent, std::string output,
                                                int64_t steps) {
  return std::make_unique<EulerDrift>(std::move(latent), std::move(output), steps);
}

std::unique_ptr<StepDriver> flow_match_euler_sampler(std::string latent, std::string output,
                                                     std::string timestep,
                                                     std::vector<double> schedule, int64_t batch) {
  return std::make_unique<FlowMatchEuler>(std::move(latent), std::move(output), std::move(timestep),
                                          std::move(schedule), batch);
}

}  // namespace ferry
