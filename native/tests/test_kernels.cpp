// The DiT kernels against a naive double-precision reference written here (linear, rmsnorm, gelu,
// attention, block, prelude, final, a whole model), for F32/F16/BF16 weights; bitwise determinism
// across thread counts; the fixed per-element arithmetic (tile/row/column independence); scratch
// bounds; and argument checks.
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "ferry/errors.h"
#include "ferry/kernels.h"
#include "ferry/kernels_detail.h"

using namespace ferry;
using namespace ferry::kernels;

namespace {

const DType kDTypes[] = {DType::F32, DType::F16, DType::BF16};

// A weight tensor: the bytes the kernels read, and the exact values they stand for.
struct Param {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<float> values;  // decoded from `bytes`: what the reference computes with
  std::vector<uint8_t> bytes;
  TensorView view() const { return TensorView{bytes.data(), dtype, shape}; }
};

Param make_param(std::mt19937_64& rng, std::vector<int64_t> shape, DType dtype, float scale,
                 float offset = 0.0f) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Param p;
  p.dtype = dtype;
  p.shape = shape;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  p.bytes.resize(dtype_nbytes(dtype, n));
  p.values.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; i++) {
    const float v = offset + scale * u(rng);
    if (dtype == DType::F32) {
      std::memcpy(p.bytes.data() + 4 * i, &v, 4);
      p.values[i] = v;
    } else {
      const uint16_t h = dtype == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v);
      std::memcpy(p.bytes.data() + 2 * i, &h, 2);
      p.values[i] = dtype == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
  }
  return p;
}

std::vector<float> random_vec(std::mt19937_64& rng, size_t n, float scale = 1.0f) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = scale * u(rng);
  return v;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// |got − want| ≤ atol + rtol·|want| everywhere; reports the worst element.
void expect_close(const std::vector<float>& got, const std::vector<double>& want, double atol,
                  double rtol, const std::string& what) {
  KCHECKF(got.size() == want.size(), "%s: size %zu vs %zu", what.c_str(), got.size(), want.size());
  double worst = 0;
  size_t at = 0;
  bool ok = true;
  for (size_t i = 0; i < got.size() && i < want.size(); i++) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double excess = err - (atol + rtol * std::fabs(want[i]));
    if (!(excess <= 0)) ok = false;  // also catches NaN
    if (!(err <= worst)) {
      worst = err;
      at = i;
    }
  }
  KCHECKF(ok, "%s: worst error %g at %zu (got %.9g, want %.9g)", what.c_str(), worst, at,
          at < got.size() ? got[at] : 0.0, at < want.size() ? want[at] : 0.0);
}

// ---- the reference: straightforward double-precision code ----

std::vector<double> ref_linear(const std::vector<double>& x, int64_t m, const Param& w,
                               const Param* b) {
  const int64_t n = w.shape[0], k = w.shape[1];
  std::vector<double> y(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; i++) {
    for (int64_t j = 0; j < n; j++) {
      double s = b ? b->values[j] : 0.0;
      for (int64_t p = 0; p < k; p++) s += x[i * k + p] * static_cast<double>(w.values[j * k + p]);
      y[i * n + j] = s;
    }
  }
  return y;
}

std::vector<double> ref_rmsnorm(const std::vector<double>& x, int64_t m, int64_t d,
                                const Param& w) {
  std::vector<double> y(x.size());
  for (int64_t i = 0; i < m; i++) {
    double ss = 0;
    for (int64_t k = 0; k < d; k++) ss += x[i * d + k] * x[i * d + k];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + 1e-6);
    for (int64_t k = 0; k < d; k++) y[i * d + k] = x[i * d + k] * inv * w.values[k];
  }
  return y;
}

double ref_gelu(double v) {
  return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
}

