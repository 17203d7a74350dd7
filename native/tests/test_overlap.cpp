// Pooled execution (the `ferry` policy: staging slots allocated once, a copy thread running ahead):
// on a paced CPU link its copies overlap compute — measured from the events' own timestamps,
// stamped by the copy thread and the compute thread as they do the work — where a serial run's
// never do; it allocates nothing on the device after step 1; resident weights stay in the device's
// residency cache across jobs (per base segment, keyed by the file) and give way when a job needs
// the memory; plus cancellation, errors from the copy thread, load modes and params backends,
// transfer verification against a link that corrupts a copy, and the copy-rate measurement.
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/ggml_support.h"
#include "ferry/runner.h"
#include "ggml-cpu.h"
#include "runner_fixture.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr int64_t kBatch = 2, kTokens = 5, kSteps = 3;
constexpr size_t kCapacity = size_t{8} << 20;

RunRequest request(std::vector<PlanSegment> segments, Execution execution, uint32_t slots = 0,
                   int64_t steps = kSteps) {
  RunRequest r;
  r.job.batch = kBatch;
  r.job.tokens = kTokens;
  r.steps = steps;
  r.seed = 7;
  r.segments = std::move(segments);
  r.execution = execution;
  r.slots = slots;
  return r;
}

RunRequest pooled(std::vector<PlanSegment> segments, uint32_t slots, int64_t steps = kSteps) {
  return request(std::move(segments), Execution::kPooled, slots, steps);
}

