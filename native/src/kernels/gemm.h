#pragma once
// The matrix-product core shared by linear() and attention: C = A·Bᵀ with both operands row-major
// along the reduction dimension (x·Wᵀ for a PyTorch Linear, q·kᵀ for attention scores).
//
// Every output is simd::dot(a_row, b_row, k) bit for bit: 16 lane-strided FMA partial sums, the
// fixed hsum tree, then the k-tail in order. The micro-kernel computes a tile of such dots at once
// to reuse each load, and tails are handled by repeating the last row pointer (the extra results
// are dropped), so an output's arithmetic never depends on its tile, the partition or the thread.
#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace ferry::kernels {

#if defined(__AVX512F__)
// 16 accumulators + 4 rows of x + a row of W fit AVX-512's 32 registers.
constexpr int kMr = 4;  // rows of A per micro-kernel call
constexpr int kNr = 4;  // rows of B per micro-kernel call
#else
// A 16-lane vector is two ymm (or four xmm) registers here: keep the tile small enough not to
// spill.
constexpr int kMr = 2;
constexpr int kNr = 2;
#endif

// out[i·kNr + j] = simd::dot(a[i], b[j], k).
inline void micro_kernel(const float* const a[kMr], const float* const b[kNr], int64_t k,
                         float out[kMr * kNr]) {
  using simd::v16;
  v16 acc[kMr * kNr] = {};
  int64_t p = 0;
  for (; p + simd::kLanes <= k; p += simd::kLanes) {
    v16 av[kMr], bv[kNr];
    for (int i = 0; i < kMr; i++) av[i] = simd::load(a[i] + p);
    for (int j = 0; j < kNr; j++) bv[j] = simd::load(b[j] + p);
#if defined(__AVX512F__)
    // Pin the loaded rows in registers: otherwise GCC folds each load into every FMA that uses
    // it as a memory operand, issuing kMr + kMr·kNr loads per step instead of kMr + kNr, and the
    // loop becomes load-bound rather than FMA-bound.
    for (int i = 0; i < kMr; i++) asm("" : "+v"(av[i]));
    for (int j = 0; j < kNr; j++) asm("" : "+v"(bv[j]));
#endif
    for (int i = 0; i < kMr; i++) {
      for (int j = 0; j < kNr; j++) acc[i * kNr + j] = simd::fmadd(av[i], bv[j], acc[i * kNr + j]);
    }
  }
  if constexpr (kMr * kNr == 16) {
    simd::store(out, simd::reduce16(acc));
  } else {
    for (int e = 0; e < kMr * kNr; e++) out[e] = simd::hsum(acc[e]);
  }
  for (; p < k; p++) {
    for (int i = 0; i < kMr; i++) {
      for (int j = 0; j < kNr; j++) {
        out[i * kNr + j] = simd::fmadd(a[i][p], b[j][p], out[i * kNr + j]);
      }
    }
  }
}

// For i < m, j < n: sink(i, j, dot(a + i·lda, b + j·ldb, k)). Serial; callers split the work.
// Loops over rows of A outside, so a tile of A rows stays in L1 while the rows of B stream by.
template <class Sink>
void gemm_nt(const float* a, int64_t lda, int64_t m, const float* b, int64_t ldb, int64_t n,
             int64_t k, Sink&& sink) {
  float out[kMr * kNr];
  for (int64_t i0 = 0; i0 < m; i0 += kMr) {
    const float* ar[kMr];
    for (int i = 0; i < kMr; i++) ar[i] = a + std::min<int64_t>(i0 + i, m - 1) * lda;
    const int mi = static_cast<int>(std::min<int64_t>(kMr, m - i0));
    for (int64_t j0 = 0; j0 < n; j0 += kNr) {
      const float* br[kNr];
      for (int j = 0; j < kNr; j++) br[j] = b + std::min<int64_t>(j0 + j, n - 1) * ldb;
      const int nj = static_cast<int>(std::min<int64_t>(kNr, n - j0));
      micro_kernel(ar, br, k, out);
      for (int i = 0; i < mi; i++) {
        for (int j = 0; j < nj; j++) sink(i0 + i, j0 + j, out[i * kNr + j]);
      }
    }
  }
}

}  // namespace ferry::kernels
