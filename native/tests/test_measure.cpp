// measure_segments: what the planner learns of a job's segments from their real ggml graphs —
// ggml_gallocr's compute buffer, the FLOPs counted from the graph, and the activations each
// segment writes and reads — checked against the DiT's formulas, and against what a run on a
// device actually allocates.
//
// DiT, with M = B·T rows, hidden D, H heads, C channels (graph_flops counts 2·m·n·k per matrix
// product and one per element for every other node):
//   prelude  2·M·C·D (embed) + elementwise: the bias add and the copy into x, 2·M·D
//   block    2·M·(12·D²) (qkv 3D², out D², fc1 4D², fc2 4D²) + 4·B·H·T²·(D/H) (QKᵀ and PV)
//            + elementwise: norms, bias adds, residuals, the head reshuffles, the GELU (built from
//            seven exact ops on 4·D per row: 28·M·D), the copy into x — 49·M·D today — and the
//            softmax, B·H·T²; bounded here by 64·M·D + B·H·T²
//   final    2·M·D·C + elementwise: the norm (2·M·D), the bias add and the copy into y (2·M·C)
// Activation bytes (f32): the prelude reads z (4·M·C, the latent) and writes x (4·M·D); a block
// reads and writes x; the final segment reads x and writes y (4·M·C). No DiT segment reads a job
// input or job state (external bytes 0).
#include <algorithm>

#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/measure.h"
#include "ferry/runner.h"
#include "runner_fixture.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

constexpr int64_t kHidden = 64, kHeads = 4, kChannels = 16, kBlocks = 3;

std::unique_ptr<ModelArch> dit() {
  return arch_from_config("ferry-dit", {{"hidden", double(kHidden)},
                                        {"heads", double(kHeads)},
                                        {"channels", double(kChannels)},
                                        {"blocks", double(kBlocks)}});
}

void flops_and_bytes_match_the_formulas() {
  auto arch = dit();
  for (auto [B, T] : {std::pair<int64_t, int64_t>{1, 1}, {2, 10}, {3, 77}}) {
    JobShape job;
    job.batch = B;
    job.tokens = T;
    const auto ms = measure_segments(*arch, job);
    CHECK_EQ(ms.size(), size_t{kBlocks + 2});
    if (ms.size() != size_t{kBlocks + 2}) return;
    const double M = double(B * T), D = kHidden, H = kHeads, C = kChannels;
    const double attention = 4.0 * B * H * T * T * (D / H);
    const double softmax = double(B) * H * T * T;

    const SegmentMeasure& prelude = ms.front();
    CHECK_EQ(prelude.name, std::string("prelude"));
    CHECK_EQ(prelude.kind, std::string("prelude"));
    const double prelude_extra = prelude.flops - 2 * M * C * D;
    CHECK(prelude_extra > 0 && prelude_extra <= 4 * M * D);
    CHECK_EQ(prelude.output_bytes, uint64_t(4 * M * D));
    CHECK_EQ(prelude.prev_cut_bytes, uint64_t(4 * M * C));
    CHECK_EQ(prelude.external_bytes, uint64_t{0});

    for (int64_t b = 1; b <= kBlocks; b++) {
      const SegmentMeasure& block = ms[size_t(b)];
      CHECK_EQ(block.name, "blocks." + std::to_string(b - 1));
      CHECK_EQ(block.kind, std::string("block"));
      const double extra = block.flops - (2 * M * 12 * D * D + attention);
      if (!(extra > 0 && extra <= 64 * M * D + softmax)) {
        report_failure(__FILE__, __LINE__,
                       "block flops " + std::to_string(block.flops) + " = formula + " +
                           std::to_string(extra) + ", outside (0, 64·M·D + B·H·T²]");
      }
      CHECK_EQ(block.output_bytes, uint64_t(4 * M * D));
      CHECK_EQ(block.prev_cut_bytes, uint64_t(4 * M * D));
      CHECK_EQ(block.external_bytes, uint64_t{0});
      // Every block is the same graph.
      CHECK_EQ(block.flops, ms[1].flops);
      CHECK_EQ(block.compute_buffer_bytes, ms[1].compute_buffer_bytes);
      // Its intermediates include the MLP's hidden layer (4·D per row) and one sample's
      // attention scores; the buffer holds at least the larger, and at most all of them.
      const double fc1 = 4 * M * 4 * D, scores = 4.0 * H * T * T * B;
      CHECK(double(block.compute_buffer_bytes) >= std::max(fc1, scores));
      CHECK(double(block.compute_buffer_bytes) <= 4 * (96 * M * D + 4 * softmax) + 64 * 256);
    }

    const SegmentMeasure& final = ms.back();
    CHECK_EQ(final.name, std::string("final"));
    CHECK_EQ(final.kind, std::string("final"));
    const double final_extra = final.flops - 2 * M * D * C;
    CHECK(final_extra > 0 && final_extra <= 4 * M * D + 4 * M * C);
    CHECK_EQ(final.output_bytes, uint64_t(4 * M * C));
    CHECK_EQ(final.prev_cut_bytes, uint64_t(4 * M * D));
    CHECK_EQ(final.external_bytes, uint64_t{0});
    for (const SegmentMeasure& m : ms) CHECK(m.compute_buffer_bytes > 0);
    std::fprintf(stderr,
                 "  B %lld T %lld: block %.0f flops = formula + B·H·T² + %.2f·M·D, buffer %llu "
                 "bytes\n",
                 static_cast<long long>(B), static_cast<long long>(T), ms[1].flops,
                 (ms[1].flops - 2 * M * 12 * D * D - attention - softmax) / (M * D),
                 static_cast<unsigned long long>(ms[1].compute_buffer_bytes));
  }
}

