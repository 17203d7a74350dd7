#pragma once
// The CUDA device's kernels for the DiT math (kernels.h): a tiled GEMM with a fused bias /
// gelu_tanh / residual-add epilogue (f32, f16 and bf16 weights converted as they are loaded),
// rmsnorm, row softmax, the Euler update, and the transfer checksum. All are queued on the given
// stream; none allocates. Private to native/src/devices/cuda/.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ferry/dtype.h"

namespace ferry {
namespace cuda {

enum class Epilogue : uint8_t {
  kStore,       // c = v
  kGelu,        // c = gelu_tanh(v)
  kAccumulate,  // c = c + v (the residual add)
};

// c[z][m, n] ← epilogue(alpha · Σ_k a[z][m, k] · B[z](n, k) + bias[n]) for z < batch, where
// B(n, k) = b[n·ldb + k] when b_transposed (a Linear weight [N, K], or attention keys) and
// b[k·ldb + n] otherwise (attention values). a and c are float32; b is b_type; bias (may be null)
// is bias_type. Each output is one thread's sequential sum over k, so results do not depend on
// the launch configuration.
struct GemmArgs {
  const float* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  DType b_type = DType::F32;
  bool b_transposed = true;
  const void* bias = nullptr;
  DType bias_type = DType::F32;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t m = 0, n = 0, k = 0;
  int64_t batch = 1;
  float alpha = 1.0f;
  Epilogue epilogue = Epilogue::kStore;
};
void gemm(const GemmArgs& args, cudaStream_t stream);

// c[m, n] (ldc) ← epilogue(c[m, n] + bias[n]) where c already holds the product (the cuBLAS path);
// for kAccumulate, `residual` (ldc) is what the product is added to: c = residual + (c + bias).
void bias_epilogue(float* c, int64_t ldc, const float* residual, int64_t m, int64_t n,
                   const void* bias, DType bias_type, Epilogue epilogue, cudaStream_t stream);

// y[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) · w, for r < m rows of d.
void rmsnorm(const float* x, int64_t m, int64_t d, const void* w, DType w_type, float eps, float* y,
             cudaStream_t stream);

// s[r, :] ← softmax(s[r, :]) for r < rows rows of n.
void softmax_rows(float* s, int64_t rows, int64_t n, cudaStream_t stream);

// z[i] ← z[i] − dt·y[i].
void euler_update(float* z, const float* y, size_t n, float dt, cudaStream_t stream);

// Converts n float32 values to `to` (F16 or BF16, round to nearest even) — activations for the
// cuBLAS mixed-precision GEMMs.
void convert_from_f32(const float* x, int64_t rows, int64_t cols, int64_t ldx, DType to, void* out,
                      cudaStream_t stream);

// Σ checksum_term over the 64-bit words of `bytes` at `data` (checksum.h, without the length
// term), added into *result (device memory, zeroed by the caller).
void checksum_words(const void* data, size_t bytes, unsigned long long* result,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace ferry
