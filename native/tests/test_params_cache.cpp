// The host params cache and its loader: what the cpu / disk / per-job backends keep, background
// reading in plan order with a prepare jumping the queue, checksums catching a file that changed
// under a disk-backend job, the disk backend keeping host memory within its read-ahead bound for
// a model larger than that bound, O_DIRECT reads (in place and through the bounce buffer) giving
// the file's bytes, the file's mapping as the cache (LoaderOptions::map), a device's host
// allocator, failures, many threads at once, and the XXH64 checksum itself.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "ferry/cpu_device.h"
#include "ferry/errors.h"
#include "ferry/model.h"
#include "ferry/params_cache.h"
#include "ferry/runner.h"
#include "ferry/xxhash.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;
using Backend = Model::Backend;

namespace {

// Segment `index` of `model` as prepared matches the file, tensor by tensor.
bool matches_file(const Model& model, size_t index, const uint8_t* data) {
  for (const auto& t : model.base_segments()[index].tensors) {
    std::vector<uint8_t> expected(t.nbytes);
    model.file().read(t.file_offset, expected.data(), expected.size());
    if (std::memcmp(data + t.packed_offset, expected.data(), t.nbytes) != 0) return false;
  }
  return true;
}

uint64_t largest_packed(const Model& model) {
  uint64_t n = 0;
  for (const auto& s : model.base_segments()) n = std::max(n, s.packed_bytes);
  return n;
}

// Waits (no timing assertion: a generous bound only turns a hang into a failure) until `done`.
template <typename F>
bool eventually(F done) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!done()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

std::string write_model(TempDir& dir, const std::string& name, const DitSpec& spec) {
  const std::string path = dir.file(name);
  write_dit(path, spec);
  return path;
}

// XXH64, the checksum of segments and transfers: the reference implementation's values, the
// streaming form equal to the one-shot one at any split, and sensitivity to any change.
void xxhash_reference_values() {
  CHECK_EQ(xxhash64("", 0), uint64_t{0xEF46DB3751D8E999ull});
  CHECK_EQ(xxhash64("abc", 3), uint64_t{0x44BC2CF5AD770999ull});
  const std::string spam = "Nobody inspects the spammish repetition";
  CHECK_EQ(xxhash64(spam.data(), spam.size()), uint64_t{0xFBCEA83C8A378BF1ull});
  CHECK_EQ(xxhash64("xxhash", 6, 20141025), uint64_t{0xB559B98D844E0635ull});
  std::vector<uint8_t> a(1001);
  for (size_t i = 0; i < a.size(); i++) a[i] = static_cast<uint8_t>(i * 7 + 3);
  const uint64_t h = xxhash64(a.data(), a.size());
  for (size_t split :
       {size_t{0}, size_t{1}, size_t{31}, size_t{32}, size_t{33}, size_t{500}, size_t{1001}}) {
    Xxhash64 stream;
    stream.update(a.data(), split);
    stream.update(a.data() + split, a.size() - split);
    CHECK_EQ(stream.digest(), h);
  }
  Xxhash64 bytewise(0);
  for (uint8_t byte : a) bytewise.update(&byte, 1);
  CHECK_EQ(bytewise.digest(), h);
  auto b = a;
  b[500] ^= 1;
  CHECK(xxhash64(b.data(), b.size()) != h);
  b = a;
  std::swap_ranges(b.begin(), b.begin() + 8, b.begin() + 8);  // positions count
  CHECK(xxhash64(b.data(), b.size()) != h);
  b = a;
  b.push_back(0);  // so does a trailing zero byte
  CHECK(xxhash64(b.data(), b.size()) != h);
  CHECK(xxhash64(a.data(), a.size(), 1) != h);  // and the seed
}

void backends_keep_or_drop() {
  TempDir dir;
  const std::string path = write_model(dir, "m.safetensors", DitSpec{});
  auto model = Model::open(path);
  const auto& segs = model->base_segments();
  CHECK(model->params_backend() == Backend::kPerJob);

  // cpu: kept after release, served from memory next time.
  model->set_params_backend(Backend::kCpu);
  auto p = model->prepare_params(1);
  CHECK_EQ(p.disk_bytes, segs[1].param_bytes);
  CHECK(matches_file(*model, 1, p.data));
  model->release_params(1);
  CHECK(model->params_cached(1));
  CHECK_EQ(model->host_cache_bytes(), segs[1].packed_bytes);
  CHECK_EQ(model->prepare_params(1).disk_bytes, uint64_t{0});
  model->release_params(1);
  model->release_params(1);  // extra releases are ignored

  // disk: dropped once the last holder releases it.
  model->set_params_backend(Backend::kDisk);
  auto a = model->prepare_params(2);
  auto b = model->prepare_params(2);
  CHECK(a.data == b.data);
  model->release_params(2);
  CHECK(model->params_cached(2));  // still held by the second caller
  model->release_params(2);
  CHECK(!model->params_cached(2));
  CHECK_EQ(model->host_cache_bytes(), segs[1].packed_bytes);  // segment 1 (cpu-time) remains

  // per-job (the default): the call decides; release(index) drops, as runners expect of a disk
  // job; an explicit cpu release keeps.
  model->set_params_backend(Backend::kPerJob);
  model->prepare_params(3);
  model->release_params(3, Backend::kCpu);
  CHECK(model->params_cached(3));
  model->prepare_params(3);
  model->release_params(3);
  CHECK(!model->params_cached(3));

  const LoadStats s = model->load_stats();
  CHECK_EQ(s.segment_reads, uint64_t{3});
  CHECK_EQ(s.bytes_read, segs[1].param_bytes * 2 + segs[3].param_bytes);
  CHECK(s.loaded[1] && !s.loaded[2] && !s.loaded[3]);
  CHECK_EQ(s.hits, uint64_t{3});  // 1 again, 2 by its second holder, 3 kept by the cpu release
  CHECK_EQ(s.misses, uint64_t{3});

  CHECK_THROWS(InvalidArgumentError, model->prepare_params(99), "out of range");
  CHECK_THROWS(InvalidArgumentError, model->prefetch({0, 99}), "out of range");
}

// One reader thread, held inside segment 0 by the hook while a prepare of segment 3 comes in:
// segment 3 must be read next, then the rest of the prefetch in its order.
void background_order_and_priority_bump() {
  TempDir dir;
  DitSpec spec;
  spec.blocks = 3;
  const std::string path = write_model(dir, "m.safetensors", spec);
  std::mutex mu;
  std::condition_variable cv;
  bool in_zero = false, go = false;
  LoaderOptions loader;
  loader.threads = 1;
  loader.on_read_start = [&](size_t index) {
    if (index != 0) return;
    std::unique_lock<std::mutex> lock(mu);
    in_zero = true;
    cv.notify_all();
    cv.wait(lock, [&] { return go; });
  };
  auto model = std::make_shared<Model>(ModelFile::open(path), loader);
  model->set_params_backend(Backend::kCpu);
  model->prefetch({0, 1, 2, 3, 4});
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return in_zero; });
  }
  CHECK(model->load_stats().queued == (std::vector<size_t>{1, 2, 3, 4}));
  std::thread needs_three([&] {
    const auto p = model->prepare_params(3);
    CHECK(p.disk_bytes > 0);  // it waited for the read
    CHECK(matches_file(*model, 3, p.data));
  });
  CHECK(eventually([&] {
    const auto q = model->load_stats().queued;
    return !q.empty() && q.front() == 3;
  }));
  CHECK(model->load_stats().queued == (std::vector<size_t>{3, 1, 2, 4}));
  {
    std::lock_guard<std::mutex> lock(mu);
    go = true;
  }
  cv.notify_all();
  needs_three.join();
  CHECK(eventually([&] { return model->load_stats().segment_reads == 5; }));
  CHECK(model->load_stats().load_order == (std::vector<size_t>{3, 0, 1, 2, 4}));
  // Reads ahead of use are reported for the trace; segment 3's is not (its prepare_params waited
  // for it and shows that time itself).
  const auto ahead = model->params_cache().take_ahead_reads();
  CHECK_EQ(ahead.size(), size_t{4});
  const std::vector<size_t> ahead_order = {0, 1, 2, 4};
  for (size_t k = 0; k < ahead.size(); k++) {
    CHECK_EQ(ahead[k].index, ahead_order[k]);
    CHECK_EQ(ahead[k].bytes, model->base_segments()[ahead_order[k]].param_bytes);
    CHECK(ahead[k].start_us > 0 && ahead[k].start_us <= ahead[k].end_us);
  }
  CHECK(model->params_cache().take_ahead_reads().empty());
  for (size_t i = 0; i < 5; i++) CHECK(matches_file(*model, i, model->prepare_params(i).data));
  CHECK(model->params_cache().take_ahead_reads().empty());  // no read: all were cached
  CHECK_EQ(model->load_stats().hits, uint64_t{5});
}

