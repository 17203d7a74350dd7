// The runner: a job gives bitwise-identical results whatever the plan's segmentation and
// residency (and matches the kernels applied directly), reports what it did per step, and leaves
// the device empty after success, failure or cancellation.
#include <algorithm>
#include <cstring>
#include <tuple>

#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/runner.h"
#include "runner_fixture.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr int64_t kBatch = 2, kTokens = 5, kSteps = 3;
constexpr size_t kCapacity = size_t{8} << 20;

uint64_t scratch_for(const DitModel& m, int64_t first, int64_t last) {
  return ferry_test::scratch_for(m, first, last, kBatch, kTokens);
}

// A plan from [first, last, resident] triples, with exactly the scratch the kernels need.
std::vector<PlanSegment> plan(const DitModel& m, const Groups& groups) {
  return plan_of(m, groups, kBatch, kTokens);
}

std::vector<PlanSegment> per_base(const DitModel& m, bool resident) {
  std::vector<std::tuple<int64_t, int64_t, bool>> spec;
  for (int64_t i = 0; i < static_cast<int64_t>(m.base_segments().size()); i++) {
    spec.emplace_back(i, i, resident);
  }
  return plan(m, spec);
}

std::vector<PlanSegment> one_segment(const DitModel& m, bool resident) {
  return plan(m, {{0, static_cast<int64_t>(m.base_segments().size()) - 1, resident}});
}

RunRequest request(std::vector<PlanSegment> segments, uint64_t seed = 7) {
  RunRequest r;
  r.batch = kBatch;
  r.tokens = kTokens;
  r.steps = kSteps;
  r.seed = seed;
  r.segments = std::move(segments);
  return r;
}

RunOutput run(CpuDevice& device, DitModel& model, const RunRequest& r,
              std::vector<StepReport>* reports = nullptr,
              const std::atomic<bool>* cancel = nullptr) {
  DeviceLease lease(device);
  return run_job(lease, model, r, cancel, [&](StepReport&& report) {
    if (reports) reports->push_back(std::move(report));
  });
}

// The job computed without the runner: weights read straight from the file into aligned host
// memory, the kernels applied in order, the same float32 update.
std::vector<float> direct(DitModel& model, const RunRequest& r, unsigned threads) {
  ThreadPool pool(threads);
  const DitDims d = job_dims(model.dims(), r.batch, r.tokens);
  const size_t m = static_cast<size_t>(d.rows());
  std::vector<float> z(m * d.channels), x(m * d.hidden), y(m * d.channels);
  initial_input(r.seed, z.data(), z.size());
  std::vector<std::vector<TensorView>> views;
  std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> storage;
  for (const auto& seg : model.base_segments()) {
    views.emplace_back();
    for (const auto& t : seg.tensors) {
      void* p = nullptr;
      CHECK(posix_memalign(&p, 64, t.nbytes) == 0);
      storage.emplace_back(static_cast<uint8_t*>(p), std::free);
      model.file().read(t.file_offset, p, t.nbytes);
      TensorView v;
      v.data = p;
      v.dtype = t.dtype;
      v.shape = t.shape;
      views.back().push_back(v);
    }
  }
  size_t scratch_bytes = 0;
  for (const auto& seg : model.base_segments()) {
    scratch_bytes = std::max(scratch_bytes, segment_scratch_bytes(seg.kind, d));
  }
  std::vector<uint8_t> scratch(scratch_bytes + 64);
  const float dt = 1.0f / static_cast<float>(r.steps);
  for (int64_t s = 0; s < r.steps; s++) {
    for (size_t i = 0; i < model.base_segments().size(); i++) {
      const auto& v = views[i];
      switch (model.base_segments()[i].kind) {
        case SegmentKind::kPrelude:
          kernels::prelude_forward(pool, d, PreludeWeights{v[0], v[1]}, z.data(), x.data(),
                                   scratch.data());
          break;
        case SegmentKind::kBlock:
          kernels::block_forward(
              pool, d, BlockWeights{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]},
              x.data(), scratch.data());
          break;
        case SegmentKind::kFinal:
          kernels::final_forward(pool, d, FinalWeights{v[0], v[1], v[2]}, x.data(), y.data(),
                                 scratch.data());
          break;
      }
    }
    CpuDevice update_device({1 << 16, 0, threads});
    update_device.euler_update(z.data(), y.data(), z.size(), dt);
  }
  return z;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void splitmix_and_initial_input() {
  // Vigna's SplitMix64 seeded with 0: its first outputs.
  CHECK_EQ(splitmix64(0), uint64_t{0xE220A8397B1DCDAFull});
  CHECK_EQ(splitmix64(0x9E3779B97F4A7C15ull), uint64_t{0x6E789E6AA1B965F4ull});
  std::vector<float> v(1000);
  initial_input(42, v.data(), v.size());
  for (size_t i = 0; i < v.size(); i++) {
    const double expected = static_cast<double>(splitmix64(42 + i) >> 40) / 16777216.0 * 2.0 - 1.0;
    if (static_cast<double>(v[i]) != expected || v[i] < -1.0f || v[i] >= 1.0f) {
      report_failure(__FILE__, __LINE__, "initial_input value " + std::to_string(i));
      break;
    }
  }
  // Counter-based: a slice starting at seed + k equals the tail of the whole.
  std::vector<float> tail(10);
  initial_input(42 + 990, tail.data(), tail.size());
  CHECK(std::memcmp(tail.data(), v.data() + 990, 10 * sizeof(float)) == 0);
  // Wraps mod 2^64.
  float w[2];
  initial_input(UINT64_MAX, w, 2);
  float w0;
  initial_input(0, &w0, 1);
  CHECK(w[1] == w0);
}

