// The CPU device's memory and copy engine: the arena allocates first-fit at 256-byte alignment
// (every ggml backend's tensor alignment and then some), merges freed neighbours, counts
// allocations/in-use/peak, and refuses what does not fit with a message that says why; the device
// wraps it as one ggml CPU buffer, places tensors inside it, and its copy stream copies in FIFO
// order and signals events; the DiT's step driver updates the latent on the device.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#include "ferry/arena.h"
#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/events.h"
#include "ferry/ggml_support.h"
#include "ferry/sampler.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

size_t offset(const void* base, const void* p) {
  return static_cast<size_t>(static_cast<const uint8_t*>(p) - static_cast<const uint8_t*>(base));
}

void alignment_and_counters() {
  CHECK_EQ(Arena::kAlignment, size_t{256});
  Arena arena(4096, "test");
  CHECK_EQ(reinterpret_cast<uintptr_t>(arena.base()) % Arena::kAlignment, uintptr_t{0});
  CHECK_EQ(arena.usable(), size_t{4096});
  void* a = arena.allocate(1);
  void* b = arena.allocate(100);
  void* c = arena.allocate(0);
  CHECK(a == arena.base());  // first fit from the region's first byte
  CHECK(reinterpret_cast<uintptr_t>(a) % Arena::kAlignment == 0);
  CHECK(reinterpret_cast<uintptr_t>(b) % Arena::kAlignment == 0);
  CHECK(reinterpret_cast<uintptr_t>(c) % Arena::kAlignment == 0);
  CHECK(a != b && b != c && a != c);
  CHECK(arena.owns(a) && arena.owns(b) && arena.owns(c));
  MemoryStats s = arena.stats();
  CHECK_EQ(s.allocations, uint64_t{3});
  CHECK_EQ(s.in_use_bytes, size_t{3 * 256});  // each rounded up to the alignment
  CHECK_EQ(s.peak_bytes, size_t{768});
  CHECK_EQ(s.capacity_bytes, size_t{4096});
  CHECK_EQ(arena.free_bytes(), size_t{4096 - 768});
  // Memory is usable.
  std::memset(b, 0xAB, 100);
  CHECK(arena.release(b));
  CHECK(!arena.release(b));  // double free is refused, not corrupting
  CHECK(!arena.owns(b));
  int on_stack = 0;
  CHECK(!arena.release(&on_stack));
  CHECK(!arena.release(nullptr));
  CHECK(!arena.release(static_cast<uint8_t*>(a) + 64));  // inside a block, not its start
  CHECK(arena.release(a));
  CHECK(arena.release(c));
  s = arena.stats();
  CHECK_EQ(s.in_use_bytes, size_t{0});
  CHECK_EQ(s.peak_bytes, size_t{768});
  CHECK_EQ(s.allocations, uint64_t{3});
  CHECK_EQ(s.largest_free_block, size_t{4096});
}

void first_fit_and_merging() {
  Arena arena(1024, "test");
  void* p[4];
  for (auto& x : p) x = arena.allocate(256);
  void* base = arena.base();
  for (int i = 0; i < 4; i++) CHECK_EQ(offset(base, p[i]), size_t(256 * i));
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(1), "largest free block 0 bytes");
  // Free the middle two in either order: they merge into one 512-byte block.
  CHECK(arena.release(p[2]));
  CHECK(arena.release(p[1]));
  CHECK_EQ(arena.stats().largest_free_block, size_t{512});
  void* big = arena.allocate(512);
  CHECK_EQ(offset(base, big), size_t{256});
  CHECK(arena.release(big));
  // First fit: the lowest block that fits.
  void* small = arena.allocate(64);
  CHECK_EQ(offset(base, small), size_t{256});
  CHECK(arena.release(small));
  CHECK(arena.release(p[0]));
  CHECK(arena.release(p[3]));
  CHECK_EQ(arena.stats().largest_free_block, size_t{1024});
  void* all = arena.allocate(1024);
  CHECK_EQ(offset(base, all), size_t{0});
  CHECK(arena.release(all));
}

