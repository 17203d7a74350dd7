// GGUF v2/v3 headers (ggml's format, as llama.cpp writes it), read into the same SafetensorsHeader
// the rest of the model code uses: tensor names, shapes in row-major order (the reverse of
// ggml's ne), absolute data offsets, and the DiT's metadata under the safetensors key names.
// Every count, length and offset is checked against the file before anything is allocated.
#include <algorithm>
#include <cstring>
#include <functional>
#include <string>

#include "ferry/errors.h"
#include "ferry/safetensors.h"

namespace ferry {
namespace {

// ggml's type traits (ggml.c type_traits, ggml-common.h block structs): {id, name, block size,
// bytes per block}. Ids 4, 5 and 31–33, 36–38 were removed from ggml and are refused.
struct GgmlType {
  int id;
  const char* name;
  int64_t block;
  int64_t bytes;
};
constexpr GgmlType kGgmlTypes[] = {
    {0, "F32", 1, 4},         {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},
    {3, "Q4_1", 32, 20},      {6, "Q5_0", 32, 22},      {7, "Q5_1", 32, 24},
    {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 36},      {10, "Q2_K", 256, 84},
    {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},   {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66},
    {17, "IQ2_XS", 256, 74},  {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},
    {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},  {22, "IQ2_S", 256, 82},
    {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},        {27, "I64", 1, 8},        {28, "F64", 1, 8},
    {29, "IQ1_M", 256, 56},   {30, "BF16", 1, 2},       {34, "TQ1_0", 256, 54},
    {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
};

const GgmlType* ggml_type(uint32_t id) {
  for (const auto& t : kGgmlTypes) {
    if (static_cast<uint32_t>(t.id) == id) return &t;
  }
  return nullptr;
}

constexpr uint64_t kMaxTensors = 1'000'000;
constexpr uint64_t kMaxKeys = 1'000'000;
constexpr uint64_t kMaxString = uint64_t{1} << 30;
constexpr int kMaxArrayDepth = 8;

enum ValueType : uint32_t {
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

int scalar_bytes(uint32_t type) {
  switch (type) {
    case kUint8:
    case kInt8:
    case kBool:
      return 1;
    case kUint16:
    case kInt16:
      return 2;
    case kUint32:
    case kInt32:
    case kFloat32:
      return 4;
    case kUint64:
    case kInt64:
    case kFloat64:
      return 8;
  }
  return 0;
}

// Sequential little-endian reads over the file through a bounded window, so a header of any
// declared size is read piece by piece and never allocated up front.
class Cursor {
 public:
  Cursor(const std::string& label, uint64_t file_bytes,
         std::function<void(uint64_t, void*, size_t)> read)
      : label_(label), file_bytes_(file_bytes), read_(std::move(read)) {}

  const std::string& label() const { return label_; }
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return file_bytes_ - pos_; }

  void need(uint64_t bytes, const std::string& what) {
    if (bytes > remaining()) {
      throw ModelFormatError(label_ + ": truncated GGUF: " + what + " needs " +
                             std::to_string(bytes) + " bytes at offset " + std::to_string(pos_) +
                             ", the file has " + std::to_string(remaining()) + " left");
    }
  }
  void bytes(void* dst, uint64_t n, const std::string& what) {
    need(n, what);
    read_(pos_, dst, static_cast<size_t>(n));
    pos_ += n;
  }
  template <typename T>
  T get(const std::string& what) {
    uint8_t raw[sizeof(T)];
    bytes(raw, sizeof(T), what);
    T value;
    std::memcpy(&value, raw, sizeof(T));  // GGUF is little-endian, as is every host Ferry runs on
    return value;
  }
  std::string str(const std::string& what) {
    const uint64_t n = get<uint64_t>(what + " length");
    if (n > kMaxString) {
      throw ModelFormatError(label_ + ": " + what + " claims " + std::to_string(n) +
                             " bytes (more than the 1 GiB limit)");
    }
    std::string s(static_cast<size_t>(std::min<uint64_t>(n, remaining())), '\0');
    bytes(s.data(), n, what);
    return s;
  }
  void skip(uint64_t n, const std::string& what) {
    need(n, what);
    pos_ += n;
  }

 private:
  std::string label_;
  uint64_t file_bytes_;
  std::function<void(uint64_t, void*, size_t)> read_;
  uint64_t pos_ = 0;
};

// Reads one metadata value. Scalars come back as text (for the metadata map); arrays are skipped
// (the DiT needs none; a tokenizer's 32,000 strings are walked, not kept).
std::string read_value(Cursor& c, uint32_t type, const std::string& key, int depth) {
  const std::string what = c.label() + ": metadata \"" + key + "\"";
  switch (type) {
    case kUint8:
      return std::to_string(c.get<uint8_t>(what));
    case kInt8:
      return std::to_string(c.get<int8_t>(what));
    case kUint16:
      return std::to_string(c.get<uint16_t>(what));
    case kInt16:
      return std::to_string(c.get<int16_t>(what));
    case kUint32:
      return std::to_string(c.get<uint32_t>(what));
    case kInt32:
      return std::to_string(c.get<int32_t>(what));
    case kUint64:
      return std::to_string(c.get<uint64_t>(what));
    case kInt64:
      return std::to_string(c.get<int64_t>(what));
    case kFloat32:
      return std::to_string(c.get<float>(what));
    case kFloat64:
      return std::to_string(c.get<double>(what));
    case kBool:
      return c.get<uint8_t>(what) ? "true" : "false";
    case kString:
      return c.str(what);
    case kArray: {
      if (depth >= kMaxArrayDepth) throw ModelFormatError(what + ": arrays nest too deep");
      const uint32_t item = c.get<uint32_t>(what + " item type");
      const uint64_t count = c.get<uint64_t>(what + " item count");
      if (const int size = scalar_bytes(item)) {
        if (count > c.remaining() / static_cast<uint64_t>(size)) {
          throw ModelFormatError(what + ": " + std::to_string(count) +
                                 " items run past the end of the file");
        }
        c.skip(count * static_cast<uint64_t>(size), what);
      } else if (item == kString || item == kArray) {
        // Each item takes at least 8 bytes (a length or a header), which bounds the count.
        if (count > c.remaining() / 8) {
          throw ModelFormatError(what + ": " + std::to_string(count) +
                                 " items run past the end of the file");
        }
        for (uint64_t i = 0; i < count; i++) read_value(c, item, key, depth + 1);
      } else {
        throw ModelFormatError(what + ": unknown array item type " + std::to_string(item));
      }
      return "";
    }
  }
  throw ModelFormatError(what + ": unknown value type " + std::to_string(type));
}

}  // namespace

SafetensorsHeader parse_gguf_header(const std::string& label, uint64_t file_bytes,
                                    const std::function<void(uint64_t, void*, size_t)>& read) {
  Cursor c(label, file_bytes, read);
  char magic[4];
  c.bytes(magic, 4, "the magic");
  if (std::memcmp(magic, "GGUF", 4) != 0) throw ModelFormatError(label + ": not a GGUF file");
  const uint32_t version = c.get<uint32_t>("the version");
  if (version != 2 && version != 3) {
    throw ModelFormatError(label + ": GGUF version " + std::to_string(version) +
                           " is not supported (2 or 3)");
  }
  const uint64_t tensor_count = c.get<uint64_t>("the tensor count");
  const uint64_t key_count = c.get<uint64_t>("the metadata count");
  if (tensor_count > kMaxTensors || key_count > kMaxKeys) {
    throw ModelFormatError(label + ": GGUF claims " + std::to_string(tensor_count) +
                           " tensors and " + std::to_string(key_count) + " metadata keys; corrupt");
  }

  SafetensorsHeader header;
  header.file_bytes = file_bytes;
  uint64_t alignment = 32;
  for (uint64_t i = 0; i < key_count; i++) {
    const std::string key = c.str("metadata key " + std::to_string(i));
    const uint32_t type = c.get<uint32_t>("metadata \"" + key + "\" type");
    const std::string value = read_value(c, type, key, 0);
    if (key == "general.alignment") {
      if (type != kUint32) throw ModelFormatError(label + ": general.alignment must be a uint32");
      alignment = std::stoull(value);
      if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
        throw ModelFormatError(label + ": general.alignment " + value + " is not a power of two");
      }
    }
    // The DiT's GGUF keys under the names the safetensors __metadata__ uses.
    if (key == "general.architecture") {
      header.metadata["ferry.arch"] = value == "ferry-dit" ? "dit" : value;
    } else if (key.rfind("ferry-dit.", 0) == 0) {
      header.metadata["ferry." + key.substr(10)] = value;
    } else if (type != kArray) {
      header.metadata[key] = value;
    }
  }

