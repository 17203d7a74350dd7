// The host params cache and its loader (see params_cache.h).
//
// One mutex guards the cache's state; reads, allocation, hashing and freeing happen with it
// released. A segment load is a Job: its file ranges cut into chunks at multiples of the chunk
// size (so O_DIRECT reads stay aligned), handed out to the reader threads in queue order. The
// queue holds prepare()'s jobs first (in the order they were asked for), then background ones.
#include "ferry/params_cache.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include "ferry/device.h"
#include "ferry/errors.h"
#include "ferry/events.h"
#include "ferry/xxhash.h"

namespace ferry {

namespace {

constexpr uint64_t kPage = kHostParamsAlignment;
#if defined(MADV_POPULATE_READ)
constexpr int kMadvPopulateRead = MADV_POPULATE_READ;
#else
constexpr int kMadvPopulateRead = 22;  // Linux 5.14's value, for older headers
#endif
// Chunks smaller than this are read buffered even with O_DIRECT: a small direct read gets no
// read-ahead and costs a device round trip, and these are biases and norms.
constexpr uint64_t kDirectMinBytes = uint64_t{64} << 10;

uint64_t align_down(uint64_t n, uint64_t a) { return n / a * a; }
uint64_t align_up_to(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016" PRIx64, v);
  return buf;
}

class AlignedAllocator final : public HostAllocator {
 public:
  void* allocate(size_t bytes) override {
    void* p = nullptr;
    if (posix_memalign(&p, kHostParamsAlignment, std::max<size_t>(bytes, 1)) != 0) {
      throw std::bad_alloc();
    }
    return p;
  }
  void deallocate(void* data, size_t) noexcept override { std::free(data); }
  const char* name() const override { return "aligned"; }
};

// Device::alloc_host promises 64-byte alignment (page alignment on CUDA); the cache wants pages,
// so each buffer is over-allocated by a page and the HostBuffer kept by its aligned address.
class DeviceAllocator final : public HostAllocator {
 public:
  explicit DeviceAllocator(std::shared_ptr<Device> device) : device_(std::move(device)) {}
  void* allocate(size_t bytes) override {
    HostBuffer buffer = device_->alloc_host(std::max<size_t>(bytes, 1) + kHostParamsAlignment);
    auto* aligned = reinterpret_cast<uint8_t*>(
        align_up_to(reinterpret_cast<uintptr_t>(buffer.data()), kHostParamsAlignment));
    std::lock_guard<std::mutex> lock(mu_);
    buffers_.push_back({aligned, std::move(buffer)});
    return aligned;
  }
  void deallocate(void* data, size_t) noexcept override {
    HostBuffer freed;  // released after the lock
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = buffers_.begin(); it != buffers_.end(); ++it) {
      if (it->aligned == data) {
        freed = std::move(it->buffer);
        buffers_.erase(it);
        break;
      }
    }
  }
  const char* name() const override { return "device"; }

 private:
  struct Held {
    void* aligned;
    HostBuffer buffer;
  };
  std::shared_ptr<Device> device_;
  std::mutex mu_;
  std::vector<Held> buffers_;  // one per cached segment: short
};

// A buffer taken out of the cache, freed when this goes — after the cache's lock is released.
struct Freed {
  std::shared_ptr<HostAllocator> allocator;
  uint8_t* data = nullptr;
  size_t bytes = 0;
  Freed() = default;
  Freed(const Freed&) = delete;
  Freed& operator=(const Freed&) = delete;
  ~Freed() { reset(); }
  void reset() noexcept {
    if (data && allocator) allocator->deallocate(data, bytes);
    data = nullptr;
  }
};

}  // namespace

std::shared_ptr<HostAllocator> aligned_host_allocator() {
  static const std::shared_ptr<HostAllocator> instance = std::make_shared<AlignedAllocator>();
  return instance;
}

std::shared_ptr<HostAllocator> device_host_allocator(std::shared_ptr<Device> device) {
  if (!device) throw InvalidArgumentError("device_host_allocator: no device");
  return std::make_shared<DeviceAllocator>(std::move(device));
}

uint64_t ParamsSegmentLayout::param_bytes() const {
  uint64_t n = 0;
  for (const auto& p : pieces) n += p.bytes;
  return n;
}

