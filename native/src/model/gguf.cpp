// The GGUF v2/v3 header reader (see gguf.h), and its view as a SafetensorsHeader for the code that
// handles both formats alike. Validation mirrors lib/model/gguf.ts rule for rule, so a file the
// planner accepts the executor accepts too, and the other way round.
#include "ferry/gguf.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <vector>

#include "ferry/errors.h"
#include "ferry/ggml_support.h"
#include "ferry/safetensors.h"
#include "gguf.h"

namespace ferry {

namespace {

struct RemovedType {
  uint32_t id;
  const char* name;
};
constexpr RemovedType kRemovedTypes[] = {
    {4, "Q4_2"},      {5, "Q4_3"},        {31, "Q4_0_4_4"},   {32, "Q4_0_4_8"},
    {33, "Q4_0_8_8"}, {36, "IQ4_NL_4_4"}, {37, "IQ4_NL_4_8"}, {38, "IQ4_NL_8_8"},
};

constexpr const char* kValueTypeNames[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                           "int32",  "float32", "bool",   "string", "array",
                                           "uint64", "int64",   "float64"};
constexpr uint32_t kValueTypeCount = 13;

// Largest integer a JavaScript number holds exactly: no real dimension comes near it.
constexpr uint64_t kMaxSafeInteger = (uint64_t{1} << 53) - 1;

using u128 = unsigned __int128;

std::string u128_text(u128 v) {
  if (v == 0) return "0";
  std::string s;
  while (v > 0) {
    s.insert(s.begin(), static_cast<char>('0' + static_cast<int>(v % 10)));
    v /= 10;
  }
  return s;
}

std::string ne_text(const std::vector<int64_t>& ne) {
  std::string s;
  for (size_t i = 0; i < ne.size(); i++) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s;
}

// A JSON string literal of `text` cut to `max_chars` bytes (on a character boundary), "…" marking
// the cut, as the TypeScript summary's quote() does.
std::string quote(const std::string& text, size_t max_chars) {
  size_t cut = text.size();
  if (cut > max_chars) {
    cut = max_chars;
    while (cut > 0 && (static_cast<uint8_t>(text[cut]) & 0xC0) == 0x80) cut--;
  }
  std::string out = "\"";
  for (size_t i = 0; i < cut; i++) {
    const char c = text[i];
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<uint8_t>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
  if (cut < text.size()) out += "…";
  return out;
}

// The shortest decimal that reads back as the same value (float32 or float64).
std::string shortest(double value, bool float32) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "Infinity" : "-Infinity";
  char buf[40];
  for (int digits = 1; digits <= 17; digits++) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, value);
    if (float32 ? std::strtof(buf, nullptr) == static_cast<float>(value)
                : std::strtod(buf, nullptr) == value) {
      break;
    }
  }
  return buf;
}

std::string scalar_text(const GgufValue& v) {
  switch (v.type) {
    case GgufValueType::kUint8:
    case GgufValueType::kUint16:
    case GgufValueType::kUint32:
    case GgufValueType::kUint64:
      return std::to_string(v.u);
    case GgufValueType::kInt8:
    case GgufValueType::kInt16:
    case GgufValueType::kInt32:
    case GgufValueType::kInt64:
      return std::to_string(v.i);
    case GgufValueType::kFloat32:
      return shortest(v.f, true);
    case GgufValueType::kFloat64:
      return shortest(v.f, false);
    case GgufValueType::kBool:
      return v.u ? "true" : "false";
    case GgufValueType::kString:
      return v.str;
    case GgufValueType::kArray:
      break;
  }
  return "";
}

