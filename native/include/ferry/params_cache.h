#pragma once
// The host params cache: where a model's weights wait in host memory between the disk and the
// device, one buffer per base segment, and the loader that fills it.
//
// Loading. A segment's file ranges are split into chunks (16 MiB by default) that a small pool of
// reader threads (4) reads with pread straight into the segment's buffer — never through JS, never
// through an intermediate copy when the layout allows it. Reads are queued per segment and served
// in queue order, so the segments of a prefetch finish in the order asked for; a segment that a
// caller needs now jumps ahead of everything a background reader merely prefetches. With O_DIRECT
// (DirectIo::kAuto, where the file system supports it) chunks that are not in the page cache are
// read past it: a cold multi-GB model then costs no page-cache copy and does not evict the rest
// of the page cache, while a warm one is still copied from it at memory speed.
//
// Backends (what happens to a segment after use):
//   kCpu    kept in host memory (pinned through the device's host allocator on CUDA) for later
//           steps and jobs; release() is a no-op.
//   kDisk   dropped by release() once no caller holds it, read again at next use; a prefetch
//           reads at most `read_ahead` segments beyond what callers hold, so host memory stays
//           bounded by the plan's slots.
//   kPerJob (the default) each job decides: release() drops (runners call it for disk jobs only),
//           prefetch is unbounded, as with kCpu.
//
// Integrity: with checksums on, each segment's XXH64 (over its tensors' bytes, in layout order;
// padding excluded so a device copy of just the tensors checks the same) is computed when it is
// first loaded; every later load (disk backend re-reads) must give the same value, and verify()
// checks any copy of the segment against it. A mismatch is an IntegrityError naming the model,
// the segment and both values.
//
// Thread-safe: any number of threads may prepare/release/prefetch at once.
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ferry/safetensors.h"

namespace ferry {

class Device;

// Host params buffers are aligned to this: O_DIRECT reads land in them in place.
constexpr size_t kHostParamsAlignment = 4096;

// Where params buffers come from. The cache frees each buffer through the allocator that made it,
// so the allocator may change while buffers from an earlier one are still cached.
class HostAllocator {
 public:
  virtual ~HostAllocator() = default;
  // At least `bytes` bytes aligned to kHostParamsAlignment; throws std::bad_alloc (or a
  // ferry::Error) when it cannot.
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* data, size_t bytes) noexcept = 0;
  virtual const char* name() const = 0;  // "aligned", "device"
};

// Page-aligned memory from the C library (the CPU default).
std::shared_ptr<HostAllocator> aligned_host_allocator();
// Memory from `device`'s host allocator (Device::alloc_host: page-locked on CUDA, so transfers
// from the cache are direct DMA). The allocator holds the device until every buffer it made is
// freed: pinned memory belongs to the device's context.
std::shared_ptr<HostAllocator> device_host_allocator(std::shared_ptr<Device> device);

// File bytes → buffer bytes of one segment.
struct ParamsPiece {
  uint64_t file_offset = 0;
  uint64_t buffer_offset = 0;
  uint64_t bytes = 0;
};

struct ParamsSegmentLayout {
  std::string name;                 // for messages ("blocks.3")
  uint64_t buffer_bytes = 0;        // size of the host buffer; bytes outside the pieces are zero
  std::vector<ParamsPiece> pieces;  // in file order is fastest; any order works
  uint64_t param_bytes() const;     // Σ pieces' bytes
};

enum class DirectIo : uint8_t {
  kOff,   // buffered pread only
  kAuto,  // O_DIRECT for chunks not in the page cache, where the file system takes it (default)
  kOn,    // O_DIRECT for every chunk, where the file system takes it
};

struct LoaderOptions {
  // Map the file and let the page cache be the host params cache: loading a segment populates
  // its pages in the mapping (MADV_POPULATE_READ, in chunks by the reader threads), copies read
  // straight from there, and a warm file costs no copy and no page faults on fresh memory
  // (llama.cpp's default). Off: segments are read into buffers from the allocator (pinned on a
  // GPU). Falls back to buffers where the kernel cannot populate a mapping (before Linux 5.14).
  bool map = false;
  unsigned threads = 4;                       // reader threads (1..64)
  uint64_t chunk_bytes = uint64_t{16} << 20;  // per read; rounded up to 4 KiB (64 KiB..1 GiB)
  DirectIo direct = DirectIo::kAuto;
  // Called on a reader thread as it starts reading a segment (before its buffer is allocated),
  // with no lock held; for tracing and for tests that need to hold a reader still.
  std::function<void(size_t index)> on_read_start;
};

