#pragma once
// Minimal test harness for the native ctest executables (no framework): CHECK macros that count
// failures, a runner over named test functions, temp files, and a writer for safetensors files —
// including tiny Ferry DiT models with random weights.
#include <unistd.h>

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

#include "ferry/dtype.h"

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
    const auto& check_a_ = (a);                                                                    \
    const auto& check_b_ = (b);                                                                    \
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
    try {
      t.fn();
    } catch (const std::exception& e) {
      report_failure(t.name, 0, std::string("uncaught exception: ") + e.what());
    }
    std::fprintf(stderr, "%s %s\n", failures() == before ? "ok  " : "FAIL", t.name);
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
      const uint16_t h = dtype == "F16" ? ferry::f32_to_f16(v) : ferry::f32_to_bf16(v);
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

}  // namespace ferry_test