const char* params_backend_name(ParamsCache::Backend backend) {
  switch (backend) {
    case ParamsCache::Backend::kPerJob:
      return "per-job";
    case ParamsCache::Backend::kCpu:
      return "cpu";
    case ParamsCache::Backend::kDisk:
      return "disk";
  }
  return "?";
}

struct ParamsCache::Chunk {
  uint64_t file_offset;
  uint64_t buffer_offset;
  uint64_t bytes;
};

struct ParamsCache::Job {
  size_t index = 0;
  std::vector<Chunk> chunks;  // in file order
  size_t next = 0;            // next chunk to hand out
  size_t in_flight = 0;
  bool queued = false;  // in queue_ (chunks left to hand out, or the buffer still to allocate)
  bool priority = false;
  bool prefetched = false;
  bool allocating = false;
  std::shared_ptr<HostAllocator> allocator;
  uint8_t* data = nullptr;
  size_t alloc_bytes = 0;
  uint64_t direct_bytes = 0;
  std::exception_ptr error;
  bool awaited = false;    // a prepare() waits for it (its time shows as that prepare_params)
  double started_us = 0;   // when the first worker took it up (wall clock)
  bool finishing = false;  // a worker is finishing it (checksum, handing the buffer over)
  bool finished = false;   // the entry is ready, or empty again after a failure
};

struct ParamsCache::Entry {
  enum class State : uint8_t { kEmpty, kLoading, kReady };
  State state = State::kEmpty;
  uint8_t* data = nullptr;
  size_t alloc_bytes = 0;
  std::shared_ptr<HostAllocator> allocator;
  int users = 0;           // prepare() calls not yet released
  bool unclaimed = false;  // loaded by a prefetch and not prepared since
  bool has_checksum = false;
  uint64_t checksum = 0;
  std::shared_ptr<Job> job;  // while loading
};

// Per reader thread: a page-aligned bounce buffer for O_DIRECT reads whose destination is not
// page-congruent with the file, and the mincore() vector.
struct ParamsCache::Worker {
  uint8_t* bounce = nullptr;
  size_t bounce_bytes = 0;
  std::vector<unsigned char> pages;
  ~Worker() { std::free(bounce); }
  uint8_t* bounce_for(size_t bytes) {
    if (bytes > bounce_bytes) {
      std::free(bounce);
      bounce = nullptr;
      bounce_bytes = 0;
      void* p = nullptr;
      if (posix_memalign(&p, kPage, bytes) != 0) throw std::bad_alloc();
      bounce = static_cast<uint8_t*>(p);
      bounce_bytes = bytes;
    }
    return bounce;
  }
};