RunOutput run(Device& device, Model& model, const RunRequest& r,
              std::vector<StepReport>* reports = nullptr,
              const std::atomic<bool>* cancel = nullptr) {
  DeviceLease lease(device);
  return run_job(lease, model, r, cancel, [&](StepReport&& report) {
    if (reports) reports->push_back(std::move(report));
  });
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

uint64_t total_params(const Model& m) {
  uint64_t total = 0;
  for (const auto& s : m.base_segments()) total += s.param_bytes;
  return total;
}

// ---- overlap on a paced link ----

struct Timeline {
  double compute_us = 0;  // Σ compute, steps 2..S
  double h2d_us = 0;      // Σ transfer time, steps 2..S
  double overlap_us = 0;  // of which during a compute
  double stall_us = 0;    // Σ StepReport::stall_us, steps 2..S
  double step_us = 0;     // Σ step time, steps 2..S
  uint64_t h2d_bytes = 0;
  // Of the copy time that could have run during compute, how much did.
  double overlap_fraction() const {
    const double possible = std::min(h2d_us, compute_us);
    return possible > 0 ? overlap_us / possible : 0;
  }
};

// The run's copies against its computes, from the events' timestamps (the copy thread stamps a
// transfer's start and end on the paced link; the compute thread its graphs'). Step 1 is left
// out (it reads the file and warms the caches).
Timeline timeline(const std::vector<StepReport>& reports) {
  Timeline t;
  std::vector<std::pair<double, double>> computes, copies;
  for (size_t s = 1; s < reports.size(); s++) {
    const StepReport& r = reports[s];
    t.stall_us += r.stall_us;
    t.step_us += r.end_us - r.start_us;
    t.h2d_bytes += r.h2d_bytes;
    for (const RunEvent& e : r.events) {
      if (e.kind == EventKind::kCompute) computes.emplace_back(e.start_us, e.end_us);
      if (e.kind == EventKind::kH2D) copies.emplace_back(e.start_us, e.end_us);
    }
  }
  for (const auto& [a, b] : computes) t.compute_us += b - a;
  for (const auto& [a, b] : copies) {
    t.h2d_us += b - a;
    for (const auto& [c, d] : computes)
      t.overlap_us += std::max(0.0, std::min(b, d) - std::max(a, c));
  }
  return t;
}

// Per step (means over steps 2..S).
void print(const char* label, const Timeline& t, int steps) {
  std::fprintf(stderr,
               "  %-9s step %6.2f ms: compute %6.2f ms, h2d %6.2f ms (%3.0f%% during compute), "
               "stall %6.2f ms\n",
               label, t.step_us / 1e3 / steps, t.compute_us / 1e3 / steps, t.h2d_us / 1e3 / steps,
               100 * t.overlap_us / std::max(1.0, t.h2d_us), t.stall_us / 1e3 / steps);
}

// The link is paced so a step's streamed bytes take about as long as its compute: the copies of
// a pooled run then hide behind compute, a serial run waits for every one of them. One compute
// thread: on a busy machine two threads meeting at every node's barrier make compute times
// erratic. The checks compare each run with itself (its copies against its own computes), so
// they hold whatever the machine's speed, though not a thread descheduled for longer than a
// segment: the timing shapes get three attempts.
void pooled_overlaps_copies_with_compute() {
  DitSpec spec;
  spec.hidden = 128;
  spec.heads = 4;
  spec.channels = 16;
  spec.blocks = 6;
  Fixture f(spec);
  Model& m = *f.model;
  const int64_t n = static_cast<int64_t>(m.base_segments().size());
  auto job = [&](std::vector<PlanSegment> plan, Execution e, uint32_t slots) {
    RunRequest r = request(std::move(plan), e, slots, 4);
    r.job.tokens = 32;
    return r;
  };
  // Prelude and final resident, the blocks streamed.
  const auto plan = plan_of({{0, 0, true},
                             {1, 1, false},
                             {2, 2, false},
                             {3, 3, false},
                             {4, 4, false},
                             {5, 5, false},
                             {6, 6, false},
                             {7, 7, true}});
  uint64_t streamed = 0;
  for (int64_t b = 1; b < n - 1; b++) streamed += m.base_segments()[b].param_bytes;
  // One attempt: calibrate the link to the compute, run the three executions, and say whether
  // the timestamps show the schedules' shapes. Outputs and bytes must hold in every attempt; the
  // timing shapes in one of three, since a machine shared with other work (CI runs two suites
  // at once; developers run builds) can stall either thread for longer than a segment.
  auto attempt = [&]() -> bool {
    // Compute alone: everything resident, nothing copied after step 1.
    double compute_us = 0;
    {
      CpuDevice device({size_t{64} << 20, 0, 1});
      std::vector<StepReport> reports;
      run(device, m, job(plan_of({{0, n - 1, true}}), Execution::kPooled, 1), &reports);
      compute_us = timeline(reports).compute_us / 3;
    }
    const double link_gbps = static_cast<double>(streamed) / (compute_us * 1e3);
    std::fprintf(stderr, "  compute %.2f ms/step, %.2f MB streamed per step: link %.3f GB/s\n",
                 compute_us / 1e3, streamed / 1e6, link_gbps);
    CpuDevice device({size_t{64} << 20, link_gbps, 1});
    std::vector<StepReport> serial_reports, lookahead_reports, pooled_reports;
    const RunOutput serial = run(device, m, job(plan, Execution::kSerial, 0), &serial_reports);
    const RunOutput lookahead =
        run(device, m, job(plan, Execution::kLookahead, 0), &lookahead_reports);
    device.residency().clear();
    const RunOutput pooled = run(device, m, job(plan, Execution::kPooled, 2), &pooled_reports);
    CHECK(same_bits(serial.output, pooled.output));
    CHECK(same_bits(serial.output, lookahead.output));
    const Timeline s = timeline(serial_reports), l = timeline(lookahead_reports),
                   p = timeline(pooled_reports);
    print("serial", s, 3);
    print("lookahead", l, 3);
    print("pooled", p, 3);
    CHECK_EQ(s.h2d_bytes, p.h2d_bytes);
    CHECK_EQ(s.h2d_bytes, 3 * streamed);
    // A serial run copies, waits, then computes: its copies never run during a compute (a
    // little slack for the two threads' clocks). The pooled run's copies run while earlier
    // segments compute; so do the lookahead's (one segment ahead). What the compute waited for:
    // every copy in the serial run, only what the prefetch did not hide in the pooled one.
    const bool shapes = s.overlap_fraction() <= 0.05 && p.overlap_fraction() >= 0.5 &&
                        l.overlap_fraction() > s.overlap_fraction() &&
                        s.stall_us >= 0.5 * s.h2d_us &&
                        p.stall_us < s.stall_us - 0.5 * std::min(p.compute_us, p.h2d_us);
    if (!shapes) std::fprintf(stderr, "  timing shapes not seen in this attempt\n");
    return shapes;
  };
  bool seen = false;
  for (int i = 0; i < 3 && !seen; i++) seen = attempt();
  CHECK(seen);
}

// ---- allocation, residency, eviction ----

// After the job's buffers are allocated at its start, a 10-step pooled run allocates nothing
// (sampled on the run's own thread, in its step callback); the serial baseline allocates per
// segment per step, by design.
void no_allocation_after_step_one() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 1});
  for (uint32_t d : {1u, 2u, 3u}) {
    const RunRequest r =
        pooled(plan_of({{0, 1, true}, {2, 2, false}, {3, 3, false}, {4, 4, true}}), d, 10);
    std::vector<uint64_t> allocations, reported;
    {
      DeviceLease lease(device);
      run_job(lease, m, r, nullptr, [&](StepReport&& report) {
        allocations.push_back(device.memory_stats().allocations);
        reported.push_back(report.allocations);
      });
    }
    CHECK_EQ(allocations.size(), size_t{10});
    for (uint64_t a : allocations) CHECK_EQ(a, allocations.front());
    for (uint64_t a : reported) CHECK_EQ(a, allocations.front());
    CHECK_EQ(device.memory_stats().allocations, allocations.front());
    CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
  }
  for (Execution e : {Execution::kSerial, Execution::kLookahead}) {
    std::vector<uint64_t> fresh;
    {
      DeviceLease lease(device);
      run_job(lease, m, request(per_base(m, false), e, 0, 4), nullptr,
              [&](StepReport&&) { fresh.push_back(device.memory_stats().allocations); });
    }
    CHECK(fresh.back() > fresh.front());
    CHECK_EQ(fresh[2] - fresh[1], fresh[1] - fresh[0]);  // the same allocations every step
  }
}

