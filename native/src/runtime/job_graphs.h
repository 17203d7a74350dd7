#pragma once
// The ggml side of one job: the activation tensors, the weight tensors and graph of each group of
// alike base segments, and the compute buffer their intermediates share.
//
// Base segments of the same kind whose weights have the same types (all blocks of a DiT; the
// double blocks of a FLUX file quantized alike) share one graph and one set of weight tensors:
// before a segment computes, its weight tensors are pointed at that segment's bytes (in a staging
// slot or the residency cache). So a job builds a handful of graphs whatever its depth, and
// ggml_gallocr lays out each graph's intermediates once, in one compute buffer reserved at job
// start for the largest of them: nothing is allocated per step.
//
// Architectures must not create views of weight tensors (a view's address is fixed when it is
// allocated, while the weights move from slot to slot).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/arch.h"
#include "ferry/measure.h"
#include "ferry/model.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace ferry {

class Device;

class JobGraphs {
 public:
  // Creates the tensors and builds the graphs. `segments` gives the weights' stored types (a
  // bound model); null means the architecture's shapes in f32 (planning without a file).
  JobGraphs(const ModelArch& arch, const JobShape& job, const std::vector<BaseSegment>* segments);
  ~JobGraphs();
  JobGraphs(const JobGraphs&) = delete;
  JobGraphs& operator=(const JobGraphs&) = delete;

  size_t segments() const { return group_of_.size(); }
  const std::vector<ActivationSpec>& activation_specs() const { return specs_; }
  const Activations& activations() const { return activations_; }
  ggml_tensor* activation(const std::string& name) const { return activations_.get(name); }
  // Bytes of device memory the activations take, each at the device's alignment.
  uint64_t activation_bytes(size_t alignment) const;

  // ---- on a device ----
  // Places the activations in `base` (activation_bytes() of device memory), then lays out every
  // graph's intermediates in one compute buffer from the device's scratch buffer type.
  // DeviceOutOfMemoryError naming the buffer when it does not fit.
  void allocate(Device& device, void* base);
  uint64_t compute_buffer_bytes() const;
  // Points base segment `index`'s weight tensors at its packed bytes on the device and returns
  // the graph to compute.
  ggml_cgraph* bind(Device& device, size_t index, const uint8_t* packed);
  // A graph of the latent's update after `step`, intermediates in the same compute buffer.
  ggml_cgraph* update_graph(const StepDriver& driver, int64_t step);

  // ---- planning ----
  // Each base segment's footprint, with ggml_gallocr's sizes for buffers of type `buft`.
  std::vector<SegmentMeasure> measure(ggml_backend_buffer_type_t buft);

 private:
  struct Group;
  void lay_out_groups();

  const ModelArch& arch_;
  JobShape job_;
  std::vector<ActivationSpec> specs_;
  Activations activations_;
  ggml_context* tensors_ctx_ = nullptr;  // activations
  std::vector<std::unique_ptr<Group>> groups_;
  std::vector<size_t> group_of_;                       // per base segment
  std::vector<std::vector<uint64_t>> packed_offsets_;  // per base segment, per weight
  ggml_gallocr_t galloc_ = nullptr;
  uint64_t laid_out_bytes_ = 0;  // the compute buffer's size when the groups were laid out
  ggml_context* update_ctx_ = nullptr;
};

}  // namespace ferry
