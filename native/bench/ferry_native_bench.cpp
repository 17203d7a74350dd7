// ferry_native_bench: the executor bench without Node, for a GPU machine (or a CPU one).
//
// One device, one model, the same resident fraction of blocks for both runs:
//   sdcpp — the resident blocks are a prefix (sd.cpp's chunk-K shape), serial execution
//           (slots 0: a fresh buffer per segment per step, copy then compute);
//   ferry — the same number of blocks resident, spread evenly between the streamed ones so each
//           copy has compute to hide behind, overlapped with --slots staging slots.
// Both stream the same bytes per step, so the difference is the execution alone (the TypeScript
// bench, bench/executor.ts, compares the two planners' plans as well). The plans are built here
// because the planners are TypeScript.
//
// On the CPU device the link is emulated; by default its rate is set from a measured all-resident
// run so that the streamed bytes take as long as a step's compute. On CUDA the link is the GPU's.
// Prints one JSON object: sdcpp_step_s, ferry_step_s, lower_bound_s (max(Σcompute,
// streamed/peak)), speedup_vs_sdcpp, ferry_over_lower_bound, h2d_gbps (copied bytes over the
// time the copies took), h2d_peak_gbps (measure_copy_rate), h2d_efficiency, grpc_over_direct
// (null: no gRPC here), and details.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../tests/test_support.h"
#include "ferry/cpu_device.h"
#include "ferry/cuda_device.h"
#include "ferry/errors.h"
#include "ferry/runner.h"

using namespace ferry;

namespace {

struct Options {
  std::string device = "cpu";
  std::string model;  // empty: generate
  int64_t blocks = 12, hidden = 2048, heads = 16, channels = 16;
  std::string dtype = "BF16";
  int64_t batch = 1, tokens = 16, steps = 6;
  unsigned threads = 0;
  double resident_fraction = 0.5;
  uint32_t slots = 2;
  double link_gbps = -1;  // cpu: < 0 = auto
  int ordinal = 0;
  size_t capacity = 0;  // cuda: 0 = what the plans need + slack
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(
      stderr,
      "ferry_native_bench: %s\n"
      "usage: ferry_native_bench [--device cpu|cuda] [--ordinal N]\n"
      "  [--model FILE | --blocks N --hidden D --heads H --channels C --dtype F32|F16|BF16]\n"
      "  [--batch B] [--tokens T] [--steps S] [--threads N]\n"
      "  [--resident-fraction R] [--slots D] [--link-gbps X]\n",
      why);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value for " + a).c_str());
      return argv[++i];
    };
    if (a == "--device")
      o.device = value();
    else if (a == "--model")
      o.model = value();
    else if (a == "--blocks")
      o.blocks = std::stoll(value());
    else if (a == "--hidden")
      o.hidden = std::stoll(value());
    else if (a == "--heads")
      o.heads = std::stoll(value());
    else if (a == "--channels")
      o.channels = std::stoll(value());
    else if (a == "--dtype")
      o.dtype = value();
    else if (a == "--batch")
      o.batch = std::stoll(value());
    else if (a == "--tokens")
      o.tokens = std::stoll(value());
    else if (a == "--steps")
      o.steps = std::max<int64_t>(2, std::stoll(value()));
    else if (a == "--threads")
      o.threads = static_cast<unsigned>(std::stoul(value()));
    else if (a == "--resident-fraction")
      o.resident_fraction = std::stod(value());
    else if (a == "--slots")
      o.slots = static_cast<uint32_t>(std::stoul(value()));
    else if (a == "--link-gbps")
      o.link_gbps = std::stod(value());
    else if (a == "--ordinal")
      o.ordinal = std::stoi(value());
    else if (a == "--help" || a == "-h")
      usage("help");
    else
      usage(("unknown option " + a).c_str());
  }
  if (o.device != "cpu" && o.device != "cuda") usage("--device must be cpu or cuda");
  if (o.slots < 1 || o.slots > kMaxSlots) usage("--slots must be between 1 and 16");
  return o;
}

