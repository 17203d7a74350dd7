// The DiT segments' forward passes (prelude, block, final) and their pieces: rmsnorm, gelu_tanh,
// multi-head attention. The model's math is in kernels.h and README "The model".
//
// Every output element is computed by exactly one task with a fixed reduction order, so results
// are bitwise identical whatever the thread count; row m of every activation depends only on the
// rows of its own sample, so batch composition does not change a sample's result either.
#include <cmath>
#include <cstring>

#include "ferry/kernels.h"
#include "ferry/kernels_detail.h"
#include "gemm.h"
#include "kernel_util.h"

namespace ferry {

int64_t TensorView::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace kernels {

namespace {

using simd::v16;

void check_dims(const char* where, const DitDims& d) {
  if (d.hidden <= 0 || d.heads <= 0 || d.channels <= 0 || d.batch <= 0 || d.tokens <= 0 ||
      d.hidden % d.heads != 0) {
    throw InvalidArgumentError(std::string(where) + ": bad dims (hidden " +
                               std::to_string(d.hidden) + ", heads " + std::to_string(d.heads) +
                               ", channels " + std::to_string(d.channels) + ", batch " +
                               std::to_string(d.batch) + ", tokens " + std::to_string(d.tokens) +
                               "); all must be positive and hidden a multiple of heads");
  }
}

void check_ptr(const char* where, const char* what, const void* p) {
  if (!p) throw InvalidArgumentError(std::string(where) + ": " + what + " is null");
}

template <DType DT>
void rmsnorm_rows(const float* x, int64_t r0, int64_t r1, int64_t d, const void* w, float* y) {
  for (int64_t r = r0; r < r1; r++) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    const float mean = simd::dot(xr, xr, d) / static_cast<float>(d);
    const float inv = 1.0f / std::sqrt(mean + kRmsNormEps);
    for (int64_t k = 0; k < d; k++) yr[k] = xr[k] * inv * util::element<DT>(w, k);
  }
}

void rmsnorm_impl(ThreadPool& pool, const float* x, int64_t m, int64_t d, const TensorView& weight,
                  float* y) {
  util::run_tasks(pool, m, m * d * 4, [&](int64_t begin, int64_t end) {
    switch (weight.dtype) {
      case DType::F32:
        return rmsnorm_rows<DType::F32>(x, begin, end, d, weight.data, y);
      case DType::F16:
        return rmsnorm_rows<DType::F16>(x, begin, end, d, weight.data, y);
      case DType::BF16:
        return rmsnorm_rows<DType::BF16>(x, begin, end, d, weight.data, y);
      case DType::Q8_0:
      case DType::Q4_0:
        break;  // refused by rmsnorm()'s checks: norm weights are never quantized
    }
  });
}

// Query rows per attention task: enough to use the micro-kernel's row tiles and to amortize the
// task, few enough that H·T/16 tasks keep every thread busy.
constexpr int64_t kQueryBlock = 16;

// softmax in place over one row of scores: exp(s − max) / Σ. The exponentials go 16 at a time
// (the tail through a padded vector, so every element takes the same arithmetic).
void softmax_row(float* s, int64_t n) {
  const float mx = simd::max(s, n);
  const v16 vmx = simd::splat(mx);
  int64_t t = 0;
  for (; t + simd::kLanes <= n; t += simd::kLanes) {
    simd::store(s + t, simd::exp16(simd::load(s + t) - vmx));
  }
  if (t < n) {
    float tail[simd::kLanes] = {};
    std::memcpy(tail, s + t, static_cast<size_t>(n - t) * 4);
    simd::store(tail, simd::exp16(simd::load(tail) - vmx));
    std::memcpy(s + t, tail, static_cast<size_t>(n - t) * 4);
  }
  const float inv = 1.0f / simd::sum(s, n);
  for (t = 0; t < n; t++) s[t] *= inv;
}

// out[i, d0 + 16·c + l] for kRows rows and NV vectors of columns: Σ_t p[i, t]·v[t, ·], a
// sequential FMA chain over t per output.
template <int NV>
void pv_tile(const float* const pr[4], int64_t n, const float* v, int64_t ldv, v16 acc[4][4]) {
  for (int r = 0; r < 4; r++) {
    for (int c = 0; c < NV; c++) acc[r][c] = v16{};
  }
  for (int64_t t = 0; t < n; t++) {
    v16 vv[NV];
    for (int c = 0; c < NV; c++) {
      vv[c] = simd::load(v + t * ldv + c * simd::kLanes);
#if defined(__AVX512F__)
      asm("" : "+v"(vv[c]));  // load once, not once per row (see micro_kernel in gemm.h)
#endif
    }
    for (int r = 0; r < 4; r++) {
      const v16 p = simd::splat(pr[r][t]);
      for (int c = 0; c < NV; c++) acc[r][c] = simd::fmadd(p, vv[c], acc[r][c]);
    }
  }
}

// out[i, d] = Σ_t p[i, t]·v[t, d] for `rows` rows of probabilities (stride ldp) and a head's
// values (row stride ldv, dh wide). Tiles of 4 rows × up to 64 columns keep 16 accumulators in
// registers. Each output is the same sequential FMA chain over t in a vector lane and in the
// scalar tail, so its value depends only on its inputs.
void weighted_values(const float* p, int64_t ldp, int64_t rows, int64_t n, const float* v,
                     int64_t ldv, int64_t dh, float* out, int64_t ldo) {
  constexpr int kRows = 4;
  v16 acc[kRows][4];
  for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
    const float* pr[kRows];
    for (int r = 0; r < kRows; r++) pr[r] = p + std::min<int64_t>(i0 + r, rows - 1) * ldp;
    const int valid = static_cast<int>(std::min<int64_t>(kRows, rows - i0));
    int64_t d0 = 0;
    while (d0 + simd::kLanes <= dh) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (dh - d0) / simd::kLanes));
      switch (nv) {
        case 4:
          pv_tile<4>(pr, n, v + d0, ldv, acc);
          break;
        case 3:
          pv_tile<3>(pr, n, v + d0, ldv, acc);
          break;
        case 2:
          pv_tile<2>(pr, n, v + d0, ldv, acc);
          break;
        default:
          pv_tile<1>(pr, n, v + d0, ldv, acc);
          break;
      }
      for (int r = 0; r < valid; r++) {
        for (int c = 0; c < nv; c++) {
          simd::store(out + (i0 + r) * ldo + d0 + c * simd::kLanes, acc[r][c]);
        }
      }
      d0 += nv * simd::kLanes;
    }
    for (; d0 < dh; d0++) {
      for (int r = 0; r < valid; r++) {
        float s = 0.0f;
        for (int64_t t = 0; t < n; t++) s = simd::fmadd(pr[r][t], v[t * ldv + d0], s);
        out[(i0 + r) * ldo + d0] = s;
      }
    }
  }
}

}  // namespace