// Larger jobs need more: FLOPs grow with the tokens (quadratically in attention), buffers too.
void grows_with_the_job() {
  auto arch = dit();
  JobShape small, large;
  small.tokens = 8;
  large.tokens = 64;
  const auto a = measure_segments(*arch, small);
  const auto b = measure_segments(*arch, large);
  for (size_t i = 0; i < a.size(); i++) {
    CHECK(b[i].flops > a[i].flops);
    CHECK(b[i].compute_buffer_bytes > a[i].compute_buffer_bytes);
    CHECK_EQ(b[i].output_bytes, 8 * a[i].output_bytes);
  }
  JobShape bad;
  bad.batch = 0;
  CHECK_THROWS(InvalidArgumentError, measure_segments(*arch, bad), "batch and tokens must be ≥ 1");
}

// A device's buffer type (its 256-byte alignment) needs at least ggml's CPU one.
void device_buffer_type() {
  auto arch = dit();
  CpuDevice device({size_t{16} << 20, 0, 1});
  JobShape job;
  job.batch = 2;
  job.tokens = 10;
  const auto cpu = measure_segments(*arch, job);
  const auto dev = measure_segments(*arch, job, device.scratch_buffer_type());
  for (size_t i = 0; i < cpu.size(); i++) {
    CHECK(dev[i].compute_buffer_bytes >= cpu[i].compute_buffer_bytes);
    CHECK_EQ(dev[i].flops, cpu[i].flops);
  }
  CHECK_EQ(device.memory_stats().allocations, uint64_t{0});  // measuring allocates nothing
}

// A pooled run's compute buffer (one gallocr buffer for every segment's graph and the sampler's
// update) holds the largest segment's measured intermediates and not much more.
void run_compute_buffer_matches() {
  DitSpec spec;
  spec.hidden = kHidden;
  spec.heads = kHeads;
  spec.channels = kChannels;
  spec.blocks = kBlocks;
  Fixture f(spec);
  CpuDevice device({size_t{16} << 20, 0, 1});
  for (auto [B, T] : {std::pair<int64_t, int64_t>{1, 3}, {2, 10}, {1, 100}}) {
    RunRequest r;
    r.job.batch = B;
    r.job.tokens = T;
    r.steps = 2;
    r.segments = per_base(*f.model, false);
    r.execution = Execution::kPooled;
    r.slots = 2;
    RunOutput out;
    {
      DeviceLease lease(device);
      out = run_job(lease, *f.model, r, nullptr, nullptr);
    }
    uint64_t largest = 0, largest_dev = 0;
    for (const auto& m : measure_segments(f.model->arch(), r.job)) {
      largest = std::max(largest, m.compute_buffer_bytes);
    }
    for (const auto& m : measure_segments(f.model->arch(), r.job, device.scratch_buffer_type())) {
      largest_dev = std::max(largest_dev, m.compute_buffer_bytes);
    }
    std::fprintf(
        stderr, "  B %lld T %lld: run %llu bytes, largest segment %llu (device type %llu)\n",
        static_cast<long long>(B), static_cast<long long>(T),
        static_cast<unsigned long long>(out.compute_buffer_bytes),
        static_cast<unsigned long long>(largest), static_cast<unsigned long long>(largest_dev));
    CHECK(out.compute_buffer_bytes >= largest);
    CHECK(out.compute_buffer_bytes >= largest_dev);
    CHECK(out.compute_buffer_bytes <= largest_dev + largest_dev / 4 + (64 << 10));
  }
}

}  // namespace

int main() {
  return run_all({
      {"flops_and_bytes_match_the_formulas", flops_and_bytes_match_the_formulas},
      {"grows_with_the_job", grows_with_the_job},
      {"device_buffer_type", device_buffer_type},
      {"run_compute_buffer_matches", run_compute_buffer_matches},
  });
}