// Per-base segments; `resident[i]` for base segment i.
std::vector<PlanSegment> plan(const DitModel& m, const DitDims& dims,
                              const std::vector<bool>& resident) {
  std::vector<PlanSegment> out;
  const auto& base = m.base_segments();
  for (size_t i = 0; i < base.size(); i++) {
    out.push_back({static_cast<int64_t>(i), static_cast<int64_t>(i), resident[i],
                   segment_scratch_bytes(base[i].kind, dims)});
  }
  return out;
}

struct Measured {
  std::vector<StepReport> reports;
  double step_s = 0;     // mean over steps 2..S
  double compute_s = 0;  // Σ compute per step, mean over steps 2..S
  double stall_s = 0;
  double h2d_bytes = 0, h2d_s = 0;  // over steps 2..S
};

Measured run(Device& device, DitModel& model, const Options& o, std::vector<PlanSegment> segments,
             uint32_t slots, int64_t steps) {
  RunRequest r;
  r.batch = o.batch;
  r.tokens = o.tokens;
  r.steps = steps;
  r.segments = std::move(segments);
  r.slots = slots;
  Measured m;
  {
    DeviceLease lease(device);
    run_job(lease, model, r, nullptr, [&](StepReport&& s) { m.reports.push_back(std::move(s)); });
  }
  const size_t n = m.reports.size() - 1;
  for (size_t s = 1; s < m.reports.size(); s++) {
    const StepReport& rep = m.reports[s];
    m.step_s += (rep.end_us - rep.start_us) / 1e6 / n;
    m.stall_s += rep.stall_us / 1e6 / n;
    for (const RunEvent& e : rep.events) {
      if (e.kind == EventKind::kCompute) m.compute_s += (e.end_us - e.start_us) / 1e6 / n;
      if (e.kind == EventKind::kH2D) {
        m.h2d_bytes += static_cast<double>(e.bytes);
        m.h2d_s += (e.end_us - e.start_us) / 1e6;
      }
    }
  }
  return m;
}

