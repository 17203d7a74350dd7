#pragma once
// A Ferry DiT model bound to its file — safetensors or GGUF, sniffed from the first bytes — : the
// base segments (prelude, blocks.0 … blocks.N−1, final) with their tensors, validated against the
// layout the metadata declares, and the host params cache those segments are streamed from
// (params_cache.h: the loader, the cpu/disk backends, checksums).
//
// Metadata. safetensors: __metadata__ "ferry.arch" = "dit", "ferry.{blocks,hidden,heads,channels}"
// as decimal strings. GGUF: general.architecture = "ferry-dit" and ferry-dit.{blocks,hidden,
// heads,channels} as integers (uint32 as gen-model writes them); tensor names as in safetensors,
// dimensions in ggml order (the binding compares the row-major shape, ne reversed). Weights may be
// f32, f16, bf16, and in GGUF q8_0 / q4_0 (2-D weights only).
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ferry/dtype.h"
#include "ferry/kernels.h"
#include "ferry/params_cache.h"
#include "ferry/safetensors.h"

namespace ferry {

struct ModelDims {
  int64_t hidden = 0;    // D
  int64_t heads = 0;     // H
  int64_t channels = 0;  // C
  int64_t blocks = 0;    // N
};

enum class SegmentKind : uint8_t { kPrelude, kBlock, kFinal };

// Tensors inside a segment's packed buffer start at multiples of this, so every weight is aligned
// for vector loads on the host and after the copy to the device.
constexpr size_t kPackAlignment = 64;
inline size_t align_up(size_t n, size_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}
// Tensors of at least this size whose file offset is a multiple of kPackAlignment are placed at a
// packed offset congruent with their file offset modulo a page (≤ 4 KiB of padding each, under
// 0.1%), so the loader reads them with O_DIRECT straight into place.
constexpr uint64_t kPackCongruentMinBytes = uint64_t{4} << 20;

struct SegmentTensor {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // row-major
  uint64_t file_offset = 0;    // absolute
  uint64_t nbytes = 0;
  uint64_t packed_offset = 0;  // offset inside the segment's packed buffer
};

struct BaseSegment {
  std::string name;  // "prelude", "blocks.<i>", "final"
  SegmentKind kind = SegmentKind::kPrelude;
  std::vector<SegmentTensor> tensors;  // in the order the kernels take them (kernels.h)
  uint64_t param_bytes = 0;            // Σ nbytes
  uint64_t packed_bytes = 0;           // size of the packed buffer (with alignment padding)
};

class DitModel {
 public:
  // When weights are read (model-level; a job may still ask for its own through the runner).
  enum class Load : uint8_t {
    kLazy,        // at first use (prepare_params)
    kEager,       // all of them in open(), in parallel
    kBackground,  // open() returns at once; a background reader reads them in base order
  };
  using Backend = ParamsCache::Backend;
  using HostParams = ParamsCache::HostParams;

  struct Options {
    Load load = Load::kLazy;
    Backend backend = Backend::kPerJob;
    // Checksum each segment at its first load; re-reads and verify_params() are checked against
    // it (IntegrityError).
    bool verify = false;
    LoaderOptions loader;
    std::shared_ptr<HostAllocator> allocator;  // null: page-aligned C-library memory
    size_t read_ahead = 1;                     // disk backend: prefetched segments held at most
  };

  // Opens, parses, validates and binds (lazy loading, default options). IoError /
  // ModelFormatError.
  static std::shared_ptr<DitModel> open(const std::string& path);
  // The same with `options` applied; kEager also reads every segment before returning (and
  // throws what the reads throw), kBackground starts the background reader (cyclic with the disk
  // backend, so later steps find segments read ahead too).
  static std::shared_ptr<DitModel> open(const std::string& path, const Options& options);
  explicit DitModel(std::unique_ptr<ModelFile> file, const LoaderOptions& loader = {});
  ~DitModel();
  DitModel(const DitModel&) = delete;
  DitModel& operator=(const DitModel&) = delete;

  const ModelFile& file() const { return *file_; }
  ModelFormat format() const { return file_->format(); }
  const std::string& path() const { return file_->path(); }
  const ModelDims& dims() const { return dims_; }
  const std::vector<BaseSegment>& base_segments() const { return segments_; }

  // ---- the host params cache (ParamsCache; every call is thread-safe) ----
  // Blocks until base segment `index` is in host memory, packed as BaseSegment::tensors
  // describes, reading it now (ahead of any background reading) if it is not; the caller holds it
  // until release_params(index). `disk_bytes` > 0 when the call waited for a read.
  HostParams prepare_params(size_t index);
  // Ends a prepare_params. kDisk and kPerJob drop the host copy once nobody holds it (runners call
  // this for disk-backend jobs only); kCpu keeps it. The caller must hold no pointer into it.
  void release_params(size_t index);
  void release_params(size_t index, Backend backend);  // this call's backend decides
  // Starts the background reader on `order` (the plan's order) and returns at once; segments a
  // prepare_params needs first are read first. `cyclic`: see ParamsCache::prefetch.
  void prefetch(const std::vector<size_t>& order, bool cyclic = false);
  // Eager: reads every segment not in host memory yet, in parallel; returns when all are.
  void load_all();
  void cancel_prefetch();
  bool params_cached(size_t index) const;
  uint64_t host_cache_bytes() const;
  LoadStats load_stats() const;
  void set_params_backend(Backend backend);
  Backend params_backend() const;
  void set_read_ahead(size_t segments);
  // Buffers allocated from now on come from `allocator` (device_host_allocator(device) pins them
  // on CUDA); null restores the default.
  void set_host_allocator(std::shared_ptr<HostAllocator> allocator);
  void set_verify(bool on);
  bool verify() const;
  // XXH64 of base segment `index`'s tensors recorded at its first load (verify on).
  uint64_t params_checksum(size_t index) const;
  // Checks a copy of base segment `index` laid out like its packed buffer (only the tensors'
  // bytes are read: a device copy made tensor by tensor qualifies) against that checksum:
  // IntegrityError naming the model, the segment and both values on a mismatch.
  void verify_params(size_t index, const uint8_t* data) const;
  ParamsCache& params_cache() { return *cache_; }

 private:
  void bind_safetensors();
  void bind_gguf();
  void bind_segments(const std::string& where);

  std::unique_ptr<ModelFile> file_;
  ModelDims dims_;
  std::vector<BaseSegment> segments_;
  std::unique_ptr<ParamsCache> cache_;
};

// The job dims of a model for `batch` × `tokens`.
DitDims job_dims(const ModelDims& model, int64_t batch, int64_t tokens);
// Scratch the kernels need for one base segment (kernels::*_scratch_bytes).
size_t segment_scratch_bytes(SegmentKind kind, const DitDims& dims);

}  // namespace ferry
