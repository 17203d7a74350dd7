// Ferry's former hand-written linear kernel (native/src/kernels/, removed when the executor moved
// to ggml) on a 64×1024×1024 product, per weight type, for bench/RESULTS-ggml.md.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <vector>
#include "ferry/kernels.h"
#include "ferry/dtype.h"
#include "ferry/thread_pool.h"
using namespace ferry;
int main(int argc, char** argv) {
  const int64_t M = 64, K = 1024, N = 1024;
  unsigned threads = argc > 1 ? atoi(argv[1]) : 2;
  ThreadPool pool(threads);
  std::vector<float> x(M * K), y(M * N), w(N * K);
  for (size_t i = 0; i < x.size(); i++) x[i] = (i % 89) / 89.f - 0.5f;
  for (size_t i = 0; i < w.size(); i++) w[i] = (i % 97) / 97.f - 0.5f;
  for (DType dt : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0}) {
    std::vector<uint8_t> wb(dtype_nbytes(dt, N * K));
    if (dt == DType::F32) std::memcpy(wb.data(), w.data(), wb.size());
    else if (dt == DType::F16 || dt == DType::BF16) {
      auto* h = reinterpret_cast<uint16_t*>(wb.data());
      for (size_t i = 0; i < w.size(); i++) h[i] = dt == DType::F16 ? f32_to_f16(w[i]) : f32_to_bf16(w[i]);
    } else {
      // q8_0 / q4_0 blocks: scale f16 + quants (ggml's reference layout), built plainly here.
      const size_t bb = dt == DType::Q8_0 ? 34 : 18;
      for (int64_t b = 0; b < N * K / 32; b++) {
        float amax = 0; for (int j = 0; j < 32; j++) amax = std::max(amax, std::abs(w[b*32+j]));
        uint8_t* blk = wb.data() + b * bb;
        const float d = dt == DType::Q8_0 ? amax / 127 : amax / 8;
        uint16_t hd = f32_to_f16(d); std::memcpy(blk, &hd, 2);
        const float id = d ? 1 / d : 0;
        for (int j = 0; j < 32; j++) {
          if (dt == DType::Q8_0) blk[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::lround(w[b*32+j] * id)));
        }
        if (dt == DType::Q4_0) for (int j = 0; j < 16; j++) {
          int a = std::min(15, (int)(w[b*32+j] * id + 8.5f)), c = std::min(15, (int)(w[b*32+16+j] * id + 8.5f));
          blk[2 + j] = static_cast<uint8_t>(a | (c << 4));
        }
      }
    }
    TensorView v; v.data = wb.data(); v.dtype = dt; v.shape = {N, K};
    kernels::linear(pool, x.data(), M, v, nullptr, y.data());
    const int iters = 50;
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; i++) kernels::linear(pool, x.data(), M, v, nullptr, y.data());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
    std::printf("old %s %u threads: %.1f GFLOP/s\n", dtype_name(dt), threads, 2.0 * M * N * K / s / 1e9);
  }
}
namespace ferry { int64_t TensorView::elements() const { int64_t n = 1; for (int64_t d : shape) n *= d; return n; } }
