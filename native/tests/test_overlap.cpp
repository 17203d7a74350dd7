// The overlapped runner (slots ≥ 1): the same bits as the serial baseline and an all-resident
// run for every prefetch depth, no device allocation after job start, resident weights kept
// across jobs in the device's residency cache (and evicted when memory is needed or the model
// goes), the load modes and params backends, and transfer verification.
#include <algorithm>
#include <cstring>
#include <tuple>

#include "ferry/checksum.h"
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

std::vector<PlanSegment> plan(const DitModel& m, const Groups& groups) {
  return plan_of(m, groups, kBatch, kTokens);
}

Groups per_base(const DitModel& m, bool resident) {
  Groups g;
  for (int64_t i = 0; i < static_cast<int64_t>(m.base_segments().size()); i++) {
    g.emplace_back(i, i, resident);
  }
  return g;
}

RunRequest request(std::vector<PlanSegment> segments, uint32_t slots, int64_t steps = kSteps) {
  RunRequest r;
  r.batch = kBatch;
  r.tokens = kTokens;
  r.steps = steps;
  r.seed = 7;
  r.segments = std::move(segments);
  r.slots = slots;
  return r;
}

RunOutput run(Device& device, DitModel& model, const RunRequest& r,
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

uint64_t total_params(const DitModel& m) {
  uint64_t total = 0;
  for (const auto& s : m.base_segments()) total += s.param_bytes;
  return total;
}

void checksum_properties() {
  std::vector<uint8_t> a(1001);
  for (size_t i = 0; i < a.size(); i++) a[i] = static_cast<uint8_t>(i * 7 + 3);
  const uint64_t h = checksum64(a.data(), a.size());
  CHECK_EQ(checksum64(a.data(), a.size()), h);
  auto b = a;
  b[500] ^= 1;
  CHECK(checksum64(b.data(), b.size()) != h);
  // Swapping two words changes it (positions count), and so does a trailing zero byte.
  b = a;
  std::swap_ranges(b.begin(), b.begin() + 8, b.begin() + 8);
  CHECK(checksum64(b.data(), b.size()) != h);
  b = a;
  b.push_back(0);
  CHECK(checksum64(b.data(), b.size()) != h);
  CHECK(checksum64(nullptr, 0) == checksum64(a.data(), 0));
}

// The bits of every plan and prefetch depth match the all-resident serial run.
void depths_agree_bitwise(const std::string& dtype) {
  DitSpec spec;
  spec.dtype = dtype;
  spec.blocks = 4;
  Fixture f(spec);
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  const int64_t n = static_cast<int64_t>(m.base_segments().size());
  const RunOutput reference = run(device, m, request(plan(m, {{0, n - 1, true}}), 0));
  const std::vector<Groups> plans = {
      per_base(m, false),
      per_base(m, true),
      {{0, n - 1, false}},
      {{0, 1, true}, {2, 2, false}, {3, 3, true}, {4, 4, false}, {5, 5, false}},
      {{0, 0, false}, {1, 3, false}, {4, 5, true}},
      {{0, 0, true}, {1, 1, false}, {2, 2, true}, {3, 3, false}, {4, 4, true}, {5, 5, false}},
  };
  for (const Groups& g : plans) {
    CHECK(same_bits(run(device, m, request(plan(m, g), 0)).output, reference.output));
    for (uint32_t d = 1; d <= 4; d++) {
      CHECK(same_bits(run(device, m, request(plan(m, g), d)).output, reference.output));
      // Only cached resident weights remain on the device.
      CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
      CHECK(!device.busy());
    }
  }
  // A paced link changes the timing, not the bits.
  CpuDevice paced({kCapacity, 5, 2});
  CHECK(same_bits(run(paced, m, request(plan(m, per_base(m, false)), 2)).output, reference.output));
}

// After the job's buffers are allocated at its start, a 10-step run allocates nothing.
void no_allocation_after_step_one() {
  Fixture f;
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  for (uint32_t d : {1u, 2u, 3u}) {
    const RunRequest r =
        request(plan(m, {{0, 1, true}, {2, 2, false}, {3, 3, false}, {4, 4, true}}), d, 10);
    std::vector<uint64_t> allocations;
    {
      DeviceLease lease(device);
      run_job(lease, m, r, nullptr,
              [&](StepReport&&) { allocations.push_back(device.memory_stats().allocations); });
    }
    CHECK_EQ(allocations.size(), size_t{10});
    for (uint64_t a : allocations) CHECK_EQ(a, allocations.front());
    CHECK_EQ(device.memory_stats().allocations, allocations.front());
  }
  // The serial baseline allocates per segment per step, by design.
  std::vector<uint64_t> serial;
  {
    DeviceLease lease(device);
    run_job(lease, m, request(plan(m, per_base(m, false)), 0, 4), nullptr,
            [&](StepReport&&) { serial.push_back(device.memory_stats().allocations); });
  }
  CHECK(serial.back() > serial.front());
}

void step_reports_and_residency_across_jobs() {
  Fixture f;
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 0, 2});
  const auto& base = m.base_segments();
  const auto p = plan(m, {{0, 1, true}, {2, 2, false}, {3, 3, true}, {4, 4, false}});
  const uint64_t seg_bytes[4] = {base[0].param_bytes + base[1].param_bytes, base[2].param_bytes,
                                 base[3].param_bytes, base[4].param_bytes};
  const uint64_t total = total_params(m);
  const uint64_t streamed = seg_bytes[1] + seg_bytes[3];

  std::vector<StepReport> first;
  const RunOutput out1 = run(device, m, request(p, 2), &first);
  CHECK_EQ(first.size(), size_t{kSteps});
  for (size_t s = 0; s < first.size(); s++) {
    const StepReport& r = first[s];
    CHECK_EQ(r.step, int64_t(s + 1));
    CHECK(r.start_us <= r.end_us);
    CHECK(r.stall_us >= 0 && r.stall_us <= r.end_us - r.start_us + 1);
    CHECK_EQ(r.disk_bytes, s == 0 ? total : 0);
    CHECK_EQ(r.h2d_bytes, s == 0 ? total : streamed);
    CHECK_EQ(r.resident_hit_bytes, uint64_t{0});
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
      for (const RunEvent& e : r.events) {
        if (e.segment == k) CHECK(head->start_us <= e.start_us && e.end_us <= head->end_us);
      }
    }
  }
  // The resident base segments (prelude, blocks.0, blocks.2) stay on the device.
  CHECK_EQ(device.residency().entries(), size_t{3});
  const uint64_t resident_params = seg_bytes[0] + seg_bytes[2];
  CHECK(device.memory_stats().in_use_bytes >= resident_params);
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());

  // The same model and plan again: step 1 copies only the streamed segments.
  std::vector<StepReport> second;
  const RunOutput out2 = run(device, m, request(p, 2), &second);
  CHECK(same_bits(out1.output, out2.output));
  CHECK_EQ(second[0].h2d_bytes, streamed);
  CHECK(second[0].h2d_bytes < first[0].h2d_bytes);
  CHECK_EQ(second[0].resident_hit_bytes, resident_params);
  CHECK_EQ(second[0].disk_bytes, uint64_t{0});

  // Another plan keeping some of the same base segments resident reuses those (per base segment,
  // whatever the merging): blocks.0 and blocks.2 are cached, blocks.1 is not.
  std::vector<StepReport> third;
  const RunOutput out3 =
      run(device, m, request(plan(m, {{0, 0, false}, {1, 3, true}, {4, 4, false}}), 1), &third);
  CHECK(same_bits(out1.output, out3.output));
  CHECK_EQ(third[0].resident_hit_bytes, base[1].param_bytes + base[3].param_bytes);
  CHECK_EQ(third[0].h2d_bytes, total - third[0].resident_hit_bytes);

  // The serial baseline neither uses nor disturbs the cache (it has room).
  std::vector<StepReport> serial;
  run(device, m, request(p, 0), &serial);
  CHECK_EQ(serial[0].h2d_bytes, total);
  CHECK_EQ(device.residency().entries(), size_t{4});

  // Disposing the model evicts what it uploaded.
  device.residency().evict_owner(&m);
  CHECK_EQ(device.residency().entries(), size_t{0});
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
  std::vector<StepReport> fourth;
  run(device, m, request(p, 2), &fourth);
  CHECK_EQ(fourth[0].h2d_bytes, total);
}