// The lookahead copies each streamed segment once per step, into one fresh buffer, however many
// resident segments come before it (each of them looks ahead to the same next streamed segment),
// and the disk backend's host params are all released when the job ends.
void lookahead_copies_each_segment_once() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 1});
  const auto p = plan_of({{0, 0, true}, {1, 1, true}, {2, 2, false}, {3, 3, false}, {4, 4, false}});
  RunRequest r = request(p, Execution::kLookahead, 0, 4);
  r.params_backend = ParamsBackend::kDisk;
  std::vector<uint64_t> allocations;
  std::vector<StepReport> reports;
  {
    DeviceLease lease(device);
    run_job(lease, m, r, nullptr, [&](StepReport&& report) {
      allocations.push_back(device.memory_stats().allocations);
      reports.push_back(std::move(report));
    });
  }
  for (size_t s = 1; s < allocations.size(); s++) {
    CHECK_EQ(allocations[s] - allocations[s - 1], uint64_t{3});  // one per streamed segment
    CHECK_EQ(reports[s].h2d_bytes, m.base_segments()[2].param_bytes +
                                       m.base_segments()[3].param_bytes +
                                       m.base_segments()[4].param_bytes);
  }
  CHECK_EQ(m.host_cache_bytes(), uint64_t{0});
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
}

// Every prefetch depth gives the all-resident serial run's bits, leaving only cached resident
// weights on the device. (test_runner covers the dtypes and execution modes more widely.)
void depths_agree_bitwise() {
  DitSpec spec;
  spec.blocks = 4;
  Fixture f(spec);
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 1});
  const int64_t n = static_cast<int64_t>(m.base_segments().size());
  const RunOutput reference =
      run(device, m, request(plan_of({{0, n - 1, true}}), Execution::kSerial));
  const std::vector<Groups> plans = {
      {{0, n - 1, false}},
      {{0, 1, true}, {2, 2, false}, {3, 3, true}, {4, 4, false}, {5, 5, false}},
      {{0, 0, true}, {1, 1, false}, {2, 2, true}, {3, 3, false}, {4, 4, true}, {5, 5, false}},
  };
  for (const Groups& g : plans) {
    for (uint32_t d = 1; d <= 4; d++) {
      CHECK(same_bits(run(device, m, pooled(plan_of(g), d)).output, reference.output));
      CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
      CHECK(!device.busy());
    }
  }
}