ParamsCache::ParamsCache(const ModelFile& file, std::vector<ParamsSegmentLayout> layouts,
                         LoaderOptions options)
    : file_(file), label_(file.path()), layouts_(std::move(layouts)), options_(options) {
  if (options_.threads < 1 || options_.threads > 64) {
    throw InvalidArgumentError("params cache: reader threads must be 1 to 64 (got " +
                               std::to_string(options_.threads) + ")");
  }
  if (options_.chunk_bytes < (uint64_t{64} << 10) || options_.chunk_bytes > (uint64_t{1} << 30)) {
    throw InvalidArgumentError("params cache: chunk bytes must be 64 KiB to 1 GiB (got " +
                               std::to_string(options_.chunk_bytes) + ")");
  }
  options_.chunk_bytes = align_up_to(options_.chunk_bytes, kPage);
  for (const auto& layout : layouts_) {
    for (const auto& p : layout.pieces) {
      if (p.buffer_offset > layout.buffer_bytes ||
          p.bytes > layout.buffer_bytes - p.buffer_offset || p.file_offset > file.file_bytes() ||
          p.bytes > file.file_bytes() - p.file_offset) {
        throw InvalidArgumentError(label_ + ": params layout of " + layout.name +
                                   " has a piece outside its buffer or the file");
      }
    }
  }
  for (size_t i = 0; i < layouts_.size(); i++) entries_.push_back(std::make_unique<Entry>());
  allocator_ = aligned_host_allocator();
  stats_.loaded.assign(layouts_.size(), false);

  if (options_.direct != DirectIo::kOff) {
    // A second descriptor with O_DIRECT, on the same inode (the path may have been replaced since
    // the model was opened: then no direct reads, rather than reads of another file).
    const int fd = ::open(file.path().c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    struct stat a, b;
    if (fd >= 0 && fstat(fd, &a) == 0 && fstat(file.fd(), &b) == 0 && a.st_dev == b.st_dev &&
        a.st_ino == b.st_ino) {
      direct_fd_ = fd;
    } else if (fd >= 0) {
      ::close(fd);
    }
  }
  const bool want_map = options_.map || (direct_fd_ >= 0 && options_.direct == DirectIo::kAuto);
  if (want_map && file.file_bytes() > 0) {
    void* m = ::mmap(nullptr, file.file_bytes(), PROT_READ, MAP_SHARED, file.fd(), 0);
    if (m != MAP_FAILED) {
      map_ = static_cast<const uint8_t*>(m);
      map_bytes_ = file.file_bytes();
    }
  }
  // The mapping as the params source needs MADV_POPULATE_READ (Linux 5.14): it faults pages in
  // and reports a file that shrank as an error, where touching the mapping would raise SIGBUS.
  if (options_.map && map_ &&
      ::madvise(const_cast<uint8_t*>(map_), std::min<size_t>(map_bytes_, kPage),
                kMadvPopulateRead) == 0) {
    mapped_ = true;
  }
}

ParamsCache::~ParamsCache() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
  // Workers are gone: free what loads in progress had allocated, and every cached buffer.
  for (auto& e : entries_) {
    if (e->job && e->job->data && e->job->allocator) {
      e->job->allocator->deallocate(e->job->data, e->job->alloc_bytes);
    }
    if (e->data && e->allocator) e->allocator->deallocate(e->data, e->alloc_bytes);
  }
  if (map_) ::munmap(const_cast<uint8_t*>(map_), map_bytes_);
  if (direct_fd_ >= 0) ::close(direct_fd_);
}

void ParamsCache::check_index(size_t index, const char* what) const {
  if (index >= layouts_.size()) {
    throw InvalidArgumentError(label_ + ": " + what + ": base segment " + std::to_string(index) +
                               " out of range (the model has " + std::to_string(layouts_.size()) +
                               ")");
  }
}

void ParamsCache::track_busy_locked(int delta) {
  if (busy_jobs_ == 0 && delta > 0) busy_since_ = now_seconds();
  busy_jobs_ += delta;
  if (busy_jobs_ == 0 && delta < 0) stats_.read_seconds += now_seconds() - busy_since_;
}

void ParamsCache::start_workers_locked() {
  if (!threads_.empty()) return;
  for (unsigned i = 0; i < options_.threads; i++) {
    threads_.emplace_back([this] { worker_loop(); });
    pthread_setname_np(threads_.back().native_handle(), "ferry-reader");
  }
}

std::shared_ptr<ParamsCache::Job> ParamsCache::enqueue_locked(size_t index, bool priority,
                                                              bool prefetched) {
  Entry& e = *entries_[index];
  auto job = std::make_shared<Job>();
  job->index = index;
  job->prefetched = prefetched;
  job->allocator = allocator_;
  const uint64_t chunk = options_.chunk_bytes;
  for (const auto& p : layouts_[index].pieces) {
    // Cut at absolute multiples of the chunk size: every chunk but a piece's first starts on a
    // page boundary of the file, which is what O_DIRECT needs.
    for (uint64_t at = p.file_offset, end = p.file_offset + p.bytes; at < end;) {
      const uint64_t next = std::min(end, align_down(at, chunk) + chunk);
      job->chunks.push_back({at, p.buffer_offset + (at - p.file_offset), next - at});
      at = next;
    }
  }
  std::sort(job->chunks.begin(), job->chunks.end(),
            [](const Chunk& a, const Chunk& b) { return a.file_offset < b.file_offset; });
  e.state = Entry::State::kLoading;
  e.job = job;
  job->queued = true;
  if (priority) {
    job->priority = true;
    auto at = queue_.begin();
    while (at != queue_.end() && (*at)->priority) ++at;
    queue_.insert(at, job);
  } else {
    queue_.push_back(job);
  }
  track_busy_locked(+1);
  start_workers_locked();
  work_cv_.notify_all();
  return job;
}

