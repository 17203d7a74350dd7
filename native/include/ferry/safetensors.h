#pragma once
// safetensors reader (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length N, N bytes of JSON {"__metadata__": {str: str}, name: {dtype, shape, data_offsets}}, then
// the data, offsets relative to its start. Only the header is read at open; tensor data is read
// later with pread, straight into the caller's memory. Every problem with the file is a
// ModelFormatError naming the file (and tensor).
//
// SafetensorsFile is also Ferry's format-independent model file (alias ModelFile): open() sniffs
// the first bytes and reads a GGUF file's header (gguf.h) into the same SafetensorsHeader view —
// names, row-major shapes, absolute byte ranges — keeping the typed GGUF header beside it.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/gguf.h"

namespace ferry {

// Every dtype a safetensors header may declare. Ferry's kernels compute with F32/F16/BF16 only
// (ferry::DType); the rest are readable for inspection.
enum class StDType : uint8_t {
  kBool,
  kU8,
  kI8,
  kF8_E5M2,
  kF8_E4M3,
  kF8_E8M0,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
  kC64,
  kF4,
  kF6_E2M3,
  kF6_E3M2,
};

const char* st_dtype_name(StDType dtype);
bool st_dtype_from_name(std::string_view name, StDType* out);
unsigned st_dtype_bits(StDType dtype);  // bits per element (sub-byte types pack)
std::string st_known_dtypes();          // "BOOL, U8, …" for error messages

struct TensorInfo {
  std::string name;
  StDType dtype = StDType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // absolute file offsets of the data
  uint64_t end = 0;
  // GGUF files: the ggml type (id and ggml's own name, "f16", "q8_0"), which covers quantized
  // blocks StDType cannot name (their `dtype` is U8: raw bytes); -1 for safetensors files.
  int ggml_type = -1;
  std::string ggml_type_name;
  uint64_t nbytes() const { return end - begin; }
  int64_t elements() const;
};

// Limits: a length field above this is the usual sign of a file that is not safetensors at all
// (the reference implementation uses the same limit).
constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;
// No real tensor has a dimension anywhere near this; larger is corruption.
constexpr int64_t kMaxTensorDim = int64_t{1} << 48;

struct SafetensorsHeader {
  uint64_t header_bytes = 0;  // N (GGUF: the end of the tensor infos)
  uint64_t data_start = 0;    // 8 + N (GGUF: the aligned data section)
  uint64_t file_bytes = 0;
  // safetensors: __metadata__. GGUF: every key, strings as they are, other values as
  // gguf_value_summary writes them (the typed values are in `gguf`).
  std::map<std::string, std::string> metadata;
  std::vector<TensorInfo> tensors;         // sorted by begin (data order)
  std::shared_ptr<const GgufHeader> gguf;  // GGUF files only
};

enum class ModelFormat : uint8_t { kSafetensors, kGguf };
const char* model_format_name(ModelFormat format);  // "safetensors", "gguf"

// Parses and validates a header's JSON text for a file of `file_bytes` bytes whose header is
// `header_bytes` long. `label` (the path) prefixes every error message.
SafetensorsHeader parse_safetensors_header(const std::string& label, std::string_view json,
                                           uint64_t header_bytes, uint64_t file_bytes);

// A GGUF v2/v3 header (parse_gguf) as a SafetensorsHeader: tensors in data order with row-major
// shapes, metadata as strings, the typed header in `gguf`. `read(offset, dst, n)` reads the file.
SafetensorsHeader parse_gguf_header(const std::string& label, uint64_t file_bytes,
                                    const std::function<void(uint64_t, void*, size_t)>& read);
SafetensorsHeader safetensors_view_of_gguf(std::shared_ptr<const GgufHeader> gguf);

// A model file: safetensors or GGUF (sniffed from the magic), behind the same header.
class SafetensorsFile {
 public:
  // Opens and validates; IoError if the file cannot be opened, ModelFormatError if it is neither
  // a valid safetensors file nor a valid GGUF file.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  ModelFormat format() const {
    return header_.gguf ? ModelFormat::kGguf : ModelFormat::kSafetensors;
  }
  const GgufHeader* gguf() const { return header_.gguf.get(); }  // GGUF files only
  // The open file descriptor (for readers that need their own view of the same file, e.g. a
  // second descriptor opened with O_DIRECT and checked to be the same inode).
  int fd() const { return fd_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  uint64_t file_bytes() const { return header_.file_bytes; }
  const TensorInfo* find(const std::string& name) const;

  // Reads exactly `bytes` at absolute `offset` into `dst` (pread, retried on short reads). The
  // range is checked against the file size seen at open; a file that shrank since is a
  // ModelFormatError, an I/O failure an IoError. Safe to call from several threads.
  void read(uint64_t offset, void* dst, size_t bytes) const;
  std::vector<uint8_t> read_tensor(const TensorInfo& tensor) const;

 private:
  SafetensorsFile(std::string path, int fd);
  std::string path_;
  int fd_ = -1;
  SafetensorsHeader header_;
};

// The model file, whatever its format.
using ModelFile = SafetensorsFile;

// Decodes a tensor's raw little-endian bytes to doubles, for inspection and tests. Unsigned and
// signed integers, BOOL, floats (F64, F32, F16, BF16, F8_E4M3, F8_E5M2); InvalidArgumentError for
// the others.
std::vector<double> decode_tensor_f64(StDType dtype, const uint8_t* bytes, size_t nbytes);

}  // namespace ferry
