#pragma once
// GGUF bytes for the native tests: a writer with the layout ggml's gguf_write_to_file (and
// lib/model/ggufWriter.ts) produce — header, metadata, tensor infos, zero padding to the
// alignment, then each tensor's data padded to the alignment — plus ggml's reference quantizers
// (quantize_row_q8_0_ref / quantize_row_q4_0_ref) and a Ferry DiT in GGUF made from the same
// weights as test_support.h's safetensors DiT.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ferry/dtype.h"
#include "test_support.h"

namespace ferry_test {

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

// A GGUF file built field by field. Metadata values are written with their type id; helpers
// cover the common cases, `kv_raw` anything (including broken values).
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

// ggml's quantize_row_q8_0_ref: per block of 32, d = max|x| / 127, q = round(x / d).
inline std::string quantize_q8_0(const std::vector<float>& x) {
  std::string out;
  for (size_t b = 0; b < x.size(); b += 32) {
    float amax = 0;
    for (size_t j = 0; j < 32; j++) amax = std::max(amax, std::fabs(x[b + j]));
    const float d = amax / 127.0f;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    const uint16_t h = ferry::f32_to_f16(d);
    out.append(reinterpret_cast<const char*>(&h), 2);
    for (size_t j = 0; j < 32; j++) {
      out += static_cast<char>(static_cast<int8_t>(std::lround(x[b + j] * id)));
    }
  }
  return out;
}

// ggml's quantize_row_q4_0_ref: d = (the value of largest magnitude) / −8, nibble =
// min(15, (int8)(x / d + 8.5)); element j in the low nibble of byte j, j + 16 in the high one.
inline std::string quantize_q4_0(const std::vector<float>& x) {
  std::string out;
  for (size_t b = 0; b < x.size(); b += 32) {
    float amax = 0, max = 0;
    for (size_t j = 0; j < 32; j++) {
      if (amax < std::fabs(x[b + j])) {
        amax = std::fabs(x[b + j]);
        max = x[b + j];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    const uint16_t h = ferry::f32_to_f16(d);
    out.append(reinterpret_cast<const char*>(&h), 2);
    for (size_t j = 0; j < 16; j++) {
      const int lo = std::min(15, static_cast<int>(static_cast<int8_t>(x[b + j] * id + 8.5f)));
      const int hi = std::min(15, static_cast<int>(static_cast<int8_t>(x[b + 16 + j] * id + 8.5f)));
      out += static_cast<char>(lo | (hi << 4));
    }
  }
  return out;
}

inline std::vector<float> decode_f32(const std::string& data) {
  std::vector<float> v(data.size() / 4);
  std::memcpy(v.data(), data.data(), data.size());
  return v;
}

// The DiT of `spec` (its F32 weights) as GGUF, `type` "f32", "f16", "q8_0" or "q4_0". As
// gen-model does: with a quantized type, 2-D weights whose rows are whole blocks are quantized,
// other 2-D weights stored f16, 1-D tensors f32. Tensors in the safetensors writer's order.
inline std::string dit_gguf_bytes(const DitSpec& spec, const std::string& type,
                                  uint64_t alignment = 32) {
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
    const std::vector<float> v = decode_f32(t.data);
    std::vector<uint64_t> ne(t.shape.rbegin(), t.shape.rend());
    const bool quant = type == "q8_0" || type == "q4_0";
    std::string stored = type;
    if (quant) stored = t.shape.size() != 2 ? "f32" : (t.shape[1] % 32 == 0 ? type : "f16");
    if (stored == "f32") {
      g.tensor(t.name, ne, 0, t.data);
    } else if (stored == "f16") {
      g.tensor(t.name, ne, 1, encode(v, "F16"));
    } else if (stored == "q8_0") {
      g.tensor(t.name, ne, 8, quantize_q8_0(v));
    } else {
      g.tensor(t.name, ne, 2, quantize_q4_0(v));
    }
  }
  return g.bytes();
}

}  // namespace ferry_test