// Segments complete in the order asked for, even when each is many chunks; with several
// threads every byte still lands where it belongs.
void prefetch_order_with_chunks() {
  TempDir dir;
  DitSpec spec;
  spec.hidden = 128;  // blocks of ~800 KB: a dozen 64 KiB chunks each
  spec.blocks = 4;
  const std::string path = write_model(dir, "m.safetensors", spec);
  LoaderOptions one;
  one.threads = 1;
  one.chunk_bytes = 64 << 10;
  one.direct = DirectIo::kOff;
  auto model = std::make_shared<Model>(ModelFile::open(path), one);
  const std::vector<size_t> order = {5, 3, 1, 0, 2, 4};
  model->prefetch(order);
  CHECK(eventually([&] { return model->load_stats().segment_reads == 6; }));
  CHECK(model->load_stats().load_order == order);

  LoaderOptions four;
  four.threads = 4;
  four.chunk_bytes = 64 << 10;
  auto parallel = std::make_shared<Model>(ModelFile::open(path), four);
  parallel->load_all();
  for (size_t i = 0; i < 6; i++) {
    CHECK(parallel->params_cached(i));
    CHECK(matches_file(*parallel, i, parallel->prepare_params(i).data));
  }
  const LoadStats s = parallel->load_stats();
  uint64_t total = 0;
  for (const auto& seg : parallel->base_segments()) total += seg.param_bytes;
  CHECK_EQ(s.bytes_read, total);
  CHECK(s.read_seconds > 0);
}