void step_reports_and_residency_across_jobs() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 0, 1});
  const auto& base = m.base_segments();
  const auto p = plan_of({{0, 1, true}, {2, 2, false}, {3, 3, true}, {4, 4, false}});
  const uint64_t seg_bytes[4] = {base[0].param_bytes + base[1].param_bytes, base[2].param_bytes,
                                 base[3].param_bytes, base[4].param_bytes};
  const uint64_t total = total_params(m);
  const uint64_t streamed = seg_bytes[1] + seg_bytes[3];

  std::vector<StepReport> first;
  const RunOutput out1 = run(device, m, pooled(p, 2), &first);
  CHECK_EQ(first.size(), size_t{kSteps});
  for (size_t s = 0; s < first.size(); s++) {
    const StepReport& r = first[s];
    CHECK_EQ(r.step, int64_t(s + 1));
    CHECK(r.start_us <= r.end_us);
    CHECK(r.stall_us >= 0 && r.stall_us <= r.end_us - r.start_us + 1);
    CHECK_EQ(r.disk_bytes, s == 0 ? total : 0);
    CHECK_EQ(r.h2d_bytes, s == 0 ? total : streamed);
    CHECK_EQ(r.resident_hit_bytes, uint64_t{0});
    CHECK(r.arena_peak_bytes > 0);
    for (int32_t k = 0; k < 4; k++) {
      const bool copies = s == 0 || k == 1 || k == 3;
      int segments = 0, prepares = 0, h2ds = 0, computes = 0;
      const RunEvent* head = nullptr;
      for (const RunEvent& e : r.events) {
        if (e.segment != k) continue;
        CHECK(e.start_us <= e.end_us);
        if (e.kind == EventKind::kSegment) {
          segments++;
          head = &e;
        }
        if (e.kind == EventKind::kPrepareParams) {
          prepares++;
          CHECK(e.source == (s == 0 ? ParamSource::kDisk : ParamSource::kHost));
          CHECK(e.cold == (s == 0 ? Cold::kTrue : Cold::kFalse));
        }
        if (e.kind == EventKind::kH2D) {
          h2ds++;
          CHECK_EQ(e.bytes, seg_bytes[k]);
        }
        if (e.kind == EventKind::kCompute) computes++;
      }
      CHECK_EQ(segments, 1);
      CHECK_EQ(prepares, copies ? 1 : 0);
      CHECK_EQ(h2ds, copies ? 1 : 0);
      CHECK_EQ(computes, 1);
      if (!head) continue;
      CHECK(head->source == (!copies  ? ParamSource::kResident
                             : s == 0 ? ParamSource::kDisk
                                      : ParamSource::kHost));
      // The segment's span covers its compute (its copy may have run during earlier segments).
      for (const RunEvent& e : r.events) {
        if (e.segment == k && e.kind == EventKind::kCompute) {
          CHECK(head->start_us <= e.start_us && e.end_us <= head->end_us);
        }
      }
    }
  }
  // The resident base segments (prelude, blocks.0, blocks.2) stay on the device.
  CHECK_EQ(device.residency().entries(), size_t{3});
  const uint64_t resident_params = seg_bytes[0] + seg_bytes[2];
  CHECK(device.memory_stats().in_use_bytes >= resident_params);
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
  CHECK_EQ(device.residency().evictable_bytes(), device.residency().bytes());  // no job holds them

  // The same model and plan again: step 1 copies only the streamed segments.
  std::vector<StepReport> second;
  const RunOutput out2 = run(device, m, pooled(p, 2), &second);
  CHECK(same_bits(out1.output, out2.output));
  CHECK_EQ(second[0].h2d_bytes, streamed);
  CHECK(second[0].h2d_bytes < first[0].h2d_bytes);
  CHECK_EQ(second[0].resident_hit_bytes, resident_params);
  CHECK_EQ(second[0].disk_bytes, uint64_t{0});

  // Another plan keeping some of the same base segments resident reuses those (per base segment,
  // whatever the merging): blocks.0 and blocks.2 are cached, blocks.1 is not.
  std::vector<StepReport> third;
  const RunOutput out3 =
      run(device, m, pooled(plan_of({{0, 0, false}, {1, 3, true}, {4, 4, false}}), 1), &third);
  CHECK(same_bits(out1.output, out3.output));
  CHECK_EQ(third[0].resident_hit_bytes, base[1].param_bytes + base[3].param_bytes);
  CHECK_EQ(third[0].h2d_bytes, total - third[0].resident_hit_bytes);

  // The serial baseline neither uses nor disturbs the cache (it has room).
  std::vector<StepReport> serial;
  run(device, m, request(p, Execution::kSerial), &serial);
  CHECK_EQ(serial[0].h2d_bytes, total);
  CHECK_EQ(device.residency().entries(), size_t{4});

  // Disposing the model evicts what it uploaded.
  device.residency().evict_owner(&m);
  CHECK_EQ(device.residency().entries(), size_t{0});
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
  std::vector<StepReport> fourth;
  run(device, m, pooled(p, 2), &fourth);
  CHECK_EQ(fourth[0].h2d_bytes, total);
}

