#pragma once
// The few vector operations the kernels are built from, on a fixed 16-lane float vector (GCC/Clang
// vector extensions: one zmm register with AVX-512, two ymm with AVX2, four xmm otherwise).
//
// Determinism rests on three rules kept here:
//  * the lane count is fixed (16) whatever the ISA, so a dot product's partial sums are the same
//    on every machine that has FMA;
//  * multiply-adds are explicit fused operations (fmadd) where the target has FMA, never left to
//    the compiler's contraction, so a vector lane and the scalar tail compute the same thing;
//  * horizontal sums use one fixed pairwise tree (hsum), and reduce16 is that same tree for 16
//    vectors at once.
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif

// Without AVX-512 GCC notes, at every call, that passing 64-byte vectors by value has a different
// ABI than it did in GCC 4.6. These helpers are inline and only called from the kernel sources,
// all built with the same flags, so the note is noise there (left on for the rest of the TU).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ferry::kernels::simd {

constexpr int kLanes = 16;
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

#if defined(__FMA__) || defined(__AVX512F__)
constexpr bool kHasFma = true;
#else
constexpr bool kHasFma = false;
#endif

inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, const v16& v) { std::memcpy(p, &v, sizeof v); }

inline v16 splat(float s) {
  // Spelled out, not `v16{} + s` (a real addition 0 + s the compiler must keep, as it turns −0
  // into +0) nor a lane loop (GCC emits 16 masked broadcasts for that).
  return v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}