void plans_agree_bitwise(const std::string& dtype) {
  DitSpec spec;
  spec.dtype = dtype;
  Fixture f(spec);
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  const RunOutput resident = run(device, m, request(one_segment(m, true)));
  CHECK_EQ(resident.output.size(), size_t{kBatch * kTokens * 8});
  CHECK(resident.shape == (std::array<int64_t, 3>{kBatch, kTokens, 8}));
  const std::vector<std::vector<PlanSegment>> plans = {
      per_base(m, false),
      per_base(m, true),
      one_segment(m, false),
      plan(m, {{0, 1, true}, {2, 2, false}, {3, 3, true}, {4, 4, false}}),
      plan(m, {{0, 0, false}, {1, 3, false}, {4, 4, true}}),
  };
  for (const auto& p : plans) {
    const RunOutput out = run(device, m, request(p));
    CHECK(same_bits(out.output, resident.output));
    CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
  }
  // A larger compute buffer than needed changes nothing either.
  auto generous = per_base(m, false);
  for (auto& s : generous) s.compute_buffer_bytes += 4096;
  CHECK(same_bits(run(device, m, request(generous)).output, resident.output));
  // And the runner computes what the kernels compute when applied directly.
  CHECK(same_bits(direct(m, request({}), 2), resident.output));
  // The model did something: the output is finite and not the input.
  std::vector<float> z0(resident.output.size());
  initial_input(7, z0.data(), z0.size());
  CHECK(!same_bits(z0, resident.output));
  bool finite = true;
  for (float v : resident.output) finite &= std::isfinite(v);
  CHECK(finite);
}

void explicit_input_and_seeds() {
  Fixture f;
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  const RunOutput seeded = run(device, m, request(per_base(m, false), 99));
  RunRequest given = request(per_base(m, false), 0);
  given.input.resize(kBatch * kTokens * 8);
  initial_input(99, given.input.data(), given.input.size());
  CHECK(same_bits(run(device, m, given).output, seeded.output));
  CHECK(!same_bits(run(device, m, request(per_base(m, false), 100)).output, seeded.output));
  given.input.pop_back();
  CHECK_THROWS(InvalidArgumentError, run(device, m, given), "input has 79 values, expected");
}

