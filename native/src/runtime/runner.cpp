#include "ferry/runner.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "ferry/errors.h"
#include "ferry/sampler.h"
#include "ferry/xxhash.h"
#include "job_graphs.h"

namespace ferry {

uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void initial_input(uint64_t seed, float* out, size_t n) {
  for (size_t i = 0; i < n; i++) {
    // The top 24 bits: a value float32 holds exactly, so float and double agree.
    const double u = static_cast<double>(splitmix64(seed + i) >> 40) / 16777216.0;
    out[i] = static_cast<float>(u * 2.0 - 1.0);
  }
}

const char* execution_name(Execution execution) {
  switch (execution) {
    case Execution::kSerial:
      return "serial";
    case Execution::kLookahead:
      return "lookahead";
    case Execution::kPooled:
      return "pooled";
  }
  return "unknown";
}

namespace {

// One entry of the plan, resolved against the model.
struct MergedSegment {
  int32_t index = 0;
  size_t first = 0;
  size_t last = 0;
  bool resident = false;
  uint64_t param_bytes = 0;
  uint64_t device_bytes = 0;             // the members' packed buffers back to back
  std::vector<uint64_t> member_offsets;  // of each member inside such a buffer
  std::string label;                     // "blocks.0..blocks.3"
};

std::string describe(const MergedSegment& s) {
  return "segment " + std::to_string(s.index) + " (" + s.label + ")";
}

// Host params of a merged segment's members, as prepare_params left them.
struct Prepared {
  std::vector<Model::HostParams> host;  // per member (data null where not prepared)
  uint64_t disk_bytes = 0;
  double start_us = 0;
  double end_us = 0;
};

RunEvent make_event(EventKind kind, const MergedSegment& seg, double start, double end,
                    uint64_t bytes) {
  RunEvent e;
  e.kind = kind;
  e.segment = seg.index;
  e.start_us = start;
  e.end_us = end;
  e.bytes = bytes;
  return e;
}

// A cold prepare's bytes are those it waited to have read (members read ahead by the loader are
// its read events), so a step's disk-sourced prepare_params bytes add up to its disk_bytes.
RunEvent prepare_event(const MergedSegment& seg, const Prepared& p, uint64_t bytes) {
  RunEvent e = make_event(EventKind::kPrepareParams, seg, p.start_us, p.end_us,
                          p.disk_bytes > 0 ? p.disk_bytes : bytes);
  e.cold = p.disk_bytes > 0 ? Cold::kTrue : Cold::kFalse;
  e.source = p.disk_bytes > 0 ? ParamSource::kDisk : ParamSource::kHost;
  return e;
}

// A step's report, with compute and copy events completed later (a GPU runs ahead of the host):
// their times are filled in when the step ends.
struct PendingStep {
  StepReport report;
  struct Timed {
    size_t event;  // index in report.events
    EventPtr done;
  };
  std::vector<Timed> timed;
  void add(RunEvent event, EventPtr done) {
    report.events.push_back(event);
    timed.push_back({report.events.size() - 1, std::move(done)});
  }
  // Waits for the step's work, fills in its times, the segments' spans and the stalls.
  void finish() {
    for (Timed& t : timed) {
      t.done->wait();
      report.events[t.event].start_us = t.done->start_us();
      report.events[t.event].end_us = t.done->end_us();
    }
    double last_compute_end = report.start_us;
    for (RunEvent& e : report.events) {
      if (e.kind != EventKind::kCompute) continue;
      e.stall_us = std::max(0.0, e.start_us - last_compute_end);
      report.stall_us += e.stall_us;
      last_compute_end = e.end_us;
    }
    for (RunEvent& head : report.events) {
      if (head.kind != EventKind::kSegment) continue;
      double start = 0, end = 0;
      bool any = false;
      for (const RunEvent& e : report.events) {
        if (e.segment != head.segment || e.kind == EventKind::kSegment ||
            e.kind == EventKind::kRead) {
          continue;
        }
        start = any ? std::min(start, e.start_us) : e.start_us;
        end = any ? std::max(end, e.end_us) : e.end_us;
        any = true;
      }
      if (any) {
        head.start_us = start;
        head.end_us = end;
      }
    }
  }
};

// What every execution mode shares: the request checked against the model, the job's graphs and
// activations, the params and copy plumbing, and the forward over a merged segment.
class RunBase {
 public:
  RunBase(Device& device, Model& model, const RunRequest& request, const std::atomic<bool>* cancel)
      : device_(device), model_(model), request_(request), cancel_(cancel) {
    validate();
  }
  virtual ~RunBase() { release_holds(); }

 protected:
  // Device memory, making room by evicting cached weights no job holds when it does not fit, and
  // saying which allocation of which segment and step failed when it still does not.
  template <typename F>
  DeviceBuffer allocate(uint64_t bytes, const std::string& what, F&& context) {
    for (;;) {
      try {
        return device_.alloc(bytes);
      } catch (const DeviceOutOfMemoryError& e) {
        if (device_.residency().evict_one_unused()) continue;
        throw DeviceOutOfMemoryError(context() + ": allocating " + std::to_string(bytes) +
                                     " bytes for " + what + ": " + e.what() + "; " +
                                     device_.describe_memory());
      }
    }
  }

  // The graphs, the activations on the device with their initial values, the sampler.
  void start_job() {
    graphs_ = std::make_unique<JobGraphs>(model_.arch(), request_.job, &model_.base_segments());
    SamplerOptions sampler = request_.sampler;
    sampler.steps = request_.steps;
    driver_ = model_.arch().step_driver(request_.job, sampler);
    auto at_start = [] { return std::string("run: job start"); };
    activations_ = allocate(graphs_->activation_bytes(device_.tensor_alignment()),
                            "the activations", at_start);
    // The compute buffer may evict cached weights too; gallocr's own failure names the sizes.
    for (;;) {
      try {
        graphs_->allocate(device_, activations_.data());
        break;
      } catch (const DeviceOutOfMemoryError&) {
        if (!device_.residency().evict_one_unused()) throw;
        graphs_ = std::make_unique<JobGraphs>(model_.arch(), request_.job, &model_.base_segments());
      }
    }
    set_inputs();
  }