// Decodes a little-endian scalar of `type` from `p` into `v`.
void decode_scalar(GgufValueType type, const uint8_t* p, GgufValue* v) {
  v->type = type;
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kBool:
      v->u = p[0];
      v->i = static_cast<int64_t>(v->u);
      if (type == GgufValueType::kBool) v->u = v->i = p[0] != 0 ? 1 : 0;  // any non-zero is true
      break;
    case GgufValueType::kInt8:
      v->i = static_cast<int8_t>(p[0]);
      v->u = static_cast<uint64_t>(v->i);
      break;
    case GgufValueType::kUint16: {
      uint16_t x;
      std::memcpy(&x, p, 2);
      v->u = x;
      v->i = x;
      break;
    }
    case GgufValueType::kInt16: {
      int16_t x;
      std::memcpy(&x, p, 2);
      v->i = x;
      v->u = static_cast<uint64_t>(v->i);
      break;
    }
    case GgufValueType::kUint32: {
      uint32_t x;
      std::memcpy(&x, p, 4);
      v->u = x;
      v->i = x;
      break;
    }
    case GgufValueType::kInt32: {
      int32_t x;
      std::memcpy(&x, p, 4);
      v->i = x;
      v->u = static_cast<uint64_t>(v->i);
      break;
    }
    case GgufValueType::kUint64:
      std::memcpy(&v->u, p, 8);
      v->i = static_cast<int64_t>(v->u);
      break;
    case GgufValueType::kInt64:
      std::memcpy(&v->i, p, 8);
      v->u = static_cast<uint64_t>(v->i);
      break;
    case GgufValueType::kFloat32: {
      float x;
      std::memcpy(&x, p, 4);
      v->f = x;
      break;
    }
    case GgufValueType::kFloat64:
      std::memcpy(&v->f, p, 8);
      break;
    case GgufValueType::kString:
    case GgufValueType::kArray:
      break;
  }
}

}  // namespace

namespace {

// ggml's type traits as Ferry's table, built once from ggml itself.
const std::vector<GgmlTypeInfo>& ggml_types() {
  static const std::vector<GgmlTypeInfo> table = [] {
    std::vector<GgmlTypeInfo> t;
    for (int i = 0; i < GGML_TYPE_COUNT; i++) {
      const auto type = static_cast<ggml_type>(i);
      if (ggml_blck_size(type) == 0) continue;  // a removed type's slot
      t.push_back({static_cast<uint32_t>(i), ggml_type_name(type),
                   static_cast<uint32_t>(ggml_blck_size(type)),
                   static_cast<uint32_t>(ggml_type_size(type)), ggml_is_quantized(type)});
    }
    return t;
  }();
  return table;
}

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t id) {
  for (const auto& t : ggml_types()) {
    if (t.id == id) return &t;
  }
  return nullptr;
}

const GgmlTypeInfo* ggml_type_by_name(std::string_view name) {
  for (const auto& t : ggml_types()) {
    const std::string_view n = t.name;
    if (n.size() != name.size()) continue;
    bool same = true;
    for (size_t i = 0; i < n.size() && same; i++) {
      const auto lower = [](char ch) { return ch >= 'A' && ch <= 'Z' ? char(ch - 'A' + 'a') : ch; };
      same = lower(n[i]) == lower(name[i]);
    }
    if (same) return &t;
  }
  return nullptr;
}

const char* ggml_removed_type_name(uint32_t id) {
  for (const auto& r : kRemovedTypes) {
    if (r.id == id) return r.name;
  }
  return nullptr;
}

const char* gguf_value_type_name(GgufValueType type) {
  const auto id = static_cast<uint32_t>(type);
  return id < kValueTypeCount ? kValueTypeNames[id] : "?";
}

size_t gguf_scalar_bytes(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    case GgufValueType::kString:
    case GgufValueType::kArray:
      return 0;
  }
  return 0;
}

