#pragma once
// Element types of weight tensors. Sizes follow ggml's type traits (block size, bytes per block),
// so quantized types are sized as ggml sizes them.
#include <cstddef>
#include <cstdint>
#include <string>

namespace ferry {

enum class DType : uint8_t { F32, F16, BF16 };

// Bytes of a tensor of `elements` elements of `dtype`.
size_t dtype_nbytes(DType dtype, int64_t elements);
const char* dtype_name(DType dtype);
// Parses a safetensors dtype string ("F32", "F16", "BF16"); false if not a weight type Ferry
// computes with.
bool dtype_from_safetensors(const std::string& name, DType* out);

// IEEE half and bfloat16 ↔ float, round-to-nearest-even on the way down.
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
inline float bf16_to_f32(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
uint16_t f32_to_bf16(float f);

}  // namespace ferry
