// The runner: a job gives bitwise-identical results whatever the execution mode, the plan's
// segmentation and residency — and the same as the architecture's graphs run by plain ggml —
// reports what it did per step, and leaves the device empty after success, failure or
// cancellation.
#include <algorithm>
#include <cstring>
#include <thread>
#include <tuple>

#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/runner.h"
#include "ferry/sampler.h"
#include "ggml-alloc.h"
#include "ggml-cpu.h"
#include "runner_fixture.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr int64_t kBatch = 2, kTokens = 5, kSteps = 3;
constexpr size_t kCapacity = size_t{16} << 20;

RunRequest request(std::vector<PlanSegment> segments, Execution execution = Execution::kSerial,
                   uint32_t slots = 0, uint64_t seed = 7) {
  RunRequest r;
  r.job.batch = kBatch;
  r.job.tokens = kTokens;
  r.steps = kSteps;
  r.seed = seed;
  r.segments = std::move(segments);
  r.execution = execution;
  r.slots = slots;
  return r;
}

RunOutput run(CpuDevice& device, Model& model, const RunRequest& r,
              std::vector<StepReport>* reports = nullptr,
              const std::atomic<bool>* cancel = nullptr) {
  DeviceLease lease(device);
  return run_job(lease, model, r, cancel, [&](StepReport&& report) {
    if (reports) reports->push_back(std::move(report));
  });
}