void ParamsCache::bump_locked(const std::shared_ptr<Job>& job) {
  if (job->priority || !job->queued) return;  // already ahead, or every chunk is under way
  queue_.erase(std::find(queue_.begin(), queue_.end(), job));
  job->priority = true;
  auto at = queue_.begin();
  while (at != queue_.end() && (*at)->priority) ++at;
  queue_.insert(at, job);
}

void ParamsCache::worker_loop() {
  Worker worker;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    std::shared_ptr<Job> job;
    work_cv_.wait(lock, [&] {
      if (stopping_) return true;
      for (const auto& j : queue_) {
        if ((j->data && j->next < j->chunks.size()) || (!j->data && !j->allocating)) {
          job = j;
          return true;
        }
      }
      return false;
    });
    if (stopping_) return;

    if (!job->data) {
      // The first worker to reach a job allocates its buffer (outside the lock: pinned memory
      // takes milliseconds) and zeroes what the pieces do not cover.
      job->allocating = true;
      job->started_us = wall_clock_us();
      const ParamsSegmentLayout& layout = layouts_[job->index];
      if (options_.on_read_start) {
        lock.unlock();
        options_.on_read_start(job->index);
        lock.lock();
      }
      // Exactly the layout's size (in-place O_DIRECT reads only touch the page-aligned inside of
      // a piece), so host_bytes is the packed size.
      const size_t bytes = static_cast<size_t>(std::max<uint64_t>(layout.buffer_bytes, 1));
      const std::shared_ptr<HostAllocator> allocator = job->allocator;
      if (mapped_) {
        // Nothing to allocate: the mapping holds the bytes once the chunks populate it.
        job->allocating = false;
        job->allocator = nullptr;
        job->data = const_cast<uint8_t*>(map_);
        job->alloc_bytes = static_cast<size_t>(layout.param_bytes());
        host_bytes_ += job->alloc_bytes;
        host_peak_bytes_ = std::max(host_peak_bytes_, host_bytes_);
        if (job->chunks.empty()) {
          job->next = job->chunks.size();
          if (job->queued) {
            queue_.erase(std::find(queue_.begin(), queue_.end(), job));
            job->queued = false;
          }
          if (job->in_flight == 0 && !job->finishing) finish_job_locked(lock, job);
        }
        work_cv_.notify_all();
        continue;
      }
      lock.unlock();
      uint8_t* data = nullptr;
      std::exception_ptr error;
      try {
        data = static_cast<uint8_t*>(allocator->allocate(bytes));
        std::vector<ParamsPiece> pieces = layout.pieces;
        std::sort(pieces.begin(), pieces.end(), [](const ParamsPiece& a, const ParamsPiece& b) {
          return a.buffer_offset < b.buffer_offset;
        });
        uint64_t at = 0;
        for (const auto& p : pieces) {
          if (p.buffer_offset > at) std::memset(data + at, 0, p.buffer_offset - at);
          at = std::max(at, p.buffer_offset + p.bytes);
        }
        if (bytes > at) std::memset(data + at, 0, bytes - at);
      } catch (const std::bad_alloc&) {
        error = std::make_exception_ptr(Error(
            label_ + ": could not allocate " + std::to_string(bytes) + " bytes of host memory (" +
            allocator->name() + " allocator) for the params of " + layout.name));
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      job->allocating = false;
      if (error) {
        job->error = error;
      } else {
        job->data = data;
        job->alloc_bytes = bytes;
        host_bytes_ += bytes;
        host_peak_bytes_ = std::max(host_peak_bytes_, host_bytes_);
      }
      if (job->error || job->chunks.empty()) {
        job->next = job->chunks.size();
        if (job->queued) {
          queue_.erase(std::find(queue_.begin(), queue_.end(), job));
          job->queued = false;
        }
        if (job->in_flight == 0 && !job->finishing) finish_job_locked(lock, job);
      }
      work_cv_.notify_all();
      continue;
    }

    const Chunk chunk = job->chunks[job->next++];
    job->in_flight++;
    if (job->next == job->chunks.size()) {
      queue_.erase(std::find(queue_.begin(), queue_.end(), job));
      job->queued = false;
    }
    lock.unlock();
    uint64_t direct = 0;
    std::exception_ptr error;
    try {
      direct = read_chunk(*job, chunk, worker);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    job->direct_bytes += direct;
    job->in_flight--;
    if (error && !job->error) {
      job->error = error;
      // The rest of this segment is not worth reading: its load has failed.
      job->next = job->chunks.size();
      if (job->queued) {
        queue_.erase(std::find(queue_.begin(), queue_.end(), job));
        job->queued = false;
      }
    }
    if (job->in_flight == 0 && job->next == job->chunks.size() && !job->finishing) {
      finish_job_locked(lock, job);
    }
  }
}

uint64_t ParamsCache::read_chunk(const Job& job, const Chunk& c, Worker& worker) {
  if (mapped_) {
    const uint64_t first = align_down(c.file_offset, kPage);
    const uint64_t end =
        std::min<uint64_t>(align_up_to(c.file_offset + c.bytes, kPage), map_bytes_);
    if (::madvise(const_cast<uint8_t*>(map_) + first, end - first, kMadvPopulateRead) != 0) {
      throw IoError(errno, "madvise(MADV_POPULATE_READ)", label_);
    }
    return 0;
  }
  uint8_t* dst = job.data + c.buffer_offset;
  const int direct_fd = direct_fd_;
  bool direct = direct_fd >= 0 && c.bytes >= kDirectMinBytes;
  if (direct && map_) {
    // kAuto: a chunk whose pages are all in the page cache is copied from there (memory speed);
    // anything else is read from the disk past the cache.
    const uint64_t first = align_down(c.file_offset, kPage);
    const uint64_t pages = (align_up_to(c.file_offset + c.bytes, kPage) - first) / kPage;
    worker.pages.resize(pages);
    if (::mincore(const_cast<uint8_t*>(map_) + first, pages * kPage, worker.pages.data()) == 0) {
      bool all = true;
      for (unsigned char p : worker.pages) all = all && (p & 1);
      direct = !all;
    }
  }
  if (!direct) {
    file_.read(c.file_offset, dst, c.bytes);
    return 0;
  }

  const uint64_t file_bytes = file_.file_bytes();
  // O_DIRECT: offset, length and address all page-aligned. Reads past the end of the file are
  // short, which is fine as long as the bytes asked for arrived.
  auto direct_read = [&](uint64_t offset, uint8_t* to, uint64_t bytes, uint64_t need) {
    uint64_t done = 0;
    while (done < need) {
      const ssize_t r =
          ::pread(direct_fd, to + done, bytes - done, static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw IoError(errno, "pread (O_DIRECT)", label_);
      }
      if (r == 0) {
        throw ModelFormatError(label_ + ": file ended at byte " + std::to_string(offset + done) +
                               " while reading the params of " + layouts_[job.index].name +
                               " (the file holds " + std::to_string(file_bytes) +
                               " bytes); was it truncated after it was opened?");
      }
      done += static_cast<uint64_t>(r);
      if (done % kPage != 0) break;  // a short read: the end of the file
    }
    if (done < need) {
      throw ModelFormatError(label_ + ": file ended at byte " + std::to_string(offset + done) +
                             " while reading the params of " + layouts_[job.index].name +
                             "; was it truncated after it was opened?");
    }
  };

  const uint64_t begin = c.file_offset;
  const uint64_t end = c.file_offset + c.bytes;
  if (end > file_bytes) {
    file_.read(begin, dst, c.bytes);  // reports the out-of-range read precisely
    return 0;
  }
  const uint64_t a = align_up_to(begin, kPage);
  const uint64_t b = align_down(end, kPage);
  if ((reinterpret_cast<uintptr_t>(dst) - begin) % kPage == 0 && a < b) {
    // In place: the buffer is page-congruent with the file here. Unaligned ends go buffered.
    if (a > begin) file_.read(begin, dst, a - begin);
    direct_read(a, dst + (a - begin), b - a, b - a);
    if (end > b) file_.read(b, dst + (b - begin), end - b);
    return b - a;
  }
  // Through the bounce buffer: read the covering pages, copy out the bytes asked for.
  const uint64_t first = align_down(begin, kPage);
  const uint64_t last = align_up_to(end, kPage);
  uint8_t* bounce = worker.bounce_for(static_cast<size_t>(last - first));
  direct_read(first, bounce, last - first, end - first);
  std::memcpy(dst, bounce + (begin - first), c.bytes);
  return c.bytes;
}

void ParamsCache::finish_job_locked(std::unique_lock<std::mutex>& lock,
                                    const std::shared_ptr<Job>& job) {
  job->finishing = true;  // claimed: no other worker finishes it
  Entry& e = *entries_[job->index];
  const ParamsSegmentLayout& layout = layouts_[job->index];
  if (!job->error && checksums_) {
    // Hashed with the lock released: the entry is still kLoading, so nobody else touches it.
    lock.unlock();
    const uint64_t h = hash_pieces(job->index, job->data, mapped_);
    lock.lock();
    if (e.has_checksum && h != e.checksum) {
      job->error = std::make_exception_ptr(IntegrityError(
          label_ + ": base segment " + layout.name + " (" + std::to_string(layout.param_bytes()) +
          " bytes) read again from the file does not match its first read (XXH64 " + hex64(h) +
          ", expected " + hex64(e.checksum) +
          "): the file changed while in use, or the storage returned bad data"));
    } else {
      e.checksum = h;
      e.has_checksum = true;
    }
  }
  Freed freed;
  if (job->error) {
    if (job->data) {
      freed.allocator = job->allocator;  // none when mapped: the mapping stays
      freed.data = job->data;
      freed.bytes = job->alloc_bytes;
      host_bytes_ -= job->alloc_bytes;
      job->data = nullptr;
    }
    e.state = Entry::State::kEmpty;
  } else {
    e.state = Entry::State::kReady;
    e.data = job->data;
    e.alloc_bytes = job->alloc_bytes;
    e.allocator = job->allocator;
    e.unclaimed = job->prefetched;
    job->data = nullptr;  // the entry owns it now
    stats_.bytes_read += layout.param_bytes();
    stats_.direct_bytes += job->direct_bytes;
    stats_.segment_reads++;
    if (stats_.load_order.size() >= 4096) stats_.load_order.erase(stats_.load_order.begin());
    stats_.load_order.push_back(job->index);
    if (!job->awaited) {
      if (ahead_reads_.size() >= 4096) ahead_reads_.pop_front();
      ahead_reads_.push_back({job->index, layout.param_bytes(), job->started_us, wall_clock_us()});
    }
  }
  e.job.reset();
  job->finished = true;
  track_busy_locked(-1);
  done_cv_.notify_all();
  feed_prefetch_locked();
  if (freed.data) {
    lock.unlock();
    freed.reset();
    lock.lock();
  }
}

void ParamsCache::wait_job(std::unique_lock<std::mutex>& lock, const std::shared_ptr<Job>& job) {
  done_cv_.wait(lock, [&] { return job->finished; });
}

ParamsCache::HostParams ParamsCache::prepare(size_t index) {
  check_index(index, "prepare_params");
  std::unique_lock<std::mutex> lock(mu_);
  bool waited = false;
  bool retried = false;
  for (;;) {
    Entry& e = *entries_[index];
    if (e.state == Entry::State::kReady) {
      e.users++;
      e.unclaimed = false;
      waited ? stats_.misses++ : stats_.hits++;
      feed_prefetch_locked();  // claiming a prefetched segment opens the disk backend's window
      return {e.data, waited ? layouts_[index].param_bytes() : 0, &layouts_[index], mapped_};
    }
    std::shared_ptr<Job> job;
    bool own = false;
    if (e.state == Entry::State::kEmpty) {
      job = enqueue_locked(index, /*priority=*/true, /*prefetched=*/false);
      own = true;
    } else {
      job = e.job;
      bump_locked(job);
    }
    job->awaited = true;
    waited = true;
    wait_job(lock, job);
    if (job->error) {
      // A background read that failed is tried once more by this caller, so the error it
      // reports comes from its own attempt.
      if (own || retried) std::rethrow_exception(job->error);
      retried = true;
    }
  }
}

void ParamsCache::release(size_t index) {
  Backend backend;
  {
    std::lock_guard<std::mutex> lock(mu_);
    backend = backend_;
  }
  release(index, backend);
}

void ParamsCache::release(size_t index, Backend backend) {
  check_index(index, "release_params");
  Freed freed;  // destroyed after the lock below is released
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = *entries_[index];
  if (e.users == 0) return;
  e.users--;
  if (e.users == 0 && e.state == Entry::State::kReady && backend != ParamsCache::Backend::kCpu) {
    // Mapped: the segment's pages leave this process's mapping (the kernel may still cache
    // them); buffered: the buffer goes back to its allocator.
    if (mapped_) drop_mapped_pages(index);
    freed.allocator = std::move(e.allocator);
    freed.data = e.data;
    freed.bytes = e.alloc_bytes;
    host_bytes_ -= e.alloc_bytes;
    e.data = nullptr;
    e.alloc_bytes = 0;
    e.unclaimed = false;
    e.state = Entry::State::kEmpty;
    done_cv_.notify_all();
    feed_prefetch_locked();
  }
}

void ParamsCache::feed_prefetch_locked() {
  if (prefetch_order_.empty() || stopping_) return;
  const size_t limit = backend_ == ParamsCache::Backend::kDisk ? read_ahead_ : SIZE_MAX;
  size_t ahead = 0;
  for (const auto& e : entries_) {
    if ((e->state == Entry::State::kLoading && e->job->prefetched) ||
        (e->state == Entry::State::kReady && e->unclaimed)) {
      ahead++;
    }
  }
  // At most one pass over the order per call: with everything cached (or held) a cyclic
  // prefetch must not spin.
  for (size_t scanned = 0; ahead < limit && scanned < prefetch_order_.size(); scanned++) {
    if (prefetch_next_ >= prefetch_order_.size()) {
      if (!prefetch_cyclic_) break;
      prefetch_next_ = 0;
    }
    const size_t index = prefetch_order_[prefetch_next_++];
    if (entries_[index]->state != Entry::State::kEmpty) continue;
    enqueue_locked(index, /*priority=*/false, /*prefetched=*/true);
    ahead++;
  }
  if (!prefetch_cyclic_ && prefetch_next_ >= prefetch_order_.size()) {
    prefetch_order_.clear();
    prefetch_next_ = 0;
  }
}

void ParamsCache::prefetch(const std::vector<size_t>& order, bool cyclic) {
  for (size_t index : order) check_index(index, "prefetch");
  std::lock_guard<std::mutex> lock(mu_);
  prefetch_order_ = order;
  prefetch_next_ = 0;
  prefetch_cyclic_ = cyclic;
  feed_prefetch_locked();
}

void ParamsCache::cancel_prefetch() {
  std::lock_guard<std::mutex> lock(mu_);
  prefetch_order_.clear();
  prefetch_next_ = 0;
}

std::vector<ParamsCache::AheadRead> ParamsCache::take_ahead_reads() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<AheadRead> reads(ahead_reads_.begin(), ahead_reads_.end());
  ahead_reads_.clear();
  return reads;
}

