#pragma once
// Minimal test harness for the native ctest executables (no framework): CHECK macros that count
// failures, a runner over named test functions (timed), temp files, and writers for safetensors
// and GGUF files — including tiny Ferry DiT models with random weights, in GGUF in any weight type
// ggml can quantize to (ggml's own quantizer).
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "ggml.h"

namespace ferry_test {

inline int& failures() {
  static int n = 0;
  return n;
}

inline void report_failure(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
  failures()++;
}

#define CHECK(cond)                                                       \
  do {                                                                    \
    if (!(cond)) ::ferry_test::report_failure(__FILE__, __LINE__, #cond); \
  } while (0)

#define CHECK_EQ(a, b)                                                                             \
  do {                                                                                             \
    const auto check_a_ = (a);                                                                     \
    const auto check_b_ = (b);                                                                     \
    if (!(check_a_ == check_b_)) {                                                                 \
      ::ferry_test::report_failure(__FILE__, __LINE__,                                             \
                                   std::string(#a " == " #b " (") + ::ferry_test::show(check_a_) + \
                                       " vs " + ::ferry_test::show(check_b_) + ")");               \
    }                                                                                              \
  } while (0)

// Runs `stmt`, which must throw `Type` whose what() contains `needle`.
#define CHECK_THROWS(Type, stmt, needle)                                                          \
  do {                                                                                            \
    bool check_thrown_ = false;                                                                   \
    try {                                                                                         \
      stmt;                                                                                       \
    } catch (const Type& check_e_) {                                                              \
      check_thrown_ = true;                                                                       \
      if (std::string(check_e_.what()).find(needle) == std::string::npos) {                       \
        ::ferry_test::report_failure(                                                             \
            __FILE__, __LINE__,                                                                   \
            std::string(#Type " message lacks \"") + (needle) + "\": " + check_e_.what());        \
      }                                                                                           \
    } catch (const std::exception& check_e_) {                                                    \
      check_thrown_ = true;                                                                       \
      ::ferry_test::report_failure(                                                               \
          __FILE__, __LINE__, std::string(#stmt " threw another exception: ") + check_e_.what()); \
    }                                                                                             \
    if (!check_thrown_) {                                                                         \
      ::ferry_test::report_failure(__FILE__, __LINE__, #stmt " did not throw " #Type);            \
    }                                                                                             \
  } while (0)

template <typename T>
std::string show(const T& v) {
  if constexpr (std::is_arithmetic_v<T>) {
    return std::to_string(v);
  } else if constexpr (std::is_convertible_v<T, std::string>) {
    return "\"" + std::string(v) + "\"";
  } else {
    return "?";
  }
}

struct TestCase {
  const char* name;
  std::function<void()> fn;
};

// Runs each test, reporting the ones that fail or throw; the exit status is the failure count.
inline int run_all(const std::vector<TestCase>& tests) {
  for (const auto& t : tests) {
    const int before = failures();
    const auto start = std::chrono::steady_clock::now();
    try {
      t.fn();
    } catch (const std::exception& e) {
      report_failure(t.name, 0, std::string("uncaught exception: ") + e.what());
    }
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "%s %s (%.0f ms)\n", failures() == before ? "ok  " : "FAIL", t.name, ms);
  }
  std::fprintf(stderr, "%d failure(s)\n", failures());
  return failures() == 0 ? 0 : 1;
}

// A fresh directory under $TMPDIR, removed (with its files) when the object goes.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/ferry-test-XXXXXX";
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data())) std::abort();
    path_ = buf.data();
  }
  ~TempDir() {
    for (const auto& f : files_) std::remove(f.c_str());
    rmdir(path_.c_str());
  }
  std::string file(const std::string& name) {
    files_.push_back(path_ + "/" + name);
    return files_.back();
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A safetensors file from a header JSON text and the data section.
inline std::string safetensors_bytes(const std::string& header_json, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header_json.size();
  for (int i = 0; i < 8; i++) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header_json + data;
}

struct WriteTensor {
  std::string name;
  std::string dtype;  // "F32", "F16", "BF16", …
  std::vector<int64_t> shape;
  std::string data;  // raw little-endian bytes
};

inline std::string shape_json(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

// Writes tensors back to back in the given order, with `metadata` as __metadata__.
inline void write_safetensors(const std::string& path,
                              const std::map<std::string, std::string>& metadata,
                              const std::vector<WriteTensor>& tensors) {
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      header += (first ? "\"" : ",\"") + k + "\":\"" + v + "\"";
      first = false;
    }
    header += "}";
  }
  std::string data;
  for (const auto& t : tensors) {
    if (header.size() > 1) header += ",";
    header += "\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":" + shape_json(t.shape) +
              ",\"data_offsets\":[" + std::to_string(data.size()) + "," +
              std::to_string(data.size() + t.data.size()) + "]}";
    data += t.data;
  }
  header += "}";
  // Pad the header with spaces to a multiple of 8, as the reference writer does.
  while ((8 + header.size()) % 8 != 0) header += ' ';
  write_file(path, safetensors_bytes(header, data));
}

struct DitSpec {
  int64_t hidden = 32;
  int64_t heads = 4;
  int64_t channels = 8;
  int64_t blocks = 3;
  std::string dtype = "F32";  // of every weight
  uint64_t seed = 1;
};

// Values as `dtype` bytes.
inline std::string encode(const std::vector<float>& values, const std::string& dtype) {
  std::string out;
  for (float v : values) {
    if (dtype == "F32") {
      char b[4];
      std::memcpy(b, &v, 4);
      out.append(b, 4);
    } else {
      uint16_t h;
      if (dtype == "F16") {
        const ggml_fp16_t f = ggml_fp32_to_fp16(v);
        std::memcpy(&h, &f, 2);
      } else {
        const ggml_bf16_t b = ggml_fp32_to_bf16(v);
        std::memcpy(&h, &b, 2);
      }
      out += static_cast<char>(h & 0xFF);
      out += static_cast<char>(h >> 8);
    }
  }
  return out;
}

// The tensors of a Ferry DiT with random weights: Linear weights ~ U(−1, 1)/√in, biases small,
// norm weights near 1, so many steps stay well-conditioned.
inline std::vector<WriteTensor> dit_tensors(const DitSpec& s) {
  std::mt19937_64 rng(s.seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto make = [&](const std::string& name, std::vector<int64_t> shape, float scale, float offset) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    for (auto& x : v) x = offset + scale * u(rng);
    return WriteTensor{name, s.dtype, shape, encode(v, s.dtype)};
  };
  const int64_t D = s.hidden, C = s.channels;
  const float in_d = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<WriteTensor> t;
  t.push_back(make("embed.weight", {D, C}, 1.0f / std::sqrt(static_cast<float>(C)), 0));
  t.push_back(make("embed.bias", {D}, 0.1f, 0));
  for (int64_t i = 0; i < s.blocks; i++) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    t.push_back(make(p + "norm1.weight", {D}, 0.1f, 1.0f));
    t.push_back(make(p + "attn.qkv.weight", {3 * D, D}, in_d, 0));
    t.push_back(make(p + "attn.qkv.bias", {3 * D}, 0.1f, 0));
    t.push_back(make(p + "attn.out.weight", {D, D}, in_d, 0));
    t.push_back(make(p + "attn.out.bias", {D}, 0.1f, 0));
    t.push_back(make(p + "norm2.weight", {D}, 0.1f, 1.0f));
    t.push_back(make(p + "mlp.fc1.weight", {4 * D, D}, in_d, 0));
    t.push_back(make(p + "mlp.fc1.bias", {4 * D}, 0.1f, 0));
    t.push_back(make(p + "mlp.fc2.weight", {D, 4 * D}, in_d / 2, 0));
    t.push_back(make(p + "mlp.fc2.bias", {D}, 0.1f, 0));
  }
  t.push_back(make("final.norm.weight", {D}, 0.1f, 1.0f));
  t.push_back(make("final.out.weight", {C, D}, in_d, 0));
  t.push_back(make("final.out.bias", {C}, 0.1f, 0));
  return t;
}

inline std::map<std::string, std::string> dit_metadata(const DitSpec& s) {
  return {{"ferry.arch", "dit"},
          {"ferry.hidden", std::to_string(s.hidden)},
          {"ferry.heads", std::to_string(s.heads)},
          {"ferry.channels", std::to_string(s.channels)},
          {"ferry.blocks", std::to_string(s.blocks)}};
}

inline void write_dit(const std::string& path, const DitSpec& s) {
  write_safetensors(path, dit_metadata(s), dit_tensors(s));
}

// ---- GGUF ----

// Little-endian byte sink.
struct Bytes {
  std::string b;
  void u8(uint8_t v) { b += static_cast<char>(v); }
  void u16(uint16_t v) { raw(&v, 2); }
  void u32(uint32_t v) { raw(&v, 4); }
  void u64(uint64_t v) { raw(&v, 8); }
  void f32(float v) { raw(&v, 4); }
  void f64(double v) { raw(&v, 8); }
  void str(const std::string& s) {
    u64(s.size());
    b += s;
  }
  void raw(const void* p, size_t n) { b.append(static_cast<const char*>(p), n); }
};

// A GGUF file built field by field, with the layout ggml's gguf_write_to_file (and
// lib/model/ggufWriter.ts) produce: header, metadata, tensor infos, zero padding to the alignment,
// then each tensor's data padded to the alignment. Metadata values are written with their type
// id; helpers cover the common cases, `kv_raw` anything (including broken values).
class GgufBuilder {
 public:
  enum : uint32_t {
    kU8 = 0,
    kI8,
    kU16,
    kI16,
    kU32,
    kI32,
    kF32,
    kBool,
    kString,
    kArray,
    kU64,
    kI64,
    kF64
  };

  uint32_t version = 3;
  uint64_t alignment = 32;  // used for layout; write general.alignment yourself to declare it

  void kv_u32(const std::string& key, uint32_t v) {
    begin_kv(key, kU32);
    meta_.u32(v);
  }
  void kv_string(const std::string& key, const std::string& v) {
    begin_kv(key, kString);
    meta_.str(v);
  }
  // `value` is the encoded value (after the type id).
  void kv_raw(const std::string& key, uint32_t type, const std::string& value) {
    begin_kv(key, type);
    meta_.b += value;
  }

  struct Tensor {
    std::string name;
    std::vector<uint64_t> ne;  // ggml order
    uint32_t type;             // ggml type id
    std::string data;
  };
  void tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, std::string data) {
    tensors_.push_back({name, std::move(ne), type, std::move(data)});
  }

  std::string bytes() const {
    Bytes out;
    out.raw("GGUF", 4);
    out.u32(version);
    out.u64(tensors_.size());
    out.u64(kvs_);
    out.b += meta_.b;
    uint64_t at = 0;
    for (const auto& t : tensors_) {
      out.str(t.name);
      out.u32(static_cast<uint32_t>(t.ne.size()));
      for (uint64_t d : t.ne) out.u64(d);
      out.u32(t.type);
      out.u64(at);
      at += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    out.b.resize((out.b.size() + alignment - 1) / alignment * alignment, '\0');
    for (const auto& t : tensors_) {
      out.b += t.data;
      out.b.resize((out.b.size() + alignment - 1) / alignment * alignment, '\0');
    }
    return out.b;
  }

 private:
  void begin_kv(const std::string& key, uint32_t type) {
    meta_.str(key);
    meta_.u32(type);
    kvs_++;
  }
  Bytes meta_;
  uint64_t kvs_ = 0;
  std::vector<Tensor> tensors_;
};

inline std::vector<float> decode_f32(const std::string& data) {
  std::vector<float> v(data.size() / 4);
  std::memcpy(v.data(), data.data(), data.size());
  return v;
}

// `values` (rows of `n_per_row`) in ggml type `type`, by ggml's own quantizer (or conversion, for
// f32/f16/bf16). Types that need an importance matrix are not supported.
inline std::string ggml_encode(ggml_type type, const std::vector<float>& values,
                               int64_t n_per_row) {
  const int64_t rows = static_cast<int64_t>(values.size()) / n_per_row;
  std::string out(ggml_row_size(type, n_per_row) * static_cast<size_t>(rows), '\0');
  const size_t written =
      ggml_quantize_chunk(type, values.data(), out.data(), 0, rows, n_per_row, nullptr);
  if (written != out.size()) std::abort();
  return out;
}

// The type a DiT tensor of row-major `shape` is stored in when a GGUF DiT is written "in" `type`,
// as gen-model does: with a quantized type, 2-D weights whose rows are whole blocks are quantized,
// other 2-D weights stored f16, 1-D tensors f32; with f32/f16/bf16 every tensor is in that type.
inline ggml_type dit_gguf_tensor_type(ggml_type type, const std::vector<int64_t>& shape) {
  if (!ggml_is_quantized(type)) return type;
  if (shape.size() != 2) return GGML_TYPE_F32;
  return shape[1] % ggml_blck_size(type) == 0 ? type : GGML_TYPE_F16;
}

// The DiT of `spec` (its F32 weights: the same values as the safetensors writer's) as GGUF:
// general.architecture "ferry-dit", ferry-dit.{blocks,hidden,heads,channels} uint32, tensors named
// and ordered as in safetensors with ne the reversed shape, stored as dit_gguf_tensor_type says.
// `alignment` other than 32 is declared as general.alignment.
inline std::string dit_gguf_bytes(const DitSpec& spec, ggml_type type, uint64_t alignment = 32) {
  DitSpec f32 = spec;
  f32.dtype = "F32";
  GgufBuilder g;
  g.alignment = alignment;
  g.kv_string("general.architecture", "ferry-dit");
  if (alignment != 32) g.kv_u32("general.alignment", static_cast<uint32_t>(alignment));
  g.kv_u32("ferry-dit.blocks", static_cast<uint32_t>(spec.blocks));
  g.kv_u32("ferry-dit.hidden", static_cast<uint32_t>(spec.hidden));
  g.kv_u32("ferry-dit.heads", static_cast<uint32_t>(spec.heads));
  g.kv_u32("ferry-dit.channels", static_cast<uint32_t>(spec.channels));
  for (const auto& t : dit_tensors(f32)) {
    const std::vector<uint64_t> ne(t.shape.rbegin(), t.shape.rend());
    const ggml_type stored = dit_gguf_tensor_type(type, t.shape);
    g.tensor(t.name, ne, static_cast<uint32_t>(stored),
             ggml_encode(stored, decode_f32(t.data), static_cast<int64_t>(ne[0])));
  }
  return g.bytes();
}

inline std::string dit_gguf_bytes(const DitSpec& spec, const std::string& type_name,
                                  uint64_t alignment = 32) {
  for (int i = 0; i < GGML_TYPE_COUNT; i++) {
    const auto type = static_cast<ggml_type>(i);
    if (ggml_blck_size(type) != 0 && type_name == ggml_type_name(type)) {
      return dit_gguf_bytes(spec, type, alignment);
    }
  }
  std::abort();
}

inline void write_dit_gguf(const std::string& path, const DitSpec& spec, const std::string& type,
                           uint64_t alignment = 32) {
  write_file(path, dit_gguf_bytes(spec, type, alignment));
}

inline void write_dit_gguf(const std::string& path, const DitSpec& spec, ggml_type type,
                           uint64_t alignment = 32) {
  write_file(path, dit_gguf_bytes(spec, type, alignment));
}

}  // namespace ferry_test