// The same file opened again reuses the cache; a rewritten file does not.
void residency_key_follows_the_file() {
  Fixture f;
  CpuDevice device({kCapacity, 0, 1});
  const auto p = per_base(*f.model, true);
  const uint64_t total = total_params(*f.model);
  const RunOutput a = run(device, *f.model, pooled(p, 1));
  auto reopened = Model::open(f.path);
  std::vector<StepReport> reports;
  CHECK(same_bits(run(device, *reopened, pooled(p, 1), &reports).output, a.output));
  CHECK_EQ(reports[0].h2d_bytes, uint64_t{0});
  CHECK_EQ(reports[0].resident_hit_bytes, total);

  // Rewritten with other weights (a new inode at the same path): nothing stale is used.
  DitSpec other;
  other.seed = 99;
  const std::string tmp = f.dir.file("other.safetensors");
  write_dit(tmp, other);
  CHECK(std::rename(tmp.c_str(), f.path.c_str()) == 0);
  auto changed = Model::open(f.path);
  reports.clear();
  const RunOutput c = run(device, *changed, pooled(p, 1), &reports);
  CHECK_EQ(reports[0].h2d_bytes, total);
  CHECK(!same_bits(c.output, a.output));
  CpuDevice fresh({kCapacity, 0, 1});
  CHECK(same_bits(run(fresh, *changed, request(p, Execution::kSerial)).output, c.output));
}

// Cached weights give way when a job needs the memory, and an impossible plan fails cleanly.
void eviction_and_out_of_memory() {
  Fixture f;
  Model& m = *f.model;
  uint64_t packed = 0;
  for (const auto& s : m.base_segments()) packed += s.packed_bytes;
  // Room for the whole model resident plus the job's buffers, not for two copies of it.
  const size_t capacity = static_cast<size_t>(packed + packed / 2);
  CpuDevice device({capacity, 0, 1});
  run(device, m, pooled(per_base(m, true), 1));
  CHECK_EQ(device.residency().entries(), m.base_segments().size());
  CHECK(device.available_bytes() > device.free_bytes());  // the cached weights count as available
  // Another model needs the memory: the cached weights are evicted to make room.
  DitSpec other_spec;
  other_spec.seed = 5;
  Fixture other(other_spec);
  std::vector<StepReport> reports;
  run(device, *other.model, pooled(per_base(*other.model, true), 2), &reports);
  CHECK_EQ(reports[0].h2d_bytes, total_params(*other.model));
  CHECK_EQ(reports[0].resident_hit_bytes, uint64_t{0});
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
  CHECK(device.residency().entries() >= 1);
  // The serial baseline evicts too, when it needs the room.
  run(device, m, request(plan_of({{0, 4, false}}), Execution::kSerial));

  // A plan that cannot fit fails naming the allocation, and leaves only the cache.
  CpuDevice small({static_cast<size_t>(packed / 2), 0, 1});
  CHECK_THROWS(DeviceOutOfMemoryError, run(small, m, pooled(per_base(m, true), 2)),
               "run: job start: allocating");
  CHECK_EQ(small.memory_stats().in_use_bytes, small.residency().bytes());
  CHECK(!small.busy());
  run(small, m, pooled(per_base(m, false), 1));
}