  struct Raw {
    TensorInfo info;
    uint64_t offset;
  };
  std::vector<Raw> raws;
  raws.reserve(static_cast<size_t>(std::min<uint64_t>(tensor_count, c.remaining() / 24)));
  for (uint64_t i = 0; i < tensor_count; i++) {
    Raw raw;
    raw.info.name = c.str("tensor " + std::to_string(i) + " name");
    const std::string where = label + ": tensor \"" + raw.info.name + "\"";
    const uint32_t dims = c.get<uint32_t>("tensor dims");
    if (dims == 0 || dims > 4) {
      throw ModelFormatError(where + " has " + std::to_string(dims) + " dimensions (1 to 4)");
    }
    std::vector<int64_t> ne(dims);
    uint64_t elements = 1;
    for (uint32_t d = 0; d < dims; d++) {
      const uint64_t n = c.get<uint64_t>("tensor ne");
      if (n == 0 || n > static_cast<uint64_t>(kMaxTensorDim) || elements > UINT64_MAX / n) {
        throw ModelFormatError(where + " has an impossible dimension " + std::to_string(n));
      }
      elements *= n;
      ne[d] = static_cast<int64_t>(n);
    }
    const uint32_t type_id = c.get<uint32_t>("tensor type");
    const GgmlType* type = ggml_type(type_id);
    if (!type) throw ModelFormatError(where + " has unknown ggml type " + std::to_string(type_id));
    if (ne[0] % type->block != 0) {
      throw ModelFormatError(where + ": " + type->name + " needs ne0 (" + std::to_string(ne[0]) +
                             ") to be a multiple of " + std::to_string(type->block));
    }
    raw.offset = c.get<uint64_t>("tensor offset");
    raw.info.shape.assign(ne.rbegin(), ne.rend());
    raw.info.ggml_type = static_cast<int>(type_id);
    raw.info.ggml_type_name = type->name;
    const uint64_t nbytes =
        elements / static_cast<uint64_t>(type->block) * static_cast<uint64_t>(type->bytes);
    raw.info.end = nbytes;  // the size, until the data section's start is known
    raws.push_back(std::move(raw));
  }