void checksums_catch_changes() {
  TempDir dir;
  const std::string path = write_model(dir, "m.safetensors", DitSpec{});
  Model::Options options;
  options.backend = Backend::kDisk;
  options.verify = true;
  auto model = Model::open(path, options);
  CHECK_THROWS(InvalidArgumentError, model->params_checksum(2), "no checksum yet");
  const auto p = model->prepare_params(2);
  const uint64_t sum = model->params_checksum(2);
  model->verify_params(2, p.data);  // the host copy itself

  // A copy holding only the tensors (garbage in the padding, as a device copy has) verifies; a
  // flipped byte in a tensor does not.
  const auto& seg = model->base_segments()[2];
  std::vector<uint8_t> copy(seg.packed_bytes, 0xAB);
  for (const auto& t : seg.tensors) {
    std::memcpy(copy.data() + t.packed_offset, p.data + t.packed_offset, t.nbytes);
  }
  model->verify_params(2, copy.data());
  copy[seg.tensors[3].packed_offset + 5] ^= 0x10;
  CHECK_THROWS(IntegrityError, model->verify_params(2, copy.data()),
               "base segment blocks.1 (" + std::to_string(seg.param_bytes) + " bytes)");
  CHECK_THROWS(IntegrityError, model->verify_params(2, copy.data()), "XXH64 0x");
  model->release_params(2);  // disk: dropped
  CHECK(!model->params_cached(2));

  // The file changes under the model (same size): the re-read no longer matches its first read.
  {
    const int fd = ::open(path.c_str(), O_WRONLY);
    const char flip = 0x55;
    CHECK(::pwrite(fd, &flip, 1, static_cast<off_t>(seg.tensors[1].file_offset + 7)) == 1);
    ::close(fd);
  }
  CHECK_THROWS(IntegrityError, model->prepare_params(2),
               path + ": base segment blocks.1 (" + std::to_string(seg.param_bytes) +
                   " bytes) read again from the file does not match its first read");
  CHECK(!model->params_cached(2));
  CHECK_EQ(model->params_checksum(2), sum);  // the first read stays the reference

  // Checksums turned on after loading: taken from the host copies then.
  auto late = Model::open(path);
  late->prepare_params(0);
  late->set_verify(true);
  late->params_checksum(0);
  CHECK_THROWS(InvalidArgumentError, late->params_checksum(1), "no checksum yet");
}