// The job without Ferry's runtime: every weight read from the file into one plain ggml CPU
// buffer, the architecture's graphs allocated by a plain gallocr and run in order, the
// sampler's update after each step.
std::vector<float> direct(Model& model, const RunRequest& r) {
  const ModelArch& arch = model.arch();
  ggml_backend_t backend = ggml_backend_cpu_init();
  ggml_backend_cpu_set_n_threads(backend, 2);
  const auto specs = arch.activations(r.job);
  size_t tensors = specs.size();
  for (const auto& seg : arch.segments()) tensors += seg.weights.size();
  ggml_init_params p{ggml_tensor_overhead() * (tensors + 8), nullptr, true};
  ggml_context* ctx = ggml_init(p);
  Activations act;
  for (const auto& a : specs) {
    ggml_tensor* t = ggml_new_tensor(ctx, GGML_TYPE_F32, a.n_dims, a.ne);
    act.add(a.name, t);
  }
  std::vector<std::vector<ggml_tensor*>> weights;
  for (const auto& seg : model.base_segments()) {
    weights.emplace_back();
    for (const auto& t : seg.tensors) {
      weights.back().push_back(ggml_new_tensor(ctx, t.type, t.n_dims, t.ne));
    }
  }
  ggml_backend_buffer_t buffer = ggml_backend_alloc_ctx_tensors(ctx, backend);
  for (size_t b = 0; b < model.base_segments().size(); b++) {
    const auto& seg = model.base_segments()[b];
    for (size_t i = 0; i < seg.tensors.size(); i++) {
      std::vector<uint8_t> bytes(seg.tensors[i].nbytes);
      model.file().read(seg.tensors[i].file_offset, bytes.data(), bytes.size());
      ggml_backend_tensor_set(weights[b][i], bytes.data(), 0, bytes.size());
    }
  }
  std::vector<float> z(static_cast<size_t>(specs[0].elements()));
  initial_input(r.seed, z.data(), z.size());
  ggml_backend_tensor_set(act.get("z"), z.data(), 0, z.size() * 4);
  auto driver = arch.step_driver(r.job, SamplerOptions{r.steps, 3.5, false});
  ggml_gallocr_t galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
  for (int64_t step = 1; step <= r.steps; step++) {
    for (size_t b = 0; b <= model.base_segments().size(); b++) {
      ggml_init_params gp{ggml_tensor_overhead() * 512 + ggml_graph_overhead(), nullptr, true};
      ggml_context* gctx = ggml_init(gp);
      ggml_cgraph* graph = ggml_new_graph(gctx);
      if (b < model.base_segments().size()) {
        arch.build_segment(gctx, graph, b, weights[b], act, r.job);
      } else {
        driver->build_update(gctx, graph, act, step);
      }
      CHECK(ggml_gallocr_alloc_graph(galloc, graph));
      CHECK(ggml_backend_graph_compute(backend, graph) == GGML_STATUS_SUCCESS);
      ggml_free(gctx);
    }
  }
  ggml_backend_tensor_get(act.get("z"), z.data(), 0, z.size() * 4);
  ggml_gallocr_free(galloc);
  ggml_backend_buffer_free(buffer);
  ggml_free(ctx);
  ggml_backend_free(backend);
  return z;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void splitmix_and_initial_input() {
  // SplitMix64's published outputs for seed 0 (the first two values of the stream).
  CHECK_EQ(splitmix64(0), uint64_t{0xE220A8397B1DCDAFull});
  CHECK_EQ(splitmix64(0x9E3779B97F4A7C15ull), uint64_t{0x6E789E6AA1B965F4ull});
  std::vector<float> v(1000);
  initial_input(42, v.data(), v.size());
  for (float x : v) CHECK(x >= -1.0f && x < 1.0f);
  std::vector<float> tail(10);
  initial_input(42 + 990, tail.data(), tail.size());
  CHECK(std::memcmp(tail.data(), v.data() + 990, 10 * sizeof(float)) == 0);
}

void plans_agree_bitwise(const std::string& dtype) {
  DitSpec spec;
  spec.dtype = dtype;
  Fixture f(spec);
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  const RunOutput reference = run(device, m, request(one_segment(m, true)));
  CHECK_EQ(reference.output.size(), size_t{kBatch * kTokens * 8});
  CHECK(reference.shape == (std::vector<int64_t>{kBatch, kTokens, 8}));
  CHECK_EQ(reference.name, std::string("z"));
  CHECK(same_bits(direct(m, request({})), reference.output));
  const std::vector<std::pair<std::vector<PlanSegment>, const char*>> plans = {
      {per_base(m, false), "every base streamed"},
      {per_base(m, true), "every base resident"},
      {one_segment(m, false), "one streamed segment"},
      {plan_of({{0, 1, true}, {2, 2, false}, {3, 4, false}}), "mixed"},
      {plan_of({{0, 0, false}, {1, 3, true}, {4, 4, false}}), "resident middle"},
  };
  for (const auto& [plan, label] : plans) {
    for (Execution e : {Execution::kSerial, Execution::kLookahead}) {
      const RunOutput out = run(device, m, request(plan, e));
      if (!same_bits(out.output, reference.output)) {
        report_failure(__FILE__, __LINE__,
                       std::string(label) + " / " + execution_name(e) + " differs (" + dtype + ")");
      }
    }
    for (uint32_t slots : {1u, 2u, 4u}) {
      device.residency().clear();
      const RunOutput out = run(device, m, request(plan, Execution::kPooled, slots));
      if (!same_bits(out.output, reference.output)) {
        report_failure(
            __FILE__, __LINE__,
            std::string(label) + " / pooled " + std::to_string(slots) + " differs (" + dtype + ")");
      }
    }
  }
  std::vector<float> z0(reference.output.size());
  initial_input(7, z0.data(), z0.size());
  CHECK(!same_bits(z0, reference.output));
  bool finite = true;
  for (float v : reference.output) finite = finite && std::isfinite(v);
  CHECK(finite);
}

void explicit_input_and_seeds() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  const RunOutput seeded = run(device, m, request(per_base(m, false)));
  RunRequest given = request(per_base(m, false), Execution::kSerial, 0, 999);
  given.inputs["z"].resize(kBatch * kTokens * 8);
  initial_input(7, given.inputs["z"].data(), given.inputs["z"].size());
  CHECK(same_bits(run(device, m, given).output, seeded.output));
  CHECK(!same_bits(run(device, m, request(per_base(m, false), Execution::kSerial, 0, 100)).output,
                   seeded.output));
  given.inputs["z"].resize(79);
  CHECK_THROWS(InvalidArgumentError, run(device, m, given), "has 79 values, expected 80");
}

