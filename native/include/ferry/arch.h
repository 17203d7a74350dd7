#pragma once
// An architecture: how a family of models (Ferry's DiT, FLUX.1, …) is cut into base segments,
// which tensors each segment holds and with what shapes, what a job keeps on the device between
// segments (its activations), and each segment's ggml graph. One file per family in
// native/src/archs/, as stable-diffusion.cpp's flux.hpp or llama.cpp's model builders; nothing
// else in native/ mentions a tensor name.
//
// The runtime (runner.cpp) owns everything else: where weights live (a staging slot or the
// residency cache), when they are copied, the compute buffer (ggml_gallocr), the order of work.
// A StepDriver (sampler.h) owns the update rule between steps.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ggml.h"

namespace ferry {

class SafetensorsFile;
using ModelFile = SafetensorsFile;  // safetensors.h
class StepDriver;

// The sizes of one job, as architectures read them.
struct JobShape {
  int64_t batch = 1;           // B
  int64_t tokens = 1;          // DiT: T; FLUX: image tokens L
  int64_t context_tokens = 0;  // FLUX: text tokens T (0 for the DiT)
};

// A weight an architecture expects: its name in the file and its shape in ggml order (ne[0] the
// contiguous dimension; a PyTorch Linear weight [out, in] is ne = {in, out}).
struct WeightSpec {
  std::string name;
  int n_dims = 1;
  int64_t ne[GGML_MAX_DIMS] = {1, 1, 1, 1};
  // Matrices a matmul reads may be any type ggml computes with; vectors (norms, biases) must be
  // f32, f16 or bf16.
  bool matrix = false;
};

struct SegmentSpec {
  std::string name;                 // "prelude", "blocks.3", "double_blocks.0"
  std::string kind;                 // "prelude", "block", "final", "double", "single"
  std::vector<WeightSpec> weights;  // in the order build_segment() receives them
};

// A tensor the job keeps in device memory from its first step to its last, shared by the
// segments' graphs: inputs, the latent, the model's output, the state between segments.
struct ActivationSpec {
  enum class Role : uint8_t {
    kInput,      // set once at job start, from the request (or generated from the seed)
    kLatent,     // an input the sampler updates after every step; the job's result
    kOutput,     // the model's output, written by the last segment, read by the sampler
    kState,      // written and read by segments within a step
    kStepInput,  // set before every step by the sampler (a timestep)
    kJobState,   // computed once per job from the inputs by the architecture (RoPE tables)
  };
  std::string name;
  Role role = Role::kState;
  int n_dims = 1;
  int64_t ne[GGML_MAX_DIMS] = {1, 1, 1, 1};  // float32, ggml order
  int64_t elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

// The activations of one job by name, placed in device memory by the runtime.
class Activations {
 public:
  void add(const std::string& name, ggml_tensor* tensor) { tensors_[name] = tensor; }
  ggml_tensor* get(const std::string& name) const;  // InvalidArgumentError if unknown
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }

 private:
  std::map<std::string, ggml_tensor*> tensors_;
};

// Host values of the job's activations (inputs, job state), float32 in ggml order.
using HostTensors = std::map<std::string, std::vector<float>>;

// Options that reach the step driver.
struct SamplerOptions {
  int64_t steps = 1;
  double guidance = 3.5;  // FLUX.1-dev's guidance_in; ignored where the model has none
  bool shift = false;     // FLUX: BFL's resolution-dependent timestep schedule
};

class ModelArch {
 public:
  virtual ~ModelArch() = default;
  // "ferry-dit", "flux".
  virtual std::string name() const = 0;
  // One line for messages: "ferry-dit 4 blocks, hidden 256, heads 4, channels 16".
  virtual std::string describe() const = 0;
  // The model's configuration as numbers (hidden, heads, blocks, …), for the addon and planner.
  virtual std::map<std::string, double> config() const = 0;
  // Base segments in execution order.
  virtual const std::vector<SegmentSpec>& segments() const = 0;
  // Whether a tensor of the file is this architecture's: binding fails on one it owns but no
  // segment binds. A FLUX checkpoint under `model.diffusion_model.` may also hold a VAE and text
  // encoders, which are not the transformer's and are ignored.
  virtual bool owns_tensor(const std::string& name) const {
    (void)name;
    return true;
  }
  // InvalidArgumentError naming the problem when a job of this shape cannot run.
  virtual void check_job(const JobShape& job) const = 0;
  virtual std::vector<ActivationSpec> activations(const JobShape& job) const = 0;
  // Fills `out` (spec.elements() floats) with a generated value for an input the request did not
  // give: by default initial_input(seed) (runner.h), uniform in [-1, 1). False: this input is not
  // generated but filled by prepare_job (a guidance scale from the options).
  virtual bool generate_input(const ActivationSpec& spec, uint64_t seed,
                              std::vector<float>& out) const;
  // Computes kJobState activations (and inputs that come from the options, like a guidance
  // scale) from the inputs already in `host`, adding them to `host`.
  virtual void prepare_job(const JobShape& job, const SamplerOptions& options,
                           HostTensors& host) const {
    (void)job, (void)options, (void)host;
  }
  // Adds base segment `index`'s forward to `graph`, over `weights` (placed tensors, in
  // SegmentSpec order) and the job's activations; results are copied into their activations.
  virtual void build_segment(ggml_context* ctx, ggml_cgraph* graph, size_t index,
                             const std::vector<ggml_tensor*>& weights, const Activations& act,
                             const JobShape& job) const = 0;
  // The sampler this architecture's jobs step with.
  virtual std::unique_ptr<StepDriver> step_driver(const JobShape& job,
                                                  const SamplerOptions& options) const = 0;
};

// The architecture a model file declares (metadata, else its tensor names), with its
// configuration read from the file. ModelFormatError naming the file and what does not fit.
std::unique_ptr<ModelArch> arch_for_file(const ModelFile& file);
// An architecture from a configuration alone, for planning without the weights:
// "ferry-dit" with config {hidden, heads, channels, blocks}; "flux" with {hidden, depth,
// depth_single, guidance (0 or 1)}. InvalidArgumentError.
std::unique_ptr<ModelArch> arch_from_config(const std::string& arch,
                                            const std::map<std::string, double>& config);

}  // namespace ferry
