#pragma once
// GGUF v2/v3 headers (ggml's model format, as llama.cpp and Ferry's gen-model write it): the typed
// metadata, the tensor infos, `general.alignment` and the data offset — never tensor data, so a
// multi-GB model is inspected by reading only its first megabytes. ggml's own reader
// (gguf_init_from_callback) parses the file; this header is Ferry's typed view of what it read.
//
// Layout (ggml docs/gguf.md), all little-endian:
//   magic "GGUF" · u32 version (2 or 3) · u64 tensor_count · u64 metadata_kv_count
//   metadata_kv_count × { string key · u32 value_type · value }
//   tensor_count × { string name · u32 n_dims · u64 ne[n_dims] · u32 ggml_type · u64 offset }
//   padding to `general.alignment` (default 32) · tensor data
// ne is in ggml order (ne[0] innermost), the reverse of the row-major shape.
//
// Every problem is a ModelFormatError naming the file and, where ggml says, the field (key,
// tensor) and what is wrong; ggml bounds every count and length by the bytes left in the file.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ferry {

// ggml's traits of one element type: the id stored in tensor infos, ggml_type_name, elements per
// block and bytes per block (ggml/src/ggml.c type_traits; the block structs of ggml-common.h).
struct GgmlTypeInfo {
  uint32_t id;
  const char* name;  // "f32", "q8_0", "q4_K", … (ggml's spelling)
  uint32_t block;
  uint32_t type_size;
  bool quantized;
};

// The traits of type `id`, or nullptr for an id ggml does not define (or has removed).
const GgmlTypeInfo* ggml_type_info(uint32_t id);
// By name, case-insensitively ("Q8_0", "q8_0"), or nullptr.
const GgmlTypeInfo* ggml_type_by_name(std::string_view name);
// The old name of a type id ggml has removed ("Q4_2"), or nullptr.
const char* ggml_removed_type_name(uint32_t id);

enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
const char* gguf_value_type_name(GgufValueType type);  // "uint32", "string", …
// Bytes of one value of a fixed-size type; 0 for string and array.
size_t gguf_scalar_bytes(GgufValueType type);

// One typed metadata value.
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  // Scalars. Integers: `u` holds the value zero-extended (unsigned types) or as the two's
  // complement bits (signed types), `i` sign-extended; bool: u = 0 or 1. Floats: `f`.
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0;
  std::string str;  // kString

  // kArray: the item type and count, always; the items only when the parse kept arrays
  // (GgufParseOptions::keep_arrays). Fixed-size items are `raw` (count × gguf_scalar_bytes,
  // little-endian as stored), strings `strings`, nested arrays `arrays`.
  GgufValueType item_type = GgufValueType::kUint8;
  uint64_t count = 0;
  bool items_kept = false;
  std::vector<uint8_t> raw;
  std::vector<std::string> strings;
  std::vector<GgufValue> arrays;

  bool is_integer() const;
  // The value as a non-negative integer: any integer type holding a value ≥ 0; false otherwise.
  bool as_uint64(uint64_t* out) const;
};

// A one-line description of a value, as lib/model/gguf.ts summarizeGgufValue writes it: strings
// quoted (long ones cut), scalars in decimal (float32 as its shortest round-trip decimal), arrays
// as `[string × 32000] "<unk>", "<s>", …` (items listed only when kept).
std::string gguf_value_summary(const GgufValue& value);

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;     // ggml order: ne[0] is the innermost (contiguous) dimension
  std::vector<int64_t> shape;  // row-major (safetensors/PyTorch order): ne reversed
  const GgmlTypeInfo* type = nullptr;
  uint64_t offset = 0;  // relative to the data section, as stored
  uint64_t begin = 0;   // absolute file offset of the first byte
  uint64_t end = 0;     // one past the last byte
  uint64_t nbytes() const { return end - begin; }
};

struct GgufHeader {
  std::string path;  // the label errors were reported with
  uint32_t version = 0;
  uint64_t file_bytes = 0;
  uint64_t alignment = 32;    // general.alignment, or 32
  uint64_t header_bytes = 0;  // ggml reports only the data offset: the same as data_start
  uint64_t data_start = 0;    // header_bytes rounded up to the alignment
  std::vector<std::pair<std::string, GgufValue>> metadata;  // file order
  std::vector<GgufTensorInfo> tensors;                      // tensor-info order

  const GgufValue* find(std::string_view key) const;
  const GgufTensorInfo* find_tensor(std::string_view name) const;
};

// Reads exactly `n` bytes at `offset` into `dst`, or throws (a ferry::Error).
using GgufReadFn = std::function<void(uint64_t offset, void* dst, size_t n)>;

struct GgufParseOptions {
  // Keep array items (a tokenizer's vocabulary: megabytes). Off, arrays are still walked and
  // validated, and their type and count kept, but not their items.
  bool keep_arrays = false;
  // Headers (metadata + tensor infos) larger than this are refused: real ones are a few MB, the
  // tokenizer dominating, so more means corruption, and the cap bounds memory.
  uint64_t max_header_bytes = uint64_t{256} << 20;
};

// Limits, as lib/model/gguf.ts has them.
constexpr uint64_t kGgufMaxTensors = 1'000'000;
constexpr uint64_t kGgufMaxStringBytes = uint64_t{1} << 30;
constexpr int kGgufMaxArrayDepth = 8;
constexpr uint32_t kGgufMaxDims = 4;
constexpr uint64_t kGgufDefaultAlignment = 32;

// Parses and validates the header of a `file_bytes`-byte GGUF file read through `read`. `label`
// (the path) prefixes every error message. Throws ModelFormatError.
GgufHeader parse_gguf(const std::string& label, uint64_t file_bytes, const GgufReadFn& read,
                      const GgufParseOptions& options = {});

// Opens `path` and parses its header. IoError if it cannot be opened, ModelFormatError otherwise.
GgufHeader read_gguf(const std::string& path, const GgufParseOptions& options = {});

}  // namespace ferry
