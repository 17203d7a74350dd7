#include "job_graphs.h"

#include <algorithm>
#include <map>
#include <set>

#include "ferry/device.h"
#include "ferry/errors.h"
#include "ferry/ggml_support.h"
#include "ferry/sampler.h"
#include "ggml-cpu.h"

namespace ferry {

namespace {

// Nodes a segment's graph may have: DiT blocks use ~40, FLUX double blocks a few hundred.
constexpr size_t kMaxGraphNodes = 4096;

size_t graph_context_bytes() {
  return ggml_tensor_overhead() * kMaxGraphNodes +
         ggml_graph_overhead_custom(kMaxGraphNodes, false);
}

ggml_context* new_context(size_t bytes) {
  ggml_init_params params{bytes, nullptr, /*no_alloc =*/true};
  ggml_context* ctx = ggml_init(params);
  if (!ctx) throw std::bad_alloc();
  return ctx;
}

// A stand-in address for tensors that must look allocated while ggml_gallocr measures a graph
// (weights and activations are never part of the compute buffer); never dereferenced.
void* const kMeasureAddress = reinterpret_cast<void*>(uintptr_t{1} << 40);

const ggml_tensor* root_of(const ggml_tensor* t) {
  while (t->view_src) t = t->view_src;
  return t;
}

}  // namespace

struct JobGraphs::Group {
  ggml_context* ctx = nullptr;
  std::vector<ggml_tensor*> weights;
  ggml_cgraph* graph = nullptr;
  std::vector<size_t> members;  // base segments
  ~Group() {
    if (ctx) ggml_free(ctx);
  }
};

JobGraphs::JobGraphs(const ModelArch& arch, const JobShape& job,
                     const std::vector<BaseSegment>* segments)
    : arch_(arch), job_(job) {
  ggml_setup();
  arch_.check_job(job_);
  specs_ = arch_.activations(job_);
  tensors_ctx_ = new_context(ggml_tensor_overhead() * (specs_.size() + 1));
  for (const ActivationSpec& a : specs_) {
    ggml_tensor* t = ggml_new_tensor(tensors_ctx_, GGML_TYPE_F32, a.n_dims, a.ne);
    ggml_set_name(t, a.name.c_str());
    activations_.add(a.name, t);
  }

  const auto& specs = arch_.segments();
  if (segments && segments->size() != specs.size()) {
    throw InvalidArgumentError("run: the model has " + std::to_string(segments->size()) +
                               " base segments, its architecture " + std::to_string(specs.size()));
  }
  // Group alike segments: same kind, same weight types and shapes.
  std::map<std::string, size_t> group_by_key;
  group_of_.resize(specs.size());
  packed_offsets_.resize(specs.size());
  for (size_t b = 0; b < specs.size(); b++) {
    const SegmentSpec& spec = specs[b];
    std::string key = spec.kind;
    std::vector<ggml_type> types;
    for (size_t i = 0; i < spec.weights.size(); i++) {
      const ggml_type type = segments ? (*segments)[b].tensors.at(i).type : GGML_TYPE_F32;
      types.push_back(type);
      key += "|" + std::string(ggml_type_name(type));
      for (int d = 0; d < GGML_MAX_DIMS; d++) key += ":" + std::to_string(spec.weights[i].ne[d]);
      if (segments) packed_offsets_[b].push_back((*segments)[b].tensors[i].packed_offset);
    }
    auto found = group_by_key.find(key);
    if (found == group_by_key.end()) {
      auto group = std::make_unique<Group>();
      group->ctx = new_context(graph_context_bytes());
      for (size_t i = 0; i < spec.weights.size(); i++) {
        const WeightSpec& w = spec.weights[i];
        ggml_tensor* t = ggml_new_tensor(group->ctx, types[i], w.n_dims, w.ne);
        ggml_set_name(t, w.name.c_str());
        group->weights.push_back(t);
      }
      group->graph = ggml_new_graph_custom(group->ctx, kMaxGraphNodes, false);
      arch_.build_segment(group->ctx, group->graph, b, group->weights, activations_, job_);
      found = group_by_key.emplace(key, groups_.size()).first;
      groups_.push_back(std::move(group));
    }
    group_of_[b] = found->second;
    groups_[found->second]->members.push_back(b);
  }
}

JobGraphs::~JobGraphs() {
  if (galloc_) ggml_gallocr_free(galloc_);
  if (update_ctx_) ggml_free(update_ctx_);
  groups_.clear();
  if (tensors_ctx_) ggml_free(tensors_ctx_);
}

uint64_t JobGraphs::activation_bytes(size_t alignment) const {
  uint64_t total = 0;
  for (const ActivationSpec& a : specs_) {
    total += align_up(static_cast<uint64_t>(a.elements()) * sizeof(float), alignment);
  }
  return total;
}

void JobGraphs::allocate(Device& device, void* base) {
  const size_t alignment = device.tensor_alignment();
  auto* at = static_cast<uint8_t*>(base);
  for (const ActivationSpec& a : specs_) {
    device.place(activations_.get(a.name), at);
    at += align_up(static_cast<uint64_t>(a.elements()) * sizeof(float), alignment);
  }
  // Weights look allocated to ggml_gallocr (they never take compute-buffer space); bind() points
  // them at their real bytes before every compute.
  for (auto& group : groups_) {
    for (ggml_tensor* w : group->weights) {
      w->buffer = device.memory();
      w->data = ggml_backend_buffer_get_base(device.memory());
    }
  }
  galloc_ = ggml_gallocr_new(device.scratch_buffer_type());
  // Reserve for the largest graph first, so the buffer is allocated once.
  std::vector<std::pair<size_t, ggml_cgraph*>> by_size;
  for (auto& group : groups_) {
    size_t size = 0;
    ggml_gallocr_reserve_n_size(galloc_, group->graph, nullptr, nullptr, &size);
    by_size.emplace_back(size, group->graph);
  }
  std::sort(by_size.begin(), by_size.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  GgmlLogCapture capture;
  for (const auto& [size, graph] : by_size) {
    if (!ggml_gallocr_reserve(galloc_, graph)) {
      throw DeviceOutOfMemoryError("run: job start: allocating the compute buffer (" +
                                   std::to_string(size) + " bytes): " + capture.text());
    }
  }
  lay_out_groups();
}

void JobGraphs::lay_out_groups() {
  // Each graph's intermediates get their addresses in the shared buffer once; graphs run one at a
  // time, so their layouts may overlap.
  GgmlLogCapture capture;
  for (auto& group : groups_) {
    if (!ggml_gallocr_alloc_graph(galloc_, group->graph)) {
      throw DeviceOutOfMemoryError("run: laying out a segment's intermediates: " + capture.text());
    }
  }
  laid_out_bytes_ = compute_buffer_bytes();
}

uint64_t JobGraphs::compute_buffer_bytes() const {
  return galloc_ ? ggml_gallocr_get_buffer_size(galloc_, 0) : 0;
}

ggml_cgraph* JobGraphs::bind(Device& device, size_t index, const uint8_t* packed) {
  Group& group = *groups_.at(group_of_.at(index));
  const auto& offsets = packed_offsets_.at(index);
  for (size_t i = 0; i < group.weights.size(); i++) {
    device.place(group.weights[i], const_cast<uint8_t*>(packed) + offsets.at(i));
  }
  return group.graph;
}

ggml_cgraph* JobGraphs::update_graph(const StepDriver& driver, int64_t step) {
  if (update_ctx_) ggml_free(update_ctx_);
  update_ctx_ = new_context(ggml_tensor_overhead() * 64 + ggml_graph_overhead_custom(64, false));
  ggml_cgraph* graph = ggml_new_graph_custom(update_ctx_, 64, false);
  driver.build_update(update_ctx_, graph, activations_, step);
  // The update's few intermediates normally fit in the buffer the segments reserved; if gallocr
  // had to grow it (once, at step 1), the segments' layouts pointed into the old buffer.
  GgmlLogCapture capture;
  if (!ggml_gallocr_alloc_graph(galloc_, graph)) {
    throw DeviceOutOfMemoryError("run: allocating the sampler's update: " + capture.text());
  }
  if (compute_buffer_bytes() != laid_out_bytes_) lay_out_groups();
  return graph;
}

std::vector<SegmentMeasure> JobGraphs::measure(ggml_backend_buffer_type_t buft) {
  std::map<const ggml_tensor*, const ActivationSpec*> role_of;
  for (const ActivationSpec& a : specs_) {
    ggml_tensor* t = activations_.get(a.name);
    t->data = kMeasureAddress;
    role_of[t] = &a;
  }
  for (auto& group : groups_) {
    for (ggml_tensor* w : group->weights) w->data = kMeasureAddress;
  }
  ggml_gallocr_t galloc = ggml_gallocr_new(buft);
  std::vector<SegmentMeasure> group_measure(groups_.size());
  for (size_t g = 0; g < groups_.size(); g++) {
    ggml_cgraph* graph = groups_[g]->graph;
    SegmentMeasure& m = group_measure[g];
    size_t size = 0;
    ggml_gallocr_reserve_n_size(galloc, graph, nullptr, nullptr, &size);
    m.compute_buffer_bytes = size;
    m.flops = graph_flops(graph);
    std::set<const ggml_tensor*> read, written;
    for (int i = 0; i < ggml_graph_n_nodes(graph); i++) {
      const ggml_tensor* node = ggml_graph_node(graph, i);
      for (int j = 0; j < GGML_MAX_SRC; j++) {
        if (!node->src[j]) continue;
        const ggml_tensor* root = root_of(node->src[j]);
        if (!role_of.count(root)) continue;
        if (node->op == GGML_OP_CPY && j == 1) {
          written.insert(root);
        } else {
          read.insert(root);
        }
      }
    }
    using Role = ActivationSpec::Role;
    for (const ggml_tensor* t : written) m.output_bytes += ggml_nbytes(t);
    for (const ggml_tensor* t : read) {
      const Role role = role_of[t]->role;
      if (role == Role::kState || role == Role::kLatent || role == Role::kOutput) {
        m.prev_cut_bytes += ggml_nbytes(t);
      } else {
        m.external_bytes += ggml_nbytes(t);
      }
    }
  }
  ggml_gallocr_free(galloc);
  for (const ActivationSpec& a : specs_) activations_.get(a.name)->data = nullptr;
  for (auto& group : groups_) {
    for (ggml_tensor* w : group->weights) w->data = nullptr;
  }
  std::vector<SegmentMeasure> out;
  const auto& specs = arch_.segments();
  for (size_t b = 0; b < specs.size(); b++) {
    SegmentMeasure m = group_measure[group_of_[b]];
    m.name = specs[b].name;
    m.kind = specs[b].kind;
    out.push_back(std::move(m));
  }
  return out;
}

std::vector<SegmentMeasure> measure_segments(const ModelArch& arch, const JobShape& job,
                                             ggml_backend_buffer_type_t buft) {
  ggml_setup();
  JobGraphs graphs(arch, job, nullptr);
  return graphs.measure(buft ? buft : ggml_backend_cpu_buffer_type());
}

}  // namespace ferry