void cancellation_and_errors() {
  Fixture f;
  Model& m = *f.model;
  CpuDevice device({kCapacity, 2, 1});
  std::atomic<bool> cancel{false};
  RunRequest r = pooled(plan_of({{0, 1, true}, {2, 2, false}, {3, 4, false}}), 2, 20);
  int steps_seen = 0;
  {
    DeviceLease lease(device);
    CHECK_THROWS(CancelledError,
                 run_job(lease, m, r, &cancel,
                         [&](StepReport&&) {
                           steps_seen++;
                           cancel.store(true);
                         }),
                 "run cancelled at step 2, before segment 0 (prelude..blocks.0)");
  }
  CHECK_EQ(steps_seen, 1);
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
  CHECK(!device.busy());
  // A cancelled disk-backend job gives back the host params its copy thread had prepared ahead
  // (for the next step's first segments), in every execution mode.
  for (Execution e : {Execution::kPooled, Execution::kSerial, Execution::kLookahead}) {
    auto model = Model::open(f.path);
    CpuDevice fresh({kCapacity, 0, 1});
    RunRequest disk = request(per_base(*model, false), e, e == Execution::kPooled ? 2 : 0, 5);
    disk.params_backend = ParamsBackend::kDisk;
    std::atomic<bool> stop{false};
    DeviceLease lease(fresh);
    CHECK_THROWS(CancelledError,
                 run_job(lease, *model, disk, &stop, [&](StepReport&&) { stop.store(true); }),
                 "run cancelled at step 2");
    CHECK_EQ(model->host_cache_bytes(), uint64_t{0});
  }
  {
    DeviceLease lease(device);
    CHECK_THROWS(std::runtime_error,
                 run_job(lease, m, r, nullptr,
                         [](StepReport&&) { throw std::runtime_error("observer failed"); }),
                 "observer failed");
  }
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
  CHECK_THROWS(InvalidArgumentError, run(device, m, pooled(per_base(m, false), kMaxSlots + 1)),
               "pooled execution takes 1 to 16 staging slots (got 17)");
  // A file that shrank under the model: the copy thread's read error reaches the caller.
  Fixture broken;
  CHECK(truncate(broken.path.c_str(), 64) == 0);
  for (Execution e : {Execution::kPooled, Execution::kSerial, Execution::kLookahead}) {
    CpuDevice fresh({kCapacity, 0, 1});
    CHECK_THROWS(ModelFormatError,
                 run(fresh, *broken.model,
                     request(per_base(*broken.model, false), e, e == Execution::kPooled ? 2 : 0)),
                 "truncated");
    CHECK_EQ(fresh.memory_stats().in_use_bytes, size_t{0});
    CHECK(!fresh.busy());
  }
}

void load_modes_and_backends() {
  DitSpec spec;
  spec.dtype = "BF16";
  Fixture f(spec);
  const auto p = plan_of({{0, 1, true}, {2, 2, false}, {3, 4, false}});
  CpuDevice reference_device({kCapacity, 0, 1});
  const RunOutput reference = run(reference_device, *f.model, request(p, Execution::kSerial));
  for (LoadMode load : {LoadMode::kLazy, LoadMode::kEager, LoadMode::kBackground}) {
    for (ParamsBackend backend : {ParamsBackend::kCpu, ParamsBackend::kDisk}) {
      for (Execution e : {Execution::kSerial, Execution::kPooled}) {
        auto model = Model::open(f.path);  // a cold params cache
        CpuDevice device({kCapacity, 0, 1});
        RunRequest r = request(p, e, e == Execution::kPooled ? 2 : 0);
        r.load = load;
        r.params_backend = backend;
        r.verify = true;
        std::vector<StepReport> reports;
        CHECK(same_bits(run(device, *model, r, &reports).output, reference.output));
        // Eager loading reads everything before step 1; lazy loading during it.
        if (load == LoadMode::kEager) CHECK_EQ(reports[0].disk_bytes, uint64_t{0});
        if (load == LoadMode::kLazy) CHECK_EQ(reports[0].disk_bytes, total_params(*model));
        // The cpu backend keeps the params for later steps; the disk backend reads them again.
        if (backend == ParamsBackend::kCpu) CHECK_EQ(reports[1].disk_bytes, uint64_t{0});
        if (backend == ParamsBackend::kDisk) CHECK(reports[1].disk_bytes > 0);
      }
    }
  }
}

