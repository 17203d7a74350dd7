// The memory arbiter: several jobs of different models run on one device at once under one
// budget, and what they hold together never passes it (the arena's high-water mark); cached
// weights of idle models give way least recently used first before a job is refused; a job that
// still does not fit is refused naming what it needed and what was left; lowering the budget
// evicts idle weights at once, and a running job swaps to a plan that fits at its next step
// boundary, with the same output.
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <thread>

#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/runner.h"
#include "runner_fixture.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr int64_t kSteps = 3;
constexpr size_t kBig = size_t{16} << 20;

RunRequest pooled(std::vector<PlanSegment> segments, uint32_t slots, uint64_t seed = 7) {
  RunRequest r;
  r.job.batch = 2;
  r.job.tokens = 5;
  r.steps = kSteps;
  r.seed = seed;
  r.segments = std::move(segments);
  r.execution = Execution::kPooled;
  r.slots = slots;
  return r;
}

RunOutput run(Device& device, Model& model, const RunRequest& r,
              std::vector<StepReport>* reports = nullptr, PlanMailbox* plans = nullptr,
              const std::function<void(const StepReport&)>& after = {}) {
  DeviceLease lease(device);
  return run_job(
      lease, model, r, nullptr,
      [&](StepReport&& report) {
        if (after) after(report);
        if (reports) reports->push_back(std::move(report));
      },
      plans);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

DitSpec spec(uint64_t seed) {
  DitSpec s;
  s.seed = seed;
  return s;
}

// What a job holds at most, measured alone on a fresh device.
size_t footprint(Model& model, const RunRequest& r) {
  CpuDevice device({kBig, 0, 1});
  run(device, model, r);
  return device.memory_stats().peak_bytes;
}

uint64_t total_params(const Model& m) {
  uint64_t total = 0;
  for (const auto& s : m.base_segments()) total += s.param_bytes;
  return total;
}

// Two models' jobs at once on one device whose budget fits both and no more: both finish with
// the outputs they have alone, and the high-water mark never passes the budget.
void two_models_share_one_budget() {
  Fixture a(spec(1)), b(spec(2));
  const RunRequest ra = pooled(per_base(*a.model, true), 1);
  const RunRequest rb = pooled(per_base(*b.model, false), 2, 11);
  const size_t need_a = footprint(*a.model, ra), need_b = footprint(*b.model, rb);
  CpuDevice alone({kBig, 0, 1});
  const RunOutput want_a = run(alone, *a.model, ra);
  const RunOutput want_b = run(alone, *b.model, rb);

  CpuDevice device({kBig, 0, 2});
  const size_t budget = need_a + need_b;
  device.set_budget(budget);
  CHECK_EQ(device.budget_bytes(), budget);
  for (int round = 0; round < 3; round++) {
    RunOutput got_a, got_b;
    std::exception_ptr error_a, error_b;
    std::thread ta([&] {
      try {
        got_a = run(device, *a.model, ra);
      } catch (...) {
        error_a = std::current_exception();
      }
    });
    std::thread tb([&] {
      try {
        got_b = run(device, *b.model, rb);
      } catch (...) {
        error_b = std::current_exception();
      }
    });
    ta.join();
    tb.join();
    if (error_a) std::rethrow_exception(error_a);
    if (error_b) std::rethrow_exception(error_b);
    CHECK(same_bits(got_a.output, want_a.output));
    CHECK(same_bits(got_b.output, want_b.output));
  }
  const MemoryStats s = device.memory_stats();
  CHECK(s.peak_bytes <= budget);
  CHECK(s.peak_bytes > need_a);  // they did hold memory together
  CHECK(!device.busy());
  // A finished job returns its memory: only the cached resident weights stay.
  CHECK_EQ(s.in_use_bytes, device.residency().bytes());
  std::printf("  two models: budget %zu, high-water mark %zu (alone: %zu + %zu)\n", budget,
              s.peak_bytes, need_a, need_b);
}

// Cached weights of idle models go least recently used first: A and B cached, A used again,
// then C needs room — B's weights go, A's stay.
void idle_models_evicted_least_recently_used() {
  Fixture a(spec(1)), b(spec(2)), c(spec(3));
  const auto resident = [](Model& m) { return pooled(per_base(m, true), 1); };
  const RunRequest rc = pooled(per_base(*c.model, false), 1);
  CpuDevice probe({kBig, 0, 1});
  run(probe, *a.model, resident(*a.model));
  const size_t cached = probe.residency().bytes();
  const size_t need_c = footprint(*c.model, rc);
  // Room for A's and B's cached weights plus a little less than C's job.
  const size_t budget = 2 * cached + need_c - Arena::kAlignment;
  CpuDevice device({kBig, 0, 1});
  device.set_budget(budget);
  run(device, *a.model, resident(*a.model));
  run(device, *b.model, resident(*b.model));
  CHECK_EQ(device.residency().bytes(), uint64_t{2 * cached});
  run(device, *a.model, resident(*a.model));  // A is now the more recently used
  run(device, *c.model, rc);
  CHECK(device.residency().bytes() < 2 * cached);
  std::vector<StepReport> reports;
  run(device, *a.model, resident(*a.model), &reports);
  CHECK_EQ(reports[0].resident_hit_bytes, total_params(*a.model));  // none of A's went
  reports.clear();
  run(device, *b.model, resident(*b.model), &reports);
  CHECK(reports[0].resident_hit_bytes < total_params(*b.model));
  CHECK(device.memory_stats().peak_bytes <= budget);
}

// A job that does not fit even with every idle model evicted is refused, naming what it asked
// for and what the budget had left; the device is left as it was.
void refused_naming_needed_and_left() {
  Fixture a(spec(1));
  const RunRequest r = pooled(per_base(*a.model, true), 1);
  const size_t need = footprint(*a.model, r);
  CpuDevice device({kBig, 0, 1});
  device.set_budget(need / 2);
  CHECK_THROWS(DeviceOutOfMemoryError, run(device, *a.model, r), "bytes (the budget");
  CHECK_THROWS(DeviceOutOfMemoryError, run(device, *a.model, r), "left");
  CHECK_THROWS(DeviceOutOfMemoryError, run(device, *a.model, r),
               "budget " + std::to_string(need / 2) + " bytes");
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
  CHECK(!device.busy());
  CHECK_THROWS(InvalidArgumentError, device.set_budget(0), "between 1 byte and");
  CHECK_THROWS(InvalidArgumentError, device.set_budget(kBig + 4096), "between 1 byte and");
}

// Lowering the budget evicts idle cached weights at once; what running jobs hold stays.
void lowering_the_budget_evicts_idle_weights() {
  Fixture a(spec(1));
  CpuDevice device({kBig, 0, 1});
  run(device, *a.model, pooled(per_base(*a.model, true), 1));
  const uint64_t cached = device.residency().bytes();
  CHECK(cached > 0);
  const Device::BudgetChange change = device.set_budget(static_cast<size_t>(cached / 2));
  CHECK(change.evicted_bytes >= cached / 2);
  CHECK(change.in_use_bytes <= cached / 2);
  CHECK_EQ(change.over_bytes, size_t{0});
  CHECK_EQ(device.memory_stats().peak_bytes, change.in_use_bytes);  // a new high-water mark
}

// The budget drops under a running job: at its next step boundary it swaps to the streaming plan
// it is sent, and from then on holds no more than the new budget; the output is the same.
void running_job_swaps_plan_at_step_boundary() {
  Fixture a(spec(1));
  const RunRequest r = pooled(per_base(*a.model, true), 1);
  const RunRequest streamed = pooled(per_base(*a.model, false), 1);
  const size_t need_streamed = footprint(*a.model, streamed);
  CpuDevice alone({kBig, 0, 1});
  const RunOutput want = run(alone, *a.model, r);

  CpuDevice device({kBig, 0, 1});
  PlanMailbox plans;
  Device::BudgetChange change;
  std::vector<StepReport> reports;
  const RunOutput got = run(device, *a.model, r, &reports, &plans, [&](const StepReport& report) {
    if (report.step != 1) return;
    change = device.set_budget(need_streamed);
    plans.post(streamed.segments, streamed.slots);
  });
  CHECK(same_bits(got.output, want.output));
  CHECK_EQ(plans.swaps(), uint32_t{1});
  CHECK(change.over_bytes > 0);  // the job held more than the new budget until the boundary
  CHECK_EQ(reports.size(), size_t{kSteps});
  CHECK_EQ(reports[0].h2d_bytes, total_params(*a.model));  // step 1 uploads the resident weights
  for (size_t i = 1; i < reports.size(); i++) {
    CHECK_EQ(reports[i].h2d_bytes, total_params(*a.model));  // then streams every step
    CHECK(reports[i].arena_peak_bytes <= need_streamed);
  }
  CHECK(device.memory_stats().in_use_bytes <= need_streamed);
  // A plan the model does not have fails the run at the boundary, cleanly.
  PlanMailbox bad;
  CHECK_THROWS(InvalidArgumentError,
               run(device, *a.model, streamed, nullptr, &bad,
                   [&](const StepReport&) {
                     bad.post(plan_of({{0, 0, false}}), 1);
                   }),
               "the plan covers base segments");
  CHECK(!device.busy());
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
}

}  // namespace

int main() {
  return run_all({
      {"two_models_share_one_budget", two_models_share_one_budget},
      {"idle_models_evicted_least_recently_used", idle_models_evicted_least_recently_used},
      {"refused_naming_needed_and_left", refused_naming_needed_and_left},
      {"lowering_the_budget_evicts_idle_weights", lowering_the_budget_evicts_idle_weights},
      {"running_job_swaps_plan_at_step_boundary", running_job_swaps_plan_at_step_boundary},
  });
}