void refuses_past_capacity() {
  Arena arena(1000, "test");  // usable: 768 (rounded down to the alignment)
  CHECK_EQ(arena.usable(), size_t{768});
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(1001),
               "test: out of device memory: requested 1001 bytes, 0 of 1000 bytes in use, "
               "largest free block 768 bytes");
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(769), "requested 769 bytes");
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(SIZE_MAX), "requested");
  // Fragmentation: enough bytes free in total, but no block large enough.
  void* a = arena.allocate(256);
  void* b = arena.allocate(256);
  void* c = arena.allocate(256);
  CHECK(arena.release(a));
  CHECK(arena.release(c));
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(300),
               "requested 300 bytes, 256 of 1000 bytes in use, largest free block 256 bytes");
  CHECK_EQ(arena.stats().in_use_bytes, size_t{256});  // a refusal changes nothing
  CHECK_EQ(arena.stats().allocations, uint64_t{3});
  CHECK(arena.release(b));
  CHECK_THROWS(InvalidArgumentError, Arena(10, "tiny"),
               "tiny: device memory capacity must be at least 256 bytes");
  CHECK_THROWS(InvalidArgumentError, Arena(255, "tiny"), "at least 256 bytes");
}

void window_peak() {
  Arena arena(4096, "test");
  void* a = arena.allocate(1024);
  void* b = arena.allocate(1024);
  CHECK(arena.release(b));
  CHECK_EQ(arena.stats().window_peak_bytes, size_t{2048});
  arena.reset_window_peak();
  CHECK_EQ(arena.stats().window_peak_bytes, size_t{1024});
  void* c = arena.allocate(64);
  CHECK_EQ(arena.stats().window_peak_bytes, size_t{1024 + 256});
  CHECK_EQ(arena.stats().peak_bytes, size_t{2048});
  CHECK(arena.release(a));
  CHECK(arena.release(c));
  CHECK_EQ(arena.stats().window_peak_bytes, size_t{1280});  // a window only grows
}

void large_lazy_capacity() {
  // 64 GiB of address space costs nothing until touched.
  Arena arena(size_t{64} << 30, "big");
  void* p = arena.allocate(size_t{1} << 20);
  std::memset(p, 1, size_t{1} << 20);
  CHECK_EQ(arena.stats().committed_bytes, size_t{1} << 20);
  CHECK(arena.release(p));
}

// Pages of [p, p + bytes) the kernel has resident (mincore), of the whole pages in it.
size_t resident_pages(const void* p, size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> in_core((bytes + page - 1) / page);
  CHECK(mincore(const_cast<void*>(p), bytes, in_core.data()) == 0);
  return static_cast<size_t>(
      std::count_if(in_core.begin(), in_core.end(), [](unsigned char v) { return (v & 1) != 0; }));
}

// commit() makes every page of the region resident at once; before it, none is.
void commit_makes_memory_resident() {
  const size_t bytes = size_t{16} << 20;
  const size_t pages = bytes / static_cast<size_t>(sysconf(_SC_PAGESIZE));
  Arena arena(bytes, "commit");
  CHECK_EQ(resident_pages(arena.base(), arena.usable()), size_t{0});
  CHECK(arena.commit() >= 0);
  CHECK_EQ(resident_pages(arena.base(), arena.usable()), pages);
  // A device made with commit_memory commits its arena in its constructor.
  CpuDeviceOptions options;
  options.capacity_bytes = bytes;
  options.commit_memory = true;
  CpuDevice device(options);
  CHECK_EQ(resident_pages(ggml_backend_buffer_get_base(device.memory()), bytes), pages);
}

// An arena over memory the caller owns (a GPU's one allocation): pieces of it, never freed.
void external_memory() {
  alignas(256) static uint8_t region[4096 + 256];
  Arena arena(region, 4096, "ext");
  CHECK(arena.base() == region);
  void* a = arena.allocate(300);
  CHECK(a == region);
  void* b = arena.allocate(1);
  CHECK_EQ(offset(region, b), size_t{512});
  CHECK(arena.release(a) && arena.release(b));
  CHECK_THROWS(InvalidArgumentError, Arena(region + 64, 1024, "ext"),
               "ext: device memory must be 256-byte aligned");
  CHECK_THROWS(InvalidArgumentError, Arena(nullptr, 1024, "ext"), "at least 256 bytes");
  CHECK_THROWS(InvalidArgumentError, Arena(region, 100, "ext"), "at least 256 bytes");
}

