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
#include <unordered_set>

#include "ferry/errors.h"
#include "ferry/safetensors.h"

namespace ferry {

namespace {

// lib/model/ggmlTypes.ts GGML_TYPES, entry for entry (ggml.h enum ggml_type; ggml.c type_traits;
// the block structs of ggml-common.h).
constexpr uint32_t kQK_K = 256;
constexpr GgmlTypeInfo kGgmlTypes[] = {
    {0, "f32", 1, 4, false},          {1, "f16", 1, 2, false},
    {2, "q4_0", 32, 18, true},        {3, "q4_1", 32, 20, true},
    {6, "q5_0", 32, 22, true},        {7, "q5_1", 32, 24, true},
    {8, "q8_0", 32, 34, true},        {9, "q8_1", 32, 36, true},
    {10, "q2_K", kQK_K, 84, true},    {11, "q3_K", kQK_K, 110, true},
    {12, "q4_K", kQK_K, 144, true},   {13, "q5_K", kQK_K, 176, true},
    {14, "q6_K", kQK_K, 210, true},   {15, "q8_K", kQK_K, 292, true},
    {16, "iq2_xxs", kQK_K, 66, true}, {17, "iq2_xs", kQK_K, 74, true},
    {18, "iq3_xxs", kQK_K, 98, true}, {19, "iq1_s", kQK_K, 50, true},
    {20, "iq4_nl", 32, 18, true},     {21, "iq3_s", kQK_K, 110, true},
    {22, "iq2_s", kQK_K, 82, true},   {23, "iq4_xs", kQK_K, 136, true},
    {24, "i8", 1, 1, false},          {25, "i16", 1, 2, false},
    {26, "i32", 1, 4, false},         {27, "i64", 1, 8, false},
    {28, "f64", 1, 8, false},         {29, "iq1_m", kQK_K, 56, true},
    {30, "bf16", 1, 2, false},        {34, "tq1_0", kQK_K, 54, true},
    {35, "tq2_0", kQK_K, 66, true},   {39, "mxfp4", 32, 17, true},
    {40, "nvfp4", 64, 36, true},      {41, "q1_0", 128, 18, true},
    {42, "q2_0", 64, 18, true},
};

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

// Smallest encodings, to bound counts by the bytes left before looping or allocating: one
// metadata kv is key length (8) + type (4) + a 1-byte value; one tensor info is name length (8) +
// a 1-byte name + n_dims (4) + ne[0] (8) + type (4) + offset (8).
constexpr uint64_t kMinKvBytes = 13;
constexpr uint64_t kMinTensorInfoBytes = 33;
// The header is read through a window that starts small and doubles up to this.
constexpr size_t kFirstWindow = size_t{64} << 10;
constexpr size_t kMaxWindow = size_t{8} << 20;
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

// RFC 3629 UTF-8 (no overlongs, no surrogates, nothing past U+10FFFF), as TextDecoder's fatal
// mode in the TypeScript reader accepts it.
bool valid_utf8(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (n - i < len) return false;
    for (size_t k = 1; k < len; k++) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
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

// Forward reads over the file through a window that is refilled in growing chunks. Every read is
// checked against the file size and the header cap first, so a length field is never trusted
// with an allocation larger than what the file really holds (and never above the cap).
class Cursor {
 public:
  Cursor(const std::string& label, uint64_t file_bytes, const GgufReadFn& read, uint64_t max_header)
      : label_(label), file_bytes_(file_bytes), read_(read), max_header_(max_header) {}

  [[noreturn]] void fail(const std::string& problem) const {
    throw ModelFormatError(label_ + ": " + problem);
  }
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return file_bytes_ - pos_; }

  // Makes [pos, pos + n) readable from the window, or fails naming what was being read.
  void need(uint64_t n, const std::string& what) {
    if (n > max_header_ - pos_) {
      fail("header is larger than the " + std::to_string(max_header_) + "-byte limit (reading " +
           what + " at byte " + std::to_string(pos_) + "); corrupt");
    }
    if (pos_ + n <= window_start_ + window_.size()) return;
    if (n > remaining()) {
      fail("truncated: " + what + " at byte " + std::to_string(pos_) + " needs " +
           std::to_string(n) + " bytes, but the file ends at byte " + std::to_string(file_bytes_));
    }
    const uint64_t length =
        std::min<uint64_t>({std::max<uint64_t>(n, chunk_), remaining(), max_header_ - pos_});
    chunk_ = std::min(chunk_ * 2, kMaxWindow);
    window_.resize(static_cast<size_t>(length));
    read_(pos_, window_.data(), static_cast<size_t>(length));
    window_start_ = pos_;
  }

  const uint8_t* take(uint64_t n, const std::string& what) {
    need(n, what);
    const uint8_t* p = window_.data() + (pos_ - window_start_);
    pos_ += n;
    return p;
  }

  // Advances past n bytes without reading them (bounded like need()).
  void skip(uint64_t n, const std::string& what) {
    if (n > max_header_ - pos_) need(n, what);  // reports the cap
    if (n > remaining()) need(n, what);         // reports the truncation
    pos_ += n;
  }

  uint32_t u32(const std::string& what) {
    uint32_t v;
    std::memcpy(&v, take(4, what), 4);
    return v;
  }
  uint64_t u64(const std::string& what) {
    uint64_t v;
    std::memcpy(&v, take(8, what), 8);
    return v;
  }

  std::string string(const std::string& what, bool keep = true) {
    const uint64_t length = u64("length of " + what);
    if (length > kGgufMaxStringBytes) {
      fail(what + " at byte " + std::to_string(pos_ - 8) + " claims " + std::to_string(length) +
           " bytes, over the " + std::to_string(kGgufMaxStringBytes) +
           "-byte limit for a string; corrupt");
    }
    if (length > remaining()) {
      fail("truncated: " + what + " at byte " + std::to_string(pos_ - 8) + " claims " +
           std::to_string(length) + " bytes, but only " + std::to_string(remaining()) +
           " remain in the file");
    }
    const uint8_t* p = take(length, what);
    if (!valid_utf8(p, static_cast<size_t>(length))) {
      fail(what + " at byte " + std::to_string(pos_ - length) + " is not valid UTF-8");
    }
    return keep ? std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(length))
                : std::string();
  }

