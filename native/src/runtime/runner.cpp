#include "ferry/runner.h"

#include <algorithm>
#include <string>
#include <utility>

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
  std::vector<uint64_t> member_offsets;  // of each member inside the device buffer
  std::string label;                     // "blocks.0..blocks.3"
};

std::string describe(const MergedSegment& s) {
  return "segment " + std::to_string(s.index) + " (" + s.label + ")";
}

// Rethrows a device allocation failure with what was being allocated, so "out of device memory"
// says which segment and step did not fit.
template <typename F>
DeviceBuffer allocate(Device& device, uint64_t bytes, const std::string& what, F&& context) {
  try {
    return device.alloc(bytes);
  } catch (const DeviceOutOfMemoryError& e) {
    throw DeviceOutOfMemoryError(context() + ": allocating " + std::to_string(bytes) +
                                 " bytes for " + what + ": " + e.what());
  }
}

TensorView view(const uint8_t* base, const SegmentTensor& t) {
  TensorView v;
  v.data = base + t.packed_offset;
  v.dtype = t.dtype;
  v.shape = t.shape;
  return v;
}

// sd.cpp's serial policy: per step, per merged segment — prepare params, allocate, copy,
// compute, free. Phases are separate members so an overlapping policy can schedule them apart.
class SerialRun {
 public:
  SerialRun(Device& device, DitModel& model, const RunRequest& request,
            const std::atomic<bool>* cancel)
      : device_(device), model_(model), request_(request), cancel_(cancel) {
    validate();
  }

  ~SerialRun() {
    // Nothing may still be copying into buffers about to be freed (only on an error path; the
    // normal path waits for every copy it queues).
    try {
      device_.copy_stream().synchronize();
    } catch (...) {
    }
  }

  RunOutput run(const StepObserver& on_step) {
    const auto& md = model_.dims();
    const uint64_t z_count = rows_ * static_cast<uint64_t>(md.channels);
    const uint64_t x_count = rows_ * static_cast<uint64_t>(md.hidden);
    auto at_start = [] { return std::string("run: job start"); };
    z_ = allocate(device_, checked_mul(z_count, 4, "z"), "the latent z", at_start);
    x_ = allocate(device_, checked_mul(x_count, 4, "x"), "the hidden state x", at_start);
    y_ = allocate(device_, checked_mul(z_count, 4, "y"), "the model output y", at_start);

    std::vector<float> generated;
    const float* z0 = request_.input.data();
    if (request_.input.empty()) {
      generated.resize(z_count);
      initial_input(request_.seed, generated.data(), generated.size());
      z0 = generated.data();
    }
    device_.wait(device_.copy_stream().copy_async(z_.data(), z0, z_count * 4));

    resident_.resize(plan_.size());
    const float dt = 1.0f / static_cast<float>(request_.steps);
    for (int64_t step = 1; step <= request_.steps; step++) {
      StepReport report;
      report.step = step;
      device_.reset_window_peak();
      report.start_us = wall_clock_us();
      for (const MergedSegment& seg : plan_) run_segment(step, seg, report);
      device_.euler_update(static_cast<float*>(z_.data()), static_cast<const float*>(y_.data()),
                           z_count, dt);
      report.end_us = wall_clock_us();
      report.arena_peak_bytes = device_.memory_stats().window_peak_bytes;
      if (on_step) on_step(std::move(report));
    }

    RunOutput out;
    out.output.resize(z_count);
    device_.wait(device_.copy_stream().copy_async(out.output.data(), z_.data(), z_count * 4));
    out.shape = {request_.batch, request_.tokens, md.channels};
    return out;
  }