// softmax(q·kᵀ/√(D/H))·v per sample and head, from qkv [M, 3D].
std::vector<double> ref_attention(const DitDims& d, const std::vector<double>& qkv) {
  const int64_t D = d.hidden, H = d.heads, T = d.tokens, dh = D / H;
  std::vector<double> out(static_cast<size_t>(d.rows() * D));
  for (int64_t b = 0; b < d.batch; b++) {
    for (int64_t j = 0; j < H; j++) {
      for (int64_t i = 0; i < T; i++) {
        const double* q = &qkv[(b * T + i) * 3 * D + j * dh];
        std::vector<double> s(static_cast<size_t>(T));
        double mx = -INFINITY;
        for (int64_t t = 0; t < T; t++) {
          const double* k = &qkv[(b * T + t) * 3 * D + D + j * dh];
          double dot = 0;
          for (int64_t e = 0; e < dh; e++) dot += q[e] * k[e];
          s[t] = dot / std::sqrt(static_cast<double>(dh));
          mx = std::max(mx, s[t]);
        }
        double sum = 0;
        for (auto& v : s) sum += (v = std::exp(v - mx));
        for (int64_t e = 0; e < dh; e++) {
          double acc = 0;
          for (int64_t t = 0; t < T; t++)
            acc += s[t] / sum * qkv[(b * T + t) * 3 * D + 2 * D + j * dh + e];
          out[(b * T + i) * D + j * dh + e] = acc;
        }
      }
    }
  }
  return out;
}

struct Block {
  Param norm1, qkv_w, qkv_b, out_w, out_b, norm2, fc1_w, fc1_b, fc2_w, fc2_b;
  BlockWeights views() const {
    return {norm1.view(), qkv_w.view(), qkv_b.view(), out_w.view(), out_b.view(),
            norm2.view(), fc1_w.view(), fc1_b.view(), fc2_w.view(), fc2_b.view()};
  }
};

// Well-conditioned random weights, as the model generator makes them. Vectors take `vec_dtype` so
// mixed-dtype segments are covered.
Block make_block(std::mt19937_64& rng, int64_t D, DType dtype, DType vec_dtype) {
  const float s = 1.0f / std::sqrt(static_cast<float>(D));
  Block b;
  b.norm1 = make_param(rng, {D}, vec_dtype, 0.1f, 1.0f);
  b.qkv_w = make_param(rng, {3 * D, D}, dtype, s);
  b.qkv_b = make_param(rng, {3 * D}, vec_dtype, 0.1f);
  b.out_w = make_param(rng, {D, D}, dtype, s);
  b.out_b = make_param(rng, {D}, vec_dtype, 0.1f);
  b.norm2 = make_param(rng, {D}, vec_dtype, 0.1f, 1.0f);
  b.fc1_w = make_param(rng, {4 * D, D}, dtype, s);
  b.fc1_b = make_param(rng, {4 * D}, vec_dtype, 0.1f);
  b.fc2_w = make_param(rng, {D, 4 * D}, dtype, s / 2);
  b.fc2_b = make_param(rng, {D}, vec_dtype, 0.1f);
  return b;
}