 private:
  const std::string& label_;
  const uint64_t file_bytes_;
  const GgufReadFn& read_;
  const uint64_t max_header_;
  std::vector<uint8_t> window_;
  uint64_t window_start_ = 0;
  size_t chunk_ = kFirstWindow;
  uint64_t pos_ = 0;
};

bool value_type_from_id(uint32_t id, GgufValueType* out) {
  if (id >= kValueTypeCount) return false;
  *out = static_cast<GgufValueType>(id);
  return true;
}

std::string known_value_types() {
  std::string s = "known: 0–12, ";
  for (uint32_t i = 0; i < kValueTypeCount; i++)
    s += (i ? ", " : "") + std::string(kValueTypeNames[i]);
  return s;
}

uint64_t min_item_bytes(GgufValueType type) {
  if (type == GgufValueType::kString) return 8;
  if (type == GgufValueType::kArray) return 12;
  return gguf_scalar_bytes(type);
}

void read_array(Cursor& c, const std::string& what, int depth, bool keep, GgufValue* out) {
  if (depth > kGgufMaxArrayDepth) {
    c.fail(what + ": arrays nested deeper than " + std::to_string(kGgufMaxArrayDepth) +
           " levels; corrupt");
  }
  out->type = GgufValueType::kArray;
  const uint32_t type_id = c.u32("item type of " + what);
  if (!value_type_from_id(type_id, &out->item_type)) {
    c.fail(what + " has unknown item type " + std::to_string(type_id) + " at byte " +
           std::to_string(c.pos() - 4) + " (" + known_value_types() + ")");
  }
  out->count = c.u64("item count of " + what);
  const uint64_t min_bytes = min_item_bytes(out->item_type);
  // Checked against the file before looping or allocating: a corrupt 2^60 fails here.
  if (static_cast<u128>(out->count) * min_bytes > c.remaining()) {
    c.fail(what + ": array of " + std::to_string(out->count) + " " +
           gguf_value_type_name(out->item_type) + " items at byte " + std::to_string(c.pos() - 8) +
           " cannot fit in the " + std::to_string(c.remaining()) +
           " bytes left in the file; truncated or corrupt");
  }
  out->items_kept = keep;
  if (const size_t size = gguf_scalar_bytes(out->item_type)) {
    const uint64_t n = out->count * size;
    if (keep) {
      const uint8_t* p = c.take(n, what);
      out->raw.assign(p, p + n);
    } else {
      c.skip(n, what);
    }
    return;
  }
  if (out->item_type == GgufValueType::kString) {
    if (keep) out->strings.reserve(static_cast<size_t>(out->count));
    for (uint64_t i = 0; i < out->count; i++) {
      std::string s = c.string(what + "[" + std::to_string(i) + "]", keep);
      if (keep) out->strings.push_back(std::move(s));
    }
    return;
  }
  if (keep) out->arrays.reserve(static_cast<size_t>(out->count));
  for (uint64_t i = 0; i < out->count; i++) {
    GgufValue inner;
    read_array(c, what + "[" + std::to_string(i) + "]", depth + 1, keep, &inner);
    if (keep) out->arrays.push_back(std::move(inner));
  }
}

GgufValue read_value(Cursor& c, GgufValueType type, const std::string& what, bool keep_arrays) {
  GgufValue v;
  v.type = type;
  if (type == GgufValueType::kString) {
    v.str = c.string(what);
  } else if (type == GgufValueType::kArray) {
    read_array(c, what, 1, keep_arrays, &v);
  } else {
    decode_scalar(type, c.take(gguf_scalar_bytes(type), what), &v);
  }
  return v;
}

std::string brief(const GgufValue& v) {
  if (v.type == GgufValueType::kArray) {
    return "an array of " + std::to_string(v.count) + " " + gguf_value_type_name(v.item_type);
  }
  return std::string(gguf_value_type_name(v.type)) + " " +
         (v.type == GgufValueType::kString ? quote(v.str, 80) : scalar_text(v));
}

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t id) {
  for (const auto& t : kGgmlTypes) {
    if (t.id == id) return &t;
  }
  return nullptr;
}