// A device whose link flips one bit of one transfer: verify must notice. It is a whole Device of
// its own (ggml's CPU backend, an arena, a synchronous copy "link"), as any backend would be.
class FlakyLinkDevice final : public Device {
 public:
  explicit FlakyLinkDevice(uint64_t corrupt_batch) : Device("flaky"), link_(corrupt_batch) {
    auto arena = std::make_unique<Arena>(kCapacity, "flaky");
    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, 1);
    ggml_backend_buffer_t memory = ggml_backend_cpu_buffer_from_ptr(arena->base(), arena->usable());
    attach(backend, memory, std::move(arena));
  }
  ~FlakyLinkDevice() override { release_memory(); }
  DeviceKind kind() const override { return DeviceKind::kCpu; }
  Stream& copy_stream() override { return link_; }
  EventPtr compute(ggml_cgraph* graph) override {
    const double start = wall_clock_us();
    if (ggml_backend_graph_compute(backend(), graph) != GGML_STATUS_SUCCESS) {
      throw InvalidArgumentError("flaky: compute failed");
    }
    return std::make_shared<Done>(start, wall_clock_us());
  }
  void compute_wait(const EventPtr& event) override { event->wait(); }

 private:
  class Done final : public Event {
   public:
    Done(double start, double end) : start_(start), end_(end) {}
    bool ready() const override { return true; }
    void wait() override {}
    double start_us() const override { return start_; }
    double end_us() const override { return end_; }

   private:
    double start_, end_;
  };
  class Link final : public Stream {
   public:
    explicit Link(uint64_t corrupt) : corrupt_(corrupt) {}
    EventPtr copy_batch_async(const CopyRegion* regions, size_t count) override {
      const double start = wall_clock_us();
      for (size_t i = 0; i < count; i++)
        std::memcpy(regions[i].dst, regions[i].src, regions[i].bytes);
      if (batches_++ == corrupt_ && count > 0 && regions[count - 1].bytes > 0) {
        static_cast<uint8_t*>(regions[count - 1].dst)[regions[count - 1].bytes / 2] ^= 0x10;
      }
      return std::make_shared<Done>(start, wall_clock_us());
    }
    EventPtr record() override { return std::make_shared<Done>(wall_clock_us(), wall_clock_us()); }
    void wait_event(const EventPtr& event) override { event->wait(); }

   private:
    uint64_t corrupt_;
    uint64_t batches_ = 0;
  };
  Link link_;
};

void verify_catches_corruption() {
  Fixture f;
  Model& m = *f.model;
  for (Execution e : {Execution::kSerial, Execution::kLookahead, Execution::kPooled}) {
    const uint32_t slots = e == Execution::kPooled ? 2 : 0;
    // Batch 1: the second segment's weights in step 1.
    FlakyLinkDevice device(1);
    RunRequest r = request(per_base(m, false), e, slots);
    r.verify = true;
    CHECK_THROWS(IntegrityError, run(device, m, r),
                 "run: step 1, segment 1 (blocks.0): the device copy of blocks.0.mlp.fc2.bias (128 "
                 "bytes) does not match its host params");
    CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
    CHECK(!device.busy());
    // Without verify the flipped bit goes unnoticed (and changes the result).
    FlakyLinkDevice quiet(1);
    r.verify = false;
    CpuDevice clean({kCapacity, 0, 1});
    const RunOutput corrupted = run(quiet, m, r);
    CHECK(!same_bits(corrupted.output, run(clean, m, r).output));
    // An honest link through the same device gives the CPU device's bits.
    FlakyLinkDevice honest(~uint64_t{0});
    CHECK(same_bits(run(honest, m, r).output, run(clean, m, r).output));
  }
}

void copy_rate_measurement() {
  CpuDevice fast({size_t{16} << 20, 0, 1});
  CHECK(fast.peak_copy_gbps() == 0);
  const double rate = fast.measure_copy_rate(size_t{4} << 20);
  CHECK(rate > 0);
  CHECK(fast.peak_copy_gbps() == rate);
  CHECK_EQ(fast.memory_stats().in_use_bytes, size_t{0});
  // A paced link is measured at (no more than) its rate.
  CpuDevice paced({size_t{16} << 20, 1, 1});
  const double paced_rate = paced.measure_copy_rate(size_t{2} << 20);
  CHECK(paced_rate > 0 && paced_rate <= 1.05);
  DeviceLease busy(paced);
  CHECK_THROWS(DeviceBusyError, paced.measure_copy_rate(), "already running a job");
}

}  // namespace

int main() {
  return run_all({
      {"pooled_overlaps_copies_with_compute", pooled_overlaps_copies_with_compute},
      {"no_allocation_after_step_one", no_allocation_after_step_one},
      {"lookahead_copies_each_segment_once", lookahead_copies_each_segment_once},
      {"depths_agree_bitwise", depths_agree_bitwise},
      {"step_reports_and_residency_across_jobs", step_reports_and_residency_across_jobs},
      {"residency_key_follows_the_file", residency_key_follows_the_file},
      {"eviction_and_out_of_memory", eviction_and_out_of_memory},
      {"cancellation_and_errors", cancellation_and_errors},
      {"load_modes_and_backends", load_modes_and_backends},
      {"verify_catches_corruption", verify_catches_corruption},
      {"copy_rate_measurement", copy_rate_measurement},
  });
}