void device_buffers_and_copies(double link_gbps) {
  CpuDevice device({1 << 20, link_gbps, 2});
  CHECK_EQ(device.name(), std::string("cpu"));
  CHECK(device.kind() == DeviceKind::kCpu);
  CHECK_EQ(std::string(device_kind_name(device.kind())), std::string("cpu"));
  CHECK_EQ(device.backend_name(), std::string("CPU"));
  CHECK_EQ(device.total_bytes(), size_t{1} << 20);
  CHECK_EQ(device.threads(), 2u);
  CHECK_EQ(device.link_gbps(), link_gbps);
  // All of the device's memory is one ggml CPU buffer: the arena's region.
  CHECK(device.memory() != nullptr);
  CHECK_EQ(ggml_backend_buffer_get_size(device.memory()), size_t{1} << 20);
  CHECK(ggml_backend_buffer_is_host(device.memory()));
  CHECK(device.tensor_alignment() >= Arena::kAlignment);
  {
    DeviceBuffer buf = device.alloc(4096);
    CHECK(buf && buf.size() == 4096);
    CHECK(buf.data() == ggml_backend_buffer_get_base(device.memory()));
    CHECK_EQ(device.memory_stats().in_use_bytes, size_t{4096});
    std::vector<uint8_t> src(4096);
    std::iota(src.begin(), src.end(), 0);
    Stream& stream = device.copy_stream();
    EventPtr first = stream.copy_async(buf.data(), src.data(), src.size());
    first->wait();
    CHECK(first->ready());
    CHECK(first->start_us() <= first->end_us());
    CHECK(std::memcmp(buf.data(), src.data(), src.size()) == 0);
    // FIFO: later copies to the same place land last; record() waits for all of them.
    std::vector<std::vector<uint8_t>> layers;
    for (int i = 0; i < 16; i++) layers.emplace_back(4096, static_cast<uint8_t>(i));
    for (auto& layer : layers) stream.copy_async(buf.data(), layer.data(), layer.size());
    EventPtr all = stream.record();
    all->wait();
    CHECK(all->ready());
    CHECK_EQ(static_cast<uint8_t*>(buf.data())[4095], uint8_t{15});
    // A batch is one transfer: one event for all of its regions.
    std::vector<uint8_t> x(256, 0x11), y(256, 0x22);
    const CopyRegion regions[] = {{buf.data(), x.data(), x.size()},
                                  {static_cast<uint8_t*>(buf.data()) + 1024, y.data(), y.size()}};
    stream.copy_batch_async(regions, 2)->wait();
    // Device → host: through ggml, after the copies queued so far.
    std::vector<uint8_t> back(4096);
    device.read(buf.data(), back.data(), back.size());
    CHECK_EQ(back[0], uint8_t{0x11});
    CHECK_EQ(back[1024], uint8_t{0x22});
    CHECK_EQ(back[4095], uint8_t{15});
    // A copy waits for an event queued before it (a compute that still reads the slot).
    EventPtr marker = stream.record();
    stream.wait_event(marker);
    stream.synchronize();
    DeviceBuffer moved = std::move(buf);
    CHECK(!buf && moved);
  }
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});  // buffers freed themselves
  CHECK_EQ(device.free_bytes(), size_t{1} << 20);
  CHECK_EQ(device.available_bytes(), size_t{1} << 20);
  CHECK_THROWS(DeviceOutOfMemoryError, device.alloc(size_t{2} << 20), "cpu: out of device memory");
  HostBuffer host = device.alloc_host(10000);
  CHECK(host && host.size() == 10000);
  CHECK_EQ(reinterpret_cast<uintptr_t>(host.data()) % 4096, uintptr_t{0});
}

