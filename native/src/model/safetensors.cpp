#include "ferry/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "ferry/errors.h"
#include "ggml.h"
#include "json.h"

namespace ferry {

namespace {

struct DTypeEntry {
  StDType dtype;
  const char* name;
  unsigned bits;
};

// The dtypes of the safetensors specification, by their header names.
constexpr DTypeEntry kDTypes[] = {
    {StDType::kBool, "BOOL", 8},       {StDType::kU8, "U8", 8},
    {StDType::kI8, "I8", 8},           {StDType::kF8_E5M2, "F8_E5M2", 8},
    {StDType::kF8_E4M3, "F8_E4M3", 8}, {StDType::kF8_E8M0, "F8_E8M0", 8},
    {StDType::kI16, "I16", 16},        {StDType::kU16, "U16", 16},
    {StDType::kF16, "F16", 16},        {StDType::kBF16, "BF16", 16},
    {StDType::kI32, "I32", 32},        {StDType::kU32, "U32", 32},
    {StDType::kF32, "F32", 32},        {StDType::kF64, "F64", 64},
    {StDType::kI64, "I64", 64},        {StDType::kU64, "U64", 64},
    {StDType::kC64, "C64", 64},        {StDType::kF4, "F4", 4},
    {StDType::kF6_E2M3, "F6_E2M3", 6}, {StDType::kF6_E3M2, "F6_E3M2", 6},
};

const DTypeEntry& entry_of(StDType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e;
  }
  return kDTypes[0];
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += static_cast<unsigned char>(c) < 0x20 ? '?' : c;
  }
  return out + "\"";
}

}  // namespace

const char* st_dtype_name(StDType dtype) { return entry_of(dtype).name; }

const char* model_format_name(ModelFormat format) {
  return format == ModelFormat::kGguf ? "gguf" : "safetensors";
}

bool st_dtype_from_name(std::string_view name, StDType* out) {
  for (const auto& e : kDTypes) {
    if (name == e.name) {
      *out = e.dtype;
      return true;
    }
  }
  return false;
}

unsigned st_dtype_bits(StDType dtype) { return entry_of(dtype).bits; }

std::string st_known_dtypes() {
  std::string s;
  for (const auto& e : kDTypes) {
    if (!s.empty()) s += ", ";
    s += e.name;
  }
  return s;
}

