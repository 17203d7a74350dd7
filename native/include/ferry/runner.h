#pragma once
// Runs a job — S sampler steps of a model's forward — on a device, following a plan of merged
// segments, in one of three execution modes:
//
// - kSerial (sd.cpp's policy before PR #1905, Ferry's `sdcpp` baseline): per step, per merged
//   segment — prepare params, allocate, copy (waiting for it), compute, free. Resident segments
//   are uploaded at their first use and kept for the job only.
// - kLookahead (sd.cpp after PR #1905, the `sdcpp-prefetch` baseline): the same fresh allocation
//   per segment per step, but the next streamed segment's copy is queued (into its own fresh
//   buffer) while the current one computes: one segment of lookahead within a step.
// - kPooled (slots = d ≥ 1, the `ferry` policy): activations, the compute buffer and d staging
//   slots (each the largest streamed merged segment) are allocated once at job start; nothing is
//   allocated in the steady state. A copy thread prepares each streamed segment's params and
//   queues its transfer into slot g mod d (g counts streamed copies across steps) once the
//   segment that used that slot before has computed, so segment k+d copies while segment k
//   computes, and step t+1's first copies run during step t's last computes. Resident weights are
//   uploaded once per device and kept across steps and jobs in the device's residency cache.
//
// Every mode runs the same graphs (job_graphs.h) on the same bytes in the same order, so outputs
// are bitwise identical; only the timing differs. Every event carries real wall-clock times, so
// spans show the overlap, and each step reports how long compute waited for copies (stall_us).
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "ferry/arch.h"
#include "ferry/device.h"
#include "ferry/events.h"
#include "ferry/model.h"