// An event the test completes by hand (a compute that still reads a staging slot).
class ManualEvent final : public Event {
 public:
  bool ready() const override { return done_.load(); }
  void wait() override {
    while (!done_.load()) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  double start_us() const override { return at_; }
  double end_us() const override { return at_; }
  void complete() {
    at_ = wall_clock_us();
    done_.store(true);
  }

 private:
  std::atomic<bool> done_{false};
  double at_ = 0;
};

// On a paced link, a copy queued behind wait_event(e) starts on the link only once e completed,
// and then takes its full bytes / rate: the link cannot have carried it while the copy engine
// waited (the pooled runner's copy into a slot that a compute still reads).
void paced_copy_waits_for_its_event() {
  CpuDevice device({size_t{4} << 20, 0.1, 1});  // 0.1 GB/s: 2 MB take 20 ms
  DeviceBuffer dst = device.alloc(size_t{2} << 20);
  std::vector<uint8_t> src(size_t{2} << 20, 7);
  auto slot_free = std::make_shared<ManualEvent>();
  Stream& stream = device.copy_stream();
  stream.wait_event(slot_free);
  EventPtr copy = stream.copy_async(dst.data(), src.data(), src.size());
  std::this_thread::sleep_for(std::chrono::milliseconds(40));
  CHECK(!copy->ready());
  slot_free->complete();
  copy->wait();
  const double freed = slot_free->end_us();
  CHECK(copy->start_us() >= freed - 1000);  // not before (1 ms of slack for the two clocks)
  CHECK(copy->end_us() - copy->start_us() >= 19000);
  CHECK(copy->end_us() >= freed + 19000);
  std::fprintf(stderr, "  slot freed at 0, copy %.1f..%.1f ms\n", (copy->start_us() - freed) / 1e3,
               (copy->end_us() - freed) / 1e3);
}

// Tensors are placed at device addresses and moved between them; ggml reads and writes them there.
void place_tensors() {
  CpuDevice device({1 << 20, 0, 1});
  ggml_init_params p{ggml_tensor_overhead() * 4, nullptr, true};
  ggml_context* ctx = ggml_init(p);
  ggml_tensor* t = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 64);
  ggml_set_name(t, "w");
  DeviceBuffer a = device.alloc(256);
  DeviceBuffer b = device.alloc(256);
  std::vector<float> v(64);
  std::iota(v.begin(), v.end(), 1.0f);
  device.place(t, a.data());
  CHECK(t->buffer == device.memory() && t->data == a.data());
  device.tensor_set(t, v.data(), 0, 256);
  CHECK(std::memcmp(a.data(), v.data(), 256) == 0);
  device.place(t, b.data());  // moved to another slot
  std::vector<float> back(64, 0);
  device.tensor_set(t, v.data(), 0, 128);
  device.tensor_get(t, back.data(), 0, 128);
  CHECK(std::memcmp(back.data(), v.data(), 128) == 0);
  CHECK_EQ(device.tensor_alloc_size(t), size_t{256});
  // Past the end of device memory, or outside it altogether.
  auto* end = static_cast<uint8_t*>(ggml_backend_buffer_get_base(device.memory())) + (1 << 20);
  CHECK_THROWS(InvalidArgumentError, device.place(t, end - 128),
               "cpu: tensor \"w\" does not fit at that place in device memory");
  CHECK_THROWS(InvalidArgumentError, device.place(t, v.data()), "does not fit");
  ggml_free(ctx);
}

void device_rejects_bad_options() {
  CHECK_THROWS(InvalidArgumentError, CpuDevice({1 << 20, -1.0, 1}), "linkGbps");
  CHECK_THROWS(InvalidArgumentError, CpuDevice({1 << 20, std::nan(""), 1}), "linkGbps");
  CHECK_THROWS(InvalidArgumentError, CpuDevice({0, 0, 1}), "capacity");
  CHECK_THROWS(InvalidArgumentError, CpuDevice({1 << 20, 0, 1000}), "threads");
  CpuDevice all_cores({1 << 20, 0, 0});
  CHECK(all_cores.threads() >= 1);
}

// Jobs share a device; the copy-rate measurement needs it free of them, and excludes them.
void jobs_share_the_device() {
  CpuDevice device({1 << 20, 0, 1});
  {
    DeviceLease lease(device);
    CHECK(device.busy());
    DeviceLease second(device);
    CHECK_EQ(device.jobs(), 2);
    CHECK_THROWS(DeviceBusyError, DeviceLease exclusive(device, true), "already running a job");
    DeviceLease moved = std::move(lease);
    CHECK_EQ(device.jobs(), 2);
    CHECK(!lease && moved);
    CHECK(&moved.device() == &device);
  }
  CHECK(!device.busy());
  {
    DeviceLease exclusive(device, true);
    CHECK(device.busy());
    CHECK_THROWS(DeviceBusyError, DeviceLease job(device), "held exclusively");
  }
  DeviceLease again(device);
  CHECK(again);
  DeviceLease empty;
  CHECK_THROWS(InvalidArgumentError, empty.device(), "no device held");
}