 private:
  void validate() {
    const auto& r = request_;
    if (r.batch < 1 || r.tokens < 1 || r.steps < 1) {
      throw InvalidArgumentError("run: batch, tokens and steps must be ≥ 1 (got batch " +
                                 std::to_string(r.batch) + ", tokens " + std::to_string(r.tokens) +
                                 ", steps " + std::to_string(r.steps) + ")");
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

  void check_cancel(int64_t step, const MergedSegment& seg) const {
    if (cancel_ && cancel_->load(std::memory_order_relaxed)) {
      throw CancelledError("run cancelled at step " + std::to_string(step) + ", before " +
                           describe(seg));
    }
  }

  void run_segment(int64_t step, const MergedSegment& seg, StepReport& report) {
    check_cancel(step, seg);
    const size_t segment_event = report.events.size();
    report.events.push_back(RunEvent{});
    RunEvent& head = report.events[segment_event];
    head.kind = EventKind::kSegment;
    head.segment = seg.index;
    head.bytes = seg.param_bytes;
    head.start_us = wall_clock_us();

    ParamSource source = ParamSource::kResident;
    DeviceBuffer streamed;  // this step's copy of a streamed segment's weights
    const uint8_t* params;
    if (seg.resident && resident_[seg.index]) {
      params = static_cast<const uint8_t*>(resident_[seg.index].data());
    } else {
      std::vector<const uint8_t*> host = prepare_params(seg, report, &source);
      DeviceBuffer copy = upload(step, seg, host, report);
      params = static_cast<const uint8_t*>(copy.data());
      if (seg.resident) {
        resident_[seg.index] = std::move(copy);
      } else {
        streamed = std::move(copy);
      }
    }
    compute(step, seg, params, report);
    streamed.reset();

    RunEvent& done = report.events[segment_event];
    done.source = source;
    done.end_us = wall_clock_us();
  }

  // a. Every member's weights in the host params cache, read from the file on first use.
  std::vector<const uint8_t*> prepare_params(const MergedSegment& seg, StepReport& report,
                                             ParamSource* source) {
    RunEvent e;
    e.kind = EventKind::kPrepareParams;
    e.segment = seg.index;
    e.start_us = wall_clock_us();
    std::vector<const uint8_t*> host;
    uint64_t disk = 0;
    for (size_t b = seg.first; b <= seg.last; b++) {
      const DitModel::HostParams p = model_.prepare_params(b);
      host.push_back(p.data);
      disk += p.disk_bytes;
    }
    e.end_us = wall_clock_us();
    e.bytes = seg.param_bytes;
    e.source = disk > 0 ? ParamSource::kDisk : ParamSource::kHost;
    e.cold = disk > 0 ? Cold::kTrue : Cold::kFalse;
    report.disk_bytes += disk;
    report.events.push_back(e);
    *source = e.source;
    return host;
  }

  // b. A fresh device buffer holding the members' packed weights, copied on the copy stream.
  DeviceBuffer upload(int64_t step, const MergedSegment& seg,
                      const std::vector<const uint8_t*>& host, StepReport& report) {
    RunEvent e;
    e.kind = EventKind::kH2D;
    e.segment = seg.index;
    e.start_us = wall_clock_us();
    DeviceBuffer buffer = allocate(device_, seg.device_bytes, "the weights", [&] {
      return "run: step " + std::to_string(step) + ", " + describe(seg);
    });
    auto* dst = static_cast<uint8_t*>(buffer.data());
    const auto& base = model_.base_segments();
    Stream& stream = device_.copy_stream();
    std::vector<EventPtr> copies;
    try {
      // Tensor by tensor, so exactly the weights' bytes cross the link (not the padding).
      for (size_t b = seg.first; b <= seg.last; b++) {
        const size_t member = b - seg.first;
        for (const SegmentTensor& t : base[b].tensors) {
          copies.push_back(stream.copy_async(dst + seg.member_offsets[member] + t.packed_offset,
                                             host[member] + t.packed_offset, t.nbytes));
        }
      }
      for (const EventPtr& c : copies) device_.wait(c);
    } catch (...) {
      stream.synchronize();
      throw;
    }
    e.end_us = wall_clock_us();
    e.bytes = seg.param_bytes;
    report.h2d_bytes += seg.param_bytes;
    report.events.push_back(e);
    return buffer;
  }

  // c. The members' forwards, in order, with the plan's compute buffer as scratch.
  void compute(int64_t step, const MergedSegment& seg, const uint8_t* params, StepReport& report) {
    RunEvent e;
    e.kind = EventKind::kCompute;
    e.segment = seg.index;
    e.start_us = wall_clock_us();
    DeviceBuffer scratch;
    if (seg.compute_buffer_bytes > 0) {
      scratch = allocate(device_, seg.compute_buffer_bytes, "the compute buffer", [&] {
        return "run: step " + std::to_string(step) + ", " + describe(seg);
      });
    }
    auto* z = static_cast<float*>(z_.data());
    auto* x = static_cast<float*>(x_.data());
    auto* y = static_cast<float*>(y_.data());
    const auto& base = model_.base_segments();
    for (size_t b = seg.first; b <= seg.last; b++) {
      const uint8_t* w = params + seg.member_offsets[b - seg.first];
      const auto& t = base[b].tensors;
      switch (base[b].kind) {
        case SegmentKind::kPrelude: {
          PreludeWeights pw{view(w, t[0]), view(w, t[1])};
          device_.prelude_forward(dims_, pw, z, x, scratch.data());
          break;
        }
        case SegmentKind::kBlock: {
          BlockWeights bw{view(w, t[0]), view(w, t[1]), view(w, t[2]), view(w, t[3]),
                          view(w, t[4]), view(w, t[5]), view(w, t[6]), view(w, t[7]),
                          view(w, t[8]), view(w, t[9])};
          device_.block_forward(dims_, bw, x, scratch.data());
          break;
        }
        case SegmentKind::kFinal: {
          FinalWeights fw{view(w, t[0]), view(w, t[1]), view(w, t[2])};
          device_.final_forward(dims_, fw, x, y, scratch.data());
          break;
        }
      }
    }
    e.end_us = wall_clock_us();
    e.bytes = seg.param_bytes;
    report.events.push_back(e);
    // d. (release) `scratch` is freed here; the caller frees a streamed segment's weights.
  }

  Device& device_;
  DitModel& model_;
  const RunRequest& request_;
  const std::atomic<bool>* cancel_;
  DitDims dims_;
  uint64_t rows_ = 0;
  std::vector<MergedSegment> plan_;
  DeviceBuffer z_, x_, y_;
  std::vector<DeviceBuffer> resident_;
};

}  // namespace

RunOutput run_job(DeviceLease& lease, DitModel& model, const RunRequest& request,
                  const std::atomic<bool>* cancel, const StepObserver& on_step) {
  SerialRun run(lease.device(), model, request, cancel);
  return run.run(on_step);
}

}  // namespace ferry