  void set_inputs() {
    using Role = ActivationSpec::Role;
    HostTensors host;
    uint64_t generated = 0;
    for (const ActivationSpec& a : graphs_->activation_specs()) {
      if (a.role != Role::kInput && a.role != Role::kLatent) continue;
      const auto given = request_.inputs.find(a.name);
      // Every input is batch-major (B is its outermost dimension): a share's samples start
      // first_sample samples into the larger batch's counter.
      const int64_t batch = a.ne[a.n_dims - 1];
      if (request_.first_sample > 0 && batch != request_.job.batch) {
        throw InvalidArgumentError("run: input \"" + a.name +
                                   "\" is not batch-major; a share of a batch cannot be run");
      }
      const uint64_t offset = request_.first_sample * static_cast<uint64_t>(a.elements() / batch);
      if (given != request_.inputs.end()) {
        host[a.name] = given->second;
      } else if (model_.arch().generate_input(a, request_.seed + (generated << 32) + offset,
                                              host[a.name])) {
        // generated from the seed
      } else {
        host.erase(a.name);  // the architecture fills it in prepare_job
      }
      generated++;
    }
    SamplerOptions options = request_.sampler;
    options.steps = request_.steps;
    model_.arch().prepare_job(request_.job, options, host);
    for (const ActivationSpec& a : graphs_->activation_specs()) {
      const auto it = host.find(a.name);
      if (it == host.end()) continue;
      set_activation(a, it->second);
    }
  }

  void set_activation(const ActivationSpec& a, const std::vector<float>& values) {
    if (values.size() != static_cast<size_t>(a.elements())) {
      throw InvalidArgumentError("run: input \"" + a.name + "\" has " +
                                 std::to_string(values.size()) + " values, expected " +
                                 std::to_string(a.elements()));
    }
    device_.tensor_set(graphs_->activation(a.name), values.data(), 0, values.size() * 4);
  }

  // The sampler's per-step inputs (a timestep), before the step's first segment computes.
  void before_step(int64_t step) {
    for (const auto& [name, values] : driver_->step_inputs(step)) {
      for (const ActivationSpec& a : graphs_->activation_specs()) {
        if (a.name == name) set_activation(a, values);
      }
    }
  }

  // Starts eager or background loading, as the request asks: of the stage's base segments only.
  void start_loading() {
    // Reads ahead that ended after an earlier job's last step are not this job's.
    model_.params_cache().take_ahead_reads();
    switch (request_.load) {
      case LoadMode::kLazy:
        break;
      case LoadMode::kEager:
        model_.load(first_base_, last_base_);
        break;
      case LoadMode::kBackground: {
        // The disk backend keeps host memory to the segments in flight; a reader running ahead
        // would hold the whole model, so with it segments are read when needed.
        if (request_.params_backend == ParamsBackend::kDisk) break;
        std::vector<size_t> order;
        for (size_t b = first_base_; b <= last_base_; b++) order.push_back(b);
        model_.prefetch(order);
        break;
      }
    }
  }

  // Ends a step's report (after PendingStep::finish): its end time, device and host memory, and
  // the reads ahead of use that ended since the previous step, each as a "read" event of the
  // merged segment holding its base segment.
  void close_step(PendingStep& pending) {
    StepReport& report = pending.report;
    report.end_us = wall_clock_us();
    const MemoryStats memory = device_.memory_stats();
    report.arena_peak_bytes = memory.window_peak_bytes;
    report.allocations = memory.allocations;
    report.host_peak_bytes = model_.params_cache().take_host_peak();
    for (const ParamsCache::AheadRead& read : model_.params_cache().take_ahead_reads()) {
      RunEvent e;
      e.kind = EventKind::kRead;
      e.start_us = read.start_us;
      e.end_us = read.end_us;
      e.bytes = read.bytes;
      e.source = ParamSource::kDisk;
      e.cold = Cold::kTrue;
      for (const MergedSegment& seg : plan_) {
        if (read.index >= seg.first && read.index <= seg.last) e.segment = seg.index;
      }
      report.events.push_back(e);
    }
  }

  EventPtr step_update(int64_t step) {
    return device_.compute(graphs_->update_graph(*driver_, step));
  }

  RunOutput finish() {
    RunOutput out;
    for (const ActivationSpec& a : graphs_->activation_specs()) {
      if (a.role != ActivationSpec::Role::kLatent) continue;
      out.name = a.name;
      out.output.resize(static_cast<size_t>(a.elements()));
      device_.tensor_get(graphs_->activation(a.name), out.output.data(), 0, out.output.size() * 4);
      for (int d = a.n_dims - 1; d >= 0; d--) out.shape.push_back(a.ne[d]);
    }
    out.compute_buffer_bytes = graphs_->compute_buffer_bytes();
    return out;
  }

  void check_cancel(int64_t step, const MergedSegment& seg) const {
    if (cancel_ && cancel_->load(std::memory_order_relaxed)) {
      throw CancelledError("run cancelled at step " + std::to_string(step) + ", before " +
                           describe(seg));
    }
  }

  // ---- pipeline stages ----
  bool first_stage() const { return first_base_ == 0; }
  bool last_stage() const { return last_base_ + 1 == model_.base_segments().size(); }
  // A stage that hands activations over (not the whole model).
  bool staged() const { return request_.stage && !(first_stage() && last_stage()); }