void attention(ThreadPool& pool, const DitDims& dims, const float* qkv, float* out, float* scores) {
  const int64_t d = dims.hidden, h = dims.heads, t_len = dims.tokens;
  const int64_t dh = d / h;
  const int64_t ld = 3 * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const int64_t qblocks = (t_len + kQueryBlock - 1) / kQueryBlock;
  // Samples one at a time: `scores` holds one sample's H·T·T.
  for (int64_t b = 0; b < dims.batch; b++) {
    const float* base = qkv + b * t_len * ld;
    float* ob = out + b * t_len * d;
    util::run_tasks(pool, h * qblocks, 2 * h * t_len * t_len * dh, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; task++) {
        const int64_t j = task / qblocks;
        const int64_t i0 = (task % qblocks) * kQueryBlock;
        const int64_t rows = std::min(kQueryBlock, t_len - i0);
        float* s = scores + (j * t_len + i0) * t_len;
        const float* q = base + i0 * ld + j * dh;
        const float* k = base + d + j * dh;
        const float* v = base + 2 * d + j * dh;
        gemm_nt(q, ld, rows, k, ld, t_len, dh,
                [&](int64_t i, int64_t t, float dot) { s[i * t_len + t] = dot * scale; });
        for (int64_t i = 0; i < rows; i++) softmax_row(s + i * t_len, t_len);
        weighted_values(s, t_len, rows, t_len, v, ld, dh, ob + i0 * d + j * dh, d);
      }
    });
  }
}

size_t prelude_scratch_bytes(const DitDims&) { return 0; }

size_t block_scratch_bytes(const DitDims& d) {
  const size_t m = static_cast<size_t>(d.rows()), dd = static_cast<size_t>(d.hidden);
  const size_t h = static_cast<size_t>(d.heads), t = static_cast<size_t>(d.tokens);
  return 4 * (9 * m * dd + h * t * t);
}

size_t final_scratch_bytes(const DitDims& d) {
  const size_t m = static_cast<size_t>(d.rows());
  return 4 * (m * static_cast<size_t>(d.hidden) + m * static_cast<size_t>(d.channels));
}

void prelude_forward(ThreadPool& pool, const DitDims& dims, const PreludeWeights& w, const float* z,
                     float* x, void* /*scratch*/) {
  check_dims("prelude", dims);
  util::expect_shape("prelude", "embed.weight", w.embed_weight, {dims.hidden, dims.channels});
  util::expect_shape("prelude", "embed.bias", w.embed_bias, {dims.hidden});
  check_ptr("prelude", "input", z);
  check_ptr("prelude", "output", x);
  linear_ex(pool, z, dims.rows(), dims.channels, w.embed_weight, &w.embed_bias, x, dims.hidden,
            Epilogue::kStore);
}