struct LoadStats {
  uint64_t bytes_read = 0;     // params bytes read from the file (re-reads of dropped segments too)
  uint64_t direct_bytes = 0;   // of which read with O_DIRECT
  double read_seconds = 0;     // wall time during which at least one segment read was under way
  uint64_t segment_reads = 0;  // completed segment loads
  uint64_t hits = 0;           // prepare() calls served from host memory
  uint64_t misses = 0;         // prepare() calls that waited for a read
  uint64_t host_bytes = 0;     // host memory the cache holds now
  uint64_t host_peak_bytes = 0;    // most it held since the last take_host_peak()
  bool direct_io = false;          // whether O_DIRECT is available for this file
  bool mapped = false;             // segments are read through the mapping (LoaderOptions::map)
  std::vector<bool> loaded;        // per segment: in host memory now
  std::vector<size_t> queued;      // segments waiting for a reader, in the order they will be read
  std::vector<size_t> load_order;  // segments in the order their loads completed (last 4096)
};

class ParamsCache {
 public:
  // What happens to a segment after use (see the top of this file). Nested, not ferry::, since
  // the runner's request has its own two-valued ParamsBackend (runner.h).
  enum class Backend : uint8_t { kPerJob, kCpu, kDisk };

  // `file` must outlive the cache. `label` (the model path) starts every error message.
  ParamsCache(const ModelFile& file, std::vector<ParamsSegmentLayout> layouts,
              LoaderOptions options = {});
  ~ParamsCache();
  ParamsCache(const ParamsCache&) = delete;
  ParamsCache& operator=(const ParamsCache&) = delete;

  size_t size() const { return layouts_.size(); }
  const ParamsSegmentLayout& layout(size_t index) const { return layouts_.at(index); }

  struct HostParams {
    const uint8_t* data = nullptr;  // the segment's buffer (or the file mapping); valid until
                                    // the matching release()
    uint64_t disk_bytes = 0;        // > 0 when this call waited for a read (its param bytes)
    const ParamsSegmentLayout* layout = nullptr;
    bool mapped = false;  // `data` is the file's mapping: pieces sit at their file offsets
    // Piece k's bytes (a tensor of the segment, in layout order).
    const uint8_t* piece(size_t k) const {
      const ParamsPiece& p = layout->pieces[k];
      return data + (mapped ? p.file_offset : p.buffer_offset);
    }
  };
  // Blocks until segment `index` is in host memory — jumping ahead of any background reading —
  // and holds it for the caller until release(index). InvalidArgumentError for a bad index;
  // the read's ModelFormatError / IoError / IntegrityError if it fails (a failed background read
  // is retried once by the caller itself, so the error it reports is its own).
  HostParams prepare(size_t index);
  // Ends a prepare(). The segment is dropped once nobody holds it when the backend says so
  // (kDisk, kPerJob); kept otherwise. Extra releases are ignored.
  void release(size_t index);
  void release(size_t index, Backend backend);  // this call's backend overrides the cache's
  // Starts reading `order` in the background, in that order (the plan's order), and returns at
  // once; replaces an earlier prefetch's order. Segments already cached or being read are
  // skipped. `cyclic` (disk backend): after the last, start again at the first — the next step
  // needs them again — bounded by read_ahead. InvalidArgumentError for a bad index.
  void prefetch(const std::vector<size_t>& order, bool cyclic = false);
  // Reads every segment not yet in host memory, in parallel, and returns when all are there;
  // rethrows the first failure (in segment order) after every read has ended.
  void load_all();
  // The same for segments first..last only (InvalidArgumentError for a bad range).
  void load(size_t first, size_t last);
  // Throws away the background prefetch order (reads already started finish).
  void cancel_prefetch();

  bool cached(size_t index) const;
  uint64_t host_bytes() const;
  // The most host memory the cache held since the last call (or since it was made), and starts a
  // new window: the runner samples it once per step.
  uint64_t take_host_peak();
  LoadStats stats() const;