  // Before step `step`'s first segment: the handoff labelled `step` into the activations, unless
  // this stage starts the job.
  void receive_handoff(int64_t step) {
    if (!staged() || (first_stage() && step == 1)) return;
    HostTensors handoff;
    if (!request_.stage->link->receive(step, cancel_, &handoff)) {
      throw CancelledError("run cancelled at step " + std::to_string(step) +
                           ", waiting for the previous pipeline stage's activations");
    }
    const auto& specs = graphs_->activation_specs();
    for (const auto& entry : handoff) {
      // (Not a structured binding: C++17 lambdas cannot capture one.)
      const std::string& name = entry.first;
      const std::vector<float>& values = entry.second;
      const auto spec = std::find_if(specs.begin(), specs.end(),
                                     [&](const ActivationSpec& a) { return a.name == name; });
      if (spec == specs.end() || !handed_over(*spec)) {
        throw InvalidArgumentError("run: step " + std::to_string(step) + "'s handoff holds \"" +
                                   name + "\", which is not an activation stages hand over");
      }
      if (values.size() != static_cast<size_t>(spec->elements())) {
        throw InvalidArgumentError("run: step " + std::to_string(step) + "'s handoff holds " +
                                   std::to_string(values.size()) + " values of \"" + name +
                                   "\", expected " + std::to_string(spec->elements()));
      }
    }
    for (const ActivationSpec& a : specs) {
      if (!handed_over(a)) continue;
      const auto it = handoff.find(a.name);
      if (it == handoff.end()) {
        throw InvalidArgumentError("run: step " + std::to_string(step) + "'s handoff lacks \"" +
                                   a.name + "\"");
      }
      device_.tensor_set(graphs_->activation(a.name), it->second.data(), 0,
                         it->second.size() * sizeof(float));
    }
  }

  // After this stage's work for the step (its computes, and the update on the last stage) has
  // finished: the activations the next stage needs, labelled `label`.
  void send_handoff(int64_t label) {
    HostTensors handoff;
    for (const ActivationSpec& a : graphs_->activation_specs()) {
      if (!handed_over(a)) continue;
      std::vector<float>& values = handoff[a.name];
      values.resize(static_cast<size_t>(a.elements()));
      device_.tensor_get(graphs_->activation(a.name), values.data(), 0,
                         values.size() * sizeof(float));
    }
    request_.stage->link->send(label, std::move(handoff));
  }

  static bool handed_over(const ActivationSpec& a) {
    using Role = ActivationSpec::Role;
    return a.role == Role::kLatent || a.role == Role::kOutput || a.role == Role::kState;
  }

  // Members `want[i]` (all when empty) of a merged segment in host memory.
  Prepared prepare(const MergedSegment& seg, const std::vector<bool>& want) {
    Prepared p;
    p.start_us = wall_clock_us();
    p.host.assign(seg.last - seg.first + 1, Model::HostParams{});
    for (size_t b = seg.first; b <= seg.last; b++) {
      const size_t i = b - seg.first;
      if (!want.empty() && !want[i]) continue;
      p.host[i] = model_.prepare_params(b);
      p.disk_bytes += p.host[i].disk_bytes;
      std::lock_guard<std::mutex> lock(holds_mu_);
      holds_[b]++;
    }
    p.end_us = wall_clock_us();
    return p;
  }

  // The copy of the prepared members to `dst[i]`, tensor by tensor so exactly the weights' bytes
  // cross the link (with the zero padding a GPU's quantized rows need, not the packing gaps),
  // queued as one transfer.
  EventPtr queue_copy(const MergedSegment& seg, const std::vector<Model::HostParams>& host,
                      const std::vector<uint8_t*>& dst) {
    const auto& base = model_.base_segments();
    std::vector<CopyRegion> regions;
    for (size_t b = seg.first; b <= seg.last; b++) {
      const size_t i = b - seg.first;
      if (!host[i].data) continue;
      const auto& tensors = base[b].tensors;
      for (size_t k = 0; k < tensors.size(); k++) {
        const SegmentTensor& t = tensors[k];
        // A mapped file has no padding after a tensor: a padded span copies from a buffer only.
        const uint64_t bytes = host[i].mapped ? t.nbytes : t.span_bytes;
        regions.push_back(CopyRegion{dst[i] + t.packed_offset, host[i].piece(k), bytes});
      }
    }
    return device_.copy_stream().copy_batch_async(regions.data(), regions.size());
  }

  // The verify option, and the disk backend's release of host params, need the copy done.
  bool copies_need_host_wait() const {
    return request_.verify || request_.params_backend == ParamsBackend::kDisk;
  }

  // verify: the device copy of each copied member against its host params' checksum, taken at
  // the member's first use in this job.
  void verify_copy(int64_t step, const MergedSegment& seg,
                   const std::vector<Model::HostParams>& host, const std::vector<uint8_t*>& dst) {
    if (!request_.verify) return;
    const auto& base = model_.base_segments();
    std::vector<uint8_t> copy;
    for (size_t b = seg.first; b <= seg.last; b++) {
      const size_t i = b - seg.first;
      if (!host[i].data) continue;
      std::vector<uint64_t>& expected = checksums_[b];
      if (expected.empty()) {
        for (size_t k = 0; k < base[b].tensors.size(); k++) {
          expected.push_back(xxhash64(host[i].piece(k), base[b].tensors[k].nbytes, 0));
        }
      }
      for (size_t k = 0; k < base[b].tensors.size(); k++) {
        const SegmentTensor& t = base[b].tensors[k];
        copy.resize(t.nbytes);
        device_.read(dst[i] + t.packed_offset, copy.data(), t.nbytes);
        const uint64_t got = xxhash64(copy.data(), t.nbytes, 0);
        if (got != expected[k]) {
          throw IntegrityError("run: step " + std::to_string(step) + ", " + describe(seg) +
                               ": the device copy of " + t.name + " (" + std::to_string(t.nbytes) +
                               " bytes) does not match its host params (checksum " +
                               std::to_string(got) + ", expected " + std::to_string(expected[k]) +
                               ")");
        }
      }
    }
  }

