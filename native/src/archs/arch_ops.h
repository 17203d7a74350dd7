#pragma once
// Graph pieces the architectures share: weight specs in PyTorch's Linear convention, a Linear,
// GELU(tanh) from exact ops, size checks. Weights are only ever read by ops here, never viewed
// (job_graphs.h: a weight tensor's address changes from segment to segment).
#include <cstdint>
#include <initializer_list>
#include <string>

#include "ferry/arch.h"
#include "ferry/errors.h"
#include "ggml.h"

namespace ferry {
namespace arch_ops {

// A vector weight (norm weight, bias): f32, f16 or bf16.
inline WeightSpec vec(std::string name, int64_t n) {
  WeightSpec w;
  w.name = std::move(name);
  w.n_dims = 1;
  w.ne[0] = n;
  return w;
}

// A Linear weight [out, in]: ne {in, out}; any type ggml multiplies with.
inline WeightSpec mat(std::string name, int64_t out, int64_t in) {
  WeightSpec w;
  w.name = std::move(name);
  w.n_dims = 2;
  w.ne[0] = in;
  w.ne[1] = out;
  w.matrix = true;
  return w;
}

inline ggml_tensor* as_f32(ggml_context* ctx, ggml_tensor* t) {
  return t->type == GGML_TYPE_F32 ? t : ggml_cast(ctx, t, GGML_TYPE_F32);
}

// y = x·Wᵀ + b. ggml's CPU matmul converts x to the weight type's dot type first (f16 for f16,
// q8_0 for q8_0/q4_0, …): lib/model/reference.ts reproduces it.
inline ggml_tensor* linear(ggml_context* ctx, ggml_tensor* x, ggml_tensor* w, ggml_tensor* b) {
  return ggml_add(ctx, ggml_mul_mat(ctx, w, x), as_f32(ctx, b));
}

// 0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²))), from exact ops: ggml_gelu reads a float16
// table on the CPU, which would make the model's output depend on float16 rounding.
inline ggml_tensor* gelu_tanh(ggml_context* ctx, ggml_tensor* x) {
  constexpr float kSqrt2OverPi = 0.79788456080286535588f;
  ggml_tensor* inner = ggml_mul(ctx, x, ggml_scale_bias(ctx, ggml_sqr(ctx, x), 0.044715f, 1.0f));
  ggml_tensor* t = ggml_tanh(ctx, ggml_scale(ctx, inner, kSqrt2OverPi));
  return ggml_mul(ctx, x, ggml_scale_bias(ctx, t, 0.5f, 0.5f));
}

// The product of `factors`, or InvalidArgumentError ("run: <what> is too large") past 2^60.
inline uint64_t checked_product(std::initializer_list<int64_t> factors, const char* what) {
  unsigned __int128 p = 1;
  for (int64_t f : factors) {
    p *= static_cast<uint64_t>(f);
    if (p > (static_cast<unsigned __int128>(1) << 60)) {
      throw InvalidArgumentError(std::string("run: ") + what + " is too large");
    }
  }
  return static_cast<uint64_t>(p);
}

}  // namespace arch_ops
}  // namespace ferry
