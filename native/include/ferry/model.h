#pragma once
// A model: a file (safetensors or GGUF, sniffed from its first bytes) bound to its architecture
// (arch.h): the base segments with their tensors checked against the shapes the architecture
// expects, each segment's packed layout — the same bytes in host memory and on the device — and
// the host params cache those segments are streamed from (params_cache.h: the loader, the
// cpu/disk backends, checksums).
//
// Packed layout. A segment's tensors sit back to back in one buffer, each at a multiple of
// kPackAlignment, taking the bytes the device's buffer type asks for (quantized rows padded where
// a GPU's kernels read past them; the padding is zero). The layout is computed for one device
// buffer type (the CPU's by default; the executor's device when it opens the model), so a
// segment's host buffer is copied to a staging slot as is and its tensors placed at the same
// offsets there.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/arch.h"
#include "ferry/params_cache.h"
#include "ferry/safetensors.h"
#include "ggml-backend.h"

namespace ferry {

// Tensors inside a segment's packed buffer start at multiples of this: enough for every ggml
// backend's tensor alignment (CPU 32, CUDA 128) and for vector loads.
constexpr size_t kPackAlignment = 256;
inline size_t align_up(size_t n, size_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}
// Tensors of at least this size whose file offset is a multiple of kPackAlignment are placed at a
// packed offset congruent with their file offset modulo a page (≤ 4 KiB of padding each, under
// 0.1%), so the loader reads them with O_DIRECT straight into place.
constexpr uint64_t kPackCongruentMinBytes = uint64_t{4} << 20;

struct SegmentTensor {
  std::string name;
  ggml_type type = GGML_TYPE_F32;
  int n_dims = 1;
  int64_t ne[GGML_MAX_DIMS] = {1, 1, 1, 1};
  uint64_t file_offset = 0;    // absolute
  uint64_t nbytes = 0;         // ggml_nbytes: the bytes in the file
  uint64_t packed_offset = 0;  // offset inside the segment's packed buffer
  uint64_t span_bytes = 0;     // bytes it takes there (≥ nbytes; the rest is zero padding)
};

struct BaseSegment {
  std::string name;
  std::string kind;
  std::vector<SegmentTensor> tensors;  // in the order the architecture builds with
  uint64_t param_bytes = 0;            // Σ nbytes
  uint64_t packed_bytes = 0;           // the packed buffer's size
};

class Model {
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
    // The device buffer type the packed layout is for; null: ggml's CPU buffer type.
    ggml_backend_buffer_type_t layout = nullptr;
  };

  // Opens, parses, validates and binds (lazy loading, default options). IoError /
  // ModelFormatError.
  static std::shared_ptr<Model> open(const std::string& path);
  // The same with `options` applied; kEager also reads every segment before returning (and
  // throws what the reads throw), kBackground starts the background reader (cyclic with the disk
  // backend, so later steps find segments read ahead too).
  static std::shared_ptr<Model> open(const std::string& path, const Options& options);
  Model(std::unique_ptr<ModelFile> file, const LoaderOptions& loader = {},
        ggml_backend_buffer_type_t layout = nullptr);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelFile& file() const { return *file_; }
  ModelFormat format() const { return file_->format(); }
  const std::string& path() const { return file_->path(); }
  const ModelArch& arch() const { return *arch_; }
  const std::vector<BaseSegment>& base_segments() const { return segments_; }
  // The name of the buffer type the packed layout was computed for ("CPU", "CUDA0").
  const std::string& layout_name() const { return layout_name_; }

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
  // The same for base segments first..last only (a pipeline stage's).
  void load(size_t first, size_t last);
  void cancel_prefetch();
  bool params_cached(size_t index) const;
  uint64_t host_cache_bytes() const;
  LoadStats load_stats() const;
  void set_params_backend(Backend backend);
  Backend params_backend() const;
  void set_read_ahead(size_t segments);
  // Buffers allocated from now on come from `allocator` (device_host_allocator(device) pins them
  // on a GPU); null restores the default.
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
  void bind_segments(ggml_backend_buffer_type_t layout);

  std::unique_ptr<ModelFile> file_;
  std::unique_ptr<ModelArch> arch_;
  std::vector<BaseSegment> segments_;
  std::string layout_name_;
  std::unique_ptr<ParamsCache> cache_;
};

// A ggml tensor descriptor (no data) of a segment tensor, for size and layout questions.
ggml_tensor tensor_descriptor(const SegmentTensor& t);

}  // namespace ferry
