// Pipeline stages: a model's base segments cut into contiguous ranges, each run by its own device
// in its own thread, the activations handed from stage to stage every step (and from the last
// back to the first) through in-process links. The last stage's output is bitwise the
// single-device run's, for the DiT (2 and 3 stages, streamed and resident segments, 1 and 2
// slots) and FLUX; a stage loads only its own segments; a stage waiting for a handoff stops
// promptly when cancelled; bad handoffs, execution modes, ranges and plans are refused.
#include <chrono>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>

#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/runner.h"
#include "flux_fixture.h"
#include "runner_fixture.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr int64_t kSteps = 3;
constexpr size_t kCapacity = size_t{64} << 20;

// A stage's link: receives from its own inbox, sends into the next stage's, and records the
// labels it sent.
class QueueLink final : public StageLink {
 public:
  HandoffInbox inbox;
  HandoffInbox* next = nullptr;
  std::vector<int64_t> sent;
  bool receive(int64_t step, const std::atomic<bool>* cancel, HostTensors* out) override {
    return inbox.wait(step, cancel, out);
  }
  void send(int64_t step, HostTensors&& tensors) override {
    sent.push_back(step);
    next->put(step, std::move(tensors));
  }
};

struct StageSpec {
  int64_t first = 0;
  int64_t last = 0;
  Groups groups;  // the stage's plan, in the model's base indices
  uint32_t slots = 1;
};

RunRequest dit_request(std::vector<PlanSegment> segments, uint32_t slots) {
  RunRequest r;
  r.job.batch = 2;
  r.job.tokens = 5;
  r.steps = kSteps;
  r.seed = 7;
  r.segments = std::move(segments);
  r.execution = Execution::kPooled;
  r.slots = slots;
  return r;
}

RunRequest flux_request(std::vector<PlanSegment> segments, uint32_t slots) {
  RunRequest r;
  r.job.batch = 2;
  r.job.tokens = 6;
  r.job.context_tokens = 3;
  r.steps = kSteps;
  r.seed = 11;
  r.sampler.guidance = 4.0;
  r.segments = std::move(segments);
  r.execution = Execution::kPooled;
  r.slots = slots;
  return r;
}

using MakeRequest = RunRequest (*)(std::vector<PlanSegment>, uint32_t);

RunOutput single(const std::string& path, MakeRequest make, const Groups& groups, uint32_t slots) {
  auto model = Model::open(path);
  CpuDevice device({kCapacity, 0, 2});
  DeviceLease lease(device);
  return run_job(lease, *model, make(plan_of(groups), slots), nullptr, [](StepReport&&) {});
}

struct StagesResult {
  RunOutput last;                          // the last stage's output
  std::vector<std::vector<int64_t>> sent;  // per stage: the labels it sent
  std::vector<std::vector<bool>> cached;   // per stage: its model's params cache, per base segment
  std::vector<int64_t> steps_reported;     // per stage
};

