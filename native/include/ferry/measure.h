#pragma once
// What the planner needs of a job's segments, measured on their real ggml graphs rather than
// estimated: ggml_gallocr's compute buffer, the activations each reads and writes, its FLOPs.
#include <cstdint>
#include <string>
#include <vector>

#include "ferry/arch.h"
#include "ggml-backend.h"

namespace ferry {

struct SegmentMeasure {
  std::string name;
  std::string kind;
  uint64_t compute_buffer_bytes = 0;  // ggml_gallocr's buffer for its intermediates
  uint64_t output_bytes = 0;          // activations it writes
  uint64_t prev_cut_bytes = 0;        // state it reads that earlier segments wrote
  uint64_t external_bytes = 0;        // job inputs and job state it reads
  double flops = 0;                   // counted from the graph (graph_flops)
};

// Every base segment of `arch` for `job`, with compute buffers sized for buffers of type `buft`
// (ggml's CPU buffer type when null). Weights are not needed: their shapes are the
// architecture's. InvalidArgumentError for a job the architecture refuses.
std::vector<SegmentMeasure> measure_segments(const ModelArch& arch, const JobShape& job,
                                             ggml_backend_buffer_type_t buft = nullptr);

}  // namespace ferry