  // A segment read that finished without any prepare() waiting for it: a background prefetch's
  // or load_all()'s, i.e. disk time spent ahead of use, which no prepare_params shows.
  struct AheadRead {
    size_t index = 0;
    uint64_t bytes = 0;
    double start_us = 0;  // wall clock (wall_clock_us()): the first worker took it up
    double end_us = 0;
  };
  // The reads ahead that finished since the last call, oldest first (the last 4096 are kept).
  std::vector<AheadRead> take_ahead_reads();

  void set_backend(Backend backend);
  Backend backend() const;
  // Disk backend: prefetched segments that no caller holds yet, at most (≥ 1). Default 1.
  void set_read_ahead(size_t segments);
  // Allocator for buffers allocated from now on (default: aligned_host_allocator()).
  void set_allocator(std::shared_ptr<HostAllocator> allocator);
  // Checksums at load (see above). Turning them on later checksums segments already cached at
  // that moment from their host copies.
  void set_checksums(bool on);
  bool checksums() const;
  // The XXH64 of segment `index` recorded at its first load; InvalidArgumentError if none yet.
  uint64_t checksum(size_t index) const;
  // Checks a copy of segment `index` laid out like its buffer (only the pieces are read) against
  // the recorded checksum: IntegrityError on a mismatch, InvalidArgumentError when no checksum
  // has been recorded (checksums off when it was loaded, or never loaded).
  void verify(size_t index, const uint8_t* data) const;

 private:
  struct Entry;
  struct Job;
  struct Chunk;
  struct Worker;

  std::shared_ptr<Job> enqueue_locked(size_t index, bool priority, bool prefetched);
  void bump_locked(const std::shared_ptr<Job>& job);
  void feed_prefetch_locked();
  void start_workers_locked();
  void worker_loop();
  uint64_t read_chunk(const Job& job, const Chunk& chunk, Worker& worker);  // → bytes read direct
  void finish_job_locked(std::unique_lock<std::mutex>& lock, const std::shared_ptr<Job>& job);
  void wait_job(std::unique_lock<std::mutex>& lock, const std::shared_ptr<Job>& job);
  void check_index(size_t index, const char* what) const;
  // XXH64 of segment `index`'s pieces in `data`, laid out like its buffer (or, `mapped`, like
  // the file).
  uint64_t hash_pieces(size_t index, const uint8_t* data, bool mapped = false) const;
  // The page-aligned file ranges a mapped segment's pieces cover.
  void drop_mapped_pages(size_t index) const;
  void track_busy_locked(int delta);

  const ModelFile& file_;
  const std::string label_;
  const std::vector<ParamsSegmentLayout> layouts_;
  LoaderOptions options_;
  int direct_fd_ = -1;
  // Read-only mapping of the file: the params source when mapped_, else for mincore() only.
  const uint8_t* map_ = nullptr;
  bool mapped_ = false;
  size_t map_bytes_ = 0;

  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // workers: a chunk to read, or stop
  std::condition_variable done_cv_;  // waiters: a job finished, or a buffer was dropped
  std::vector<std::unique_ptr<Entry>> entries_;
  // Jobs with chunks not yet handed out (or a buffer to allocate), in read order: prepare()'s
  // (priority) jobs first, in the order asked for, then background ones.
  std::deque<std::shared_ptr<Job>> queue_;
  std::vector<std::thread> threads_;
  bool stopping_ = false;
  Backend backend_ = Backend::kPerJob;
  size_t read_ahead_ = 1;
  bool checksums_ = false;
  std::shared_ptr<HostAllocator> allocator_;

  std::vector<size_t> prefetch_order_;
  size_t prefetch_next_ = 0;
  bool prefetch_cyclic_ = false;

  uint64_t host_bytes_ = 0;
  uint64_t host_peak_bytes_ = 0;
  LoadStats stats_;
  std::deque<AheadRead> ahead_reads_;
  int busy_jobs_ = 0;
  double busy_since_ = 0;
};

const char* params_backend_name(ParamsCache::Backend backend);  // "per-job", "cpu", "disk"

}  // namespace ferry