namespace ferry {

// Base segments first_base..last_base (inclusive) run as one unit.
struct PlanSegment {
  int64_t first_base = 0;
  int64_t last_base = 0;
  bool resident = false;  // keep its weights on the device instead of streaming them
};

enum class Execution : uint8_t { kSerial, kLookahead, kPooled };
const char* execution_name(Execution execution);  // "serial", "lookahead", "pooled"

// Where weights wait on the host between uses.
enum class ParamsBackend : uint8_t {
  kCpu,   // the host params cache keeps them for later steps and jobs
  kDisk,  // dropped after each transfer and read again when next needed
};

// When weights are read from the file.
enum class LoadMode : uint8_t {
  kLazy,        // at first use, inside step 1 (sd.cpp's default)
  kEager,       // all of them before step 1
  kBackground,  // a background reader, in plan order, from job start
};

// A pipeline stage's connection to the stages before and after it. A model's base segments are
// cut into contiguous ranges, each run by its own executor; every step, each stage hands the
// activations its segments computed to the next, and the last stage (after the sampler's update)
// hands them to the first. A handoff is labelled with the step whose segments it feeds, and holds
// every activation of role kLatent, kOutput or kState as float32 host copies by name (each stage
// computes its own inputs, job state and step inputs). Both calls are made on the run's thread.
class StageLink {
 public:
  virtual ~StageLink() = default;
  // Waits for the handoff labelled `step` and moves it into `out`. Returns false, without
  // waiting longer, once `cancel` (may be null) is set: it must be checked at least every ~20 ms.
  virtual bool receive(int64_t step, const std::atomic<bool>* cancel, HostTensors* out) = 0;
  // Hands on the handoff labelled `step`. Must not block on the receiving stage.
  virtual void send(int64_t step, HostTensors&& tensors) = 0;
};

// Handoffs by label, for a StageLink's receive side: put() from any thread, in any order of
// steps, before or while the run waits; wait() as StageLink::receive. A later put of a label not
// yet taken replaces the earlier one.
class HandoffInbox {
 public:
  void put(int64_t step, HostTensors&& tensors);
  bool wait(int64_t step, const std::atomic<bool>* cancel, HostTensors* out);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, HostTensors> handoffs_;
};

// The part of the model a run computes as one stage of a pipeline split.
struct PipelineStage {
  int64_t first_base = 0;  // base segments first_base..last_base (inclusive)
  int64_t last_base = 0;
  StageLink* link = nullptr;  // not owned; needed unless the stage is the whole model
};

struct RunRequest {
  JobShape job;
  int64_t steps = 1;
  uint64_t seed = 0;
  // Values of the job's input and latent activations by name (float32, ggml order: the row-major
  // [B, T, C] latent of the DiT is "z"). Absent ones are generated from the seed.
  HostTensors inputs;
  // A share of a batch split: this job's samples are samples first_sample.. of a larger batch
  // run with the same seed, so each generated input starts first_sample samples into that
  // batch's counter (seed + k·2^32 + first_sample × the input's values per sample), and the
  // shares' outputs, concatenated, are the larger batch's. 0: the whole batch.
  uint64_t first_sample = 0;
  SamplerOptions sampler;  // its `steps` is this request's
  std::vector<PlanSegment> segments;
  Execution execution = Execution::kSerial;
  uint32_t slots = 0;  // kPooled: staging slots (1..kMaxSlots)
  ParamsBackend params_backend = ParamsBackend::kCpu;
  LoadMode load = LoadMode::kLazy;
  // Checksum each base segment's host params at its first use in the job and check every copy of
  // it on the device against that (IntegrityError on a mismatch).
  bool verify = false;
  // A stage of a pipeline split (pooled execution only): the plan's segments cover exactly the
  // stage's base segments; the run receives the handoff labelled t before step t (except the
  // first stage, first_base 0, at step 1), and after step t's segments a stage that is not the
  // last sends the handoff labelled t, while the last (last_base n−1) runs the sampler's update
  // and, if t < steps, sends the handoff labelled t+1. Only the last stage's output is the job's
  // result. A stage covering the whole model hands nothing over, as without a stage.
  std::optional<PipelineStage> stage;
};

// Most staging slots a plan may ask for: beyond a few, slots only take memory from residency.
constexpr uint32_t kMaxSlots = 16;

struct RunOutput {
  std::string name;                   // the latent's activation name
  std::vector<float> output;          // the latent after the last step
  std::vector<int64_t> shape;         // row-major ([B, T, C] for the DiT)
  uint64_t compute_buffer_bytes = 0;  // ggml_gallocr's buffer the job used
};

using StepObserver = std::function<void(StepReport&& report)>;

// A new plan for a running job — e.g. after the device's budget was lowered — which a pooled run
// takes at its next step boundary: it lets its copies drain, frees its staging slots and stops
// holding resident weights the new plan streams (they stay cached, idle, evicted first when
// memory is needed), then allocates what the new plan needs (under Device::admit()) and runs the
// remaining steps with it. Outputs are unchanged (the same graphs on the same bytes). Serial and
// lookahead runs allocate per segment anyway and ignore it. Thread-safe; a later post replaces an
// earlier one not yet taken.
class PlanMailbox {
 public:
  void post(std::vector<PlanSegment> segments, uint32_t slots);
  // The posted plan, if any (and then no longer posted).
  bool take(std::vector<PlanSegment>* segments, uint32_t* slots);
  // Plans taken so far.
  uint32_t swaps() const;

 private:
  mutable std::mutex mu_;
  bool posted_ = false;
  std::vector<PlanSegment> segments_;
  uint32_t slots_ = 0;
  uint32_t swaps_ = 0;
};

// Runs the job on the leased device. `cancel` (may be null) is checked between segments and
// while a stage waits for a handoff; a set flag ends the run with CancelledError. `on_step` (may be
// empty) gets each step's report on the run's thread; `plans` (may be null) hands a pooled run new
// plans at step boundaries. Everything the job allocated on the device is freed when this returns
// or throws, except resident weights of a pooled run, which stay in the device's residency cache.
// Throws InvalidArgumentError (bad request or plan), DeviceOutOfMemoryError, CancelledError,
// ModelFormatError / IoError (reading weights), IntegrityError (verify).
RunOutput run_job(DeviceLease& lease, Model& model, const RunRequest& request,
                  const std::atomic<bool>* cancel, const StepObserver& on_step,
                  PlanMailbox* plans = nullptr);

// SplitMix64's finaliser of x + γ, mod 2^64.
uint64_t splitmix64(uint64_t x);
// A generated input: out[i] = ((splitmix64(seed + i) >> 40) / 2^24)·2 − 1, for i < n.
// Same values as lib/model/initialInput.ts, bit for bit. A job's k-th generated input (in
// activation order) uses seed + k·2^32.
void initial_input(uint64_t seed, float* out, size_t n);

}  // namespace ferry