void step_reports() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  std::vector<StepReport> reports;
  run(device, m, request(plan_of({{0, 1, true}, {2, 4, false}})), &reports);
  CHECK_EQ(reports.size(), size_t{kSteps});
  uint64_t streamed = 0, total = 0;
  for (size_t b = 0; b < m.base_segments().size(); b++) {
    total += m.base_segments()[b].param_bytes;
    if (b >= 2) streamed += m.base_segments()[b].param_bytes;
  }
  CHECK_EQ(reports[0].h2d_bytes, total);     // step 1 uploads the resident segment too
  CHECK_EQ(reports[1].h2d_bytes, streamed);  // later steps stream only
  CHECK(reports[0].disk_bytes > 0);          // lazy: step 1 reads the file
  CHECK_EQ(reports[1].disk_bytes, uint64_t{0});
  for (const StepReport& r : reports) {
    CHECK(r.end_us >= r.start_us);
    int computes = 0;
    for (const RunEvent& e : r.events) {
      CHECK(e.end_us >= e.start_us);
      if (e.kind == EventKind::kCompute) computes++;
    }
    CHECK_EQ(computes, 2);
  }
  const MemoryStats stats = device.memory_stats();
  CHECK_EQ(stats.in_use_bytes, size_t{0});
  CHECK(!device.busy());
}

void pooled_allocates_nothing_after_start() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  std::vector<StepReport> reports;
  uint64_t at_step_2 = 0;
  run(device, m,
      request(plan_of({{0, 1, true}, {2, 2, false}, {3, 4, false}}), Execution::kPooled, 2),
      nullptr);
  // The second job finds the resident weights cached and allocates only its job buffers.
  const uint64_t before = device.memory_stats().allocations;
  RunRequest r =
      request(plan_of({{0, 1, true}, {2, 2, false}, {3, 4, false}}), Execution::kPooled, 2);
  DeviceLease lease(device);
  run_job(lease, m, r, nullptr, [&](StepReport&& report) {
    if (report.step == 1) at_step_2 = device.memory_stats().allocations;
    if (report.step > 1) CHECK_EQ(device.memory_stats().allocations, at_step_2);
    reports.push_back(std::move(report));
  });
  CHECK(at_step_2 > before);
  CHECK(reports[0].resident_hit_bytes > 0);
}

void out_of_memory_leaves_device_empty() {
  DitSpec spec;
  spec.hidden = 64;
  Fixture f(spec);
  Model& m = *f.model;
  // Room for the activations and compute buffer but not for all weights at once.
  CpuDevice device({size_t{300} << 10, 0, 2});
  CHECK_THROWS(DeviceOutOfMemoryError, run(device, m, request(one_segment(m, true))),
               "out of device memory");
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
  CHECK(!device.busy());
  CpuDevice tiny({size_t{4} << 10, 0, 2});
  CHECK_THROWS(DeviceOutOfMemoryError, run(tiny, m, request(per_base(m, false))), "job start");
  CHECK_EQ(tiny.memory_stats().in_use_bytes, size_t{0});
}