// A model larger than what the disk backend may hold runs step after step with host memory
// within (held + read-ahead) segments.
void disk_backend_memory_bound() {
  TempDir dir;
  DitSpec spec;
  spec.hidden = 64;
  spec.blocks = 12;
  const std::string path = write_model(dir, "m.safetensors", spec);
  Model::Options options;
  options.backend = Backend::kDisk;
  options.read_ahead = 2;
  options.load = Model::Load::kBackground;
  options.loader.threads = 2;
  auto model = Model::open(path, options);
  const size_t n = model->base_segments().size();
  uint64_t total = 0;
  for (const auto& s : model->base_segments()) total += s.packed_bytes;
  const uint64_t bound = 3 * largest_packed(*model);
  CHECK(total > 4 * bound);
  uint64_t peak = 0;
  for (int step = 0; step < 3; step++) {
    for (size_t b = 0; b < n; b++) {
      const auto p = model->prepare_params(b);
      CHECK(matches_file(*model, b, p.data));
      peak = std::max(peak, model->host_cache_bytes());
      model->release_params(b);
      peak = std::max(peak, model->host_cache_bytes());
    }
  }
  CHECK(peak <= bound);
  CHECK(model->host_cache_bytes() <= 2 * largest_packed(*model));
  // The reader ran ahead: most prepares found their segment already read.
  const LoadStats s = model->load_stats();
  CHECK_EQ(s.hits + s.misses, uint64_t{3 * n});
  CHECK(s.segment_reads >= 3 * n);
  std::printf("disk backend: peak host %llu bytes (bound %llu, model %llu), %llu hits / %llu\n",
              static_cast<unsigned long long>(peak), static_cast<unsigned long long>(bound),
              static_cast<unsigned long long>(total), static_cast<unsigned long long>(s.hits),
              static_cast<unsigned long long>(3 * n));
}

// O_DIRECT: in place (a GGUF file aligned to 4 KiB, big tensors packed page-congruent) and
// through the bounce buffer (safetensors offsets that are not), the same bytes as the file.
void direct_reads() {
  TempDir dir;
  DitSpec spec;
  spec.hidden = 512;  // fc1 and fc2 are 4 MiB: big enough to be packed page-congruent
  spec.heads = 8;
  spec.channels = 16;
  spec.blocks = 1;
  const std::string st = write_model(dir, "big.safetensors", spec);
  const std::string gg = dir.file("big.gguf");
  write_file(gg, dit_gguf_bytes(spec, "f32", /*alignment=*/4096));
  for (const std::string& path : {gg, st}) {
    for (DirectIo mode : {DirectIo::kOn, DirectIo::kAuto, DirectIo::kOff}) {
      LoaderOptions loader;
      loader.direct = mode;
      loader.chunk_bytes = 1 << 20;
      auto model = std::make_shared<Model>(ModelFile::open(path), loader);
      if (mode == DirectIo::kAuto) {
        // Evict the file from the page cache so the loader sees it cold.
        const int fd = ::open(path.c_str(), O_RDONLY);
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        ::close(fd);
      }
      model->load_all();
      for (size_t i = 0; i < model->base_segments().size(); i++) {
        CHECK(matches_file(*model, i, model->prepare_params(i).data));
      }
      const LoadStats s = model->load_stats();
      if (mode == DirectIo::kOff) CHECK_EQ(s.direct_bytes, uint64_t{0});
      if (mode == DirectIo::kOn && s.direct_io) CHECK(s.direct_bytes > s.bytes_read / 2);
      std::printf("%s direct=%d: O_DIRECT %s, %llu of %llu bytes direct\n",
                  path == gg ? "gguf" : "safetensors", static_cast<int>(mode),
                  s.direct_io ? "available" : "unavailable",
                  static_cast<unsigned long long>(s.direct_bytes),
                  static_cast<unsigned long long>(s.bytes_read));
    }
  }
  // Big tensors at 4 KiB-aligned file offsets are packed congruent with them.
  auto model = Model::open(gg);
  int congruent = 0;
  for (const auto& t : model->base_segments()[1].tensors) {
    if (t.nbytes >= kPackCongruentMinBytes) {
      CHECK_EQ(t.packed_offset % kHostParamsAlignment, t.file_offset % kHostParamsAlignment);
      congruent++;
    }
    CHECK_EQ(t.packed_offset % kPackAlignment, uint64_t{0});
  }
  CHECK_EQ(congruent, 2);
}

