// The CPU device's memory and copy engine: the arena allocates first-fit with 64-byte alignment,
// merges freed neighbours, counts allocations/in-use/peak, and refuses what does not fit with a
// message that says why; the copy stream copies in FIFO order and signals events.
#include <cstring>
#include <numeric>

#include "ferry/arena.h"
#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

size_t offset(const Arena& arena, void* base, void* p) {
  (void)arena;
  return static_cast<size_t>(static_cast<uint8_t*>(p) - static_cast<uint8_t*>(base));
}

void alignment_and_counters() {
  Arena arena(4096, "test");
  void* a = arena.allocate(1);
  void* b = arena.allocate(100);
  void* c = arena.allocate(0);
  CHECK(reinterpret_cast<uintptr_t>(a) % Arena::kAlignment == 0);
  CHECK(reinterpret_cast<uintptr_t>(b) % Arena::kAlignment == 0);
  CHECK(reinterpret_cast<uintptr_t>(c) % Arena::kAlignment == 0);
  CHECK(a != b && b != c && a != c);
  MemoryStats s = arena.stats();
  CHECK_EQ(s.allocations, uint64_t{3});
  CHECK_EQ(s.in_use_bytes, size_t{64 + 128 + 64});
  CHECK_EQ(s.peak_bytes, size_t{256});
  CHECK_EQ(s.capacity_bytes, size_t{4096});
  CHECK_EQ(arena.free_bytes(), size_t{4096 - 256});
  // Memory is usable.
  std::memset(b, 0xAB, 100);
  CHECK(arena.release(b));
  CHECK(!arena.release(b));  // double free is refused, not corrupting
  int on_stack = 0;
  CHECK(!arena.release(&on_stack));
  CHECK(!arena.release(static_cast<uint8_t*>(a) + 64));  // not the start of a block
  CHECK(arena.release(a));
  CHECK(arena.release(c));
  s = arena.stats();
  CHECK_EQ(s.in_use_bytes, size_t{0});
  CHECK_EQ(s.peak_bytes, size_t{256});
  CHECK_EQ(s.allocations, uint64_t{3});
  CHECK_EQ(s.largest_free_block, size_t{4096});
}

void first_fit_and_merging() {
  Arena arena(1024, "test");
  void* p[4];
  for (auto& x : p) x = arena.allocate(256);
  void* base = p[0];
  for (int i = 0; i < 4; i++) CHECK_EQ(offset(arena, base, p[i]), size_t(256 * i));
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(1), "largest free block 0 bytes");
  // Free the middle two in either order: they merge into one 512-byte block.
  CHECK(arena.release(p[2]));
  CHECK(arena.release(p[1]));
  CHECK_EQ(arena.stats().largest_free_block, size_t{512});
  void* big = arena.allocate(512);
  CHECK_EQ(offset(arena, base, big), size_t{256});
  CHECK(arena.release(big));
  // First fit: the lowest block that fits.
  void* small = arena.allocate(64);
  CHECK_EQ(offset(arena, base, small), size_t{256});
  CHECK(arena.release(small));
  CHECK(arena.release(p[0]));
  CHECK(arena.release(p[3]));
  CHECK_EQ(arena.stats().largest_free_block, size_t{1024});
  CHECK_EQ(offset(arena, base, arena.allocate(1024)), size_t{0});
}

void refuses_past_capacity() {
  Arena arena(1000, "test");  // usable: 960 (rounded down to the alignment)
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(1001),
               "test: out of device memory: requested 1001 bytes, 0 of 1000 bytes in use, "
               "largest free block 960 bytes");
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(SIZE_MAX), "requested");
  // Fragmentation: enough bytes free in total, but no block large enough.
  void* a = arena.allocate(320);
  void* b = arena.allocate(320);
  void* c = arena.allocate(320);
  CHECK(arena.release(a));
  CHECK(arena.release(c));
  CHECK_THROWS(DeviceOutOfMemoryError, arena.allocate(400),
               "requested 400 bytes, 320 of 1000 bytes in use, largest free block 320 bytes");
  CHECK_EQ(arena.stats().in_use_bytes, size_t{320});  // a refusal changes nothing
  CHECK(arena.release(b));
  CHECK_THROWS(InvalidArgumentError, Arena(10, "tiny"), "at least 64 bytes");
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
  CHECK_EQ(arena.stats().window_peak_bytes, size_t{1088});
  CHECK_EQ(arena.stats().peak_bytes, size_t{2048});
  CHECK(arena.release(a));
  CHECK(arena.release(c));
}

