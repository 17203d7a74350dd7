#pragma once
// Kernel internals that tests (and other native code that needs them) may call directly. Not part
// of the model's contract in kernels.h; names here may change with the kernels.
#include <cstdint>

#include "ferry/dtype.h"
#include "ferry/kernels.h"

namespace ferry {

// Converts `n` elements of `dtype` at `src` to float32 at `dst` (F16C/AVX2/AVX-512 when compiled
// for them). Element-wise and exact (every F16/BF16 value is representable in F32). Q8_0/Q4_0
// are dequantized (ggml's q·d) block by block: `n` must be a multiple of 32 and `src` whole
// blocks, as a quantized weight row is.
void convert_to_f32(DType dtype, const void* src, float* dst, int64_t n);

namespace detail {

// The table-free, intrinsic-free conversions. dtype.cpp uses them when the target has no F16C;
// tests check they agree bit for bit with the hardware path where there is one.
float f16_to_f32_portable(uint16_t h);
uint16_t f32_to_f16_portable(float f);

// The plain scalar form of ggml's dequantization (q·d; (nibble − 8)·d), for tests to check the
// vectorized convert_to_f32 against bit for bit. Other dtypes go to convert_to_f32.
void dequantize_reference(DType dtype, const void* src, float* dst, int64_t n);

}  // namespace detail

namespace kernels {

// Σ a[k]·b[k] by the one reduction every product in the kernels uses: 16 lane-strided FMA partial
// sums, a fixed pairwise tree over the lanes, then the tail k ≥ 16·⌊n/16⌋ in order.
float dot(const float* a, const float* b, int64_t n);

// What linear_ex does with each finished value v = x·wₙ + bₙ before it lands in y.
enum class Epilogue : uint8_t {
  kStore,       // y = v
  kGelu,        // y = gelu_tanh(v)
  kAccumulate,  // y = y + v   (the residual add)
};

// linear() with row strides and a fused epilogue: y[m·ldy + n] ← epilogue(Σ_k x[m·ldx + k]·W[n, k]
// + bias[n]). The sum for each output is taken in the same order whatever the thread count, the
// position of the element in its tile, or m — so row m of y depends only on row m of x.
void linear_ex(ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const TensorView& weight,
               const TensorView* bias, float* y, int64_t ldy, Epilogue epilogue);

// softmax(q·kᵀ/√(D/H))·v per sample and head, from qkv [M, 3D] into out [M, D]; `scores` holds
// H·T·T floats (one sample's heads at a time).
void attention(ThreadPool& pool, const DitDims& dims, const float* qkv, float* out, float* scores);

}  // namespace kernels
}  // namespace ferry