  header.data_start = (c.pos() + alignment - 1) / alignment * alignment;
  header.header_bytes = header.data_start;
  for (auto& raw : raws) {
    const std::string where = label + ": tensor \"" + raw.info.name + "\"";
    if (raw.offset % alignment != 0) {
      throw ModelFormatError(where + " data offset " + std::to_string(raw.offset) +
                             " is not aligned to " + std::to_string(alignment));
    }
    const uint64_t size = raw.info.end;
    if (raw.offset > file_bytes || header.data_start > file_bytes - raw.offset ||
        size > file_bytes - header.data_start - raw.offset) {
      throw ModelFormatError(where + " (" + std::to_string(size) + " bytes at data offset " +
                             std::to_string(raw.offset) + ") runs past the end of the file (" +
                             std::to_string(file_bytes) + " bytes)");
    }
    raw.info.begin = header.data_start + raw.offset;
    raw.info.end = raw.info.begin + size;
    header.tensors.push_back(std::move(raw.info));
  }
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < header.tensors.size(); i++) {
    if (header.tensors[i].begin < header.tensors[i - 1].end) {
      throw ModelFormatError(label + ": tensors \"" + header.tensors[i - 1].name + "\" and \"" +
                             header.tensors[i].name + "\" overlap");
    }
  }
  return header;
}

}  // namespace ferry