bool GgufValue::is_integer() const {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

bool GgufValue::as_uint64(uint64_t* out) const {
  if (!is_integer()) return false;
  const bool is_signed = type == GgufValueType::kInt8 || type == GgufValueType::kInt16 ||
                         type == GgufValueType::kInt32 || type == GgufValueType::kInt64;
  if (is_signed && i < 0) return false;
  *out = u;
  return true;
}

std::string gguf_value_summary(const GgufValue& value) {
  constexpr size_t kMaxChars = 80;
  constexpr uint64_t kMaxItems = 4;
  if (value.type == GgufValueType::kString) return quote(value.str, kMaxChars);
  if (value.type != GgufValueType::kArray) return scalar_text(value);
  std::string text = "[" + std::string(gguf_value_type_name(value.item_type)) + " × " +
                     std::to_string(value.count) + "]";
  if (value.items_kept && value.count > 0) {
    std::string shown;
    const uint64_t n = std::min(value.count, kMaxItems);
    const size_t size = gguf_scalar_bytes(value.item_type);
    for (uint64_t k = 0; k < n; k++) {
      if (k) shown += ", ";
      if (value.item_type == GgufValueType::kString) {
        shown += quote(value.strings[k], 24);
      } else if (value.item_type == GgufValueType::kArray) {
        const GgufValue& inner = value.arrays[k];
        shown += "[" + std::string(gguf_value_type_name(inner.item_type)) + " × " +
                 std::to_string(inner.count) + "]";
      } else {
        GgufValue item;
        decode_scalar(value.item_type, value.raw.data() + k * size, &item);
        shown += scalar_text(item);
      }
    }
    text += " " + shown + (value.count > kMaxItems ? ", …" : "");
  }
  if (text.size() > kMaxChars + 40) {
    size_t cut = kMaxChars + 39;
    while (cut > 0 && (static_cast<uint8_t>(text[cut]) & 0xC0) == 0x80) cut--;
    text = text.substr(0, cut) + "…";
  }
  return text;
}

const GgufValue* GgufHeader::find(std::string_view key) const {
  for (const auto& [k, v] : metadata) {
    if (k == key) return &v;
  }
  return nullptr;
}

const GgufTensorInfo* GgufHeader::find_tensor(std::string_view name) const {
  for (const auto& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

namespace {

[[noreturn]] void fail(const std::string& label, const std::string& what) {
  throw ModelFormatError(label + ": " + what);
}

uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// ggml's reader reads through this: the caller's read function, clamped to the file (ggml reads
// up to `len` bytes and treats a short read as the end), its first failure kept for the caller.
struct CallbackReader {
  const GgufReadFn* read;
  uint64_t file_bytes;
  std::exception_ptr error;
};

size_t read_callback(void* userdata, void* output, uint64_t offset, size_t len) {
  auto& r = *static_cast<CallbackReader*>(userdata);
  if (r.error || offset >= r.file_bytes) return 0;
  const size_t n = static_cast<size_t>(std::min<uint64_t>(len, r.file_bytes - offset));
  try {
    (*r.read)(offset, output, n);
  } catch (...) {
    r.error = std::current_exception();
    return 0;
  }
  return n;
}

GgufValue value_of(const gguf_context* ctx, int64_t id, bool keep_arrays) {
  GgufValue v;
  const auto type = static_cast<GgufValueType>(gguf_get_kv_type(ctx, id));
  if (type == GgufValueType::kString) {
    v.type = type;
    v.str = gguf_get_val_str(ctx, id);
  } else if (type == GgufValueType::kArray) {
    v.type = type;
    v.item_type = static_cast<GgufValueType>(gguf_get_arr_type(ctx, id));
    v.count = gguf_get_arr_n(ctx, id);
    if (keep_arrays) {
      v.items_kept = true;
      if (v.item_type == GgufValueType::kString) {
        v.strings.reserve(static_cast<size_t>(v.count));
        for (uint64_t i = 0; i < v.count; i++) {
          v.strings.emplace_back(gguf_get_arr_str(ctx, id, static_cast<size_t>(i)));
        }
      } else if (v.item_type != GgufValueType::kArray) {
        const auto* data = static_cast<const uint8_t*>(gguf_get_arr_data(ctx, id));
        v.raw.assign(data, data + v.count * gguf_scalar_bytes(v.item_type));
      }
    }
  } else {
    decode_scalar(type, static_cast<const uint8_t*>(gguf_get_val_data(ctx, id)), &v);
  }
  return v;
}

}  // namespace

GgufHeader parse_gguf(const std::string& label, uint64_t file_bytes, const GgufReadFn& read,
                      const GgufParseOptions& options) {
  GgufHeader h;
  h.path = label;
  h.file_bytes = file_bytes;
  // What the first bytes already say, in Ferry's words: not GGUF at all, or a version ggml would
  // refuse for a reason worth spelling out.
  if (file_bytes < 8) {
    fail(label, "file is too short to be GGUF (" + std::to_string(file_bytes) +
                    " bytes; the magic and version alone need 8)");
  }
  uint8_t head[8];
  read(0, head, sizeof head);
  if (std::memcmp(head, "GGUF", 4) != 0) {
    char shown[16];
    std::snprintf(shown, sizeof shown, "%02x %02x %02x %02x", head[0], head[1], head[2], head[3]);
    fail(label, std::string("not a GGUF file: starts with ") + shown +
                    ", expected \"GGUF\" (47 47 55 46)");
  }
  h.version = le32(head + 4);
  if (h.version == 1) {
    fail(label,
         "GGUF version 1 is not supported (its counts and lengths are 32-bit); convert the model "
         "again with a current llama.cpp");
  }
  if (h.version != 2 && h.version != 3) {
    // A big-endian file stores version 3 as 00 00 00 03, which reads as 0x03000000 here.
    const uint32_t swapped = h.version >> 24;
    const bool big_endian = (h.version & 0x00FFFFFFu) == 0 && (swapped == 2 || swapped == 3);
    fail(label,
         "unsupported GGUF version " + std::to_string(h.version) +
             (big_endian ? " (a big-endian GGUF file; only little-endian files are supported)"
                         : "") +
             "; supported: 2, 3");
  }

  // ggml's reader: every count and length bounded by the bytes left in the file.
  GgmlLogCapture capture;
  CallbackReader reader{&read, file_bytes, nullptr};
  gguf_init_params params{/*no_alloc =*/true, /*ctx =*/nullptr};
  gguf_context* ctx =
      gguf_init_from_callback(read_callback, &reader, size_t{8} << 20,
                              std::min(file_bytes, options.max_header_bytes), params);
  if (reader.error) {
    if (ctx) gguf_free(ctx);
    std::rethrow_exception(reader.error);
  }
  if (!ctx) {
    std::string why = capture.text();
    if (why.empty()) why = "ggml's GGUF reader refused it";
    fail(label, "not a valid GGUF file: " + why);
  }
  std::unique_ptr<gguf_context, void (*)(gguf_context*)> owned(ctx, gguf_free);

  const int64_t n_kv = gguf_get_n_kv(ctx);
  h.metadata.reserve(static_cast<size_t>(n_kv));
  for (int64_t i = 0; i < n_kv; i++) {
    h.metadata.emplace_back(gguf_get_key(ctx, i), value_of(ctx, i, options.keep_arrays));
  }
  h.alignment = gguf_get_alignment(ctx);
  h.data_start = gguf_get_data_offset(ctx);
  h.header_bytes = h.data_start;

  const int64_t n_tensors = gguf_get_n_tensors(ctx);
  h.tensors.reserve(static_cast<size_t>(n_tensors));
  for (int64_t i = 0; i < n_tensors; i++) {
    GgufTensorInfo t;
    t.name = gguf_get_tensor_name(ctx, i);
    const std::string where = "tensor \"" + t.name + "\"";
    const int64_t* ne = gguf_get_tensor_ne(ctx, i);
    // ggml keeps 4 dimensions and no count: trailing ones are dropped, as ggml_n_dims does.
    int dims = GGML_MAX_DIMS;
    while (dims > 1 && ne[dims - 1] == 1) dims--;
    for (int d = 0; d < dims; d++) {
      if (static_cast<uint64_t>(ne[d]) > kMaxSafeInteger) {
        fail(label, where + " has an absurd dimension ne[" + std::to_string(d) +
                        "] = " + std::to_string(ne[d]) + "; corrupt");
      }
      t.ne.push_back(ne[d]);
    }
    // Upstream ggml's own element-count check is skipped when the product wraps to ≤ 0 in int64
    // (ne {2^40, 2^40} passes with 0 bytes). The ggml Ferry extracts has that fixed
    // (scripts/ggml-fixes.mjs); a FERRY_GGML_DIR checkout may not, so bound the product here too.
    u128 elements = 1;
    for (int64_t n : t.ne) {
      elements *= static_cast<uint64_t>(n);
      if (elements > kMaxSafeInteger) {
        fail(label, where + " has more elements (ne [" + ne_text(t.ne) +
                        "]) than any file can hold; corrupt");
      }
    }
    t.shape.assign(t.ne.rbegin(), t.ne.rend());
    t.type = ggml_type_info(static_cast<uint32_t>(gguf_get_tensor_type(ctx, i)));
    if (!t.type) fail(label, where + " has a ggml type this build does not know");
    t.offset = gguf_get_tensor_offset(ctx, i);
    const uint64_t bytes = gguf_get_tensor_size(ctx, i);
    const u128 end = static_cast<u128>(h.data_start) + t.offset + bytes;
    if (end > file_bytes) {
      fail(label, where + " (" + t.type->name + " [" + ne_text(t.ne) + "], " +
                      std::to_string(bytes) + " bytes) at data offset " + std::to_string(t.offset) +
                      " ends at byte " + u128_text(end) + ", past the end of the " +
                      std::to_string(file_bytes) + "-byte file; truncated?");
    }
    t.begin = h.data_start + t.offset;
    t.end = t.begin + bytes;
    h.tensors.push_back(std::move(t));
  }
  return h;
}

GgufHeader read_gguf(const std::string& path, const GgufParseOptions& options) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(errno, "open", path);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (fstat(fd, &st) != 0) throw IoError(errno, "fstat", path);
  if (!S_ISREG(st.st_mode)) throw ModelFormatError(path + ": not a regular file");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  return parse_gguf(
      path, size,
      [&](uint64_t offset, void* dst, size_t n) {
        size_t done = 0;
        while (done < n) {
          const ssize_t r = ::pread(fd, static_cast<uint8_t*>(dst) + done, n - done,
                                    static_cast<off_t>(offset + done));
          if (r < 0) {
            if (errno == EINTR) continue;
            throw IoError(errno, "pread", path);
          }
          if (r == 0) {
            throw ModelFormatError(path + ": file shrank while its GGUF header was read (at byte " +
                                   std::to_string(offset + done) + ")");
          }
          done += static_cast<size_t>(r);
        }
      },
      options);
}

// ---- the GGUF header as a SafetensorsHeader (safetensors.h) ----

namespace {

// The safetensors dtype of a plain ggml type; quantized blocks (and the rest) have none and are
// described by TensorInfo::ggml_type, with `dtype` U8 (raw bytes).
StDType st_dtype_of(const GgmlTypeInfo& t) {
  switch (t.id) {
    case 0:
      return StDType::kF32;
    case 1:
      return StDType::kF16;
    case 24:
      return StDType::kI8;
    case 25:
      return StDType::kI16;
    case 26:
      return StDType::kI32;
    case 27:
      return StDType::kI64;
    case 28:
      return StDType::kF64;
    case 30:
      return StDType::kBF16;
    default:
      return StDType::kU8;
  }
}

}  // namespace

SafetensorsHeader safetensors_view_of_gguf(std::shared_ptr<const GgufHeader> gguf) {
  SafetensorsHeader header;
  header.header_bytes = gguf->header_bytes;
  header.data_start = gguf->data_start;
  header.file_bytes = gguf->file_bytes;
  for (const auto& [key, value] : gguf->metadata) {
    header.metadata[key] =
        value.type == GgufValueType::kString ? value.str : gguf_value_summary(value);
  }
  header.tensors.reserve(gguf->tensors.size());
  for (const auto& t : gguf->tensors) {
    TensorInfo info;
    info.name = t.name;
    info.dtype = st_dtype_of(*t.type);
    info.shape = t.shape;
    info.begin = t.begin;
    info.end = t.end;
    info.ggml_type = static_cast<int>(t.type->id);
    info.ggml_type_name = t.type->name;
    header.tensors.push_back(std::move(info));
  }
  // Data order, like a safetensors header; stable so empty tensors keep tensor-info order.
  std::stable_sort(header.tensors.begin(), header.tensors.end(),
                   [](const TensorInfo& a, const TensorInfo& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  header.gguf = std::move(gguf);
  return header;
}

SafetensorsHeader parse_gguf_header(const std::string& label, uint64_t file_bytes,
                                    const std::function<void(uint64_t, void*, size_t)>& read) {
  return safetensors_view_of_gguf(
      std::make_shared<const GgufHeader>(parse_gguf(label, file_bytes, read)));
}

}  // namespace ferry
