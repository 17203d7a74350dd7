#pragma once
// A Ferry DiT model bound to its safetensors file: the base segments (prelude, blocks.0 …
// blocks.N−1, final) with their tensors, validated against the layout the metadata declares, and
// the host params cache those segments are streamed from.
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ferry/dtype.h"
#include "ferry/kernels.h"
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

struct SegmentTensor {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t file_offset = 0;  // absolute
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
  // Opens, parses and validates. IoError / ModelFormatError.
  static std::shared_ptr<DitModel> open(const std::string& path);
  explicit DitModel(std::unique_ptr<SafetensorsFile> file);
  ~DitModel();
  DitModel(const DitModel&) = delete;
  DitModel& operator=(const DitModel&) = delete;

  const SafetensorsFile& file() const { return *file_; }
  const std::string& path() const { return file_->path(); }
  const ModelDims& dims() const { return dims_; }
  const std::vector<BaseSegment>& base_segments() const { return segments_; }

  // The host params cache. Ensures base segment `index`'s tensors are in host memory, packed as
  // BaseSegment::tensors describes, reading them from the file on first use. Returns the packed
  // buffer (valid while the model lives) and how many bytes this call read from disk (0 when
  // cached). Safe to call from several runs at once.
  struct HostParams {
    const uint8_t* data = nullptr;
    uint64_t disk_bytes = 0;
  };
  HostParams prepare_params(size_t index);
  bool params_cached(size_t index) const;
  // The disk params backend: drops base segment `index`'s host copy once its transfer is done
  // (the next prepare_params reads it again). The caller must hold no pointer into it.
  void release_params(size_t index);
  uint64_t host_cache_bytes() const { return host_bytes_.load(); }

 private:
  struct CacheEntry;
  std::unique_ptr<SafetensorsFile> file_;
  ModelDims dims_;
  std::vector<BaseSegment> segments_;
  std::vector<std::unique_ptr<CacheEntry>> cache_;
  std::atomic<uint64_t> host_bytes_{0};
};

// The job dims of a model for `batch` × `tokens`.
DitDims job_dims(const ModelDims& model, int64_t batch, int64_t tokens);
// Scratch the kernels need for one base segment (kernels::*_scratch_bytes).
size_t segment_scratch_bytes(SegmentKind kind, const DitDims& dims);

}  // namespace ferry