std::string steps_json(const Measured& m) {
  std::string s = "[";
  for (size_t i = 1; i < m.reports.size(); i++) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s%.6f", i > 1 ? ", " : "",
                  (m.reports[i].end_us - m.reports[i].start_us) / 1e6);
    s += buf;
  }
  return s + "]";
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    ferry_test::TempDir dir;
    std::string path = o.model;
    if (path.empty()) {
      path = dir.file("bench.safetensors");
      ferry_test::DitSpec spec;
      spec.blocks = o.blocks;
      spec.hidden = o.hidden;
      spec.heads = o.heads;
      spec.channels = o.channels;
      spec.dtype = o.dtype;
      std::fprintf(stderr, "generating a %s model (%lld blocks, hidden %lld) in %s\n",
                   o.dtype.c_str(), static_cast<long long>(o.blocks),
                   static_cast<long long>(o.hidden), path.c_str());
      ferry_test::write_dit(path, spec);
    }
    auto model = DitModel::open(path);
    const auto& base = model->base_segments();
    const DitDims dims = job_dims(model->dims(), o.batch, o.tokens);
    uint64_t params = 0, scratch = 0, largest = 0;
    for (const auto& b : base) {
      params += b.param_bytes;
      scratch = std::max<uint64_t>(scratch, segment_scratch_bytes(b.kind, dims));
      largest = std::max<uint64_t>(largest, align_up(b.packed_bytes, kPackAlignment));
    }
    const size_t capacity =
        static_cast<size_t>(params + (o.slots + 2) * largest + 2 * scratch + (size_t{64} << 20));

    // Resident sets: prelude and final always (they are small); K of the N blocks.
    const size_t blocks = base.size() - 2;
    const size_t k = static_cast<size_t>(std::llround(o.resident_fraction * blocks));
    std::vector<bool> prefix(base.size(), false), spread(base.size(), false),
        all(base.size(), true);
    prefix.front() = prefix.back() = spread.front() = spread.back() = true;
    for (size_t i = 0; i < k; i++) prefix[1 + i] = true;
    // Evenly spread: block j is resident when floor((j+1)·k/N) > floor(j·k/N).
    for (size_t j = 0; j < blocks; j++) spread[1 + j] = (j + 1) * k / blocks > j * k / blocks;
    uint64_t streamed = 0;
    for (size_t i = 0; i < base.size(); i++) {
      if (!spread[i]) streamed += base[i].param_bytes;
    }

    auto open_device = [&](double link) -> std::shared_ptr<Device> {
      if (o.device == "cuda") return make_cuda_device(CudaDeviceOptions{o.ordinal, capacity});
      return std::make_shared<CpuDevice>(CpuDeviceOptions{capacity, link, o.threads});
    };

    // Compute per step, everything resident (also fills the host params cache).
    double link = o.link_gbps;
    double calibrated_compute = 0;
    {
      auto device = open_device(0);
      calibrated_compute = run(*device, *model, o, plan(*model, dims, all), 1, 3).compute_s;
    }
    if (o.device == "cpu" && link < 0) {
      link = streamed > 0 ? static_cast<double>(streamed) / calibrated_compute / 1e9 : 0;
    }
    if (link < 0) link = 0;
    auto device = open_device(link);
    const double peak = device->measure_copy_rate();
    std::fprintf(stderr, "compute %.4f s/step, streamed %.1f MiB/step, link %.3f GB/s, peak %.3f\n",
                 calibrated_compute, static_cast<double>(streamed) / (1 << 20), link, peak);

    const Measured sdcpp = run(*device, *model, o, plan(*model, dims, prefix), 0, o.steps);
    device->residency().clear();
    const Measured ferry = run(*device, *model, o, plan(*model, dims, spread), o.slots, o.steps);

    const double bound =
        std::max(sdcpp.compute_s, peak > 0 ? static_cast<double>(streamed) / (peak * 1e9) : 0.0);
    const double h2d_gbps = ferry.h2d_s > 0 ? ferry.h2d_bytes / ferry.h2d_s / 1e9 : 0;
    std::printf(
        "{\n"
        "  \"sdcpp_step_s\": %.6f,\n  \"ferry_step_s\": %.6f,\n  \"lower_bound_s\": %.6f,\n"
        "  \"speedup_vs_sdcpp\": %.4f,\n  \"ferry_over_lower_bound\": %.4f,\n"
        "  \"h2d_gbps\": %.4f,\n  \"h2d_peak_gbps\": %.4f,\n  \"h2d_efficiency\": %.4f,\n"
        "  \"grpc_over_direct\": null,\n"
        "  \"details\": {\"device\": \"%s\", \"params_bytes\": %llu, \"streamed_bytes\": %llu, "
        "\"resident_blocks\": %zu, \"blocks\": %zu, \"slots\": %u, \"link_gbps\": %.4f, "
        "\"batch\": %lld, \"tokens\": %lld, \"steps\": %lld, \"compute_s\": %.6f, "
        "\"ferry_compute_s\": %.6f, \"ferry_stall_s\": %.6f, \"sdcpp_steps_s\": %s, "
        "\"ferry_steps_s\": %s}\n}\n",
        sdcpp.step_s, ferry.step_s, bound, sdcpp.step_s / ferry.step_s, ferry.step_s / bound,
        h2d_gbps, peak, peak > 0 ? h2d_gbps / peak : 0, device->name().c_str(),
        static_cast<unsigned long long>(params), static_cast<unsigned long long>(streamed), k,
        blocks, o.slots, link, static_cast<long long>(o.batch), static_cast<long long>(o.tokens),
        static_cast<long long>(o.steps), sdcpp.compute_s, ferry.compute_s, ferry.stall_s,
        steps_json(sdcpp).c_str(), steps_json(ferry).c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry_native_bench: %s\n", e.what());
    return 1;
  }
}