// LoaderOptions::map: the file's mapping is the cache. A prepared segment's pieces are the
// file's bytes at their file offsets, the host memory counted is the params (no packing), the
// disk backend drops the pages again, checksums hold, and a job gives the buffered cache's bits.
void mapped_params() {
  TempDir dir;
  const std::string path = write_model(dir, "m.safetensors", DitSpec{});
  LoaderOptions loader;
  loader.map = true;
  auto model = std::make_shared<Model>(ModelFile::open(path), loader);
  if (!model->load_stats().mapped) {
    std::fprintf(stderr, "skipping mapped_params: the kernel cannot populate a mapping\n");
    return;
  }
  model->set_verify(true);
  const auto& seg = model->base_segments()[2];
  const auto p = model->prepare_params(2);
  CHECK(p.mapped);
  CHECK_EQ(p.disk_bytes, seg.param_bytes);
  CHECK(p.layout != nullptr && p.layout->pieces.size() == seg.tensors.size());
  for (size_t k = 0; k < seg.tensors.size(); k++) {
    const SegmentTensor& t = seg.tensors[k];
    std::vector<uint8_t> expected(t.nbytes);
    model->file().read(t.file_offset, expected.data(), expected.size());
    CHECK(std::memcmp(p.piece(k), expected.data(), t.nbytes) == 0);
    CHECK(p.piece(k) == p.data + t.file_offset);
  }
  CHECK_EQ(model->host_cache_bytes(), seg.param_bytes);
  // A packed copy of it verifies against the checksum taken from the mapping.
  std::vector<uint8_t> packed(seg.packed_bytes, 0);
  for (size_t k = 0; k < seg.tensors.size(); k++) {
    std::memcpy(packed.data() + seg.tensors[k].packed_offset, p.piece(k), seg.tensors[k].nbytes);
  }
  model->verify_params(2, packed.data());
  model->release_params(2, Model::Backend::kDisk);
  CHECK(!model->params_cached(2));
  CHECK_EQ(model->host_cache_bytes(), uint64_t{0});
  // Read again (the disk backend's next step): the same checksum.
  CHECK(model->prepare_params(2).disk_bytes > 0);
  model->release_params(2, Model::Backend::kDisk);

  // The same job through the mapping and through buffers: the same bits, verified copies.
  auto buffered = Model::open(path);
  for (Execution e : {Execution::kSerial, Execution::kPooled}) {
    RunRequest r;
    r.job.batch = 2;
    r.job.tokens = 5;
    r.steps = 2;
    r.segments = {{0, 1, true}, {2, 2, false}, {3, 4, false}};
    r.execution = e;
    r.slots = e == Execution::kPooled ? 2 : 0;
    r.verify = true;
    CpuDevice device({size_t{8} << 20, 0, 1});
    RunOutput a, b;
    {
      DeviceLease lease(device);
      a = run_job(lease, *model, r, nullptr, nullptr);
    }
    device.residency().clear();
    {
      DeviceLease lease(device);
      b = run_job(lease, *buffered, r, nullptr, nullptr);
    }
    CHECK(a.output == b.output);
  }

  // A file that shrank before its pages were read: a clean error, not a SIGBUS.
  auto shrinking = std::make_shared<Model>(ModelFile::open(path), loader);
  CHECK(truncate(path.c_str(),
                 static_cast<off_t>(shrinking->base_segments()[3].tensors[0].file_offset)) == 0);
  bool refused = false;
  try {
    shrinking->prepare_params(4);
  } catch (const Error& e) {
    refused = true;
    CHECK(std::string(e.what()).find(path) != std::string::npos);
  }
  CHECK(refused);
}

