#pragma once
// The DiT model's math (see README "The model"): PyTorch Linear convention (weight [out, in],
// y = x·Wᵀ + b), float32 activations, weights in any DType converted on the fly.
// Base segments: prelude (embed), one per block, final. Each forward takes its weights as views
// into device memory and a scratch area of exactly *_scratch_bytes(dims) bytes.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ferry/dtype.h"
#include "ferry/thread_pool.h"

namespace ferry {

struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;  // safetensors order: [out, in] for weights
  int64_t elements() const;
};

struct DitDims {
  int64_t hidden = 0;                              // D
  int64_t heads = 0;                               // H (D % H == 0)
  int64_t channels = 0;                            // C
  int64_t batch = 1;                               // B
  int64_t tokens = 1;                              // T
  int64_t rows() const { return batch * tokens; }  // M = B·T
};

struct PreludeWeights {
  TensorView embed_weight, embed_bias;  // [D, C], [D]
};

struct BlockWeights {
  TensorView norm1;       // [D]
  TensorView qkv_weight;  // [3D, D]
  TensorView qkv_bias;    // [3D]
  TensorView out_weight;  // [D, D]
  TensorView out_bias;    // [D]
  TensorView norm2;       // [D]
  TensorView fc1_weight;  // [4D, D]
  TensorView fc1_bias;    // [4D]
  TensorView fc2_weight;  // [D, 4D]
  TensorView fc2_bias;    // [D]
};

struct FinalWeights {
  TensorView norm;        // [D]
  TensorView out_weight;  // [C, D]
  TensorView out_bias;    // [C]
};

namespace kernels {

constexpr float kRmsNormEps = 1e-6f;

// Scratch each base segment's forward needs, in bytes. The planner's compute_buffer_bytes uses
// the same formulas (lib/model/footprint.ts); a test checks they agree.
//   prelude: 0
//   block:   4·(9·M·D + H·T·T)   (h, qkv[3D], attention out, mlp hidden[4D]; one sample's scores)
//   final:   4·(M·D + M·C)
size_t prelude_scratch_bytes(const DitDims& dims);
size_t block_scratch_bytes(const DitDims& dims);
size_t final_scratch_bytes(const DitDims& dims);

// x[M, D] = z[M, C]·Wᵀ + b
void prelude_forward(ThreadPool& pool, const DitDims& dims, const PreludeWeights& w, const float* z,
                     float* x, void* scratch);
// x ← block(x), in place
void block_forward(ThreadPool& pool, const DitDims& dims, const BlockWeights& w, float* x,
                   void* scratch);
// y[M, C] = rmsnorm(x)·w·Wᵀ + b
void final_forward(ThreadPool& pool, const DitDims& dims, const FinalWeights& w, const float* x,
                   float* y, void* scratch);

// Building blocks, exposed for tests.
// y[m, n] = Σ_k x[m, k]·W[n, k] + bias[n]   (bias may be a null view)
void linear(ThreadPool& pool, const float* x, int64_t m, const TensorView& weight,
            const TensorView* bias, float* y);
// y = x / sqrt(mean(x²) + eps) · weight, per row of length d
void rmsnorm(ThreadPool& pool, const float* x, int64_t m, int64_t d, const TensorView& weight,
             float* y);
float gelu_tanh(float v);

}  // namespace kernels
}  // namespace ferry