  // The copied members' host params are no longer needed by this job: the disk backend drops
  // them (the copy must have landed), the cpu backend keeps them for later steps and jobs.
  void release_copied(const MergedSegment& seg, const std::vector<Model::HostParams>& host) {
    const auto backend = request_.params_backend == ParamsBackend::kDisk ? Model::Backend::kDisk
                                                                         : Model::Backend::kCpu;
    for (size_t b = seg.first; b <= seg.last; b++) {
      if (!host[b - seg.first].data) continue;
      model_.release_params(b, backend);
      std::lock_guard<std::mutex> lock(holds_mu_);
      holds_[b]--;
    }
  }

  // Params this job prepared and did not release (a run that failed or was cancelled midway):
  // given back, so the cache does not hold them for good.
  void release_holds() noexcept {
    const auto backend = request_.params_backend == ParamsBackend::kDisk ? Model::Backend::kDisk
                                                                         : Model::Backend::kCpu;
    std::lock_guard<std::mutex> lock(holds_mu_);
    for (size_t b = 0; b < holds_.size(); b++) {
      for (; holds_[b] > 0; holds_[b]--) model_.release_params(b, backend);
    }
  }

  // The members' graphs, in order, on the compute side; `params[i]` holds member i's packed
  // weights on the device. Returns the last compute's event (its start is the first's).
  EventPtr forward(const MergedSegment& seg, const std::vector<const uint8_t*>& params) {
    EventPtr first, last;
    for (size_t b = seg.first; b <= seg.last; b++) {
      last = device_.compute(graphs_->bind(device_, b, params[b - seg.first]));
      if (!first) first = last;
    }
    if (first == last) return last;
    return std::make_shared<SpanEvent>(first, last);
  }

  // A merged segment's computes as one event: from the first member's start to the last's end.
  class SpanEvent final : public Event {
   public:
    SpanEvent(EventPtr first, EventPtr last) : first_(std::move(first)), last_(std::move(last)) {}
    bool ready() const override { return last_->ready(); }
    void wait() override {
      first_->wait();
      last_->wait();
    }
    double start_us() const override { return first_->start_us(); }
    double end_us() const override { return last_->end_us(); }

   private:
    EventPtr first_, last_;
  };

  Device& device_;
  Model& model_;
  const RunRequest& request_;
  const std::atomic<bool>* cancel_;
  std::vector<MergedSegment> plan_;
  std::unique_ptr<JobGraphs> graphs_;
  std::unique_ptr<StepDriver> driver_;
  DeviceBuffer activations_;
  std::vector<std::vector<uint64_t>> checksums_;  // verify: per base segment, per tensor
  std::mutex holds_mu_;     // the copy thread prepares while the compute thread releases
  std::vector<int> holds_;  // per base segment: prepares not yet released
  // The base segments this run computes: all of them, or its stage's.
  size_t first_base_ = 0;
  size_t last_base_ = 0;

  // The plan's merged segments, checked against the model.
  std::vector<MergedSegment> merge_plan(const std::vector<PlanSegment>& segments) const {
    const auto& base = model_.base_segments();
    std::vector<MergedSegment> plan;
    if (segments.empty()) throw InvalidArgumentError("run: the plan has no segments");
    const int64_t lo = static_cast<int64_t>(first_base_), hi = static_cast<int64_t>(last_base_);
    const std::string of_what = request_.stage ? " (the stage's base segments, of 0.." +
                                                     std::to_string(base.size() - 1) + ")"
                                               : "";
    int64_t expected_first = lo;
    for (size_t i = 0; i < segments.size(); i++) {
      const PlanSegment& s = segments[i];
      if (s.first_base != expected_first || s.last_base < s.first_base || s.last_base > hi) {
        throw InvalidArgumentError("run: plan segment " + std::to_string(i) +
                                   " covers base segments " + std::to_string(s.first_base) + ".." +
                                   std::to_string(s.last_base) + "; segments must cover " +
                                   std::to_string(lo) + ".." + std::to_string(hi) + of_what +
                                   " in order, each exactly once");
      }
      MergedSegment m;
      m.index = static_cast<int32_t>(i);
      m.first = static_cast<size_t>(s.first_base);
      m.last = static_cast<size_t>(s.last_base);
      m.resident = s.resident;
      for (size_t b = m.first; b <= m.last; b++) {
        m.member_offsets.push_back(m.device_bytes);
        m.device_bytes += align_up(base[b].packed_bytes, kPackAlignment);
        m.param_bytes += base[b].param_bytes;
      }
      m.label = base[m.first].name + (m.last > m.first ? ".." + base[m.last].name : "");
      plan.push_back(std::move(m));
      expected_first = s.last_base + 1;
    }
    if (expected_first != hi + 1) {
      throw InvalidArgumentError("run: the plan covers base segments " + std::to_string(lo) + ".." +
                                 std::to_string(expected_first - 1) + " of " + std::to_string(lo) +
                                 ".." + std::to_string(hi) + of_what);
    }
    return plan;
  }