void device_host_allocator_is_used() {
  TempDir dir;
  const std::string path = write_model(dir, "m.safetensors", DitSpec{});
  CpuDeviceOptions o;
  o.capacity_bytes = 1 << 20;
  auto device = std::make_shared<CpuDevice>(o);
  auto model = Model::open(path);
  model->set_host_allocator(device_host_allocator(device));
  const auto p = model->prepare_params(1);
  CHECK_EQ(reinterpret_cast<uintptr_t>(p.data) % kHostParamsAlignment, uintptr_t{0});
  CHECK(matches_file(*model, 1, p.data));
  device.reset();  // the allocator keeps the device while its buffers live
  model->release_params(1);
  CHECK(!model->params_cached(1));
  model->set_host_allocator(nullptr);
  CHECK(matches_file(*model, 1, model->prepare_params(1).data));
}

void failures_are_reported_and_retried() {
  TempDir dir;
  const std::string path = write_model(dir, "m.safetensors", DitSpec{});
  auto model = Model::open(path);
  const uint64_t cut = model->base_segments()[3].tensors[2].file_offset;
  CHECK(truncate(path.c_str(), static_cast<off_t>(cut)) == 0);
  CHECK_THROWS(ModelFormatError, model->load_all(), "truncated");
  CHECK(model->params_cached(0) && model->params_cached(1) && model->params_cached(2));
  CHECK(!model->params_cached(3) && !model->params_cached(4));
  // A failed background read is retried by the caller, whose own attempt reports the error.
  model->prefetch({3, 4});
  CHECK_THROWS(ModelFormatError, model->prepare_params(4), "truncated");
  CHECK(eventually([&] { return model->load_stats().queued.empty(); }));
  uint64_t held = 0;
  for (size_t i = 0; i < 3; i++) held += model->base_segments()[i].packed_bytes;
  CHECK(eventually([&] { return model->host_cache_bytes() == held; }));
}

// Many threads preparing, checking and releasing segments at random under the disk backend with
// a cyclic background reader.
void many_threads() {
  TempDir dir;
  DitSpec spec;
  spec.blocks = 8;
  const std::string path = write_model(dir, "m.safetensors", spec);
  Model::Options options;
  options.backend = Backend::kDisk;
  options.read_ahead = 3;
  options.load = Model::Load::kBackground;
  options.verify = true;
  options.loader.chunk_bytes = 64 << 10;
  auto model = Model::open(path, options);
  const size_t n = model->base_segments().size();
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 300; i++) {
        const size_t b = rng() % n;
        const auto p = model->prepare_params(b);
        if (!matches_file(*model, b, p.data)) bad++;
        model->verify_params(b, p.data);
        model->release_params(b);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK_EQ(bad.load(), 0);
  // Nothing held: at most the read-ahead window stays.
  CHECK(model->host_cache_bytes() <= 3 * largest_packed(*model));
  model->cancel_prefetch();
}

}  // namespace

int main() {
  return run_all({
      {"xxhash_reference_values", xxhash_reference_values},
      {"backends_keep_or_drop", backends_keep_or_drop},
      {"background_order_and_priority_bump", background_order_and_priority_bump},
      {"prefetch_order_with_chunks", prefetch_order_with_chunks},
      {"checksums_catch_changes", checksums_catch_changes},
      {"disk_backend_memory_bound", disk_backend_memory_bound},
      {"direct_reads", direct_reads},
      {"mapped_params", mapped_params},
      {"device_host_allocator_is_used", device_host_allocator_is_used},
      {"failures_are_reported_and_retried", failures_are_reported_and_retried},
      {"many_threads", many_threads},
  });
}