void step_reports() {
  Fixture f;
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  // Plan segments: 0 = prelude+blocks.0 resident, 1 = blocks.1 streamed, 2 = blocks.2 resident,
  // 3 = final streamed.
  const auto p = plan(m, {{0, 1, true}, {2, 2, false}, {3, 3, true}, {4, 4, false}});
  const auto& base = m.base_segments();
  const uint64_t seg_bytes[4] = {base[0].param_bytes + base[1].param_bytes, base[2].param_bytes,
                                 base[3].param_bytes, base[4].param_bytes};
  uint64_t total = 0;
  for (uint64_t b : seg_bytes) total += b;

  std::vector<StepReport> reports;
  const uint64_t allocations_before = device.memory_stats().allocations;
  run(device, m, request(p), &reports);
  CHECK_EQ(reports.size(), size_t{kSteps});
  for (size_t s = 0; s < reports.size(); s++) {
    const StepReport& r = reports[s];
    CHECK_EQ(r.step, int64_t(s + 1));
    CHECK(r.start_us <= r.end_us);
    if (s > 0) CHECK(reports[s - 1].end_us <= r.start_us);
    CHECK(r.arena_peak_bytes > 0 && r.arena_peak_bytes <= kCapacity);
    // Step 1 reads everything from disk and copies everything; later steps copy streamed only.
    CHECK_EQ(r.disk_bytes, s == 0 ? total : 0);
    CHECK_EQ(r.h2d_bytes, s == 0 ? total : seg_bytes[1] + seg_bytes[3]);
    for (int32_t k = 0; k < 4; k++) {
      const bool resident_now = s > 0 && (k == 0 || k == 2);
      const RunEvent* segment = nullptr;
      int prepares = 0, h2ds = 0, computes = 0;
      for (const RunEvent& e : r.events) {
        if (e.segment != k) continue;
        CHECK(e.start_us <= e.end_us);
        switch (e.kind) {
          case EventKind::kSegment:
            segment = &e;
            break;
          case EventKind::kPrepareParams:
            prepares++;
            CHECK(e.source == (s == 0 ? ParamSource::kDisk : ParamSource::kHost));
            CHECK(e.cold == (s == 0 ? Cold::kTrue : Cold::kFalse));
            CHECK_EQ(e.bytes, seg_bytes[k]);
            break;
          case EventKind::kH2D:
            h2ds++;
            CHECK_EQ(e.bytes, seg_bytes[k]);
            break;
          case EventKind::kCompute:
            computes++;
            break;
        }
      }
      CHECK(segment != nullptr);
      if (!segment) continue;
      CHECK(segment->source == (resident_now ? ParamSource::kResident
                                : s == 0     ? ParamSource::kDisk
                                             : ParamSource::kHost));
      CHECK_EQ(segment->bytes, seg_bytes[k]);
      CHECK_EQ(prepares, resident_now ? 0 : 1);
      CHECK_EQ(h2ds, resident_now ? 0 : 1);
      CHECK_EQ(computes, 1);
      // Children lie inside their segment.
      for (const RunEvent& e : r.events) {
        if (e.segment == k) CHECK(segment->start_us <= e.start_us && e.end_us <= segment->end_us);
      }
    }
  }
  const MemoryStats stats = device.memory_stats();
  CHECK_EQ(stats.in_use_bytes, size_t{0});
  // 3 carried + per step: streamed weights and compute buffers (+ resident weights once).
  CHECK(stats.allocations > allocations_before + 3);
  CHECK(!device.busy());

  // The host params cache outlives the job: a second job reads nothing from disk.
  reports.clear();
  run(device, m, request(per_base(m, false)), &reports);
  for (const StepReport& r : reports) CHECK_EQ(r.disk_bytes, uint64_t{0});
  CHECK_EQ(reports[0].h2d_bytes, total);
}

void out_of_memory_leaves_device_empty() {
  Fixture f;
  DitModel& m = *f.model;
  uint64_t params = 0;
  for (const auto& s : m.base_segments()) params += s.param_bytes;
  // Room for any single streamed segment, not for the whole model resident.
  CpuDevice device({static_cast<size_t>(params / 2), 0, 2});
  CHECK_THROWS(DeviceOutOfMemoryError, run(device, m, request(per_base(m, true))),
               "run: step 1, segment ");
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
  CHECK(!device.busy());
  CHECK_THROWS(DeviceOutOfMemoryError, run(device, m, request(one_segment(m, false))),
               "out of device memory: requested");
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
  // The streamed plan fits, and runs.
  run(device, m, request(per_base(m, false)));
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
  // Not even the activations fit.
  CpuDevice tiny({1024, 0, 1});
  CHECK_THROWS(DeviceOutOfMemoryError, run(tiny, m, request(per_base(m, false))),
               "run: job start: allocating");
  CHECK_EQ(tiny.memory_stats().in_use_bytes, size_t{0});
}