int64_t TensorInfo::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsHeader parse_safetensors_header(const std::string& label, std::string_view text,
                                           uint64_t header_bytes, uint64_t file_bytes) {
  auto fail = [&](const std::string& problem) -> void {
    throw ModelFormatError(label + ": " + problem);
  };
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const json::ParseError& e) {
    throw ModelFormatError(label + ": header is not valid JSON (" + e.what() + " at byte " +
                           std::to_string(e.offset) + " of the header)");
  }
  if (!root.is_object())
    fail(std::string("header must be a JSON object, got ") + json::describe(root));

  SafetensorsHeader header;
  header.header_bytes = header_bytes;
  header.data_start = 8 + header_bytes;
  header.file_bytes = file_bytes;
  if (header.data_start > file_bytes) {
    fail("header length " + std::to_string(header_bytes) + " runs past the end of the file (" +
         std::to_string(file_bytes) + " bytes)");
  }
  const uint64_t data_bytes = file_bytes - header.data_start;

  std::set<std::string> seen;
  for (const auto& [name, entry] : root.members) {
    if (!seen.insert(name).second) fail("duplicate key " + quoted(name) + " in the header");
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        fail("__metadata__ must be an object of strings, got " + json::describe(entry));
      }
      for (const auto& [key, value] : entry.members) {
        if (!value.is_string()) {
          fail("__metadata__ value of " + quoted(key) + " must be a string, got " +
               json::describe(value));
        }
        if (!header.metadata.emplace(key, value.text).second) {
          fail("duplicate __metadata__ key " + quoted(key));
        }
      }
      continue;
    }
    // A lambda may not capture a structured binding before C++20 (clang refuses): a copy.
    const std::string& tensor_name = name;
    auto bad = [&](const std::string& problem) {
      fail("tensor " + quoted(tensor_name) + ": " + problem);
    };
    if (!entry.is_object()) {
      bad("entry must be an object with dtype, shape and data_offsets, got " +
          json::describe(entry));
    }
    TensorInfo t;
    t.name = name;

    const json::Value* dtype = entry.find("dtype");
    if (!dtype) bad("missing \"dtype\"");
    if (!dtype->is_string()) bad("\"dtype\" must be a string, got " + json::describe(*dtype));
    if (!st_dtype_from_name(dtype->text, &t.dtype)) {
      bad("unknown dtype " + quoted(dtype->text) + " (known: " + st_known_dtypes() + ")");
    }

    const json::Value* shape = entry.find("shape");
    if (!shape) bad("missing \"shape\"");
    if (!shape->is_array()) bad("\"shape\" must be an array, got " + json::describe(*shape));
    // Elements are accumulated in 128 bits: a corrupt shape overflows 64 long before the byte
    // size check could catch it.
    unsigned __int128 elements = 1;
    for (const auto& d : shape->items) {
      int64_t dim;
      if (!d.as_int64(&dim) || dim < 0) {
        bad("\"shape\" must be an array of non-negative integers, got " + json::describe(*shape));
      }
      if (dim > kMaxTensorDim) {
        bad("dimension " + std::to_string(dim) + " in \"shape\" is absurd (limit " +
            std::to_string(kMaxTensorDim) + ")");
      }
      t.shape.push_back(dim);
      elements *= static_cast<uint64_t>(dim);
      if (elements > (static_cast<unsigned __int128>(1) << 64)) {
        bad("shape " + shape_text(t.shape) + " has more elements than any file can hold");
      }
    }

    const json::Value* offsets = entry.find("data_offsets");
    if (!offsets) bad("missing \"data_offsets\"");
    int64_t begin = -1, end = -1;
    if (!offsets->is_array() || offsets->items.size() != 2 || !offsets->items[0].as_int64(&begin) ||
        !offsets->items[1].as_int64(&end) || begin < 0 || end < 0) {
      bad("\"data_offsets\" must be [begin, end] of non-negative integers, got " +
          json::describe(*offsets));
    }
    const std::string range =
        "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "]";
    if (begin > end) bad(range + " begin after end");
    if (static_cast<uint64_t>(end) > data_bytes) {
      bad(range + " run past the end of the data (" + std::to_string(data_bytes) +
          " bytes after the header); file truncated?");
    }
    const unsigned __int128 bits = elements * st_dtype_bits(t.dtype);
    const uint64_t have = static_cast<uint64_t>(end - begin);
    if (bits % 8 != 0 || bits / 8 != have) {
      const std::string need = bits % 8 != 0
                                   ? "a whole number of bytes"
                                   : std::to_string(static_cast<uint64_t>(bits / 8)) + " bytes";
      bad(range + " hold " + std::to_string(have) + " bytes, but " + st_dtype_name(t.dtype) +
          " shape " + shape_text(t.shape) + " needs " + need);
    }
    t.begin = header.data_start + static_cast<uint64_t>(begin);
    t.end = header.data_start + static_cast<uint64_t>(end);
    header.tensors.push_back(std::move(t));
  }

  // Data order; stable so empty tensors sharing an offset keep their JSON order.
  std::stable_sort(header.tensors.begin(), header.tensors.end(),
                   [](const TensorInfo& a, const TensorInfo& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  const TensorInfo* reach = nullptr;  // the tensor whose data ends furthest so far
  for (const auto& t : header.tensors) {
    if (reach && t.nbytes() > 0 && t.begin < reach->end) {
      const auto rel = [&](const TensorInfo& x) {
        return "[" + std::to_string(x.begin - header.data_start) + ", " +
               std::to_string(x.end - header.data_start) + "]";
      };
      fail("tensor " + quoted(t.name) + " data_offsets " + rel(t) + " overlap tensor " +
           quoted(reach->name) + " " + rel(*reach));
    }
    if (!reach || t.end > reach->end) reach = &t;
  }
  return header;
}

SafetensorsFile::SafetensorsFile(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(errno, "open", path);
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile(path, fd));
  struct stat st;
  if (fstat(fd, &st) != 0) throw IoError(errno, "fstat", path);
  if (!S_ISREG(st.st_mode)) throw ModelFormatError(path + ": not a regular file");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  file->header_.file_bytes = size;
  if (size >= 4) {
    char magic[4];
    file->read(0, magic, 4);
    if (std::memcmp(magic, "GGUF", 4) == 0) {
      const SafetensorsFile* reader = file.get();
      file->header_ = parse_gguf_header(path, size, [reader](uint64_t offset, void* dst, size_t n) {
        reader->read(offset, dst, n);
      });
      return file;
    }
  }
  if (size < 8) {
    throw ModelFormatError(path + ": file is too short to be safetensors (" + std::to_string(size) +
                           " bytes; the 8-byte header length alone needs 8)");
  }
  uint8_t length_field[8];
  file->read(0, length_field, 8);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | length_field[i];
  if (n > kMaxSafetensorsHeaderBytes) {
    throw ModelFormatError(path + ": header length " + std::to_string(n) + " exceeds the " +
                           std::to_string(kMaxSafetensorsHeaderBytes) + "-byte limit (file is " +
                           std::to_string(size) + " bytes); not a safetensors file or corrupt");
  }
  if (8 + n > size) {
    throw ModelFormatError(path + ": header length " + std::to_string(n) +
                           " runs past the end of the file (" + std::to_string(size) +
                           " bytes, so at most " + std::to_string(size - 8) +
                           "); truncated or not safetensors");
  }
  std::string text(n, '\0');
  file->read(8, text.data(), n);
  file->header_ = parse_safetensors_header(path, text, n, size);
  return file;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  for (const auto& t : header_.tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

void SafetensorsFile::read(uint64_t offset, void* dst, size_t bytes) const {
  if (offset > header_.file_bytes || bytes > header_.file_bytes - offset) {
    throw ModelFormatError(path_ + ": read of " + std::to_string(bytes) + " bytes at offset " +
                           std::to_string(offset) + " is past the end of the file (" +
                           std::to_string(header_.file_bytes) + " bytes)");
  }
  auto* out = static_cast<uint8_t*>(dst);
  size_t done = 0;
  while (done < bytes) {
    // Bounded chunks: some kernels cap a single read near 2 GiB anyway.
    const size_t chunk = std::min<size_t>(bytes - done, size_t{1} << 30);
    const ssize_t r = ::pread(fd_, out + done, chunk, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw IoError(errno, "pread", path_);
    }
    if (r == 0) {
      throw ModelFormatError(path_ + ": file ended at byte " + std::to_string(offset + done) +
                             " while reading " + std::to_string(bytes) + " bytes at offset " +
                             std::to_string(offset) + "; was it truncated after it was opened?");
    }
    done += static_cast<size_t>(r);
  }
}

std::vector<uint8_t> SafetensorsFile::read_tensor(const TensorInfo& tensor) const {
  std::vector<uint8_t> bytes(tensor.nbytes());
  read(tensor.begin, bytes.data(), bytes.size());
  return bytes;
}

namespace {

template <typename T>
T load_le(const uint8_t* p) {
  // Safetensors data is little-endian, as is every host Ferry builds for.
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

double f8_e4m3_to_f64(uint8_t b) {
  // OCP E4M3 ("fn"): bias 7, no infinities, S.1111.111 is NaN.
  const int sign = b >> 7;
  const int exp = (b >> 3) & 0xF;
  const int mant = b & 0x7;
  double v;
  if (exp == 0xF && mant == 0x7) {
    v = std::numeric_limits<double>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(mant / 8.0, -6);
  } else {
    v = std::ldexp(1.0 + mant / 8.0, exp - 7);
  }
  return sign ? -v : v;
}

}  // namespace

namespace {

float f16_to_f32(uint16_t h) {
  ggml_fp16_t f;
  std::memcpy(&f, &h, 2);
  return ggml_fp16_to_fp32(f);
}

float bf16_to_f32(uint16_t h) {
  ggml_bf16_t b;
  std::memcpy(&b, &h, 2);
  return ggml_bf16_to_fp32(b);
}

}  // namespace

std::vector<double> decode_tensor_f64(StDType dtype, const uint8_t* bytes, size_t nbytes) {
  const unsigned bits = st_dtype_bits(dtype);
  if (bits % 8 != 0 || nbytes % (bits / 8) != 0) {
    throw InvalidArgumentError(std::string("decode_tensor_f64: ") + std::to_string(nbytes) +
                               " bytes is not a whole number of " + st_dtype_name(dtype));
  }
  const size_t n = nbytes / (bits / 8);
  std::vector<double> out(n);
  for (size_t i = 0; i < n; i++) {
    const uint8_t* p = bytes + i * (bits / 8);
    switch (dtype) {
      case StDType::kBool:
        out[i] = p[0] != 0 ? 1.0 : 0.0;
        break;
      case StDType::kU8:
        out[i] = p[0];
        break;
      case StDType::kI8:
        out[i] = static_cast<int8_t>(p[0]);
        break;
      case StDType::kU16:
        out[i] = load_le<uint16_t>(p);
        break;
      case StDType::kI16:
        out[i] = load_le<int16_t>(p);
        break;
      case StDType::kU32:
        out[i] = load_le<uint32_t>(p);
        break;
      case StDType::kI32:
        out[i] = load_le<int32_t>(p);
        break;
      case StDType::kU64:
        out[i] = static_cast<double>(load_le<uint64_t>(p));
        break;
      case StDType::kI64:
        out[i] = static_cast<double>(load_le<int64_t>(p));
        break;
      case StDType::kF16:
        out[i] = f16_to_f32(load_le<uint16_t>(p));
        break;
      case StDType::kBF16:
        out[i] = bf16_to_f32(load_le<uint16_t>(p));
        break;
      case StDType::kF32:
        out[i] = load_le<float>(p);
        break;
      case StDType::kF64:
        out[i] = load_le<double>(p);
        break;
      // E5M2 is the top byte of an IEEE half.
      case StDType::kF8_E5M2:
        out[i] = f16_to_f32(static_cast<uint16_t>(p[0] << 8));
        break;
      case StDType::kF8_E4M3:
        out[i] = f8_e4m3_to_f64(p[0]);
        break;
      default:
        throw InvalidArgumentError(std::string("decode_tensor_f64: decoding ") +
                                   st_dtype_name(dtype) + " is not supported");
    }
  }
  return out;
}

}  // namespace ferry
