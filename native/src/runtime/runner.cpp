#include "ferry/runner.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

#include "ferry/checksum.h"
#include "ferry/errors.h"

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

namespace {

// ---- the params cache's loading API, where the model offers it ----
// DitModel (model.h) is gaining release_params(index), prefetch(order) and load_all(). The runner
// calls them where they exist and otherwise falls back to what prepare_params alone can do
// (detected at compile time, so this file builds against either version of model.h).
template <typename M, typename = void>
struct HasReleaseParams : std::false_type {};
template <typename M>
struct HasReleaseParams<M, std::void_t<decltype(std::declval<M&>().release_params(size_t{}))>>
    : std::true_type {};
template <typename M, typename = void>
struct HasLoadAll : std::false_type {};
template <typename M>
struct HasLoadAll<M, std::void_t<decltype(std::declval<M&>().load_all())>> : std::true_type {};
template <typename M, typename = void>
struct HasPrefetch : std::false_type {};
template <typename M>
struct HasPrefetch<M, std::void_t<decltype(std::declval<M&>().prefetch(
                          std::declval<const std::vector<size_t>&>()))>> : std::true_type {};

// Disk backend: the host copy of base segment `index` is not needed until its next use.
template <typename M>
void release_host_params(M& model, size_t index) {
  if constexpr (HasReleaseParams<M>::value) {
    model.release_params(index);
  } else {
    (void)model;
    (void)index;  // a params cache without release keeps everything, as the cpu backend does
  }
}

// Eager loading: every base segment in host memory before step 1.
template <typename M>
void load_all_params(M& model) {
  if constexpr (HasLoadAll<M>::value) {
    model.load_all();
  } else {
    for (size_t b = 0; b < model.base_segments().size(); b++) model.prepare_params(b);
  }
}

// Background loading through the model's own reader; false if it has none.
template <typename M>
bool model_prefetch(M& model, const std::vector<size_t>& order) {
  if constexpr (HasPrefetch<M>::value) {
    model.prefetch(order);
    return true;
  } else {
    (void)model;
    (void)order;
    return false;
  }
}

// Without the model's reader: a thread of the run's own reads base segments in plan order, so
// prepare_params finds them in host memory (the cache serialises concurrent loads of a segment).
class BackgroundLoader {
 public:
  BackgroundLoader(DitModel& model, std::vector<size_t> order)
      : thread_([this, &model, order = std::move(order)] {
          for (size_t b : order) {
            if (stop_.load()) return;
            try {
              model.prepare_params(b);
            } catch (...) {
              // The run's own prepare_params of this segment reports the failure, in context.
              return;
            }
          }
        }) {}
  ~BackgroundLoader() {
    stop_.store(true);
    thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Sizes of activations and buffers, refusing requests whose byte counts would overflow.
uint64_t checked_mul(uint64_t a, uint64_t b, const char* what) {
  unsigned __int128 p = static_cast<unsigned __int128>(a) * b;
  if (p > (static_cast<unsigned __int128>(1) << 62)) {
    throw InvalidArgumentError(std::string("run: ") + what + " is too large");
  }
  return static_cast<uint64_t>(p);
}

// One entry of the plan, resolved against the model.
struct MergedSegment {
  int32_t index = 0;
  size_t first = 0;
  size_t last = 0;
  bool resident = false;
  uint64_t compute_buffer_bytes = 0;
  uint64_t param_bytes = 0;
  uint64_t device_bytes = 0;             // the members' packed buffers back to back
  std::vector<uint64_t> member_offsets;  // of each member inside such a buffer
  std::string label;                     // "blocks.0..blocks.3"
};

std::string describe(const MergedSegment& s) {
  return "segment " + std::to_string(s.index) + " (" + s.label + ")";
}

TensorView view(const uint8_t* base, const SegmentTensor& t) {
  TensorView v;
  v.data = base + t.packed_offset;
  v.dtype = t.dtype;
  v.shape = t.shape;
  return v;
}

// Host params of a merged segment's members, as prepare_params left them.
struct Prepared {
  std::vector<const uint8_t*> host;  // per member (null where not prepared)
  uint64_t disk_bytes = 0;
  double start_us = 0;
  double end_us = 0;
};

// What both execution modes share: the request checked against the model, the carried
// activations, the params and copy plumbing, and the model's forwards over a merged segment.
class RunBase {
 public:
  RunBase(Device& device, DitModel& model, const RunRequest& request,
          const std::atomic<bool>* cancel)
      : device_(device), model_(model), request_(request), cancel_(cancel) {
    validate();
  }

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
                                     " bytes for " + what + ": " + e.what());
      }
    }
  }

  // z, x, y on the device and z's initial value copied there.
  void start_job() {
    const auto& md = model_.dims();
    z_count_ = rows_ * static_cast<uint64_t>(md.channels);
    const uint64_t x_count = rows_ * static_cast<uint64_t>(md.hidden);
    auto at_start = [] { return std::string("run: job start"); };
    z_ = allocate(checked_mul(z_count_, 4, "z"), "the latent z", at_start);
    x_ = allocate(checked_mul(x_count, 4, "x"), "the hidden state x", at_start);
    y_ = allocate(checked_mul(z_count_, 4, "y"), "the model output y", at_start);

    std::vector<float> generated;
    const float* z0 = request_.input.data();
    if (request_.input.empty()) {
      generated.resize(z_count_);
      initial_input(request_.seed, generated.data(), generated.size());
      z0 = generated.data();
    }
    device_.wait(device_.copy_stream().copy_async(z_.data(), z0, z_count_ * 4));
  }

  // Starts eager or background loading, as the request asks.
  void start_loading() {
    const size_t n = model_.base_segments().size();
    switch (request_.load) {
      case LoadMode::kLazy:
        break;
      case LoadMode::kEager:
        load_all_params(model_);
        break;
      case LoadMode::kBackground: {
        // The disk backend keeps host memory to the segments in flight; a reader running ahead
        // would hold the whole model, so with it segments are read when needed.
        if (request_.params_backend == ParamsBackend::kDisk) break;
        // Plan order: the order the first step needs them in.
        std::vector<size_t> order(n);
        for (size_t b = 0; b < n; b++) order[b] = b;
        if (!model_prefetch(model_, order)) {
          loader_ = std::make_unique<BackgroundLoader>(model_, std::move(order));
        }
        break;
      }
    }
  }

  void euler_step() {
    const float dt = 1.0f / static_cast<float>(request_.steps);
    device_.euler_update(static_cast<float*>(z_.data()), static_cast<const float*>(y_.data()),
                         z_count_, dt);
    device_.compute_stream().synchronize();
  }

  RunOutput finish() {
    RunOutput out;
    out.output.resize(z_count_);
    device_.wait(device_.copy_stream().copy_async(out.output.data(), z_.data(), z_count_ * 4));
    out.shape = {request_.batch, request_.tokens, model_.dims().channels};
    return out;
  }

  void check_cancel(int64_t step, const MergedSegment& seg) const {
    if (cancel_ && cancel_->load(std::memory_order_relaxed)) {
      throw CancelledError("run cancelled at step " + std::to_string(step) + ", before " +
                           describe(seg));
    }
  }

  // Members `want[i]` (all when empty) of a merged segment in host memory.
  Prepared prepare(const MergedSegment& seg, const std::vector<bool>& want) {
    Prepared p;
    p.start_us = wall_clock_us();
    p.host.assign(seg.last - seg.first + 1, nullptr);
    for (size_t b = seg.first; b <= seg.last; b++) {
      const size_t i = b - seg.first;
      if (!want.empty() && !want[i]) continue;
      const DitModel::HostParams hp = model_.prepare_params(b);
      p.host[i] = hp.data;
      p.disk_bytes += hp.disk_bytes;
    }
    p.end_us = wall_clock_us();
    return p;
  }

  // The copy of the prepared members to `dst[i]`, tensor by tensor so exactly the weights' bytes
  // cross the link (not the packing padding), queued as one transfer.
  EventPtr queue_copy(const MergedSegment& seg, const std::vector<const uint8_t*>& host,
                      const std::vector<uint8_t*>& dst) {
    const auto& base = model_.base_segments();
    std::vector<CopyRegion> regions;
    for (size_t b = seg.first; b <= seg.last; b++) {
      const size_t i = b - seg.first;
      if (!host[i]) continue;
      for (const SegmentTensor& t : base[b].tensors) {
        regions.push_back(
            CopyRegion{dst[i] + t.packed_offset, host[i] + t.packed_offset, t.nbytes});
      }
    }
    return device_.copy_stream().copy_batch_async(regions.data(), regions.size());
  }

  // verify: the device copy of each copied member against its host params' checksum, taken at
  // the member's first use in this job.
  void verify_copy(int64_t step, const MergedSegment& seg, const std::vector<const uint8_t*>& host,
                   const std::vector<uint8_t*>& dst) {
    if (!request_.verify) return;
    const auto& base = model_.base_segments();
    for (size_t b = seg.first; b <= seg.last; b++) {
      const size_t i = b - seg.first;
      if (!host[i]) continue;
      std::vector<uint64_t>& expected = checksums_[b];
      if (expected.empty()) {
        for (const SegmentTensor& t : base[b].tensors) {
          expected.push_back(checksum64(host[i] + t.packed_offset, t.nbytes));
        }
      }
      for (size_t k = 0; k < base[b].tensors.size(); k++) {
        const SegmentTensor& t = base[b].tensors[k];
        const uint64_t got = device_.checksum(dst[i] + t.packed_offset, t.nbytes);
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

  // Disk backend: the copied members' host params are no longer needed.
  void release_copied(const MergedSegment& seg, const std::vector<const uint8_t*>& host) {
    if (request_.params_backend != ParamsBackend::kDisk) return;
    for (size_t b = seg.first; b <= seg.last; b++) {
      if (host[b - seg.first]) release_host_params(model_, b);
    }
  }

  // The members' forwards, in order, queued on the compute stream; `params[i]` holds member i's
  // packed weights on the device.
  void forward(const MergedSegment& seg, const std::vector<const uint8_t*>& params, void* scratch) {
    auto* z = static_cast<float*>(z_.data());
    auto* x = static_cast<float*>(x_.data());
    auto* y = static_cast<float*>(y_.data());
    const auto& base = model_.base_segments();
    for (size_t b = seg.first; b <= seg.last; b++) {
      const uint8_t* w = params[b - seg.first];
      const auto& t = base[b].tensors;
      switch (base[b].kind) {
        case SegmentKind::kPrelude: {
          PreludeWeights pw{view(w, t[0]), view(w, t[1])};
          device_.prelude_forward(dims_, pw, z, x, scratch);
          break;
        }
        case SegmentKind::kBlock: {
          BlockWeights bw{view(w, t[0]), view(w, t[1]), view(w, t[2]), view(w, t[3]),
                          view(w, t[4]), view(w, t[5]), view(w, t[6]), view(w, t[7]),
                          view(w, t[8]), view(w, t[9])};
          device_.block_forward(dims_, bw, x, scratch);
          break;
        }
        case SegmentKind::kFinal: {
          FinalWeights fw{view(w, t[0]), view(w, t[1]), view(w, t[2])};
          device_.final_forward(dims_, fw, x, y, scratch);
          break;
        }
      }
    }
  }

  Device& device_;
  DitModel& model_;
  const RunRequest& request_;
  const std::atomic<bool>* cancel_;
  DitDims dims_;
  uint64_t rows_ = 0;
  uint64_t z_count_ = 0;
  std::vector<MergedSegment> plan_;
  DeviceBuffer z_, x_, y_;
  std::vector<std::vector<uint64_t>> checksums_;  // verify: per base segment, per tensor
  std::unique_ptr<BackgroundLoader> loader_;

 private:
  void validate() {
    const auto& r = request_;
    if (r.batch < 1 || r.tokens < 1 || r.steps < 1) {
      throw InvalidArgumentError("run: batch, tokens and steps must be ≥ 1 (got batch " +
                                 std::to_string(r.batch) + ", tokens " + std::to_string(r.tokens) +
                                 ", steps " + std::to_string(r.steps) + ")");
    }
    if (r.slots > kMaxSlots) {
      throw InvalidArgumentError("run: slots must be between 0 and " + std::to_string(kMaxSlots) +
                                 " (got " + std::to_string(r.slots) + ")");
    }
    rows_ = checked_mul(static_cast<uint64_t>(r.batch), static_cast<uint64_t>(r.tokens),
                        "batch × tokens");
    const auto& md = model_.dims();
    // Every activation size the kernels compute must be representable.
    checked_mul(checked_mul(rows_, static_cast<uint64_t>(md.hidden), "the activations"), 16,
                "the activations");
    checked_mul(checked_mul(static_cast<uint64_t>(md.heads), static_cast<uint64_t>(r.tokens),
                            "the attention scores"),
                static_cast<uint64_t>(r.tokens) * 4, "the attention scores");
    checked_mul(rows_, static_cast<uint64_t>(md.channels) * 4, "the latent");
    const uint64_t z_count = rows_ * static_cast<uint64_t>(md.channels);
    if (!r.input.empty() && r.input.size() != z_count) {
      throw InvalidArgumentError("run: input has " + std::to_string(r.input.size()) +
                                 " values, expected batch·tokens·channels = " +
                                 std::to_string(r.batch) + "·" + std::to_string(r.tokens) + "·" +
                                 std::to_string(md.channels) + " = " + std::to_string(z_count));
    }
    dims_ = job_dims(md, r.batch, r.tokens);

    const auto& base = model_.base_segments();
    const int64_t n = static_cast<int64_t>(base.size());
    checksums_.resize(base.size());
    if (r.segments.empty()) throw InvalidArgumentError("run: the plan has no segments");
    int64_t next = 0;
    for (size_t k = 0; k < r.segments.size(); k++) {
      const PlanSegment& p = r.segments[k];
      const std::string at = "run: plan segment " + std::to_string(k);
      if (p.first_base != next) {
        throw InvalidArgumentError(at + " starts at base segment " + std::to_string(p.first_base) +
                                   ", expected " + std::to_string(next) +
                                   " (segments must cover base segments 0.." +
                                   std::to_string(n - 1) + " in order, each exactly once)");
      }
      if (p.last_base < p.first_base || p.last_base >= n) {
        throw InvalidArgumentError(at + " ends at base segment " + std::to_string(p.last_base) +
                                   ", outside " + std::to_string(p.first_base) + ".." +
                                   std::to_string(n - 1));
      }
      MergedSegment m;
      m.index = static_cast<int32_t>(k);
      m.first = static_cast<size_t>(p.first_base);
      m.last = static_cast<size_t>(p.last_base);
      m.resident = p.resident;
      m.compute_buffer_bytes = p.compute_buffer_bytes;
      m.label = base[m.first].name + (m.first == m.last ? "" : ".." + base[m.last].name);
      uint64_t needed = 0;
      for (size_t b = m.first; b <= m.last; b++) {
        m.member_offsets.push_back(m.device_bytes);
        m.device_bytes += align_up(base[b].packed_bytes, kPackAlignment);
        m.param_bytes += base[b].param_bytes;
        needed = std::max<uint64_t>(needed, segment_scratch_bytes(base[b].kind, dims_));
      }
      if (m.compute_buffer_bytes < needed) {
        throw InvalidArgumentError(at + " (" + m.label + ") has computeBufferBytes " +
                                   std::to_string(m.compute_buffer_bytes) + ", below the " +
                                   std::to_string(needed) + " bytes its kernels need for batch " +
                                   std::to_string(r.batch) + " × tokens " +
                                   std::to_string(r.tokens));
      }
      plan_.push_back(std::move(m));
      next = p.last_base + 1;
    }
    if (next != n) {
      throw InvalidArgumentError("run: the plan covers base segments 0.." +
                                 std::to_string(next - 1) + " but the model has 0.." +
                                 std::to_string(n - 1));
    }
  }
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

RunEvent prepare_event(const MergedSegment& seg, const Prepared& p, uint64_t bytes) {
  RunEvent e = make_event(EventKind::kPrepareParams, seg, p.start_us, p.end_us, bytes);
  e.source = p.disk_bytes > 0 ? ParamSource::kDisk : ParamSource::kHost;
  e.cold = p.disk_bytes > 0 ? Cold::kTrue : Cold::kFalse;
  return e;
}

// ==== slots = 0: sd.cpp's serial policy ====
// Per step, per merged segment: prepare params, allocate, copy (synchronous), compute (with a
// freshly allocated compute buffer), free. Resident segments are uploaded at first use and kept
// for this job only; nothing is shared with later jobs.
class SerialRun : public RunBase {
 public:
  using RunBase::RunBase;

  ~SerialRun() {
    // Nothing may still be copying into buffers about to be freed (only on an error path; the
    // normal path waits for every copy it queues).
    try {
      device_.copy_stream().synchronize();
    } catch (...) {
    }
  }

  RunOutput run(const StepObserver& on_step) {
    start_job();
    start_loading();
    resident_.resize(plan_.size());
    for (int64_t step = 1; step <= request_.steps; step++) {
      StepReport report;
      report.step = step;
      device_.reset_window_peak();
      report.start_us = wall_clock_us();
      last_compute_end_ = report.start_us;
      for (const MergedSegment& seg : plan_) run_segment(step, seg, report);
      euler_step();
      report.end_us = wall_clock_us();
      report.arena_peak_bytes = device_.memory_stats().window_peak_bytes;
      if (on_step) on_step(std::move(report));
    }
    return finish();
  }

 private:
  void run_segment(int64_t step, const MergedSegment& seg, StepReport& report) {
    check_cancel(step, seg);
    const size_t segment_event = report.events.size();
    report.events.push_back(
        make_event(EventKind::kSegment, seg, wall_clock_us(), 0, seg.param_bytes));

    ParamSource source = ParamSource::kResident;
    DeviceBuffer streamed;  // this step's copy of a streamed segment's weights
    const uint8_t* params;
    if (seg.resident && resident_[seg.index]) {
      params = static_cast<const uint8_t*>(resident_[seg.index].data());
    } else {
      // a. Every member's weights in the host params cache, read from the file on first use.
      const Prepared p = prepare(seg, {});
      report.events.push_back(prepare_event(seg, p, seg.param_bytes));
      report.disk_bytes += p.disk_bytes;
      source = report.events.back().source;
      // b. A fresh device buffer holding the members' packed weights, copied on the copy stream
      // and waited for (the h2d event spans the allocation and the copy, as sd.cpp's does).
      const double h2d_start = wall_clock_us();
      DeviceBuffer copy = allocate(seg.device_bytes, "the weights", [&] {
        return "run: step " + std::to_string(step) + ", " + describe(seg);
      });
      auto* dst = static_cast<uint8_t*>(copy.data());
      std::vector<uint8_t*> dsts;
      for (uint64_t offset : seg.member_offsets) dsts.push_back(dst + offset);
      device_.wait(queue_copy(seg, p.host, dsts));
      report.events.push_back(
          make_event(EventKind::kH2D, seg, h2d_start, wall_clock_us(), seg.param_bytes));
      report.h2d_bytes += seg.param_bytes;
      verify_copy(step, seg, p.host, dsts);
      release_copied(seg, p.host);
      params = dst;
      if (seg.resident) {
        resident_[seg.index] = std::move(copy);
      } else {
        streamed = std::move(copy);
      }
    }

    // c. The members' forwards, with a freshly allocated compute buffer.
    const double compute_start = wall_clock_us();
    DeviceBuffer scratch;
    if (seg.compute_buffer_bytes > 0) {
      scratch = allocate(seg.compute_buffer_bytes, "the compute buffer", [&] {
        return "run: step " + std::to_string(step) + ", " + describe(seg);
      });
    }
    std::vector<const uint8_t*> members;
    for (uint64_t offset : seg.member_offsets) members.push_back(params + offset);
    forward(seg, members, scratch.data());
    device_.compute_stream().synchronize();
    const double compute_end = wall_clock_us();
    RunEvent compute =
        make_event(EventKind::kCompute, seg, compute_start, compute_end, seg.param_bytes);
    compute.stall_us = std::max(0.0, compute_start - last_compute_end_);
    report.stall_us += compute.stall_us;
    last_compute_end_ = compute_end;
    report.events.push_back(compute);
    // d. Release: the compute buffer, and a streamed segment's weights.
    scratch.reset();
    streamed.reset();

    RunEvent& head = report.events[segment_event];
    head.source = source;
    head.end_us = wall_clock_us();
  }

  std::vector<DeviceBuffer> resident_;
  double last_compute_end_ = 0;
};

// ==== slots ≥ 1: overlapped, pooled, cyclic ====
class OverlappedRun : public RunBase {
 public:
  OverlappedRun(Device& device, DitModel& model, const RunRequest& request,
                const std::atomic<bool>* cancel)
      : RunBase(device, model, request, cancel) {}

  ~OverlappedRun() { shutdown(); }

  RunOutput run(const StepObserver& on_step) {
    start_job();
    allocate_job_buffers();
    start_loading();
    copier_ = std::thread([this] { copy_loop(); });

    for (int64_t step = 1; step <= request_.steps; step++) {
      StepReport report;
      report.step = step;
      device_.reset_window_peak();
      report.start_us = wall_clock_us();
      if (step == 1) report.resident_hit_bytes = resident_hit_bytes_;
      double last_compute_end = report.start_us;
      for (const MergedSegment& seg : plan_) {
        run_segment(step, seg, report, &last_compute_end);
      }
      euler_step();
      report.end_us = wall_clock_us();
      report.arena_peak_bytes = device_.memory_stats().window_peak_bytes;
      if (on_step) on_step(std::move(report));
    }
    shutdown();
    return finish();
  }

 private:
  // A copy the copy thread queued, handed to the compute thread in the order it computes them.
  struct Landed {
    Prepared prepared;
    std::vector<uint8_t*> dst;  // per member (null where nothing was copied)
    uint64_t bytes = 0;
    EventPtr copy;
    std::exception_ptr error;
  };

  // Whether (step, segment) copies anything: every streamed segment each step; in step 1 the
  // resident segments whose weights the residency cache did not already hold.
  bool needs_copy(int64_t step, const MergedSegment& seg) const {
    return !seg.resident || (step == 1 && upload_[seg.index]);
  }

  // Everything the job uses on the device, allocated once, before step 1.
  void allocate_job_buffers() {
    const auto& base = model_.base_segments();
    auto at_start = [] { return std::string("run: job start"); };
    uint64_t scratch_bytes = 0, slot_bytes = 0, streamed_per_step = 0;
    for (const MergedSegment& seg : plan_) {
      scratch_bytes = std::max(scratch_bytes, seg.compute_buffer_bytes);
      if (!seg.resident) {
        slot_bytes = std::max(slot_bytes, seg.device_bytes);
        streamed_per_step++;
      }
    }

    // Resident weights: reuse what the residency cache holds (this job holds them from now on,
    // so no other allocation can evict them), allocate the rest.
    const std::string model_key = ResidencyCache::model_key(model_.path());
    resident_params_.resize(plan_.size());
    upload_.assign(plan_.size(), false);
    to_upload_.resize(plan_.size());
    fresh_.resize(base.size());
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
        params[b - seg.first] = static_cast<uint8_t*>(entry->buffer.data());
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

    if (scratch_bytes > 0) scratch_ = allocate(scratch_bytes, "the compute buffer", at_start);
    if (streamed_per_step > 0) {
      // More slots than the job has streamed copies could never be used.
      const uint64_t copies = streamed_per_step * static_cast<uint64_t>(request_.steps);
      const uint64_t count = std::min<uint64_t>(request_.slots, copies);
      for (uint64_t s = 0; s < count; s++) {
        slots_.push_back(allocate(slot_bytes, "staging slot " + std::to_string(s), at_start));
      }
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
  // (across steps) goes to slot g mod d once the (g−d)-th streamed segment has computed.
  void copy_loop() {
    const uint64_t d = slots_.size();
    uint64_t g = 0;
    try {
      for (int64_t step = 1; step <= request_.steps; step++) {
        for (const MergedSegment& seg : plan_) {
          if (!needs_copy(step, seg)) continue;
          {
            std::unique_lock<std::mutex> lock(mu_);
            if (!seg.resident) {
              cv_.wait(lock, [&] { return stop_ || g < computed_ + d; });
            }
            if (stop_) return;
          }
          Landed landed;
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
            if (!landed.prepared.host[b - seg.first]) {
              landed.dst[b - seg.first] = nullptr;
            } else {
              landed.bytes += base[b].param_bytes;
            }
          }
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

  void run_segment(int64_t step, const MergedSegment& seg, StepReport& report,
                   double* last_compute_end) {
    check_cancel(step, seg);
    const size_t segment_event = report.events.size();
    report.events.push_back(make_event(EventKind::kSegment, seg, 0, 0, seg.param_bytes));
    double first_start = wall_clock_us();
    ParamSource source = ParamSource::kResident;

    std::vector<const uint8_t*> params;
    if (needs_copy(step, seg)) {
      Landed landed = next_landed();
      landed.copy->wait();
      const RunEvent prep = prepare_event(seg, landed.prepared, landed.bytes);
      source = prep.source;
      first_start = std::min(first_start, prep.start_us);
      report.events.push_back(prep);
      report.disk_bytes += landed.prepared.disk_bytes;
      RunEvent h2d = make_event(EventKind::kH2D, seg, landed.copy->start_us(),
                                landed.copy->end_us(), landed.bytes);
      first_start = std::min(first_start, h2d.start_us);
      report.events.push_back(h2d);
      report.h2d_bytes += landed.bytes;
      verify_copy(step, seg, landed.prepared.host, landed.dst);
      release_copied(seg, landed.prepared.host);
      if (seg.resident) {
        publish_uploads(seg);
      } else {
        for (uint8_t* p : landed.dst) params.push_back(p);
      }
    }
    if (seg.resident) {
      for (uint8_t* p : resident_params_[seg.index]) params.push_back(p);
    }

    const double compute_start = wall_clock_us();
    forward(seg, params, scratch_.data());
    device_.compute_stream().synchronize();
    const double compute_end = wall_clock_us();
    if (!seg.resident) {
      // Its slot is free for the copy `slots` streamed segments ahead.
      {
        std::lock_guard<std::mutex> lock(mu_);
        computed_++;
      }
      cv_.notify_all();
    }
    RunEvent compute =
        make_event(EventKind::kCompute, seg, compute_start, compute_end, seg.param_bytes);
    compute.stall_us = std::max(0.0, compute_start - *last_compute_end);
    report.stall_us += compute.stall_us;
    *last_compute_end = compute_end;
    report.events.push_back(compute);

    RunEvent& head = report.events[segment_event];
    head.start_us = std::min(first_start, compute_start);
    head.end_us = compute_end;
    head.source = source;
  }

  // A resident segment's fresh uploads have landed: they enter the device's residency cache,
  // for later jobs.
  void publish_uploads(const MergedSegment& seg) {
    if (model_key_.empty()) return;
    for (size_t b = seg.first; b <= seg.last; b++) {
      if (fresh_[b]) device_.residency().insert(model_key_, b, entry_for(b));
    }
  }

  // Stops the copy thread and waits for every copy it queued, so no buffer is freed under a copy.
  void shutdown() noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (copier_.joinable()) copier_.join();
    try {
      device_.copy_stream().synchronize();
    } catch (...) {
    }
  }

  std::string model_key_;
  std::vector<std::vector<uint8_t*>> resident_params_;  // per plan segment, per member
  std::vector<bool> upload_;                            // per plan segment: uploads in step 1
  std::vector<std::vector<bool>> to_upload_;            // per plan segment, per member
  std::vector<bool> fresh_;                             // per base segment: uploaded by this job
  std::vector<ResidencyCache::EntryPtr> held_;          // resident weights this job uses
  std::vector<size_t> held_base_;
  uint64_t resident_hit_bytes_ = 0;
  DeviceBuffer scratch_;
  std::vector<DeviceBuffer> slots_;

  std::thread copier_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t computed_ = 0;  // streamed segments computed so far, across steps
  std::deque<Landed> landed_;
};

}  // namespace

RunOutput run_job(DeviceLease& lease, DitModel& model, const RunRequest& request,
                  const std::atomic<bool>* cancel, const StepObserver& on_step) {
  if (request.slots == 0) {
    SerialRun run(lease.device(), model, request, cancel);
    return run.run(on_step);
  }
  OverlappedRun run(lease.device(), model, request, cancel);
  return run.run(on_step);
}

}  // namespace ferry