// The same file opened again reuses the cache; a rewritten file does not.
void residency_key_follows_the_file() {
  Fixture f;
  CpuDevice device({kCapacity, 0, 2});
  const auto p = plan(*f.model, per_base(*f.model, true));
  const uint64_t total = total_params(*f.model);
  const RunOutput a = run(device, *f.model, request(p, 1));
  auto reopened = DitModel::open(f.path);
  std::vector<StepReport> reports;
  CHECK(same_bits(run(device, *reopened, request(p, 1), &reports).output, a.output));
  CHECK_EQ(reports[0].h2d_bytes, uint64_t{0});
  CHECK_EQ(reports[0].resident_hit_bytes, total);

  // Rewritten with other weights (a new inode at the same path): nothing stale is used.
  DitSpec other;
  other.seed = 99;
  const std::string tmp = f.dir.file("other.safetensors");
  write_dit(tmp, other);
  CHECK(std::rename(tmp.c_str(), f.path.c_str()) == 0);
  auto changed = DitModel::open(f.path);
  reports.clear();
  const RunOutput c = run(device, *changed, request(p, 1), &reports);
  CHECK_EQ(reports[0].h2d_bytes, total);
  CHECK(!same_bits(c.output, a.output));
  CpuDevice fresh({kCapacity, 0, 2});
  CHECK(same_bits(run(fresh, *changed, request(p, 0)).output, c.output));
}