void large_lazy_capacity() {
  // 64 GiB of address space costs nothing until touched.
  Arena arena(size_t{64} << 30, "big");
  void* p = arena.allocate(size_t{1} << 20);
  std::memset(p, 1, size_t{1} << 20);
  CHECK_EQ(arena.stats().committed_bytes, size_t{1} << 20);
  CHECK(arena.release(p));
}

void device_buffers_and_copies(double link_gbps) {
  CpuDevice device({1 << 20, link_gbps, 2});
  CHECK_EQ(device.name(), std::string("cpu"));
  CHECK(device.kind() == DeviceKind::kCpu);
  CHECK_EQ(device.total_bytes(), size_t{1} << 20);
  CHECK_EQ(device.threads(), 2u);
  {
    DeviceBuffer buf = device.alloc(4096);
    CHECK(buf && buf.size() == 4096);
    CHECK_EQ(device.memory_stats().in_use_bytes, size_t{4096});
    std::vector<uint8_t> src(4096);
    std::iota(src.begin(), src.end(), 0);
    Stream& stream = device.copy_stream();
    device.wait(stream.copy_async(buf.data(), src.data(), src.size()));
    CHECK(std::memcmp(buf.data(), src.data(), src.size()) == 0);
    // FIFO: later copies to the same place land last; record() waits for all of them.
    std::vector<std::vector<uint8_t>> layers;
    for (int i = 0; i < 16; i++) layers.emplace_back(4096, static_cast<uint8_t>(i));
    for (auto& layer : layers) stream.copy_async(buf.data(), layer.data(), layer.size());
    EventPtr all = stream.record();
    all->wait();
    CHECK(all->ready());
    CHECK_EQ(static_cast<uint8_t*>(buf.data())[4095], uint8_t{15});
    // Device → host.
    std::vector<uint8_t> back(4096);
    device.wait(stream.copy_async(back.data(), buf.data(), back.size()));
    CHECK_EQ(back[0], uint8_t{15});
    DeviceBuffer moved = std::move(buf);
    CHECK(!buf && moved);
  }
  CHECK_EQ(device.memory_stats().in_use_bytes, size_t{0});  // buffers freed themselves
  CHECK_EQ(device.free_bytes(), size_t{1} << 20);
}

void device_rejects_bad_options() {
  CHECK_THROWS(InvalidArgumentError, CpuDevice({1 << 20, -1.0, 1}), "linkGbps");
  CHECK_THROWS(InvalidArgumentError, CpuDevice({0, 0, 1}), "capacity");
}

void one_job_at_a_time() {
  CpuDevice device({1 << 20, 0, 1});
  {
    DeviceLease lease(device);
    CHECK(device.busy());
    CHECK_THROWS(DeviceBusyError, DeviceLease second(device), "already running a job");
    DeviceLease moved = std::move(lease);
    CHECK(device.busy());
  }
  CHECK(!device.busy());
  DeviceLease again(device);
  CHECK(again);
}

void euler_update() {
  CpuDevice device({1 << 20, 0, 2});
  std::vector<float> z(1000), y(1000);
  for (size_t i = 0; i < z.size(); i++) {
    z[i] = static_cast<float>(i);
    y[i] = static_cast<float>(i % 7);
  }
  device.euler_update(z.data(), y.data(), z.size(), 0.5f);
  bool ok = true;
  for (size_t i = 0; i < z.size(); i++) ok &= z[i] == static_cast<float>(i) - 0.5f * (i % 7);
  CHECK(ok);
}

}  // namespace

int main() {
  return run_all({
      {"alignment_and_counters", alignment_and_counters},
      {"first_fit_and_merging", first_fit_and_merging},
      {"refuses_past_capacity", refuses_past_capacity},
      {"window_peak", window_peak},
      {"large_lazy_capacity", large_lazy_capacity},
      {"device_buffers_and_copies", [] { device_buffers_and_copies(0); }},
      {"device_buffers_and_copies_paced_link", [] { device_buffers_and_copies(50); }},
      {"device_rejects_bad_options", device_rejects_bad_options},
      {"one_job_at_a_time", one_job_at_a_time},
      {"euler_update", euler_update},
  });
}