void ParamsCache::load_all() {
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    n = entries_.size();
  }
  if (n > 0) load(0, n - 1);
}

void ParamsCache::load(size_t first, size_t last) {
  std::unique_lock<std::mutex> lock(mu_);
  const size_t n = entries_.size();
  if (first > last || last >= n) {
    throw InvalidArgumentError("params cache: cannot load segments " + std::to_string(first) +
                               ".." + std::to_string(last) + " of " + std::to_string(n));
  }
  std::vector<std::shared_ptr<Job>> jobs(n);
  std::vector<bool> own(n, false);
  for (size_t i = first; i <= last; i++) {
    Entry& e = *entries_[i];
    if (e.state == Entry::State::kEmpty) {
      jobs[i] = enqueue_locked(i, /*priority=*/false, /*prefetched=*/false);
      own[i] = true;
    } else if (e.state == Entry::State::kLoading) {
      jobs[i] = e.job;
    }
  }
  std::exception_ptr failure;
  for (size_t i = 0; i < n; i++) {
    if (!jobs[i]) continue;
    wait_job(lock, jobs[i]);
    if (jobs[i]->error && !own[i] && entries_[i]->state == Entry::State::kEmpty) {
      // Someone else's read failed (a prefetch): try it ourselves once.
      jobs[i] = enqueue_locked(i, /*priority=*/false, /*prefetched=*/false);
      own[i] = true;
      wait_job(lock, jobs[i]);
    }
    if (jobs[i]->error && !failure) failure = jobs[i]->error;
  }
  if (failure) std::rethrow_exception(failure);
}