// Cached weights give way when a plan needs the memory, and an impossible plan fails cleanly.
void eviction_and_out_of_memory() {
  Fixture f;
  DitModel& m = *f.model;
  const uint64_t total = total_params(m);
  // Room for the whole model resident plus the activations, not for two copies of it.
  CpuDevice device({static_cast<size_t>(total + total / 2), 0, 2});
  run(device, m, request(plan(m, per_base(m, true)), 1));
  CHECK_EQ(device.residency().entries(), m.base_segments().size());
  // Another model needs the memory: the cached weights are evicted to make room.
  DitSpec other_spec;
  other_spec.seed = 5;
  Fixture other(other_spec);
  std::vector<StepReport> reports;
  run(device, *other.model, request(plan(*other.model, per_base(*other.model, true)), 2), &reports);
  CHECK_EQ(reports[0].h2d_bytes, total);
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());

  // A plan that cannot fit fails naming the allocation, and leaves only the cache.
  CpuDevice small({static_cast<size_t>(total / 2), 0, 2});
  CHECK_THROWS(DeviceOutOfMemoryError, run(small, m, request(plan(m, per_base(m, true)), 2)),
               "run: job start: allocating");
  CHECK_EQ(small.memory_stats().in_use_bytes, small.residency().bytes());
  CHECK(!small.busy());
  run(small, m, request(plan(m, per_base(m, false)), 1));
}

void cancellation_and_errors() {
  Fixture f;
  DitModel& m = *f.model;
  CpuDevice device({kCapacity, 2, 2});
  std::atomic<bool> cancel{false};
  RunRequest r = request(plan(m, {{0, 1, true}, {2, 2, false}, {3, 4, false}}), 2, 20);
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
  {
    DeviceLease lease(device);
    CHECK_THROWS(std::runtime_error,
                 run_job(lease, m, r, nullptr,
                         [](StepReport&&) { throw std::runtime_error("observer failed"); }),
                 "observer failed");
  }
  CHECK_EQ(device.memory_stats().in_use_bytes, device.residency().bytes());
  RunRequest too_deep = request(plan(m, per_base(m, false)), kMaxSlots + 1);
  CHECK_THROWS(InvalidArgumentError, run(device, m, too_deep), "slots must be between 0 and");
  // A file that shrank under the model: the copy thread's read error reaches the caller.
  Fixture broken;
  truncate(broken.path.c_str(), 64);
  CpuDevice fresh({kCapacity, 0, 2});
  bool threw = false;
  try {
    run(fresh, *broken.model, request(plan(*broken.model, per_base(*broken.model, false)), 2));
  } catch (const ModelFormatError&) {
    threw = true;
  } catch (const IoError&) {
    threw = true;
  }
  CHECK(threw);
  CHECK_EQ(fresh.memory_stats().in_use_bytes, size_t{0});
  CHECK(!fresh.busy());
}

void load_modes_and_backends() {
  DitSpec spec;
  spec.dtype = "BF16";
  Fixture f(spec);
  const auto p = plan(*f.model, {{0, 1, true}, {2, 2, false}, {3, 4, false}});
  CpuDevice reference_device({kCapacity, 0, 2});
  const RunOutput reference = run(reference_device, *f.model, request(p, 0));
  for (LoadMode load : {LoadMode::kLazy, LoadMode::kEager, LoadMode::kBackground}) {
    for (ParamsBackend backend : {ParamsBackend::kCpu, ParamsBackend::kDisk}) {
      for (uint32_t slots : {0u, 2u}) {
        auto model = DitModel::open(f.path);  // a cold params cache
        CpuDevice device({kCapacity, 0, 2});
        RunRequest r = request(p, slots);
        r.load = load;
        r.params_backend = backend;
        r.verify = true;
        std::vector<StepReport> reports;
        CHECK(same_bits(run(device, *model, r, &reports).output, reference.output));
        // Eager loading reads everything before step 1.
        if (load == LoadMode::kEager) CHECK_EQ(reports[0].disk_bytes, uint64_t{0});
        if (load == LoadMode::kLazy) CHECK_EQ(reports[0].disk_bytes, total_params(*model));
      }
    }
  }
}