 private:
  // The stage's range against the model, and its link.
  void validate_stage() {
    const int64_t n = static_cast<int64_t>(model_.base_segments().size());
    last_base_ = static_cast<size_t>(n - 1);
    if (!request_.stage) return;
    const PipelineStage& st = *request_.stage;
    if (st.first_base < 0 || st.first_base > st.last_base || st.last_base >= n) {
      throw InvalidArgumentError("run: the stage's base segments " + std::to_string(st.first_base) +
                                 ".." + std::to_string(st.last_base) +
                                 " are not a range of the model's 0.." + std::to_string(n - 1));
    }
    first_base_ = static_cast<size_t>(st.first_base);
    last_base_ = static_cast<size_t>(st.last_base);
    if (!st.link && !(st.first_base == 0 && st.last_base == n - 1)) {
      throw InvalidArgumentError("run: the stage " + std::to_string(st.first_base) + ".." +
                                 std::to_string(st.last_base) + " of 0.." + std::to_string(n - 1) +
                                 " has no link to the other stages");
    }
  }

  void validate() {
    const auto& r = request_;
    if (r.steps < 1) {
      throw InvalidArgumentError("run: steps must be ≥ 1 (got " + std::to_string(r.steps) + ")");
    }
    model_.arch().check_job(r.job);
    if (r.stage && r.execution != Execution::kPooled) {
      throw InvalidArgumentError(
          std::string("run: a pipeline stage runs with pooled execution, not ") +
          execution_name(r.execution));
    }
    if (r.execution == Execution::kPooled ? (r.slots < 1 || r.slots > kMaxSlots) : r.slots != 0) {
      throw InvalidArgumentError(
          std::string("run: ") + execution_name(r.execution) + " execution takes " +
          (r.execution == Execution::kPooled ? "1 to " + std::to_string(kMaxSlots) : "no") +
          " staging slots (got " + std::to_string(r.slots) + ")");
    }
    // The packed layout must suit this device's memory: tensors aligned as it wants and spanning
    // what it allocates (a GPU pads quantized rows).
    const size_t alignment = device_.tensor_alignment();
    for (const BaseSegment& seg : model_.base_segments()) {
      for (const SegmentTensor& t : seg.tensors) {
        const ggml_tensor desc = tensor_descriptor(t);
        if (t.packed_offset % alignment != 0 || t.span_bytes < device_.tensor_alloc_size(&desc)) {
          throw InvalidArgumentError("run: the model was laid out for " + model_.layout_name() +
                                     " memory, which does not suit " + device_.backend_name() +
                                     " (open the model for this device)");
        }
      }
    }
    validate_stage();
    plan_ = merge_plan(r.segments);
    const auto& base = model_.base_segments();
    checksums_.resize(base.size());
    holds_.assign(base.size(), 0);
  }
};

// ==== serial (sd.cpp before #1905) and lookahead (sd.cpp after #1905) ====
// Per step, per merged segment: prepare, allocate, copy, compute, free — the lookahead queues the
// next streamed segment's copy into its own fresh buffer before computing the current one.
class FreshRun : public RunBase {
 public:
  FreshRun(Device& device, Model& model, const RunRequest& request, const std::atomic<bool>* cancel)
      : RunBase(device, model, request, cancel) {}

  RunOutput run(const StepObserver& on_step) {
    {
      std::unique_lock<std::mutex> admission = device_.admit();
      start_job();
    }
    start_loading();
    resident_.resize(plan_.size());
    const bool lookahead = request_.execution == Execution::kLookahead;
    for (int64_t step = 1; step <= request_.steps; step++) {
      PendingStep pending;
      pending.report.step = step;
      device_.reset_window_peak();
      pending.report.start_us = wall_clock_us();
      before_step(step);
      Copy ahead;  // the next streamed segment's copy, queued during this one's compute
      for (size_t k = 0; k < plan_.size(); k++) {
        const MergedSegment& seg = plan_[k];
        check_cancel(step, seg);
        pending.report.events.push_back(
            make_event(EventKind::kSegment, seg, 0, 0, seg.param_bytes));
        const size_t head = pending.report.events.size() - 1;
        Copy current;
        if (needs_upload(seg)) {
          current = ahead.seg == &seg ? std::move(ahead) : start_copy(step, seg);
          ahead = Copy{};
          finish_copy(step, current, pending);
        }
        pending.report.events[head].source =
            current.seg ? current.prepared.disk_bytes > 0 ? ParamSource::kDisk : ParamSource::kHost
                        : ParamSource::kResident;
        // One copy ahead at a time: a resident segment's lookahead may already have queued the
        // next streamed segment's copy (replacing it would free its buffer under the transfer).
        if (lookahead && !ahead.seg) {
          for (size_t n = k + 1; n < plan_.size(); n++) {
            if (!needs_upload(plan_[n])) continue;
            ahead = try_start_copy(step, plan_[n]);
            break;
          }
        }
        const std::vector<const uint8_t*> params =
            members(current.seg ? current.buffer : resident_[seg.index], seg);
        EventPtr done = forward(seg, params);
        pending.add(make_event(EventKind::kCompute, seg, 0, 0, seg.param_bytes), done);
        // sd.cpp waits for each segment's compute before freeing its weights.
        done->wait();
        if (current.seg && seg.resident) resident_[seg.index] = std::move(current.buffer);
      }
      step_update(step)->wait();
      pending.finish();
      close_step(pending);
      if (on_step) on_step(std::move(pending.report));
    }
    return finish();
  }

 private:
  struct Copy {
    const MergedSegment* seg = nullptr;
    Prepared prepared;
    DeviceBuffer buffer;
    EventPtr done;
    double queued_us = 0;
    Copy() = default;
    Copy(Copy&&) = default;
    Copy& operator=(Copy&&) = default;
    // A copy still in flight when the run ends early (a cancellation, a failed segment) must land
    // before its buffer goes back to the arena, where the next allocation could take it.
    ~Copy() {
      if (!done) return;
      try {
        done->wait();
      } catch (...) {
      }
    }
  };

