// CUDA kernels of the DiT math (see cuda_kernels.h and kernels.h). Plain CUDA C++, no library:
// they are what the device runs when the build has no cuBLAS, and what it always runs for
// attention, norms and element-wise work.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "cuda_kernels.h"
#include "ferry/checksum.h"
#include "ferry/errors.h"

namespace ferry {
namespace cuda {

namespace {

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw Error(std::string("cuda: launching ") + what + ": " + cudaGetErrorString(e));
  }
}

// Weight element types as they sit in memory (raw bits, converted on load).
struct F16Bits {
  uint16_t bits;
};
struct BF16Bits {
  uint16_t bits;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(F16Bits v) {
  return __half2float(__ushort_as_half(v.bits));
}
__device__ __forceinline__ float to_float(BF16Bits v) {
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}

__device__ __forceinline__ float load_elem(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::F16:
      return to_float(static_cast<const F16Bits*>(p)[i]);
    case DType::BF16:
      return to_float(static_cast<const BF16Bits*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// The CPU kernels' form of gelu_tanh (simd.h): v / (1 + exp(−2·√(2/π)·(v + 0.044715·v³))).
__device__ __forceinline__ float gelu_tanh(float v) {
  const float inner = fmaf(v * v * v, 0.044715f, v);
  return v / (expf(inner * -1.5957691216057308f) + 1.0f);
}

__device__ __forceinline__ float apply_epilogue(float v, float* out, Epilogue e) {
  switch (e) {
    case Epilogue::kGelu:
      return gelu_tanh(v);
    case Epilogue::kAccumulate:
      return *out + v;
    default:
      return v;
  }
}

// 64×64 output tile per block of 256 threads, 4×4 outputs per thread, k in slices of 16 staged
// through shared memory (B converted to float as it is staged). Thread (tx, ty) owns rows
// ty + 16i and columns tx + 16j, so a warp's stores are contiguous.
constexpr int kTile = 64;
constexpr int kSlice = 16;
constexpr int kThreads = 256;

template <typename TB, bool kTransposed>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmArgs g) {
  __shared__ float as[kSlice][kTile + 4];
  __shared__ float bs[kSlice][kTile + 4];
  const int64_t z = blockIdx.z;
  const float* a = g.a + z * g.stride_a;
  const TB* b = static_cast<const TB*>(g.b) + z * g.stride_b;
  float* c = g.c + z * g.stride_c;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++) {
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < g.k; k0 += kSlice) {
    for (int e = threadIdx.x; e < kTile * kSlice; e += kThreads) {
      const int r = e / kSlice, kk = e % kSlice;  // k fastest: a's rows are contiguous in k
      const int64_t gm = m0 + r, gk = k0 + kk;
      as[kk][r] = (gm < g.m && gk < g.k) ? a[gm * g.lda + gk] : 0.0f;
    }
    for (int e = threadIdx.x; e < kTile * kSlice; e += kThreads) {
      int col, kk;
      if (kTransposed) {
        col = e / kSlice;  // b[n·ldb + k]: k fastest
        kk = e % kSlice;
      } else {
        kk = e / kTile;  // b[k·ldb + n]: n fastest
        col = e % kTile;
      }
      const int64_t gn = n0 + col, gk = k0 + kk;
      float v = 0.0f;
      if (gn < g.n && gk < g.k) v = to_float(kTransposed ? b[gn * g.ldb + gk] : b[gk * g.ldb + gn]);
      bs[kk][col] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSlice; kk++) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; i++) av[i] = as[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++) {
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int64_t row = m0 + ty + 16 * i;
    if (row >= g.m) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= g.n) continue;
      float v = g.alpha * acc[i][j];
      if (g.bias) v += load_elem(g.bias, col, g.bias_type);
      float* out = c + row * g.ldc + col;
      *out = apply_epilogue(v, out, g.epilogue);
    }
  }
}

template <typename TB, bool kTransposed>
void launch_gemm(const GemmArgs& g, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((g.n + kTile - 1) / kTile),
                  static_cast<unsigned>((g.m + kTile - 1) / kTile), static_cast<unsigned>(g.batch));
  gemm_kernel<TB, kTransposed><<<grid, kThreads, 0, stream>>>(g);
  check_launch("gemm");
}

__global__ void bias_epilogue_kernel(float* c, int64_t ldc, const float* residual, int64_t m,
                                     int64_t n, const void* bias, DType bias_type, Epilogue e) {
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / n, col = i % n;
    float* out = c + row * ldc + col;
    float v = *out;
    if (bias) v += load_elem(bias, col, bias_type);
    switch (e) {
      case Epilogue::kGelu:
        v = gelu_tanh(v);
        break;
      case Epilogue::kAccumulate:
        v = residual[row * ldc + col] + v;
        break;
      default:
        break;
    }
    *out = v;
  }
}