void block_forward(ThreadPool& pool, const DitDims& dims, const BlockWeights& w, float* x,
                   void* scratch) {
  check_dims("block", dims);
  const int64_t d = dims.hidden, m = dims.rows();
  util::expect_shape("block", "norm1", w.norm1, {d});
  util::expect_shape("block", "attn.qkv.weight", w.qkv_weight, {3 * d, d});
  util::expect_shape("block", "attn.qkv.bias", w.qkv_bias, {3 * d});
  util::expect_shape("block", "attn.out.weight", w.out_weight, {d, d});
  util::expect_shape("block", "attn.out.bias", w.out_bias, {d});
  util::expect_shape("block", "norm2", w.norm2, {d});
  util::expect_shape("block", "mlp.fc1.weight", w.fc1_weight, {4 * d, d});
  util::expect_shape("block", "mlp.fc1.bias", w.fc1_bias, {4 * d});
  util::expect_shape("block", "mlp.fc2.weight", w.fc2_weight, {d, 4 * d});
  util::expect_shape("block", "mlp.fc2.bias", w.fc2_bias, {d});
  check_ptr("block", "activations", x);
  check_ptr("block", "scratch", scratch);

  // Scratch layout, in floats (block_scratch_bytes): h [M,D] | qkv [M,3D] | attention out [M,D] |
  // mlp hidden [M,4D] | one sample's scores [H,T,T].
  float* h = static_cast<float*>(scratch);
  float* qkv = h + m * d;
  float* att = qkv + m * 3 * d;
  float* mlp = att + m * d;
  float* scores = mlp + m * 4 * d;

  rmsnorm_impl(pool, x, m, d, w.norm1, h);
  linear_ex(pool, h, m, d, w.qkv_weight, &w.qkv_bias, qkv, 3 * d, Epilogue::kStore);
  attention(pool, dims, qkv, att, scores);
  // x + (attn·Woᵀ + bo), the residual add fused into the product's epilogue.
  linear_ex(pool, att, m, d, w.out_weight, &w.out_bias, x, d, Epilogue::kAccumulate);
  rmsnorm_impl(pool, x, m, d, w.norm2, h);
  linear_ex(pool, h, m, d, w.fc1_weight, &w.fc1_bias, mlp, 4 * d, Epilogue::kGelu);
  linear_ex(pool, mlp, m, 4 * d, w.fc2_weight, &w.fc2_bias, x, d, Epilogue::kAccumulate);
}

void final_forward(ThreadPool& pool, const DitDims& dims, const FinalWeights& w, const float* x,
                   float* y, void* scratch) {
  check_dims("final", dims);
  const int64_t d = dims.hidden, c = dims.channels, m = dims.rows();
  util::expect_shape("final", "final.norm.weight", w.norm, {d});
  util::expect_shape("final", "final.out.weight", w.out_weight, {c, d});
  util::expect_shape("final", "final.out.bias", w.out_bias, {c});
  check_ptr("final", "activations", x);
  check_ptr("final", "output", y);
  check_ptr("final", "scratch", scratch);
  // Uses M·D of the documented M·D + M·C: the product writes straight into y.
  float* h = static_cast<float*>(scratch);
  rmsnorm_impl(pool, x, m, d, w.norm, h);
  linear_ex(pool, h, m, d, w.out_weight, &w.out_bias, y, c, Epilogue::kStore);
}

void rmsnorm(ThreadPool& pool, const float* x, int64_t m, int64_t d, const TensorView& weight,
             float* y) {
  if (m < 0 || d < 0) throw InvalidArgumentError("rmsnorm: negative size");
  if (dtype_is_quantized(weight.dtype)) {
    throw InvalidArgumentError("rmsnorm: the weight must be F32, F16 or BF16");
  }
  if (weight.elements() != d || weight.shape.size() != 1) {
    throw InvalidArgumentError("rmsnorm: weight has shape " + util::shape_string(weight.shape) +
                               ", expected [" + std::to_string(d) + "]");
  }
  if (m == 0 || d == 0) return;
  check_ptr("rmsnorm", "input", x);
  check_ptr("rmsnorm", "output", y);
  check_ptr("rmsnorm", "weight", weight.data);
  rmsnorm_impl(pool, x, m, d, weight, y);
}

float gelu_tanh(float v) {
  // Lane 0 of the vector form, so a scalar call and the fused epilogue agree bit for bit.
  return simd::gelu16(simd::splat(v))[0];
}

}  // namespace kernels
}  // namespace ferry