  bool needs_upload(const MergedSegment& seg) const {
    return !seg.resident || !resident_[seg.index];
  }

  std::vector<const uint8_t*> members(const DeviceBuffer& buffer, const MergedSegment& seg) const {
    std::vector<const uint8_t*> out;
    for (uint64_t offset : seg.member_offsets) {
      out.push_back(static_cast<const uint8_t*>(buffer.data()) + offset);
    }
    return out;
  }

  std::vector<uint8_t*> dsts(const Copy& c) const {
    std::vector<uint8_t*> out;
    for (uint64_t offset : c.seg->member_offsets) {
      out.push_back(static_cast<uint8_t*>(c.buffer.data()) + offset);
    }
    return out;
  }

  // Prepares the segment's params, allocates its fresh buffer and queues the copy.
  Copy start_copy(int64_t step, const MergedSegment& seg) {
    Copy c;
    c.seg = &seg;
    c.prepared = prepare(seg, {});
    c.queued_us = wall_clock_us();
    c.buffer = allocate(seg.device_bytes, "the weights",
                        [&] { return "run: step " + std::to_string(step) + ", " + describe(seg); });
    c.done = queue_copy(seg, c.prepared.host, dsts(c));
    return c;
  }

  // The lookahead's copy; none if its buffer does not fit beside the current segment's (the
  // segment is then copied when its turn comes, as without lookahead).
  Copy try_start_copy(int64_t step, const MergedSegment& seg) {
    try {
      return start_copy(step, seg);
    } catch (const DeviceOutOfMemoryError&) {
      return Copy{};
    }
  }

  // Waits for the copy (sd.cpp's copies are synchronous) and records prepare_params and h2d.
  // The h2d event spans the allocation and the transfer, as sd.cpp's does.
  void finish_copy(int64_t step, Copy& c, PendingStep& pending) {
    c.done->wait();
    const MergedSegment& seg = *c.seg;
    pending.report.events.push_back(prepare_event(seg, c.prepared, seg.param_bytes));
    pending.report.disk_bytes += c.prepared.disk_bytes;
    RunEvent h2d = make_event(EventKind::kH2D, seg, std::min(c.queued_us, c.done->start_us()),
                              c.done->end_us(), seg.param_bytes);
    pending.report.events.push_back(h2d);
    pending.report.h2d_bytes += seg.param_bytes;
    verify_copy(step, seg, c.prepared.host, dsts(c));
    release_copied(seg, c.prepared.host);
  }

  std::vector<DeviceBuffer> resident_;
};

// ==== pooled: slots ≥ 1, overlapped, cyclic ====
class PooledRun : public RunBase {
 public:
  PooledRun(Device& device, Model& model, const RunRequest& request,
            const std::atomic<bool>* cancel, PlanMailbox* plans)
      : RunBase(device, model, request, cancel), plans_(plans), slots_wanted_(request.slots) {}

  ~PooledRun() override { shutdown(); }

  RunOutput run(const StepObserver& on_step) {
    {
      // All of the job's memory is taken at once, so concurrent starts cannot each take half.
      std::unique_lock<std::mutex> admission = device_.admit();
      start_job();
      allocate_job_buffers();
    }
    start_loading();
    copier_ = std::thread([this] { copy_loop(); });

    for (int64_t step = 1; step <= request_.steps; step++) {
      // A stage's wait for the previous stage is not part of its step (nor a stall of it).
      receive_handoff(step);
      PendingStep pending;
      pending.report.step = step;
      device_.reset_window_peak();
      pending.report.start_us = wall_clock_us();
      if (step == first_step_) pending.report.resident_hit_bytes = resident_hit_bytes_;
      before_step(step);
      for (const MergedSegment& seg : plan_) run_segment(step, seg, pending);
      if (!staged()) {
        step_update(step);
        pending.finish();
      } else if (!last_stage()) {
        pending.finish();  // the computes have ended
        send_handoff(step);
      } else {
        step_update(step)->wait();
        pending.finish();
        if (step < request_.steps) send_handoff(step + 1);
      }
      close_step(pending);
      if (on_step) on_step(std::move(pending.report));
      std::vector<PlanSegment> segments;
      uint32_t slots = 0;
      if (step < request_.steps && plans_ && plans_->take(&segments, &slots)) {
        swap_plan(step + 1, segments, slots);
      }
    }
    shutdown();
    return finish();
  }

 private:
  // A copy the copy thread queued, handed to the compute thread in the order it computes them.
  struct Landed {
    const MergedSegment* seg = nullptr;
    Prepared prepared;
    std::vector<uint8_t*> dst;  // per member (null where nothing was copied)
    uint64_t bytes = 0;
    EventPtr copy;
    std::exception_ptr error;
  };

  // Whether (step, segment) copies anything: every streamed segment each step; in the plan's
  // first step the resident segments whose weights the residency cache did not already hold.
  bool needs_copy(int64_t step, const MergedSegment& seg) const {
    return !seg.resident || (step == first_step_ && upload_[seg.index]);
  }

  // The job goes on from `next_step` with another plan: copies queued ahead drain (and are
  // dropped), the staging slots and the hold on resident weights go back, and the new plan's
  // buffers are taken under admission, as at the start.
  void swap_plan(int64_t next_step, const std::vector<PlanSegment>& segments, uint32_t slots) {
    if (slots < 1 || slots > kMaxSlots) {
      throw InvalidArgumentError("run: a swapped plan takes 1 to " + std::to_string(kMaxSlots) +
                                 " staging slots (got " + std::to_string(slots) + ")");
    }
    std::vector<MergedSegment> plan = merge_plan(segments);
    shutdown();
    slots_.clear();
    slot_free_.clear();
    held_.clear();
    held_base_.clear();
    resident_hit_bytes_ = 0;
    computed_ = 0;
    stop_ = false;
    plan_ = std::move(plan);
    slots_wanted_ = slots;
    first_step_ = next_step;
    {
      std::unique_lock<std::mutex> admission = device_.admit();
      allocate_job_buffers();
    }
    copier_ = std::thread([this] { copy_loop(); });
  }

