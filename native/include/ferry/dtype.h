#pragma once
// Element types of weight tensors. Sizes follow ggml's type traits (block size, bytes per block),
// so quantized types are sized as ggml sizes them.
#include <cstddef>
#include <cstdint>
#include <string>

namespace ferry {

// Q8_0 and Q4_0 are ggml's blocks of 32: an fp16 scale d, then 32 int8 (value q·d), or 16 bytes
// of nibbles (element j in the low nibble of byte j, element j+16 in the high one; value
// (nibble − 8)·d). Only 2-D weights may be quantized, with rows a whole number of blocks.
enum class DType : uint8_t { F32, F16, BF16, Q8_0, Q4_0 };

constexpr int64_t kQuantBlock = 32;
constexpr size_t kQ8_0BlockBytes = 34;  // sizeof(block_q8_0): f16 d + int8 qs[32]
constexpr size_t kQ4_0BlockBytes = 18;  // sizeof(block_q4_0): f16 d + uint8 qs[16]
inline bool dtype_is_quantized(DType dtype) { return dtype == DType::Q8_0 || dtype == DType::Q4_0; }

// Elements per block (32 for Q8_0/Q4_0, 1 for plain types) and bytes per block, as ggml's
// blck_size and type_size.
int64_t dtype_block_size(DType dtype);
size_t dtype_block_bytes(DType dtype);
// Bytes of a tensor of `elements` elements of `dtype` (whole blocks: for quantized types
// `elements` must be a multiple of the block size; callers validate rows first).
size_t dtype_nbytes(DType dtype, int64_t elements);
const char* dtype_name(DType dtype);
// ggml's type id and name ("f32", "q8_0") of a DType, and the DType of a ggml type id (false for
// the types the kernels do not compute with).
uint32_t dtype_ggml_id(DType dtype);
const char* dtype_ggml_name(DType dtype);
bool dtype_from_ggml(uint32_t ggml_id, DType* out);
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