// Block-wide sum of one float per thread (blockDim.x a multiple of 32, ≤ 1024).
__device__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? shared[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ float block_max(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  v = lane < warps ? shared[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

constexpr int kRowThreads = 256;

__global__ void __launch_bounds__(kRowThreads)
    rmsnorm_kernel(const float* x, int64_t d, const void* w, DType w_type, float eps, float* y) {
  __shared__ float shared[32];
  const float* xr = x + blockIdx.x * d;
  float* yr = y + blockIdx.x * d;
  float sum = 0.0f;
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) sum = fmaf(xr[k], xr[k], sum);
  sum = block_sum(sum, shared);
  const float inv = rsqrtf(sum / static_cast<float>(d) + eps);
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x)
    yr[k] = xr[k] * inv * load_elem(w, k, w_type);
}

__global__ void __launch_bounds__(kRowThreads) softmax_kernel(float* s, int64_t n) {
  __shared__ float shared[32];
  float* row = s + blockIdx.x * n;
  float mx = -INFINITY;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) mx = fmaxf(mx, row[t]);
  mx = block_max(mx, shared);
  float sum = 0.0f;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    const float e = expf(row[t] - mx);
    row[t] = e;
    sum += e;
  }
  sum = block_sum(sum, shared);
  const float inv = 1.0f / sum;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) row[t] *= inv;
}

__global__ void euler_kernel(float* z, const float* y, size_t n, float dt) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    z[i] = z[i] - dt * y[i];
  }
}

__global__ void convert_kernel(const float* x, int64_t rows, int64_t cols, int64_t ldx, DType to,
                               void* out) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = x[(i / cols) * ldx + i % cols];
    if (to == DType::BF16) {
      static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
    } else {
      static_cast<__half*>(out)[i] = __float2half_rn(v);
    }
  }
}

__global__ void checksum_kernel(const uint8_t* p, size_t bytes, unsigned long long* result) {
  const size_t words = (bytes + 7) / 8;
  const bool aligned = (reinterpret_cast<uintptr_t>(p) % 8) == 0;
  unsigned long long sum = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t w = 0;
    const size_t begin = 8 * i;
    if (aligned && begin + 8 <= bytes) {
      w = reinterpret_cast<const uint64_t*>(p)[i];
    } else {
      for (size_t b = 0; b < 8 && begin + b < bytes; b++) {
        w |= static_cast<uint64_t>(p[begin + b]) << (8 * b);
      }
    }
    sum += checksum_term(w, i);
  }
  // Sums mod 2^64 commute, so combining per-warp and per-block in any order gives one value.
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (threadIdx.x % 32 == 0) atomicAdd(result, sum);
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace

void gemm(const GemmArgs& g, cudaStream_t stream) {
  if (g.m <= 0 || g.n <= 0 || g.batch <= 0) return;
  if (g.b_transposed) {
    switch (g.b_type) {
      case DType::F16:
        return launch_gemm<F16Bits, true>(g, stream);
      case DType::BF16:
        return launch_gemm<BF16Bits, true>(g, stream);
      case DType::F32:
        return launch_gemm<float, true>(g, stream);
      default:
        break;
    }
  } else if (g.b_type == DType::F32) {
    return launch_gemm<float, false>(g, stream);
  }
  throw InvalidArgumentError(std::string("cuda: no GEMM kernel for ") + dtype_name(g.b_type) +
                             (g.b_transposed ? " weights" : " non-transposed operands"));
}

void bias_epilogue(float* c, int64_t ldc, const float* residual, int64_t m, int64_t n,
                   const void* bias, DType bias_type, Epilogue epilogue, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return;
  bias_epilogue_kernel<<<grid_for(m * n, 256), 256, 0, stream>>>(c, ldc, residual, m, n, bias,
                                                                 bias_type, epilogue);
  check_launch("bias_epilogue");
}

void rmsnorm(const float* x, int64_t m, int64_t d, const void* w, DType w_type, float eps, float* y,
             cudaStream_t stream) {
  if (m <= 0) return;
  rmsnorm_kernel<<<static_cast<unsigned>(m), kRowThreads, 0, stream>>>(x, d, w, w_type, eps, y);
  check_launch("rmsnorm");
}

void softmax_rows(float* s, int64_t rows, int64_t n, cudaStream_t stream) {
  if (rows <= 0) return;
  softmax_kernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(s, n);
  check_launch("softmax");
}

void euler_update(float* z, const float* y, size_t n, float dt, cudaStream_t stream) {
  if (n == 0) return;
  euler_kernel<<<grid_for(static_cast<int64_t>(n), 256), 256, 0, stream>>>(z, y, n, dt);
  check_launch("euler_update");
}

void convert_from_f32(const float* x, int64_t rows, int64_t cols, int64_t ldx, DType to, void* out,
                      cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  convert_kernel<<<grid_for(rows * cols, 256), 256, 0, stream>>>(x, rows, cols, ldx, to, out);
  check_launch("convert");
}

void checksum_words(const void* data, size_t bytes, unsigned long long* result,
                    cudaStream_t stream) {
  if (bytes == 0) return;
  const int64_t words = static_cast<int64_t>((bytes + 7) / 8);
  checksum_kernel<<<grid_for(words, 256), 256, 0, stream>>>(static_cast<const uint8_t*>(data),
                                                            bytes, result);
  check_launch("checksum");
}

}  // namespace cuda
}  // namespace ferry