// A device whose link flips one bit of one transfer: verify must notice.
class FlakyLinkDevice final : public Device {
 public:
  explicit FlakyLinkDevice(uint64_t corrupt_batch)
      : arena_(kCapacity, "flaky"), kernels_({64, 0, 2}), link_(kernels_, corrupt_batch) {}
  ~FlakyLinkDevice() override { release_residency(); }
  const std::string& name() const override { return name_; }
  DeviceKind kind() const override { return DeviceKind::kCpu; }
  size_t total_bytes() const override { return arena_.capacity(); }
  size_t free_bytes() const override { return arena_.free_bytes(); }
  MemoryStats memory_stats() const override { return arena_.stats(); }
  void reset_window_peak() override { arena_.reset_window_peak(); }
  Stream& copy_stream() override { return link_; }
  Stream& compute_stream() override { return kernels_.compute_stream(); }
  void prelude_forward(const DitDims& d, const PreludeWeights& w, const float* z, float* x,
                       void* s) override {
    kernels_.prelude_forward(d, w, z, x, s);
  }
  void block_forward(const DitDims& d, const BlockWeights& w, float* x, void* s) override {
    kernels_.block_forward(d, w, x, s);
  }
  void final_forward(const DitDims& d, const FinalWeights& w, const float* x, float* y,
                     void* s) override {
    kernels_.final_forward(d, w, x, y, s);
  }
  void euler_update(float* z, const float* y, size_t n, float dt) override {
    kernels_.euler_update(z, y, n, dt);
  }

 protected:
  void* alloc_raw(size_t bytes) override { return arena_.allocate(bytes); }
  void free_raw(void* data) noexcept override { arena_.release(data); }

 private:
  class Link final : public Stream {
   public:
    Link(CpuDevice& inner, uint64_t corrupt) : inner_(inner), corrupt_(corrupt) {}
    EventPtr copy_batch_async(const CopyRegion* regions, size_t count) override {
      EventPtr e = inner_.copy_stream().copy_batch_async(regions, count);
      if (batches_++ == corrupt_ && count > 0 && regions[count - 1].bytes > 0) {
        e->wait();
        static_cast<uint8_t*>(regions[count - 1].dst)[regions[count - 1].bytes / 2] ^= 0x10;
      }
      return e;
    }
    EventPtr record() override { return inner_.copy_stream().record(); }

   private:
    CpuDevice& inner_;
    uint64_t corrupt_;
    uint64_t batches_ = 0;
  };

  std::string name_ = "flaky";
  Arena arena_;
  CpuDevice kernels_;
  Link link_;
};

void verify_catches_corruption() {
  Fixture f;
  DitModel& m = *f.model;
  for (uint32_t slots : {0u, 2u}) {
    // Batch 0 is the latent z; batch 3 is a segment's weights in step 1.
    FlakyLinkDevice device(3);
    RunRequest r = request(plan(m, per_base(m, false)), slots);
    r.verify = true;
    CHECK_THROWS(IntegrityError, run(device, m, r), "does not match its host params");
    CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});
    // Without verify the flipped bit goes unnoticed (and changes the result).
    FlakyLinkDevice quiet(3);
    r.verify = false;
    CpuDevice clean({kCapacity, 0, 2});
    CHECK(!same_bits(run(quiet, m, r).output, run(clean, m, r).output));
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
      {"checksum_properties", checksum_properties},
      {"depths_agree_bitwise_f32", [] { depths_agree_bitwise("F32"); }},
      {"depths_agree_bitwise_bf16", [] { depths_agree_bitwise("BF16"); }},
      {"depths_agree_bitwise_f16", [] { depths_agree_bitwise("F16"); }},
      {"no_allocation_after_step_one", no_allocation_after_step_one},
      {"step_reports_and_residency_across_jobs", step_reports_and_residency_across_jobs},
      {"residency_key_follows_the_file", residency_key_follows_the_file},
      {"eviction_and_out_of_memory", eviction_and_out_of_memory},
      {"cancellation_and_errors", cancellation_and_errors},
      {"load_modes_and_backends", load_modes_and_backends},
      {"verify_catches_corruption", verify_catches_corruption},
      {"copy_rate_measurement", copy_rate_measurement},
  });
}