std::vector<double> ref_block(const DitDims& d, const Block& w, std::vector<double> x) {
  const int64_t M = d.rows(), D = d.hidden;
  auto h = ref_rmsnorm(x, M, D, w.norm1);
  auto qkv = ref_linear(h, M, w.qkv_w, &w.qkv_b);
  auto att = ref_attention(d, qkv);
  auto o = ref_linear(att, M, w.out_w, &w.out_b);
  for (size_t i = 0; i < x.size(); i++) x[i] += o[i];
  h = ref_rmsnorm(x, M, D, w.norm2);
  auto f = ref_linear(h, M, w.fc1_w, &w.fc1_b);
  for (auto& v : f) v = ref_gelu(v);
  auto g = ref_linear(f, M, w.fc2_w, &w.fc2_b);
  for (size_t i = 0; i < x.size(); i++) x[i] += g[i];
  return x;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

DitDims dims_of(int64_t B, int64_t T, int64_t D, int64_t H, int64_t C) {
  DitDims d;
  d.batch = B;
  d.tokens = T;
  d.hidden = D;
  d.heads = H;
  d.channels = C;
  return d;
}

// Scratch of exactly `bytes`, NaN-filled (a kernel reading scratch it did not write shows up as a
// NaN in its output), followed by a guard that must stay untouched.
struct Scratch {
  static constexpr size_t kGuard = 64;
  std::vector<float> buf;
  explicit Scratch(size_t bytes) : buf(bytes / 4 + kGuard, std::nanf("")) {
    for (size_t i = 0; i < kGuard; i++) buf[bytes / 4 + i] = 12345.0f;
  }
  void* data() { return buf.data(); }
  bool guard_intact() const {
    for (size_t i = buf.size() - kGuard; i < buf.size(); i++) {
      if (buf[i] != 12345.0f) return false;
    }
    return true;
  }
};

// ---- tests ----

void test_linear_matches_reference() {
  std::mt19937_64 rng(1);
  ThreadPool pool(2);
  struct Shape {
    int64_t m, n, k;
  };
  const Shape shapes[] = {{1, 1, 1},     {3, 5, 7},     {7, 37, 33},   {4, 16, 16},
                          {64, 48, 100}, {16, 64, 256}, {33, 70, 513}, {130, 17, 64}};
  for (const Shape& s : shapes) {
    for (DType dt : kDTypes) {
      for (bool with_bias : {true, false}) {
        const Param w = make_param(rng, {s.n, s.k}, dt, 1.0f);
        const Param b = make_param(rng, {s.n}, dt, 1.0f);
        const auto x = random_vec(rng, static_cast<size_t>(s.m * s.k));
        std::vector<float> y(static_cast<size_t>(s.m * s.n), NAN);
        const TensorView bv = b.view();
        linear(pool, x.data(), s.m, w.view(), with_bias ? &bv : nullptr, y.data());
        const auto want = ref_linear(to_double(x), s.m, w, with_bias ? &b : nullptr);
        // Error bound of a float sum of k products of magnitude ≤ 1 (lane partials keep it far
        // below the worst case k·ε).
        const double tol = 1e-6 * static_cast<double>(s.k) + 1e-6;
        expect_close(y, want, tol, 1e-6,
                     std::string("linear ") + dtype_name(dt) + " m" + std::to_string(s.m) + " n" +
                         std::to_string(s.n) + " k" + std::to_string(s.k));
      }
    }
  }
}

// Every output is dot(x row, w row) + b bit for bit, wherever it sits in a (reduce16-summed) tile
// — the property that makes results independent of the partition and of M.
void test_linear_per_element_arithmetic() {
  std::mt19937_64 rng(2);
  ThreadPool pool(3);
  for (DType dt : kDTypes) {
    const int64_t m = 11, n = 23, k = 45;
    const Param w = make_param(rng, {n, k}, dt, 1.0f);
    const Param b = make_param(rng, {n}, DType::F32, 1.0f);
    const auto x = random_vec(rng, static_cast<size_t>(m * k));
    std::vector<float> y(static_cast<size_t>(m * n));
    const TensorView bv = b.view();
    linear(pool, x.data(), m, w.view(), &bv, y.data());
    bool same = true;
    for (int64_t i = 0; i < m; i++) {
      for (int64_t j = 0; j < n; j++) {
        const float want = dot(&x[i * k], &w.values[j * k], k) + b.values[j];
        same = same && std::memcmp(&want, &y[i * n + j], 4) == 0;
      }
    }
    KCHECKF(same, "%s", dtype_name(dt));
    // Row i alone gives the same row.
    for (int64_t i = 0; i < m; i++) {
      std::vector<float> row(static_cast<size_t>(n));
      linear(pool, &x[i * k], 1, w.view(), &bv, row.data());
      KCHECKF(std::memcmp(row.data(), &y[i * n], n * 4) == 0, "%s row %lld", dtype_name(dt),
              static_cast<long long>(i));
    }
  }
}

void test_linear_epilogues_and_strides() {
  std::mt19937_64 rng(4);
  ThreadPool pool(2);
  const int64_t m = 9, n = 21, k = 40, ldx = 47, ldy = 30;
  const Param w = make_param(rng, {n, k}, DType::BF16, 1.0f);
  const Param b = make_param(rng, {n}, DType::F16, 1.0f);
  const TensorView bv = b.view();
  auto xs = random_vec(rng, static_cast<size_t>(m * ldx));
  std::vector<float> x(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m; i++) std::memcpy(&x[i * k], &xs[i * ldx], k * 4);
  std::vector<float> plain(static_cast<size_t>(m * n));
  linear(pool, x.data(), m, w.view(), &bv, plain.data());

  const auto y0 = random_vec(rng, static_cast<size_t>(m * ldy));
  for (Epilogue e : {Epilogue::kStore, Epilogue::kGelu, Epilogue::kAccumulate}) {
    std::vector<float> y = y0;
    linear_ex(pool, xs.data(), m, ldx, w.view(), &bv, y.data(), ldy, e);
    bool ok = true;
    for (int64_t i = 0; i < m; i++) {
      for (int64_t j = 0; j < ldy; j++) {
        const float got = y[i * ldy + j];
        float want = y0[i * ldy + j];  // columns past n stay untouched
        if (j < n) {
          const float v = plain[i * n + j];
          want = e == Epilogue::kStore  ? v
                 : e == Epilogue::kGelu ? gelu_tanh(v)
                                        : y0[i * ldy + j] + v;
        }
        ok = ok && std::memcmp(&got, &want, 4) == 0;
      }
    }
    KCHECKF(ok, "epilogue %d", static_cast<int>(e));
  }
}

void test_rmsnorm() {
  std::mt19937_64 rng(5);
  ThreadPool pool(2);
  for (DType dt : kDTypes) {
    for (int64_t d : {1, 7, 16, 33, 300}) {
      const int64_t m = 13;
      const Param w = make_param(rng, {d}, dt, 0.5f, 1.0f);
      auto x = random_vec(rng, static_cast<size_t>(m * d), 3.0f);
      x[0] = 0.0f;  // an all-but-zero row stays finite thanks to eps
      std::vector<float> y(x.size());
      rmsnorm(pool, x.data(), m, d, w.view(), y.data());
      expect_close(y, ref_rmsnorm(to_double(x), m, d, w), 1e-6, 1e-6,
                   std::string("rmsnorm ") + dtype_name(dt) + " d" + std::to_string(d));
    }
  }
  // A zero row gives zeros, not NaN.
  const Param w = make_param(rng, {8}, DType::F32, 0.0f, 1.0f);
  std::vector<float> x(8, 0.0f), y(8, NAN);
  rmsnorm(pool, x.data(), 1, 8, w.view(), y.data());
  for (float v : y) KCHECK(v == 0.0f);
}

void test_gelu() {
  for (double v = -12.0; v <= 12.0; v += 0.01) {
    const double want = ref_gelu(static_cast<float>(v));
    const float got = gelu_tanh(static_cast<float>(v));
    KCHECKF(std::fabs(got - want) <= 1e-6 + 2e-6 * std::fabs(want), "v=%g got %.9g want %.9g", v,
            got, want);
  }
  KCHECK(gelu_tanh(0.0f) == 0.0f);
  KCHECK(gelu_tanh(100.0f) == 100.0f);
  KCHECK(gelu_tanh(1e30f) == 1e30f);
  KCHECK(gelu_tanh(INFINITY) == INFINITY);
  KCHECK(std::fabs(gelu_tanh(-100.0f)) <= 1e-30f);
  KCHECK(gelu_tanh(-1e30f) == 0.0f);
  KCHECK(std::isnan(gelu_tanh(NAN)));
}

// Sharp softmax rows (score spreads of ~100, so many exponentials are tiny or underflow; much
// larger spreads exceed what float32 scores can resolve against a double reference) and a
// single token (p = 1 exactly).
void test_attention_extremes() {
  std::mt19937_64 rng(13);
  ThreadPool pool(2);
  for (float scale : {3.0f, 8.0f}) {
    const DitDims d = dims_of(2, 37, 32, 2, 3);
    const auto qkv = random_vec(rng, static_cast<size_t>(d.rows() * 3 * d.hidden), scale);
    std::vector<float> out(static_cast<size_t>(d.rows() * d.hidden));
    std::vector<float> scores(static_cast<size_t>(d.heads * d.tokens * d.tokens));
    attention(pool, d, qkv.data(), out.data(), scores.data());
    // Values are O(scale); the tolerance is relative to that.
    expect_close(out, ref_attention(d, to_double(qkv)), 4e-6 * scale, 1e-5,
                 "attention scale " + std::to_string(scale));
  }
  const DitDims one = dims_of(3, 1, 16, 4, 3);
  const auto qkv = random_vec(rng, static_cast<size_t>(one.rows() * 3 * one.hidden), 5.0f);
  std::vector<float> out(static_cast<size_t>(one.rows() * one.hidden));
  std::vector<float> scores(static_cast<size_t>(one.heads));
  attention(pool, one, qkv.data(), out.data(), scores.data());
  bool copies_v = true;
  for (int64_t r = 0; r < one.rows(); r++) {
    for (int64_t e = 0; e < one.hidden; e++) {
      copies_v =
          copies_v && out[r * one.hidden + e] == qkv[r * 3 * one.hidden + 2 * one.hidden + e];
    }
  }
  KCHECK(copies_v);  // one token: softmax is exactly 1, so out = v
}

void test_attention() {
  std::mt19937_64 rng(6);
  ThreadPool pool(2);
  // Head widths below, at, and past a vector (16), with query and row-tile tails.
  const DitDims cases[] = {dims_of(2, 5, 16, 4, 6), dims_of(1, 19, 64, 2, 3),
                           dims_of(3, 17, 48, 1, 3), dims_of(2, 33, 40, 2, 3),
                           dims_of(1, 1, 8, 2, 3)};
  for (const DitDims& d : cases) {
    const auto qkv = random_vec(rng, static_cast<size_t>(d.rows() * 3 * d.hidden), 2.0f);
    std::vector<float> out(static_cast<size_t>(d.rows() * d.hidden), NAN);
    std::vector<float> scores(static_cast<size_t>(d.heads * d.tokens * d.tokens), NAN);
    attention(pool, d, qkv.data(), out.data(), scores.data());
    expect_close(out, ref_attention(d, to_double(qkv)), 2e-6, 2e-6,
                 "attention T" + std::to_string(d.tokens) + " D" + std::to_string(d.hidden) + " H" +
                     std::to_string(d.heads));
  }
}

void test_block() {
  std::mt19937_64 rng(7);
  ThreadPool pool(2);
  const DitDims cases[] = {dims_of(2, 5, 16, 4, 6), dims_of(1, 20, 64, 4, 6),
                           dims_of(3, 7, 40, 2, 6)};
  for (const DitDims& d : cases) {
    for (DType dt : kDTypes) {
      const DType vec_dt = dt == DType::F32 ? DType::BF16 : DType::F32;
      const Block w = make_block(rng, d.hidden, dt, vec_dt);
      const auto x0 = random_vec(rng, static_cast<size_t>(d.rows() * d.hidden), 2.0f);
      std::vector<float> x = x0;
      Scratch scratch(block_scratch_bytes(d));
      block_forward(pool, d, w.views(), x.data(), scratch.data());
      KCHECK(scratch.guard_intact());
      expect_close(x, ref_block(d, w, to_double(x0)), 2e-5, 2e-5,
                   std::string("block ") + dtype_name(dt) + " D" + std::to_string(d.hidden));
    }
  }
}

void test_prelude_and_final() {
  std::mt19937_64 rng(8);
  ThreadPool pool(2);
  const DitDims d = dims_of(2, 5, 16, 4, 6);
  for (DType dt : kDTypes) {
    const Param ew = make_param(rng, {d.hidden, d.channels}, dt, 0.4f);
    const Param eb = make_param(rng, {d.hidden}, dt, 0.1f);
    const auto z = random_vec(rng, static_cast<size_t>(d.rows() * d.channels));
    std::vector<float> x(static_cast<size_t>(d.rows() * d.hidden), NAN);
    prelude_forward(pool, d, {ew.view(), eb.view()}, z.data(), x.data(), nullptr);
    KCHECK(prelude_scratch_bytes(d) == 0);
    expect_close(x, ref_linear(to_double(z), d.rows(), ew, &eb), 1e-6, 1e-6,
                 std::string("prelude ") + dtype_name(dt));

    const Param nw = make_param(rng, {d.hidden}, dt, 0.1f, 1.0f);
    const Param ow = make_param(rng, {d.channels, d.hidden}, dt, 0.25f);
    const Param ob = make_param(rng, {d.channels}, dt, 0.1f);
    std::vector<float> y(static_cast<size_t>(d.rows() * d.channels), NAN);
    Scratch scratch(final_scratch_bytes(d));
    final_forward(pool, d, {nw.view(), ow.view(), ob.view()}, x.data(), y.data(), scratch.data());
    KCHECK(scratch.guard_intact());
    const auto h = ref_rmsnorm(to_double(x), d.rows(), d.hidden, nw);
    expect_close(y, ref_linear(h, d.rows(), ow, &ob), 1e-5, 1e-5,
                 std::string("final ") + dtype_name(dt));
  }
}

// prelude → 3 blocks → final, as the runner chains them, against the reference end to end.
void test_whole_model() {
  std::mt19937_64 rng(9);
  ThreadPool pool(3);
  const DitDims d = dims_of(2, 5, 16, 4, 6);
  for (DType dt : kDTypes) {
    const Param ew = make_param(rng, {d.hidden, d.channels}, dt, 0.4f);
    const Param eb = make_param(rng, {d.hidden}, dt, 0.1f);
    std::vector<Block> blocks;
    for (int i = 0; i < 3; i++) blocks.push_back(make_block(rng, d.hidden, dt, dt));
    const Param nw = make_param(rng, {d.hidden}, dt, 0.1f, 1.0f);
    const Param ow = make_param(rng, {d.channels, d.hidden}, dt, 0.25f);
    const Param ob = make_param(rng, {d.channels}, dt, 0.1f);
    const auto z = random_vec(rng, static_cast<size_t>(d.rows() * d.channels));

    std::vector<float> x(static_cast<size_t>(d.rows() * d.hidden));
    std::vector<float> y(static_cast<size_t>(d.rows() * d.channels));
    Scratch scratch(std::max(block_scratch_bytes(d), final_scratch_bytes(d)));
    prelude_forward(pool, d, {ew.view(), eb.view()}, z.data(), x.data(), nullptr);
    for (const Block& b : blocks) block_forward(pool, d, b.views(), x.data(), scratch.data());
    final_forward(pool, d, {nw.view(), ow.view(), ob.view()}, x.data(), y.data(), scratch.data());

    auto rx = ref_linear(to_double(z), d.rows(), ew, &eb);
    for (const Block& b : blocks) rx = ref_block(d, b, rx);
    const auto want = ref_linear(ref_rmsnorm(rx, d.rows(), d.hidden, nw), d.rows(), ow, &ob);
    expect_close(y, want, 5e-5, 5e-5, std::string("model ") + dtype_name(dt));
  }
}

// The same inputs give bitwise-identical outputs with 1, 2, 3 or 8 threads (sizes large enough
// that the work is really split).
void test_deterministic_across_thread_counts() {
  std::mt19937_64 rng(10);
  const DitDims d = dims_of(2, 24, 64, 4, 12);
  const unsigned counts[] = {1, 2, 3, 8};
  for (DType dt : kDTypes) {
    const Param w = make_param(rng, {150, 200}, dt, 1.0f);
    const Param b = make_param(rng, {150}, dt, 1.0f);
    const auto x = random_vec(rng, 37 * 200);
    const Param nw = make_param(rng, {100}, dt, 0.1f, 1.0f);
    const auto xn = random_vec(rng, 700 * 100);
    const Block blk = make_block(rng, d.hidden, dt, dt);
    const auto xb = random_vec(rng, static_cast<size_t>(d.rows() * d.hidden), 2.0f);
    const Param fn = make_param(rng, {d.hidden}, dt, 0.1f, 1.0f);
    const Param fw = make_param(rng, {d.channels, d.hidden}, dt, 0.25f);
    const Param fb = make_param(rng, {d.channels}, dt, 0.1f);

    std::vector<std::vector<float>> lin, norm, block, fin;
    for (unsigned threads : counts) {
      ThreadPool pool(threads);
      const TensorView bv = b.view();
      lin.emplace_back(150 * 37);
      linear(pool, x.data(), 37, w.view(), &bv, lin.back().data());
      norm.emplace_back(700 * 100);
      rmsnorm(pool, xn.data(), 700, 100, nw.view(), norm.back().data());
      block.push_back(xb);
      Scratch scratch(block_scratch_bytes(d));
      block_forward(pool, d, blk.views(), block.back().data(), scratch.data());
      fin.emplace_back(static_cast<size_t>(d.rows() * d.channels));
      Scratch fs(final_scratch_bytes(d));
      final_forward(pool, d, {fn.view(), fw.view(), fb.view()}, block.back().data(),
                    fin.back().data(), fs.data());
    }
    for (size_t i = 1; i < lin.size(); i++) {
      KCHECKF(bitwise_equal(lin[0], lin[i]), "linear %s threads %u", dtype_name(dt), counts[i]);
      KCHECKF(bitwise_equal(norm[0], norm[i]), "rmsnorm %s threads %u", dtype_name(dt), counts[i]);
      KCHECKF(bitwise_equal(block[0], block[i]), "block %s threads %u", dtype_name(dt), counts[i]);
      KCHECKF(bitwise_equal(fin[0], fin[i]), "final %s threads %u", dtype_name(dt), counts[i]);
    }
  }
}

// A sample's result does not depend on what else is in the batch.
void test_batch_independence() {
  std::mt19937_64 rng(11);
  ThreadPool pool(2);
  const DitDims d2 = dims_of(3, 9, 32, 4, 6);
  const DitDims d1 = dims_of(1, 9, 32, 4, 6);
  const Block w = make_block(rng, 32, DType::F16, DType::F16);
  const auto x = random_vec(rng, static_cast<size_t>(d2.rows() * 32), 2.0f);
  std::vector<float> all = x;
  Scratch s2(block_scratch_bytes(d2));
  block_forward(pool, d2, w.views(), all.data(), s2.data());
  for (int64_t b = 0; b < 3; b++) {
    std::vector<float> one(x.begin() + b * 9 * 32, x.begin() + (b + 1) * 9 * 32);
    Scratch s1(block_scratch_bytes(d1));
    block_forward(pool, d1, w.views(), one.data(), s1.data());
    KCHECKF(std::memcmp(one.data(), &all[b * 9 * 32], one.size() * 4) == 0, "sample %lld",
            static_cast<long long>(b));
  }
}

void test_scratch_sizes() {
  const DitDims d = dims_of(2, 5, 16, 4, 6);
  KCHECK(prelude_scratch_bytes(d) == 0);
  KCHECK(block_scratch_bytes(d) == 4 * (9 * 10 * 16 + 4 * 5 * 5));
  KCHECK(final_scratch_bytes(d) == 4 * (10 * 16 + 10 * 6));
}

void test_bad_arguments() {
  std::mt19937_64 rng(12);
  ThreadPool pool(2);
  const DitDims d = dims_of(2, 5, 16, 4, 6);
  Block w = make_block(rng, 16, DType::F32, DType::F32);
  std::vector<float> x(static_cast<size_t>(d.rows() * 16));
  Scratch s(block_scratch_bytes(d));

  Block bad = w;
  bad.qkv_w.shape = {47, 16};
  KCHECK_THROWS(InvalidArgumentError, block_forward(pool, d, bad.views(), x.data(), s.data()));
  bad = w;
  bad.norm2.shape = {16, 1};
  KCHECK_THROWS(InvalidArgumentError, block_forward(pool, d, bad.views(), x.data(), s.data()));
  KCHECK_THROWS(InvalidArgumentError, block_forward(pool, d, w.views(), x.data(), nullptr));
  KCHECK_THROWS(InvalidArgumentError,
                block_forward(pool, dims_of(2, 5, 16, 3, 6), w.views(), x.data(), s.data()));
  KCHECK_THROWS(InvalidArgumentError,
                block_forward(pool, dims_of(0, 5, 16, 4, 6), w.views(), x.data(), s.data()));

  const Param lw = make_param(rng, {4, 3}, DType::F32, 1.0f);
  const Param lb = make_param(rng, {5}, DType::F32, 1.0f);
  const TensorView lbv = lb.view();
  std::vector<float> y(20);
  KCHECK_THROWS(InvalidArgumentError, linear(pool, x.data(), 2, lw.view(), &lbv, y.data()));
  TensorView one_d = lw.view();
  one_d.shape = {12};
  KCHECK_THROWS(InvalidArgumentError, linear(pool, x.data(), 2, one_d, nullptr, y.data()));
  KCHECK_THROWS(InvalidArgumentError, rmsnorm(pool, x.data(), 2, 5, lw.view(), y.data()));

  const Param fn = make_param(rng, {16}, DType::F32, 0.1f, 1.0f);
  const Param fw = make_param(rng, {6, 15}, DType::F32, 0.1f);
  const Param fb = make_param(rng, {6}, DType::F32, 0.1f);
  Scratch fs(final_scratch_bytes(d));
  KCHECK_THROWS(InvalidArgumentError, final_forward(pool, d, {fn.view(), fw.view(), fb.view()},
                                                    x.data(), y.data(), fs.data()));
}

}  // namespace

int main() {
  return ferry_check::run({
      {"linear_matches_reference", test_linear_matches_reference},
      {"linear_per_element_arithmetic", test_linear_per_element_arithmetic},
      {"linear_epilogues_and_strides", test_linear_epilogues_and_strides},
      {"rmsnorm", test_rmsnorm},
      {"gelu", test_gelu},
      {"attention", test_attention},
      {"attention_extremes", test_attention_extremes},
      {"block", test_block},
      {"prelude_and_final", test_prelude_and_final},
      {"whole_model", test_whole_model},
      {"deterministic_across_thread_counts", test_deterministic_across_thread_counts},
      {"batch_independence", test_batch_independence},
      {"scratch_sizes", test_scratch_sizes},
      {"bad_arguments", test_bad_arguments},
  });
}
