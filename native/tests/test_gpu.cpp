// A GPU device (any GPU backend ggml has in this build; CUDA with FERRY_CUDA=ON). Without one —
// a CPU-only build, or no GPU on the machine — opening one must fail with DeviceUnavailableError
// saying how to get one, and the rest is skipped. With one: a small DiT job gives bitwise the same
// latent under every execution mode, plan and slot count (the same graphs on the same bytes),
// close to the CPU's (other kernels, other summation orders), with no device allocation after
// step 1 of a pooled run, verified copies, resident weights kept across jobs, and a copy rate.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/gpu_device.h"
#include "ferry/runner.h"
#include "runner_fixture.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr int64_t kBatch = 2, kTokens = 37, kSteps = 3;

RunRequest request(std::vector<PlanSegment> segments, Execution execution, uint32_t slots = 0) {
  RunRequest r;
  r.job.batch = kBatch;
  r.job.tokens = kTokens;
  r.steps = kSteps;
  r.seed = 3;
  r.segments = std::move(segments);
  r.execution = execution;
  r.slots = slots;
  return r;
}

RunOutput run(Device& device, Model& model, const RunRequest& r,
              std::vector<StepReport>* reports = nullptr) {
  DeviceLease lease(device);
  return run_job(lease, model, r, nullptr, [&](StepReport&& report) {
    if (reports) reports->push_back(std::move(report));
  });
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void unavailable_without_a_gpu() {
  CHECK_EQ(gpu_device_count(), 0);
  CHECK_THROWS(DeviceUnavailableError, GpuDevice(GpuDeviceOptions{}), "FERRY_CUDA");
  CHECK_THROWS(DeviceUnavailableError, GpuDevice(GpuDeviceOptions{3, 0}), "gpu: ");
}

// `file_type`: "F32"/"F16"/"BF16" (safetensors) or a ggml type name (GGUF, laid out for the GPU).
void plans_agree_on_gpu(const std::string& file_type) {
  TempDir dir;
  DitSpec spec;
  spec.hidden = 256;
  spec.heads = 4;
  spec.channels = 16;
  spec.blocks = 4;
  const bool gguf = file_type != "F32" && file_type != "F16" && file_type != "BF16";
  spec.dtype = gguf ? "F32" : file_type;
  const std::string path = dir.file(gguf ? "model.gguf" : "model.safetensors");
  if (gguf) {
    write_dit_gguf(path, spec, file_type);
  } else {
    write_dit(path, spec);
  }
  GpuDevice gpu(GpuDeviceOptions{0, size_t{256} << 20});
  CHECK(gpu.kind() == DeviceKind::kGpu);
  CHECK(!gpu.description().empty());
  std::fprintf(stderr, "gpu: %s (%s), %s\n", gpu.description().c_str(), gpu.backend_name().c_str(),
               file_type.c_str());
  Model::Options options;
  options.layout = ggml_backend_buffer_get_type(gpu.memory());
  auto model = Model::open(path, options);
  auto cpu_model = Model::open(path);
  Model& m = *model;
  const int64_t n = static_cast<int64_t>(m.base_segments().size());

  CpuDevice cpu({size_t{64} << 20, 0, 2});
  const RunOutput expected =
      run(cpu, *cpu_model, request(per_base(*cpu_model, false), Execution::kSerial));
  const RunOutput reference = run(gpu, m, request(per_base(m, false), Execution::kSerial));
  double worst = 0, scale = 0;
  for (size_t i = 0; i < expected.output.size(); i++) {
    worst = std::max(worst, std::fabs(double(reference.output[i]) - expected.output[i]));
    scale = std::max(scale, std::fabs(double(expected.output[i])));
    CHECK(std::isfinite(reference.output[i]));
  }
  std::fprintf(stderr, "  gpu vs cpu: max |diff| %.3g (max |value| %.3g)\n", worst, scale);
  CHECK(worst <= 2e-2 * std::max(1.0, scale));

  const std::vector<std::pair<Groups, const char*>> plans = {
      {{{0, n - 1, true}}, "all resident"},
      {{{0, n - 1, false}}, "one streamed segment"},
      {{{0, 1, true}, {2, 2, false}, {3, 3, true}, {4, 5, false}}, "mixed"},
  };
  for (const auto& [groups, label] : plans) {
    for (Execution e : {Execution::kSerial, Execution::kLookahead}) {
      if (!same_bits(run(gpu, m, request(plan_of(groups), e)).output, reference.output)) {
        report_failure(__FILE__, __LINE__, std::string(label) + " / " + execution_name(e));
      }
    }
    for (uint32_t slots = 1; slots <= 3; slots++) {
      gpu.residency().clear();
      RunRequest r = request(plan_of(groups), Execution::kPooled, slots);
      r.verify = true;
      std::vector<StepReport> reports;
      if (!same_bits(run(gpu, m, r, &reports).output, reference.output)) {
        report_failure(__FILE__, __LINE__,
                       std::string(label) + " / pooled " + std::to_string(slots));
      }
      for (const StepReport& s : reports) CHECK_EQ(s.allocations, reports.front().allocations);
      CHECK_EQ(gpu.memory_stats().in_use_bytes, gpu.residency().bytes());
    }
  }
  // Resident weights stay on the GPU for the next job.
  std::vector<StepReport> again;
  run(gpu, m, request(plan_of(plans[2].first), Execution::kPooled, 2), &again);
  CHECK(again[0].resident_hit_bytes > 0);
  gpu.residency().clear();
  CHECK_EQ(gpu.memory_stats().in_use_bytes, size_t{0});
  CHECK(gpu.measure_copy_rate(size_t{16} << 20) > 0);
  CHECK(!gpu.busy());
}

}  // namespace

int main() {
  if (gpu_device_count() == 0) {
    const int status = run_all({{"unavailable_without_a_gpu", unavailable_without_a_gpu}});
    std::fprintf(stderr, "skipped the GPU job tests: no GPU in this build or on this machine\n");
    return status;
  }
  return run_all({
      {"plans_agree_on_gpu_f32", [] { plans_agree_on_gpu("F32"); }},
      {"plans_agree_on_gpu_f16", [] { plans_agree_on_gpu("F16"); }},
      {"plans_agree_on_gpu_bf16", [] { plans_agree_on_gpu("BF16"); }},
      {"plans_agree_on_gpu_q8_0", [] { plans_agree_on_gpu("q8_0"); }},
      {"plans_agree_on_gpu_q4_K", [] { plans_agree_on_gpu("q4_K"); }},
  });
}
