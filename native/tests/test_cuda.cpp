// The CUDA device, where there is one: its kernels against the CPU reference (within float
// tolerance: different summation orders), its plans against each other (bitwise: the same kernels
// on the same bytes), no allocation after job start, transfer verification and the copy rate.
// Without a GPU (or without CUDA in this build) it checks that opening one fails clearly, and
// passes as skipped.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "ferry/cpu_device.h"
#include "ferry/cuda_device.h"
#include "ferry/errors.h"
#include "ferry/runner.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr int64_t kBatch = 2, kTokens = 37;

std::vector<PlanSegment> plan(const DitModel& m, bool resident_blocks) {
  const DitDims d = job_dims(m.dims(), kBatch, kTokens);
  std::vector<PlanSegment> out;
  const auto& base = m.base_segments();
  for (size_t i = 0; i < base.size(); i++) {
    const bool resident = resident_blocks && base[i].kind == SegmentKind::kBlock && i % 2 == 1;
    out.push_back({static_cast<int64_t>(i), static_cast<int64_t>(i), resident,
                   segment_scratch_bytes(base[i].kind, d)});
  }
  return out;
}

RunRequest request(std::vector<PlanSegment> segments, uint32_t slots) {
  RunRequest r;
  r.batch = kBatch;
  r.tokens = kTokens;
  r.steps = 4;
  r.seed = 3;
  r.segments = std::move(segments);
  r.slots = slots;
  return r;
}

RunOutput run(Device& device, DitModel& model, const RunRequest& r,
              std::vector<uint64_t>* allocations = nullptr) {
  DeviceLease lease(device);
  return run_job(lease, model, r, nullptr, [&](StepReport&&) {
    if (allocations) allocations->push_back(device.memory_stats().allocations);
  });
}

void matches_cpu(const std::string& dtype) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  DitSpec spec;
  spec.hidden = 96;
  spec.heads = 4;
  spec.channels = 12;
  spec.blocks = 4;
  spec.dtype = dtype;
  write_dit(path, spec);
  auto model = DitModel::open(path);
  CpuDevice cpu({size_t{32} << 20, 0, 2});
  auto gpu = make_cuda_device(CudaDeviceOptions{0, size_t{256} << 20});
  const RunOutput expected = run(cpu, *model, request(plan(*model, false), 0));
  const RunOutput serial = run(*gpu, *model, request(plan(*model, false), 0));
  double worst = 0;
  for (size_t i = 0; i < expected.output.size(); i++) {
    worst = std::max(worst, std::fabs(static_cast<double>(serial.output[i]) - expected.output[i]));
  }
  CHECK(worst < 1e-3);
  for (uint32_t slots = 1; slots <= 4; slots++) {
    std::vector<uint64_t> allocations;
    RunRequest r = request(plan(*model, true), slots);
    r.verify = true;
    const RunOutput out = run(*gpu, *model, r, &allocations);
    CHECK(std::memcmp(out.output.data(), serial.output.data(), out.output.size() * 4) == 0);
    for (uint64_t a : allocations) CHECK_EQ(a, allocations.front());
  }
  CHECK(gpu->measure_copy_rate() > 0);
  CHECK_EQ(gpu->memory_stats().in_use_bytes, gpu->residency().bytes());
}

}  // namespace

int main() {
  if (cuda_device_count() == 0) {
    bool clear = false;
    try {
      make_cuda_device(CudaDeviceOptions{});
    } catch (const DeviceUnavailableError& e) {
      clear = std::string(e.what()).find("cuda") != std::string::npos;
    }
    if (!clear) {
      std::fprintf(stderr, "FAILED: opening a CUDA device without one did not say why\n");
      return 1;
    }
    std::printf("skipped: no CUDA device%s\n", cuda_built() ? "" : " (built without CUDA)");
    return 0;
  }
  return run_all({
      {"matches_cpu_f32", [] { matches_cpu("F32"); }},
      {"matches_cpu_bf16", [] { matches_cpu("BF16"); }},
      {"matches_cpu_f16", [] { matches_cpu("F16"); }},
  });
}