const GgmlTypeInfo* ggml_type_by_name(std::string_view name) {
  for (const auto& t : kGgmlTypes) {
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

GgufHeader parse_gguf(const std::string& label, uint64_t file_bytes, const GgufReadFn& read,
                      const GgufParseOptions& options) {
  Cursor c(label, file_bytes, read, options.max_header_bytes);
  GgufHeader h;
  h.path = label;
  h.file_bytes = file_bytes;
  if (file_bytes < 4) {
    c.fail("file is too short to be GGUF (" + std::to_string(file_bytes) +
           " bytes; the magic alone needs 4)");
  }
  const uint8_t* magic = c.take(4, "magic");
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    char shown[16];
    std::snprintf(shown, sizeof shown, "%02x %02x %02x %02x", magic[0], magic[1], magic[2],
                  magic[3]);
    c.fail(std::string("not a GGUF file: starts with ") + shown +
           ", expected \"GGUF\" (47 47 55 46)");
  }
  h.version = c.u32("version");
  if (h.version == 1) {
    c.fail(
        "GGUF version 1 is not supported (its counts and lengths are 32-bit); convert the model "
        "again with a current llama.cpp");
  }
  if (h.version != 2 && h.version != 3) {
    // A big-endian file stores version 3 as 00 00 00 03, which reads as 0x03000000 here.
    const uint32_t swapped = h.version >> 24;
    const bool big_endian = (h.version & 0x00FFFFFFu) == 0 && (swapped == 2 || swapped == 3);
    c.fail("unsupported GGUF version " + std::to_string(h.version) +
           (big_endian ? " (a big-endian GGUF file; only little-endian files are supported)" : "") +
           "; supported: 2, 3");
  }
  const uint64_t tensor_count = c.u64("tensor count");
  const uint64_t kv_count = c.u64("metadata count");
  if (tensor_count > kGgufMaxTensors) {
    c.fail("tensor count " + std::to_string(tensor_count) + " is absurd (limit " +
           std::to_string(kGgufMaxTensors) + " tensors); corrupt");
  }
  if (static_cast<u128>(kv_count) * kMinKvBytes +
          static_cast<u128>(tensor_count) * kMinTensorInfoBytes >
      c.remaining()) {
    c.fail(std::to_string(kv_count) + " metadata entries and " + std::to_string(tensor_count) +
           " tensor infos cannot fit in the " + std::to_string(file_bytes) +
           "-byte file; truncated or corrupt");
  }

  std::unordered_set<std::string> keys;
  h.metadata.reserve(static_cast<size_t>(kv_count));
  for (uint64_t i = 0; i < kv_count; i++) {
    std::string key = c.string("key of metadata entry #" + std::to_string(i));
    if (!keys.insert(key).second) {
      c.fail("duplicate metadata key \"" + key + "\" (entry #" + std::to_string(i) + ")");
    }
    const uint32_t type_id = c.u32("value type of \"" + key + "\"");
    GgufValueType type;
    if (!value_type_from_id(type_id, &type)) {
      c.fail("metadata \"" + key + "\" has unknown value type " + std::to_string(type_id) +
             " at byte " + std::to_string(c.pos() - 4) + " (" + known_value_types() + ")");
    }
    GgufValue value = read_value(c, type, "value of \"" + key + "\"", options.keep_arrays);
    h.metadata.emplace_back(std::move(key), std::move(value));
  }

  if (const GgufValue* a = h.find("general.alignment")) {
    // ggml requires a u32; accepting other types would read a file ggml itself refuses.
    if (a->type != GgufValueType::kUint32 || a->u == 0 || (a->u & (a->u - 1)) != 0) {
      c.fail("\"general.alignment\" must be a uint32 power of two, got " + brief(*a));
    }
    h.alignment = a->u;
  }

  std::unordered_set<std::string> names;
  h.tensors.reserve(static_cast<size_t>(tensor_count));
  for (uint64_t i = 0; i < tensor_count; i++) {
    GgufTensorInfo t;
    t.name = c.string("name of tensor #" + std::to_string(i));
    if (t.name.empty()) c.fail("tensor #" + std::to_string(i) + " has an empty name");
    if (!names.insert(t.name).second) {
      c.fail("duplicate tensor name \"" + t.name + "\" (tensor #" + std::to_string(i) + ")");
    }
    const std::string where = "tensor \"" + t.name + "\"";
    const uint32_t dims = c.u32("dimension count of " + where);
    if (dims == 0 || dims > kGgufMaxDims) {
      c.fail(where + " has " + std::to_string(dims) + " dimensions; ggml allows 1 to " +
             std::to_string(kGgufMaxDims));
    }
    u128 elements = 1;
    for (uint32_t d = 0; d < dims; d++) {
      const uint64_t n = c.u64("ne[" + std::to_string(d) + "] of " + where);
      if (n > kMaxSafeInteger) {
        c.fail(where + " has an absurd dimension ne[" + std::to_string(d) +
               "] = " + std::to_string(n) + "; corrupt");
      }
      t.ne.push_back(static_cast<int64_t>(n));
      // Each factor is below 2^53 and the product is checked after every step, so 128 bits
      // never overflow.
      elements *= n;
      if (elements > static_cast<u128>(INT64_MAX)) {
        c.fail(where + " shape [" + ne_text(t.ne) + (d + 1 < dims ? ", …" : "") +
               "] (ggml order) overflows int64");
      }
    }
    const uint32_t type_id = c.u32("type of " + where);
    t.type = ggml_type_info(type_id);
    if (!t.type) {
      const char* removed = ggml_removed_type_name(type_id);
      c.fail(removed ? where + " has ggml type " + std::to_string(type_id) + " (" + removed +
                           "), which ggml has removed; re-quantize the model"
                     : where + " has unknown ggml type " + std::to_string(type_id));
    }
    t.offset = c.u64("data offset of " + where);
    if (t.ne[0] % t.type->block != 0) {
      c.fail(where + ": ne[0] = " + std::to_string(t.ne[0]) + " is not a multiple of the " +
             t.type->name + " block size " + std::to_string(t.type->block) + " (shape [" +
             ne_text(t.ne) + "], ggml order)");
    }
    const u128 bytes = elements == 0 ? 0 : elements / t.type->block * t.type->type_size;
    if (t.offset > file_bytes || bytes > file_bytes) {
      c.fail(where + " (" + t.type->name + " [" + ne_text(t.ne) + "], " + u128_text(bytes) +
             " bytes at data offset " + std::to_string(t.offset) + ") runs past the end of the " +
             std::to_string(file_bytes) + "-byte file; truncated or corrupt");
    }
    if (t.offset % h.alignment != 0) {
      c.fail(where + " data offset " + std::to_string(t.offset) +
             " is not a multiple of the alignment " + std::to_string(h.alignment));
    }
    t.shape.assign(t.ne.rbegin(), t.ne.rend());
    t.end = static_cast<uint64_t>(bytes);  // the size, until the data section's start is known
    h.tensors.push_back(std::move(t));
  }

  h.header_bytes = c.pos();
  h.data_start = (h.header_bytes + h.alignment - 1) / h.alignment * h.alignment;
  for (auto& t : h.tensors) {
    const uint64_t bytes = t.end;
    const u128 end = static_cast<u128>(h.data_start) + t.offset + bytes;
    if (end > file_bytes) {
      c.fail("tensor \"" + t.name + "\" (" + t.type->name + " [" + ne_text(t.ne) + "], " +
             std::to_string(bytes) + " bytes) at data offset " + std::to_string(t.offset) +
             " ends at byte " + u128_text(end) + ", past the end of the " +
             std::to_string(file_bytes) + "-byte file; truncated?");
    }
    t.begin = h.data_start + t.offset;
    t.end = t.begin + bytes;
  }
  std::vector<const GgufTensorInfo*> by_begin;
  for (const auto& t : h.tensors) {
    if (t.nbytes() > 0) by_begin.push_back(&t);
  }
  std::stable_sort(
      by_begin.begin(), by_begin.end(),
      [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_begin.size(); i++) {
    const GgufTensorInfo& prev = *by_begin[i - 1];
    const GgufTensorInfo& t = *by_begin[i];
    if (t.begin < prev.end) {
      c.fail("tensor \"" + t.name + "\" data [" + std::to_string(t.offset) + ", " +
             std::to_string(t.offset + t.nbytes()) + ") overlaps tensor \"" + prev.name + "\" [" +
             std::to_string(prev.offset) + ", " + std::to_string(prev.offset + prev.nbytes()) +
             ")");
    }
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