void rejects_bad_plans() {
  Fixture f;
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 0, 1});
  CHECK_THROWS(InvalidArgumentError, run(device, m, request({})), "the plan has no segments");
  CHECK_THROWS(InvalidArgumentError,
               run(device, m, request(plan(m, {{0, 1, false}, {3, 4, false}}))),
               "plan segment 1 starts at base segment 3, expected 2");
  CHECK_THROWS(InvalidArgumentError,
               run(device, m, request(plan(m, {{0, 2, false}, {2, 4, false}}))),
               "plan segment 1 starts at base segment 2, expected 3");
  CHECK_THROWS(InvalidArgumentError, run(device, m, request(plan(m, {{0, 3, false}}))),
               "covers base segments 0..3 but the model has 0..4");
  CHECK_THROWS(InvalidArgumentError, run(device, m, request(plan(m, {{1, 4, false}}))),
               "starts at base segment 1, expected 0");
  auto too_far = per_base(m, false);
  too_far.back().last_base = 5;
  CHECK_THROWS(InvalidArgumentError, run(device, m, request(too_far)), "ends at base segment 5");
  auto small = per_base(m, false);
  small[2].compute_buffer_bytes -= 1;
  CHECK_THROWS(InvalidArgumentError, run(device, m, request(small)),
               "plan segment 2 (blocks.1) has computeBufferBytes");
  RunRequest zero = request(per_base(m, false));
  zero.steps = 0;
  CHECK_THROWS(InvalidArgumentError, run(device, m, zero), "must be ≥ 1");
  RunRequest huge = request(per_base(m, false));
  huge.batch = int64_t{1} << 40;
  huge.tokens = int64_t{1} << 40;
  CHECK_THROWS(InvalidArgumentError, run(device, m, huge), "too large");
  CHECK_EQ(device.memory_stats().allocations, uint64_t{0});  // refused before allocating
}

void cancellation() {
  Fixture f;
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  std::atomic<bool> cancel{false};
  RunRequest r = request(per_base(m, false));
  r.steps = 10;
  int steps_seen = 0;
  {
    DeviceLease lease(device);
    CHECK_THROWS(CancelledError,
                 run_job(lease, m, r, &cancel,
                         [&](StepReport&&) {
                           steps_seen++;
                           cancel.store(true);
                         }),
                 "run cancelled at step 2, before segment 0 (prelude)");
  }
  CHECK_EQ(steps_seen, 1);
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
  CHECK(!device.busy());
  // An observer that throws stops the run the same way, and frees everything.
  {
    DeviceLease lease(device);
    CHECK_THROWS(std::runtime_error,
                 run_job(lease, m, r, nullptr,
                         [](StepReport&&) { throw std::runtime_error("observer failed"); }),
                 "observer failed");
  }
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
}

void paced_link_same_result() {
  Fixture f;
  DitModel& m = *f.model;
  CpuDevice fast({kCapacity, 0, 2});
  CpuDevice paced({kCapacity, 20, 2});
  CHECK(same_bits(run(fast, m, request(per_base(m, false))).output,
                  run(paced, m, request(per_base(m, false))).output));
}

}  // namespace

int main() {
  return run_all({
      {"splitmix_and_initial_input", splitmix_and_initial_input},
      {"plans_agree_bitwise_f32", [] { plans_agree_bitwise("F32"); }},
      {"plans_agree_bitwise_bf16", [] { plans_agree_bitwise("BF16"); }},
      {"plans_agree_bitwise_f16", [] { plans_agree_bitwise("F16"); }},
      {"explicit_input_and_seeds", explicit_input_and_seeds},
      {"step_reports", step_reports},
      {"out_of_memory_leaves_device_empty", out_of_memory_leaves_device_empty},
      {"rejects_bad_plans", rejects_bad_plans},
      {"cancellation", cancellation},
      {"paced_link_same_result", paced_link_same_result},
  });
}