void rejects_bad_plans() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  CHECK_THROWS(InvalidArgumentError, run(device, m, request({})), "the plan has no segments");
  CHECK_THROWS(InvalidArgumentError, run(device, m, request(plan_of({{0, 3, false}}))),
               "covers base segments 0..3 of 0..4");
  CHECK_THROWS(InvalidArgumentError, run(device, m, request(plan_of({{1, 4, false}}))),
               "must cover 0..4 in order");
  CHECK_THROWS(InvalidArgumentError, run(device, m, request(plan_of({{0, 5, false}}))),
               "must cover 0..4 in order");
  CHECK_THROWS(InvalidArgumentError,
               run(device, m, request(per_base(m, false), Execution::kPooled, 0)),
               "pooled execution takes 1 to 16 staging slots");
  CHECK_THROWS(InvalidArgumentError,
               run(device, m, request(per_base(m, false), Execution::kSerial, 2)),
               "serial execution takes no staging slots");
  RunRequest zero = request(per_base(m, false));
  zero.steps = 0;
  CHECK_THROWS(InvalidArgumentError, run(device, m, zero), "steps must be ≥ 1");
  RunRequest huge = request(per_base(m, false));
  huge.job.tokens = int64_t{1} << 40;
  CHECK_THROWS(InvalidArgumentError, run(device, m, huge), "too large");
  CHECK_EQ(device.memory_stats().allocations, uint64_t{0});  // refused before allocating
}

void cancellation() {
  Fixture f;
  Model& m = *f.model;
  for (Execution e : {Execution::kSerial, Execution::kPooled}) {
    CpuDevice device({kCapacity, 0, 2});
    std::atomic<bool> cancel{false};
    int steps_seen = 0;
    RunRequest r = request(per_base(m, false), e, e == Execution::kPooled ? 2 : 0);
    r.steps = 5;
    DeviceLease lease(device);
    CHECK_THROWS(CancelledError,
                 run_job(lease, m, r, &cancel,
                         [&](StepReport&&) {
                           steps_seen++;
                           cancel.store(true);
                         }),
                 "run cancelled at step 2");
    CHECK_EQ(steps_seen, 1);
    CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
  }
}

// A cpu-backend job keeps its params (and releases its holds on them), so a later disk-backend
// job on the same model can drop every segment once copied; a failed job gives its holds back.
void params_holds_are_released() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  run(device, m, request(per_base(m, false), Execution::kPooled, 2));
  CHECK(m.host_cache_bytes() > 0);
  RunRequest disk = request(per_base(m, false), Execution::kPooled, 2);
  disk.params_backend = ParamsBackend::kDisk;
  run(device, m, disk);
  CHECK_EQ(m.host_cache_bytes(), uint64_t{0});
  RunRequest serial = request(per_base(m, false));
  serial.params_backend = ParamsBackend::kDisk;
  run(device, m, serial);
  CHECK_EQ(m.host_cache_bytes(), uint64_t{0});
  // Cancelled after step 1: whatever was prepared ahead goes back too.
  std::atomic<bool> cancel{false};
  DeviceLease lease(device);
  CHECK_THROWS(CancelledError,
               run_job(lease, m, disk, &cancel, [&](StepReport&&) { cancel.store(true); }),
               "cancelled");
  CHECK_EQ(m.host_cache_bytes(), uint64_t{0});
}

void paced_link_same_result() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice fast({kCapacity, 0, 2});
  CpuDevice slow({kCapacity, 0.5, 2});
  CHECK(same_bits(run(fast, m, request(per_base(m, false))).output,
                  run(slow, m, request(per_base(m, false), Execution::kPooled, 2)).output));
}

}  // namespace

int main() {
  return run_all({
      {"splitmix_and_initial_input", splitmix_and_initial_input},
      {"plans_agree_bitwise_f32", [] { plans_agree_bitwise("F32"); }},
      {"plans_agree_bitwise_f16", [] { plans_agree_bitwise("F16"); }},
      {"plans_agree_bitwise_bf16", [] { plans_agree_bitwise("BF16"); }},
      {"explicit_input_and_seeds", explicit_input_and_seeds},
      {"step_reports", step_reports},
      {"pooled_allocates_nothing_after_start", pooled_allocates_nothing_after_start},
      {"out_of_memory_leaves_device_empty", out_of_memory_leaves_device_empty},
      {"rejects_bad_plans", rejects_bad_plans},
      {"cancellation", cancellation},
      {"params_holds_are_released", params_holds_are_released},
      {"paced_link_same_result", paced_link_same_result},
  });
}