bool ParamsCache::cached(size_t index) const {
  std::lock_guard<std::mutex> lock(mu_);
  return index < entries_.size() && entries_[index]->state == Entry::State::kReady;
}

uint64_t ParamsCache::host_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return host_bytes_;
}

LoadStats ParamsCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  LoadStats s = stats_;
  if (busy_jobs_ > 0) s.read_seconds += now_seconds() - busy_since_;
  s.host_bytes = host_bytes_;
  s.host_peak_bytes = host_peak_bytes_;
  s.direct_io = direct_fd_ >= 0;
  s.mapped = mapped_;
  for (size_t i = 0; i < entries_.size(); i++) {
    s.loaded[i] = entries_[i]->state == Entry::State::kReady;
  }
  for (const auto& job : queue_) {
    if (job->next == 0 && !job->allocating && !job->data) s.queued.push_back(job->index);
  }
  return s;
}

uint64_t ParamsCache::take_host_peak() {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t peak = host_peak_bytes_;
  host_peak_bytes_ = host_bytes_;
  return peak;
}

void ParamsCache::set_backend(Backend backend) {
  std::lock_guard<std::mutex> lock(mu_);
  backend_ = backend;
  feed_prefetch_locked();
}

ParamsCache::Backend ParamsCache::backend() const {
  std::lock_guard<std::mutex> lock(mu_);
  return backend_;
}