// a·b + c, rounded once where the target has FMA.
inline float fmadd(float a, float b, float c) {
  if constexpr (kHasFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

inline v16 fmadd(const v16& a, const v16& b, const v16& c) {
#if defined(__AVX512F__)
  // Same-size vector types convert bit for bit.
  return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  __m256 a2[2], b2[2], c2[2];
  std::memcpy(a2, &a, 64);
  std::memcpy(b2, &b, 64);
  std::memcpy(c2, &c, 64);
  c2[0] = _mm256_fmadd_ps(a2[0], b2[0], c2[0]);
  c2[1] = _mm256_fmadd_ps(a2[1], b2[1], c2[1]);
  v16 r;
  std::memcpy(&r, c2, 64);
  return r;
#else
  // No FMA in the target, so the compiler has nothing to contract this into either.
  return a * b + c;
#endif
}

// Σ lanes by the fixed tree: t[l] = a[l] + a[l+8], then +4, +2, +1 apart.
inline float hsum(const v16& a) {
  float t[16];
  store(t, a);
  for (int l = 0; l < 8; l++) t[l] += t[l + 8];
  for (int l = 0; l < 4; l++) t[l] += t[l + 4];
  for (int l = 0; l < 2; l++) t[l] += t[l + 2];
  return t[0] + t[1];
}

// r[e] = hsum(a[e]) for 16 vectors, bit for bit, in 15 shuffle-add pairs instead of 16 trees.
inline v16 reduce16(const v16 a[16]) {
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FERRY_HAS_SHUFFLEVECTOR 1
#endif
#endif
#if defined(FERRY_HAS_SHUFFLEVECTOR)
  // Each level halves the lanes per element: the low half of every group of lanes plus the high
  // half, which is exactly hsum's t[l] + t[l + w] for the group width w at that level.
  v16 b[8], c[4], d[2];
  for (int p = 0; p < 8; p++) {
    b[p] = __builtin_shufflevector(a[2 * p], a[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                   20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * p], a[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26,
                                   27, 28, 29, 30, 31);
  }
  for (int p = 0; p < 4; p++) {
    c[p] = __builtin_shufflevector(b[2 * p], b[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19,
                                   24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * p], b[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22,
                                   23, 28, 29, 30, 31);
  }
  for (int p = 0; p < 2; p++) {
    d[p] = __builtin_shufflevector(c[2 * p], c[2 * p + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21,
                                   24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * p], c[2 * p + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22,
                                   23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                 31);
#else
  float r[16];
  for (int e = 0; e < 16; e++) r[e] = hsum(a[e]);
  return load(r);
#endif
}

// Σ a[k]·b[k] for k < n: 16 lane-strided partial sums, hsum, then the tail k ≥ 16·⌊n/16⌋ in order.
inline float dot(const float* a, const float* b, int64_t n) {
  v16 acc{};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) acc = fmadd(load(a + k), load(b + k), acc);
  float s = hsum(acc);
  for (; k < n; k++) s = fmadd(a[k], b[k], s);
  return s;
}

// e^x per lane (Cephes expf: Cody–Waite reduction by ln 2, degree-6 polynomial; about 1 ulp).
// Below −87.3 (where e^x leaves the normal floats) it gives 0, above 88.37 +Inf; NaN stays NaN.
// Every step is an explicit operation, so a lane's result depends only on its input — the scalar
// callers run it on a padded vector and get the same bits as the vector callers.
__attribute__((always_inline)) inline v16 exp16(const v16& x_in) {
  constexpr float kLo = -87.33654475f, kHi = 88.37626266f;
  const v16 lo = splat(kLo), hi = splat(kHi);
  v16 x = x_in < lo ? lo : x_in;
  x = x > hi ? hi : x;
  // n = round(x·log₂e): adding 1.5·2²³ leaves an integer in the low mantissa bits.
  const v16 magic = splat(12582912.0f);
  const v16 n = fmadd(x, splat(1.44269504088896341f), magic) - magic;
  // r = x − n·ln2, in two parts so r keeps its precision.
  v16 r = fmadd(n, splat(-0.693359375f), x);
  r = fmadd(n, splat(2.12194440e-4f), r);
  v16 p = splat(1.9875691500e-4f);
  p = fmadd(p, r, splat(1.3981999507e-3f));
  p = fmadd(p, r, splat(8.3334519073e-3f));
  p = fmadd(p, r, splat(4.1665795894e-2f));
  p = fmadd(p, r, splat(1.6666665459e-1f));
  p = fmadd(p, r, splat(5.0000001201e-1f));
  const v16 r2 = r * r;
  const v16 y = fmadd(p, r2, r) + 1.0f;
  // 2ⁿ from its exponent bits; n is in [−126, 127] after the clamps.
  const vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 out = y * (v16)e;  // a same-size vector cast reinterprets the bits
  out = x_in < lo ? splat(0.0f) : out;
  out = x_in > hi ? splat(__builtin_inff()) : out;
  return out;
}

// gelu_tanh(v) = 0.5·v·(1 + tanh(u)), u = √(2/π)·(v + 0.044715·v³), computed as the identical
// v·σ(2u) = v / (1 + e^(−2u)): one exp instead of tanh, and no cancellation in 1 + tanh(u) for
// u ≪ 0 (large negative v gives v/Inf = −0, large positive gives v).
__attribute__((always_inline)) inline v16 gelu16(const v16& v) {
  const v16 inner = fmadd(v * v * v, splat(0.044715f), v);
  const v16 e = exp16(inner * splat(-1.5957691216057308f));  // −2·√(2/π)
  return v / (e + 1.0f);
}

// max over a[0..n), n ≥ 1 (exact, so the order of comparisons does not matter).
inline float max(const float* a, int64_t n) {
  int64_t k = 0;
  float m = a[0];
  if (n >= kLanes) {
    v16 acc = load(a);
    for (k = kLanes; k + kLanes <= n; k += kLanes) {
      const v16 v = load(a + k);
      acc = v > acc ? v : acc;
    }
    m = acc[0];
    for (int l = 1; l < kLanes; l++) m = acc[l] > m ? acc[l] : m;
  }
  for (; k < n; k++) m = a[k] > m ? a[k] : m;
  return m;
}

// Σ a[k] for k < n, in the same order as dot.
inline float sum(const float* a, int64_t n) {
  v16 acc{};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) acc += load(a + k);
  float s = hsum(acc);
  for (; k < n; k++) s += a[k];
  return s;
}

}  // namespace ferry::kernels::simd