  // Everything the job uses on the device beyond activations and the compute buffer, allocated
  // once, before step 1.
  void allocate_job_buffers() {
    const auto& base = model_.base_segments();
    auto at_start = [] { return std::string("run: job start"); };
    uint64_t slot_bytes = 0, streamed_per_step = 0;
    for (const MergedSegment& seg : plan_) {
      if (!seg.resident) {
        slot_bytes = std::max(slot_bytes, seg.device_bytes);
        streamed_per_step++;
      }
    }

    // Resident weights: reuse what the residency cache holds (this job holds them from now on,
    // so no other allocation can evict them), allocate the rest.
    const std::string model_key = ResidencyCache::model_key(model_.path());
    resident_params_.assign(plan_.size(), {});
    upload_.assign(plan_.size(), false);
    to_upload_.assign(plan_.size(), {});
    fresh_.assign(base.size(), false);
    for (const MergedSegment& seg : plan_) {
      if (!seg.resident) continue;
      auto& params = resident_params_[seg.index];
      params.resize(seg.last - seg.first + 1);
      to_upload_[seg.index].assign(params.size(), false);
      for (size_t b = seg.first; b <= seg.last; b++) {
        ResidencyCache::EntryPtr entry;
        if (!model_key.empty()) entry = device_.residency().find(model_key, b, &model_);
        if (entry) {
          resident_hit_bytes_ += entry->param_bytes;
        } else {
          entry = std::make_shared<ResidencyCache::Entry>();
          entry->owner = &model_;
          entry->param_bytes = base[b].param_bytes;
          fresh_[b] = true;
          upload_[seg.index] = true;
          to_upload_[seg.index][b - seg.first] = true;
        }
        held_.push_back(std::move(entry));
        held_base_.push_back(b);
      }
    }
    for (size_t i = 0; i < held_.size(); i++) {
      const size_t b = held_base_[i];
      if (!fresh_[b]) continue;
      held_[i]->buffer = allocate(align_up(base[b].packed_bytes, kPackAlignment),
                                  "the resident weights of " + base[b].name, at_start);
    }
    for (const MergedSegment& seg : plan_) {
      if (!seg.resident) continue;
      for (size_t b = seg.first; b <= seg.last; b++) {
        resident_params_[seg.index][b - seg.first] =
            static_cast<uint8_t*>(entry_for(b)->buffer.data());
      }
    }

    if (streamed_per_step > 0) {
      // More slots than the job has streamed copies could never be used.
      const uint64_t copies =
          streamed_per_step * static_cast<uint64_t>(request_.steps - first_step_ + 1);
      const uint64_t count = std::min<uint64_t>(slots_wanted_, copies);
      for (uint64_t s = 0; s < count; s++) {
        slots_.push_back(allocate(slot_bytes, "staging slot " + std::to_string(s), at_start));
      }
      slot_free_.resize(slots_.size());
    }
    model_key_ = model_key;
  }

  const ResidencyCache::EntryPtr& entry_for(size_t base) const {
    for (size_t i = 0; i < held_base_.size(); i++) {
      if (held_base_[i] == base) return held_[i];
    }
    throw InvalidArgumentError("run: base segment " + std::to_string(base) + " is not resident");
  }

  // The copy thread: queues every copy of the job in compute order. The g-th streamed copy
  // (across steps) goes to slot g mod d once the (g−d)-th streamed segment's compute has been
  // queued, and (on the copy stream, not the host) after that compute has finished.
  void copy_loop() {
    const uint64_t d = slots_.size();
    uint64_t g = 0;
    try {
      for (int64_t step = first_step_; step <= request_.steps; step++) {
        for (const MergedSegment& seg : plan_) {
          if (!needs_copy(step, seg)) continue;
          EventPtr slot_free;
          {
            std::unique_lock<std::mutex> lock(mu_);
            if (!seg.resident) {
              cv_.wait(lock, [&] { return stop_ || g < computed_ + d; });
              slot_free = slot_free_[g % d];
            }
            if (stop_) return;
          }
          Landed landed;
          landed.seg = &seg;
          std::vector<bool> want;
          if (seg.resident) {
            want = to_upload_[seg.index];
            landed.dst = resident_params_[seg.index];
          } else {
            auto* slot = static_cast<uint8_t*>(slots_[g % d].data());
            for (uint64_t offset : seg.member_offsets) landed.dst.push_back(slot + offset);
          }
          landed.prepared = prepare(seg, want);
          const auto& base = model_.base_segments();
          for (size_t b = seg.first; b <= seg.last; b++) {
            if (!landed.prepared.host[b - seg.first].data) {
              landed.dst[b - seg.first] = nullptr;
            } else {
              landed.bytes += base[b].param_bytes;
            }
          }
          if (slot_free) device_.copy_stream().wait_event(slot_free);
          landed.copy = queue_copy(seg, landed.prepared.host, landed.dst);
          if (!seg.resident) g++;
          {
            std::lock_guard<std::mutex> lock(mu_);
            landed_.push_back(std::move(landed));
          }
          cv_.notify_all();
        }
      }
    } catch (...) {
      Landed failed;
      failed.error = std::current_exception();
      {
        std::lock_guard<std::mutex> lock(mu_);
        landed_.push_back(std::move(failed));
      }
      cv_.notify_all();
    }
  }