void ParamsCache::set_read_ahead(size_t segments) {
  std::lock_guard<std::mutex> lock(mu_);
  read_ahead_ = std::max<size_t>(segments, 1);
  feed_prefetch_locked();
}

void ParamsCache::set_allocator(std::shared_ptr<HostAllocator> allocator) {
  std::lock_guard<std::mutex> lock(mu_);
  allocator_ = allocator ? std::move(allocator) : aligned_host_allocator();
}

uint64_t ParamsCache::hash_pieces(size_t index, const uint8_t* data, bool mapped) const {
  Xxhash64 h;
  for (const auto& p : layouts_[index].pieces) {
    h.update(data + (mapped ? p.file_offset : p.buffer_offset), p.bytes);
  }
  return h.digest();
}

void ParamsCache::drop_mapped_pages(size_t index) const {
  // Only pages wholly inside a piece: a page shared with a neighbour stays mapped for it.
  for (const auto& p : layouts_[index].pieces) {
    const uint64_t first = align_up_to(p.file_offset, kPage);
    const uint64_t end = align_down(p.file_offset + p.bytes, kPage);
    if (end > first) ::madvise(const_cast<uint8_t*>(map_) + first, end - first, MADV_DONTNEED);
  }
}

void ParamsCache::set_checksums(bool on) {
  std::unique_lock<std::mutex> lock(mu_);
  checksums_ = on;
  if (!on) return;
  // Segments cached before checksums were on are hashed from their host copies now, held (so a
  // disk-backend release cannot drop them meanwhile) and hashed with the lock released.
  for (size_t i = 0; i < entries_.size(); i++) {
    Entry& e = *entries_[i];
    if (e.state != Entry::State::kReady || e.has_checksum) continue;
    e.users++;
    const uint8_t* data = e.data;
    lock.unlock();
    const uint64_t h = hash_pieces(i, data, mapped_);
    lock.lock();
    e.checksum = h;
    e.has_checksum = true;
    e.users--;
  }
}

bool ParamsCache::checksums() const {
  std::lock_guard<std::mutex> lock(mu_);
  return checksums_;
}

uint64_t ParamsCache::checksum(size_t index) const {
  check_index(index, "checksum");
  std::lock_guard<std::mutex> lock(mu_);
  const Entry& e = *entries_[index];
  if (!e.has_checksum) {
    throw InvalidArgumentError(label_ + ": base segment " + layouts_[index].name +
                               " has no checksum yet (checksums are taken when a segment is "
                               "loaded with verify on)");
  }
  return e.checksum;
}

void ParamsCache::verify(size_t index, const uint8_t* data) const {
  const uint64_t expected = checksum(index);
  if (!data) throw InvalidArgumentError(label_ + ": verify_params: no data");
  const uint64_t actual = hash_pieces(index, data);
  if (actual != expected) {
    const ParamsSegmentLayout& layout = layouts_[index];
    throw IntegrityError(label_ + ": base segment " + layout.name + " (" +
                         std::to_string(layout.param_bytes()) +
                         " bytes): the copy checked does not match the params read from the "
                         "file (XXH64 " +
                         hex64(actual) + ", expected " + hex64(expected) + ")");
  }
}

}  // namespace ferry