// The stages, each with its own model, device and thread, wired in a ring. The first failure
// cancels the others and is rethrown.
StagesResult run_stages(const std::string& path, MakeRequest make,
                        const std::vector<StageSpec>& stages, LoadMode load = LoadMode::kLazy) {
  const size_t k = stages.size();
  std::vector<std::unique_ptr<QueueLink>> links;
  for (size_t i = 0; i < k; i++) links.push_back(std::make_unique<QueueLink>());
  for (size_t i = 0; i < k; i++) links[i]->next = &links[(i + 1) % k]->inbox;
  std::vector<std::shared_ptr<Model>> models;
  std::vector<std::unique_ptr<CpuDevice>> devices;
  for (size_t i = 0; i < k; i++) {
    models.push_back(Model::open(path));
    devices.push_back(std::make_unique<CpuDevice>(CpuDeviceOptions{kCapacity, 0, 2}));
  }
  std::atomic<bool> cancel{false};
  std::mutex mu;
  std::exception_ptr error;
  StagesResult result;
  result.steps_reported.assign(k, 0);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < k; i++) {
    threads.emplace_back([&, i] {
      try {
        RunRequest r = make(plan_of(stages[i].groups), stages[i].slots);
        r.load = load;
        r.stage = PipelineStage{stages[i].first, stages[i].last, links[i].get()};
        DeviceLease lease(*devices[i]);
        RunOutput out = run_job(lease, *models[i], r, &cancel,
                                [&, i](StepReport&&) { result.steps_reported[i]++; });
        if (i + 1 == k) result.last = std::move(out);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        cancel.store(true);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  if (error) std::rethrow_exception(error);
  for (size_t i = 0; i < k; i++) {
    result.sent.push_back(links[i]->sent);
    std::vector<bool> cached;
    for (size_t b = 0; b < models[i]->base_segments().size(); b++) {
      cached.push_back(models[i]->params_cached(b));
    }
    result.cached.push_back(cached);
    devices[i]->residency().clear();
    CHECK_EQ(devices[i]->memory_stats().in_use_bytes, size_t{0});
  }
  return result;
}

bool same_bits(const RunOutput& a, const RunOutput& b) {
  return a.name == b.name && a.shape == b.shape && a.output.size() == b.output.size() &&
         !a.output.empty() &&
         std::memcmp(a.output.data(), b.output.data(), a.output.size() * sizeof(float)) == 0;
}

// Non-last stages send the handoffs labelled 1..S, the last 2..S (back to the first).
void check_labels(const StagesResult& r) {
  for (size_t i = 0; i < r.sent.size(); i++) {
    std::vector<int64_t> expected;
    for (int64_t t = i + 1 == r.sent.size() ? 2 : 1; t <= kSteps; t++) expected.push_back(t);
    CHECK(r.sent[i] == expected);
    CHECK_EQ(r.steps_reported[i], kSteps);
  }
}

// Per-base groups over first..last, resident or not.
Groups each(int64_t first, int64_t last, bool resident) {
  Groups g;
  for (int64_t b = first; b <= last; b++) g.emplace_back(b, b, resident);
  return g;
}

void dit_stages_match_single_device() {
  DitSpec spec;
  spec.blocks = 4;
  Fixture f(spec);
  const int64_t n = static_cast<int64_t>(f.model->base_segments().size());
  CHECK_EQ(n, int64_t{6});  // prelude, 4 blocks, final
  const RunOutput reference = single(f.path, dit_request, each(0, n - 1, false), 2);
  CHECK_EQ(reference.output.size(), size_t{2 * 5 * 8});

  struct Case {
    const char* name;
    std::vector<StageSpec> stages;
  };
  const std::vector<Case> cases = {
      {"2 stages, streamed, 1 slot",
       {{0, 2, each(0, 2, false), 1}, {3, n - 1, each(3, n - 1, false), 1}}},
      {"2 stages, resident, 2 slots",
       {{0, 1, each(0, 1, true), 2}, {2, n - 1, each(2, n - 1, true), 2}}},
      {"2 stages, mixed merged segments",
       {{0, 3, {{0, 1, true}, {2, 3, false}}, 2}, {4, n - 1, {{4, 4, false}, {5, 5, true}}, 1}}},
      {"3 stages, streamed, 2 slots",
       {{0, 0, each(0, 0, false), 2},
        {1, 3, each(1, 3, false), 2},
        {4, n - 1, each(4, n - 1, false), 2}}},
      {"3 stages, mixed",
       {{0, 1, {{0, 1, false}}, 1},
        {2, 4, {{2, 2, true}, {3, 4, false}}, 2},
        {5, 5, {{5, 5, true}}, 1}}},
  };
  for (const Case& c : cases) {
    std::fprintf(stderr, "  %s\n", c.name);
    const StagesResult r = run_stages(f.path, dit_request, c.stages);
    CHECK(same_bits(r.last, reference));
    check_labels(r);
  }

  // A stage covering the whole model is a plain run: no link, no handoffs.
  {
    auto model = Model::open(f.path);
    CpuDevice device({kCapacity, 0, 2});
    RunRequest r = dit_request(plan_of(each(0, n - 1, false)), 2);
    r.stage = PipelineStage{0, n - 1, nullptr};
    DeviceLease lease(device);
    CHECK(same_bits(run_job(lease, *model, r, nullptr, [](StepReport&&) {}), reference));
  }
}

// Eager and background loading read the stage's segments only.
void stages_load_only_their_segments() {
  DitSpec spec;
  spec.blocks = 4;
  Fixture f(spec);
  const int64_t n = static_cast<int64_t>(f.model->base_segments().size());
  const RunOutput reference = single(f.path, dit_request, each(0, n - 1, false), 2);
  for (LoadMode load : {LoadMode::kEager, LoadMode::kBackground}) {
    const std::vector<StageSpec> stages = {{0, 2, each(0, 2, false), 2},
                                           {3, n - 1, each(3, n - 1, false), 2}};
    const StagesResult r = run_stages(f.path, dit_request, stages, load);
    CHECK(same_bits(r.last, reference));
    for (size_t i = 0; i < stages.size(); i++) {
      for (int64_t b = 0; b < n; b++) {
        const bool inside = b >= stages[i].first && b <= stages[i].last;
        CHECK_EQ(static_cast<bool>(r.cached[i][static_cast<size_t>(b)]), inside);
      }
    }
  }
}

void flux_stages_match_single_device() {
  TempDir dir;
  FluxSpec s;
  const std::string path = dir.file("flux.gguf");
  write_flux_gguf(path, flux_tensors(s), GGML_TYPE_Q8_0);
  auto model = Model::open(path);
  const int64_t n = static_cast<int64_t>(model->base_segments().size());
  CHECK_EQ(n, int64_t{5});
  const RunOutput reference = single(path, flux_request, each(0, n - 1, false), 2);
  CHECK(reference.shape == std::vector<int64_t>({2, 6, 64}));
  const StagesResult r =
      run_stages(path, flux_request,
                 {{0, 2, {{0, 1, true}, {2, 2, false}}, 2}, {3, n - 1, each(3, n - 1, false), 1}});
  CHECK(same_bits(r.last, reference));
  check_labels(r);
}

// A stage that is not the first, whose link never delivers: cancelling it ends the wait.
void cancel_while_waiting() {
  Fixture f;
  Model& m = *f.model;
  const int64_t n = static_cast<int64_t>(m.base_segments().size());
  CpuDevice device({kCapacity, 0, 2});
  QueueLink link;
  HandoffInbox sink;
  link.next = &sink;
  RunRequest r = dit_request(plan_of(each(1, n - 1, false)), 2);
  r.stage = PipelineStage{1, n - 1, &link};
  std::atomic<bool> cancel{false};
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    cancel.store(true);
  });
  const auto start = std::chrono::steady_clock::now();
  {
    DeviceLease lease(device);
    CHECK_THROWS(CancelledError, run_job(lease, m, r, &cancel, [](StepReport&&) {}),
                 "run cancelled at step 1, waiting for the previous pipeline stage's activations");
  }
  canceller.join();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::fprintf(stderr, "  ended %.0f ms after start (cancelled at 100 ms)\n", ms);
  CHECK(ms < 1000);
  CHECK(link.sent.empty());
  device.residency().clear();
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
}

// The handoff a stage 1..n−1 expects at step 1: every latent, output and state activation.
HostTensors full_handoff(const Model& m, const JobShape& job) {
  using Role = ActivationSpec::Role;
  HostTensors h;
  for (const ActivationSpec& a : m.arch().activations(job)) {
    if (a.role == Role::kLatent || a.role == Role::kOutput || a.role == Role::kState) {
      h[a.name].assign(static_cast<size_t>(a.elements()), 0.5f);
    }
  }
  return h;
}

void rejects_bad_handoffs() {
  Fixture f;
  Model& m = *f.model;
  const int64_t n = static_cast<int64_t>(m.base_segments().size());
  CpuDevice device({kCapacity, 0, 2});
  const RunRequest base = dit_request(plan_of(each(1, n - 1, false)), 1);
  const HostTensors good = full_handoff(m, base.job);
  CHECK(good.count("z") == 1 && good.size() >= 3);
  const auto attempt = [&](HostTensors handoff) {
    QueueLink link;
    HandoffInbox sink;
    link.next = &sink;
    link.inbox.put(1, std::move(handoff));
    RunRequest r = base;
    r.stage = PipelineStage{1, n - 1, &link};
    DeviceLease lease(device);
    run_job(lease, m, r, nullptr, [](StepReport&&) {});
  };
  HostTensors short_z = good;
  short_z["z"].pop_back();
  CHECK_THROWS(InvalidArgumentError, attempt(short_z),
               "step 1's handoff holds 79 values of \"z\", expected 80");
  HostTensors unknown = good;
  unknown["nope"] = {1.0f};
  CHECK_THROWS(InvalidArgumentError, attempt(unknown), "\"nope\"");
  HostTensors missing = good;
  missing.erase("z");
  CHECK_THROWS(InvalidArgumentError, attempt(missing), "step 1's handoff lacks \"z\"");
  device.residency().clear();
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
}

void rejects_bad_stages() {
  Fixture f;
  Model& m = *f.model;
  const int64_t n = static_cast<int64_t>(m.base_segments().size());
  CpuDevice device({kCapacity, 0, 2});
  QueueLink link;
  HandoffInbox sink;
  link.next = &sink;
  const auto attempt = [&](RunRequest r) {
    DeviceLease lease(device);
    run_job(lease, m, r, nullptr, [](StepReport&&) {});
  };
  RunRequest r = dit_request(plan_of(each(1, n - 1, false)), 1);
  r.stage = PipelineStage{1, n - 1, &link};
  for (Execution e : {Execution::kSerial, Execution::kLookahead}) {
    RunRequest serial = r;
    serial.execution = e;
    serial.slots = 0;
    CHECK_THROWS(
        InvalidArgumentError, attempt(serial),
        "a pipeline stage runs with pooled execution, not " + std::string(execution_name(e)));
  }
  RunRequest whole_plan = r;
  whole_plan.segments = plan_of(each(0, n - 1, false));
  CHECK_THROWS(
      InvalidArgumentError, attempt(whole_plan),
      "plan segment 0 covers base segments 0..0; segments must cover 1.." + std::to_string(n - 1));
  RunRequest short_plan = r;
  short_plan.segments = plan_of(each(1, 2, false));
  CHECK_THROWS(InvalidArgumentError, attempt(short_plan),
               "the plan covers base segments 1..2 of 1.." + std::to_string(n - 1));
  RunRequest reversed = r;
  reversed.stage->first_base = 3;
  reversed.stage->last_base = 2;
  CHECK_THROWS(InvalidArgumentError, attempt(reversed), "the stage's base segments 3..2");
  RunRequest beyond = r;
  beyond.stage->last_base = n;
  CHECK_THROWS(InvalidArgumentError, attempt(beyond),
               "are not a range of the model's 0.." + std::to_string(n - 1));
  RunRequest unlinked = r;
  unlinked.stage->link = nullptr;
  CHECK_THROWS(InvalidArgumentError, attempt(unlinked), "has no link");
  CHECK(link.sent.empty());
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
}

}  // namespace

int main() {
  return run_all({
      {"dit_stages_match_single_device", dit_stages_match_single_device},
      {"stages_load_only_their_segments", stages_load_only_their_segments},
      {"flux_stages_match_single_device", flux_stages_match_single_device},
      {"cancel_while_waiting", cancel_while_waiting},
      {"rejects_bad_handoffs", rejects_bad_handoffs},
      {"rejects_bad_stages", rejects_bad_stages},
  });
}