  Landed next_landed() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !landed_.empty(); });
    Landed landed = std::move(landed_.front());
    landed_.pop_front();
    lock.unlock();
    if (landed.error) std::rethrow_exception(landed.error);
    return landed;
  }

  void run_segment(int64_t step, const MergedSegment& seg, PendingStep& pending) {
    check_cancel(step, seg);
    pending.report.events.push_back(make_event(EventKind::kSegment, seg, 0, 0, seg.param_bytes));
    const size_t head = pending.report.events.size() - 1;
    ParamSource source = ParamSource::kResident;

    std::vector<const uint8_t*> params;
    if (needs_copy(step, seg)) {
      Landed landed = next_landed();
      const RunEvent prep = prepare_event(seg, landed.prepared, landed.bytes);
      source = prep.source;
      pending.report.events.push_back(prep);
      pending.report.disk_bytes += landed.prepared.disk_bytes;
      pending.add(make_event(EventKind::kH2D, seg, 0, 0, landed.bytes), landed.copy);
      pending.report.h2d_bytes += landed.bytes;
      if (copies_need_host_wait()) {
        landed.copy->wait();
        verify_copy(step, seg, landed.prepared.host, landed.dst);
      }
      // The cpu backend keeps the bytes whether or not the copy has landed; the disk backend
      // waited for it just above.
      release_copied(seg, landed.prepared.host);
      device_.compute_wait(landed.copy);
      if (seg.resident) {
        publish_uploads(seg);
      } else {
        for (uint8_t* p : landed.dst) params.push_back(p);
      }
    }
    if (seg.resident) {
      for (uint8_t* p : resident_params_[seg.index]) params.push_back(p);
    }

    EventPtr done = forward(seg, params);
    pending.add(make_event(EventKind::kCompute, seg, 0, 0, seg.param_bytes), done);
    pending.report.events[head].source = source;
    if (!seg.resident) {
      // Its slot is free for the copy `slots` streamed segments ahead, once this compute ends.
      {
        std::lock_guard<std::mutex> lock(mu_);
        slot_free_[computed_ % slot_free_.size()] = done;
        computed_++;
      }
      cv_.notify_all();
    }
  }

  // A resident segment's fresh uploads have landed: they enter the device's residency cache,
  // for later jobs.
  void publish_uploads(const MergedSegment& seg) {
    if (model_key_.empty()) return;
    for (size_t b = seg.first; b <= seg.last; b++) {
      if (fresh_[b]) device_.residency().insert(model_key_, b, entry_for(b));
    }
  }

  // Stops the copy thread and waits for every copy and compute it queued, so no buffer is freed
  // under a transfer.
  void shutdown() noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (copier_.joinable()) copier_.join();
    try {
      device_.copy_stream().synchronize();
      for (const EventPtr& e : slot_free_) {
        if (e) e->wait();
      }
      // Copies queued ahead that no segment consumed (the run was cancelled or failed): the disk
      // backend's host params they hold go back, or the cache would keep them for good.
      for (const Landed& l : landed_) {
        if (l.seg) release_copied(*l.seg, l.prepared.host);
      }
      landed_.clear();
    } catch (...) {
    }
  }

  PlanMailbox* plans_;
  uint32_t slots_wanted_;
  int64_t first_step_ = 1;  // the current plan's first step
  std::string model_key_;
  std::vector<std::vector<uint8_t*>> resident_params_;  // per plan segment, per member
  std::vector<bool> upload_;                            // per plan segment: uploads in step 1
  std::vector<std::vector<bool>> to_upload_;            // per plan segment, per member
  std::vector<bool> fresh_;                             // per base segment: uploaded by this job
  std::vector<ResidencyCache::EntryPtr> held_;          // resident weights this job uses
  std::vector<size_t> held_base_;
  uint64_t resident_hit_bytes_ = 0;
  std::vector<DeviceBuffer> slots_;
  std::vector<EventPtr> slot_free_;  // per slot: the compute that last read it

  std::thread copier_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t computed_ = 0;  // streamed segments whose compute was queued, across steps
  std::deque<Landed> landed_;
};

}  // namespace

void HandoffInbox::put(int64_t step, HostTensors&& tensors) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    handoffs_[step] = std::move(tensors);
  }
  cv_.notify_all();
}

bool HandoffInbox::wait(int64_t step, const std::atomic<bool>* cancel, HostTensors* out) {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    const auto it = handoffs_.find(step);
    if (it != handoffs_.end()) {
      *out = std::move(it->second);
      handoffs_.erase(it);
      return true;
    }
    if (cancel && cancel->load(std::memory_order_relaxed)) return false;
    // A cancel flag is a bare atomic (nobody notifies): look at it every 20 ms.
    cv_.wait_for(lock, std::chrono::milliseconds(20));
  }
}

void PlanMailbox::post(std::vector<PlanSegment> segments, uint32_t slots) {
  std::lock_guard<std::mutex> lock(mu_);
  segments_ = std::move(segments);
  slots_ = slots;
  posted_ = true;
}

bool PlanMailbox::take(std::vector<PlanSegment>* segments, uint32_t* slots) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!posted_) return false;
  *segments = std::move(segments_);
  *slots = slots_;
  posted_ = false;
  swaps_++;
  return true;
}

uint32_t PlanMailbox::swaps() const {
  std::lock_guard<std::mutex> lock(mu_);
  return swaps_;
}

RunOutput run_job(DeviceLease& lease, Model& model, const RunRequest& request,
                  const std::atomic<bool>* cancel, const StepObserver& on_step,
                  PlanMailbox* plans) {
  if (request.execution == Execution::kPooled) {
    PooledRun run(lease.device(), model, request, cancel, plans);
    return run.run(on_step);
  }
  FreshRun run(lease.device(), model, request, cancel);
  return run.run(on_step);
}

}  // namespace ferry