// A limit below the capacity (the budget) is refused past like the capacity, may be lowered
// under allocations already made, and a new high-water mark starts at what is in use.
void limit_and_peak() {
  Arena arena(8192, "test");
  CHECK_EQ(arena.limit(), size_t{8192});
  CHECK_EQ(arena.stats().limit_bytes, size_t{8192});
  void* a = arena.allocate(2048);
  arena.set_limit(4096);
  CHECK_EQ(arena.free_bytes(), size_t{2048});
  void* b = arena.allocate(2048);
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(256), "of 4096 bytes (the budget");
  CHECK_EQ(arena.stats().peak_bytes, size_t{4096});
  arena.set_limit(1024);  // below what is in use: nothing is taken back
  CHECK_EQ(arena.free_bytes(), size_t{0});
  CHECK_EQ(arena.stats().in_use_bytes, size_t{4096});
  CHECK(arena.release(b));
  arena.reset_peak();
  CHECK_EQ(arena.stats().peak_bytes, size_t{2048});
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(256), "requested 256 bytes");
  CHECK_THROWS(InvalidArgumentError, arena.set_limit(0), "between 1 byte and");
  CHECK_THROWS(InvalidArgumentError, arena.set_limit(8193), "between 1 byte and");
  arena.set_limit(8192);
  void* c = arena.allocate(4096);
  CHECK_EQ(arena.stats().peak_bytes, size_t{6144});
  CHECK(arena.release(a));
  CHECK(arena.release(c));
  CHECK_EQ(arena.free_bytes(), size_t{8192});
}

// The DiT's sampler on the device: z ← z − (1/S)·y, computed by ggml (the old
// Device::euler_update, now a graph the runner runs after every step).
void euler_drift_update() {
  CpuDevice device({1 << 20, 0, 2});
  ggml_init_params p{ggml_tensor_overhead() * 16 + ggml_graph_overhead(), nullptr, true};
  ggml_context* ctx = ggml_init(p);
  ggml_tensor* z = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 1000);
  ggml_tensor* y = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 1000);
  DeviceBuffer za = device.alloc(4000), ya = device.alloc(4000);
  device.place(z, za.data());
  device.place(y, ya.data());
  std::vector<float> zv(1000), yv(1000);
  for (size_t i = 0; i < zv.size(); i++) {
    zv[i] = static_cast<float>(i);
    yv[i] = static_cast<float>(i % 7);
  }
  device.tensor_set(z, zv.data(), 0, 4000);
  device.tensor_set(y, yv.data(), 0, 4000);
  Activations act;
  act.add("z", z);
  act.add("y", y);
  auto driver = euler_drift_sampler("z", "y", 2);
  CHECK_EQ(driver->name(), std::string("euler-drift"));
  CHECK(driver->step_inputs(1).empty());
  ggml_cgraph* graph = ggml_new_graph(ctx);
  driver->build_update(ctx, graph, act, 1);
  ggml_gallocr_t galloc = ggml_gallocr_new(device.scratch_buffer_type());
  CHECK(ggml_gallocr_alloc_graph(galloc, graph));
  EventPtr done = device.compute(graph);
  CHECK(done->ready());
  device.tensor_get(z, zv.data(), 0, 4000);
  bool ok = true;
  for (size_t i = 0; i < zv.size(); i++) ok &= zv[i] == static_cast<float>(i) - 0.5f * (i % 7);
  CHECK(ok);
  ggml_gallocr_free(galloc);
  ggml_free(ctx);
  CHECK_THROWS(InvalidArgumentError, euler_drift_sampler("z", "y", 0), "steps must be ≥ 1");
  CHECK_THROWS(InvalidArgumentError, act.get("x"), "activations: no tensor \"x\"");
}

}  // namespace

int main() {
  return run_all({
      {"alignment_and_counters", alignment_and_counters},
      {"first_fit_and_merging", first_fit_and_merging},
      {"refuses_past_capacity", refuses_past_capacity},
      {"window_peak", window_peak},
      {"large_lazy_capacity", large_lazy_capacity},
      {"commit_makes_memory_resident", commit_makes_memory_resident},
      {"external_memory", external_memory},
      {"device_buffers_and_copies", [] { device_buffers_and_copies(0); }},
      {"device_buffers_and_copies_paced_link", [] { device_buffers_and_copies(50); }},
      {"paced_copy_waits_for_its_event", paced_copy_waits_for_its_event},
      {"place_tensors", place_tensors},
      {"device_rejects_bad_options", device_rejects_bad_options},
      {"jobs_share_the_device", jobs_share_the_device},
      {"limit_and_peak", limit_and_peak},
      {"euler_drift_update", euler_drift_update},
  });
}
