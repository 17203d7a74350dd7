// Quantized weights (ggml's q8_0 and q4_0 blocks): sizes and names, the vectorized dequantization
// against the plain scalar formula bit for bit, and the kernels computing with quantized weights
// giving exactly what they give with the dequantized float32 values — linear in every epilogue,
// at several shapes and thread counts, and a whole DiT block.
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ferry/dtype.h"
#include "ferry/errors.h"
#include "ferry/kernels.h"
#include "ferry/kernels_detail.h"
#include "test_gguf_support.h"
#include "test_support.h"

using namespace ferry;
using namespace ferry_test;

namespace {

std::vector<float> random_values(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = scale * u(rng);
  return v;
}

std::string quantize(DType dtype, const std::vector<float>& v) {
  return dtype == DType::Q8_0 ? quantize_q8_0(v) : quantize_q4_0(v);
}

std::vector<float> dequantized(DType dtype, const std::string& blocks, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  detail::dequantize_reference(dtype, blocks.data(), out.data(), n);
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

void sizes_and_names() {
  CHECK_EQ(dtype_nbytes(DType::Q8_0, 64), size_t{68});
  CHECK_EQ(dtype_nbytes(DType::Q4_0, 64), size_t{36});
  CHECK_EQ(dtype_nbytes(DType::Q8_0, 3 * 64 * 64), size_t{3 * 64 * 64 / 32 * 34});
  CHECK_EQ(dtype_block_size(DType::Q4_0), int64_t{32});
  CHECK_EQ(dtype_block_size(DType::BF16), int64_t{1});
  CHECK_EQ(dtype_block_bytes(DType::Q8_0), size_t{34});
  CHECK_EQ(dtype_block_bytes(DType::Q4_0), size_t{18});
  CHECK_EQ(dtype_block_bytes(DType::F16), size_t{2});
  CHECK(dtype_is_quantized(DType::Q8_0) && dtype_is_quantized(DType::Q4_0));
  CHECK(!dtype_is_quantized(DType::F32));
  CHECK_EQ(std::string(dtype_name(DType::Q4_0)), std::string("Q4_0"));
  CHECK_EQ(std::string(dtype_ggml_name(DType::Q8_0)), std::string("q8_0"));
  CHECK_EQ(dtype_ggml_id(DType::Q8_0), uint32_t{8});
  CHECK_EQ(dtype_ggml_id(DType::Q4_0), uint32_t{2});
  CHECK_EQ(dtype_ggml_id(DType::BF16), uint32_t{30});
  DType d;
  CHECK(dtype_from_ggml(2, &d) && d == DType::Q4_0);
  CHECK(dtype_from_ggml(1, &d) && d == DType::F16);
  CHECK(!dtype_from_ggml(12, &d));  // q4_K: readable, not computed with
}

// ggml's layouts, by hand: a q8_0 block is value q·d; a q4_0 block puts element j in the low
// nibble of byte j and element j + 16 in the high nibble, each offset by 8.
void block_layouts() {
  std::string q8(34, '\0');
  const uint16_t half = f32_to_f16(0.5f);
  std::memcpy(&q8[0], &half, 2);
  for (int j = 0; j < 32; j++) q8[2 + j] = static_cast<char>(static_cast<int8_t>(j - 16));
  std::vector<float> out(32);
  convert_to_f32(DType::Q8_0, q8.data(), out.data(), 32);
  for (int j = 0; j < 32; j++) CHECK_EQ(out[j], 0.5f * static_cast<float>(j - 16));

  std::string q4(18, '\0');
  const uint16_t two = f32_to_f16(-2.0f);
  std::memcpy(&q4[0], &two, 2);
  for (int j = 0; j < 16; j++) q4[2 + j] = static_cast<char>((j & 0xF) | ((15 - j) << 4));
  convert_to_f32(DType::Q4_0, q4.data(), out.data(), 32);
  for (int j = 0; j < 16; j++) {
    CHECK_EQ(out[j], -2.0f * static_cast<float>(j - 8));
    CHECK_EQ(out[j + 16], -2.0f * static_cast<float>(15 - j - 8));
  }

  // The reference quantizers: q8_0 is within half a step (d = max|x|/127) of the input, q4_0
  // within one step (d = max|x|/8), plus what rounding d to f16 adds.
  const std::vector<float> v = random_values(32 * 8, 3, 2.0f);
  const std::vector<float> v8 = dequantized(DType::Q8_0, quantize_q8_0(v), 32 * 8);
  const std::vector<float> v4 = dequantized(DType::Q4_0, quantize_q4_0(v), 32 * 8);
  for (size_t b = 0; b < v.size(); b += 32) {
    float amax = 0;
    for (size_t j = 0; j < 32; j++) amax = std::max(amax, std::fabs(v[b + j]));
    for (size_t j = 0; j < 32; j++) {
      CHECK(std::fabs(v8[b + j] - v[b + j]) <= amax / 127 * 0.6f);
      CHECK(std::fabs(v4[b + j] - v[b + j]) <= amax / 8 * 1.1f);
    }
  }
}

// The vector paths of convert_to_f32 against the scalar formula, over random blocks and scales
// that cover subnormal, negative, zero, huge and non-finite f16 scales.
void vectorized_dequantization_is_exact() {
  std::mt19937_64 rng(7);
  for (DType dtype : {DType::Q8_0, DType::Q4_0}) {
    const size_t block_bytes = dtype_block_bytes(dtype);
    const int64_t blocks = 257;
    std::string raw(blocks * block_bytes, '\0');
    for (auto& c : raw) c = static_cast<char>(rng());
    const uint16_t scales[] = {0x0000, 0x8000, 0x0001, 0x03FF, 0x3C00, 0xBC00,
                               0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x1234, 0xC321};
    for (int64_t b = 0; b < blocks; b++) {
      if (b < 12) std::memcpy(&raw[b * block_bytes], &scales[b], 2);
    }
    const int64_t n = blocks * kQuantBlock;
    std::vector<float> fast(n), reference(n);
    convert_to_f32(dtype, raw.data(), fast.data(), n);
    detail::dequantize_reference(dtype, raw.data(), reference.data(), n);
    CHECK(same_bits(fast, reference));
  }
}

// linear with quantized weights = linear with their dequantized f32 values, bit for bit.
void linear_matches_dequantized_f32() {
  ThreadPool one(1), two(2), four(4);
  struct Shape {
    int64_t m, n, k;
  };
  const Shape shapes[] = {{1, 1, 32}, {3, 17, 64}, {8, 48, 96}, {33, 40, 320}, {5, 130, 256}};
  for (DType dtype : {DType::Q8_0, DType::Q4_0}) {
    for (const Shape& s : shapes) {
      const std::vector<float> w = random_values(s.n * s.k, 11 + s.n, 0.3f);
      const std::string blocks = quantize(dtype, w);
      const std::vector<float> w32 = dequantized(dtype, blocks, s.n * s.k);
      const std::vector<float> x = random_values(s.m * s.k, 5 + s.m, 1.0f);
      const std::vector<float> bias = random_values(s.n, 9, 0.1f);
      TensorView wq{blocks.data(), dtype, {s.n, s.k}};
      TensorView wf{w32.data(), DType::F32, {s.n, s.k}};
      TensorView b{bias.data(), DType::F32, {s.n}};
      for (auto epilogue :
           {kernels::Epilogue::kStore, kernels::Epilogue::kGelu, kernels::Epilogue::kAccumulate}) {
        std::vector<float> expected(s.m * s.n, 0.5f);
        kernels::linear_ex(one, x.data(), s.m, s.k, wf, &b, expected.data(), s.n, epilogue);
        for (ThreadPool* pool : {&one, &two, &four}) {
          std::vector<float> got(s.m * s.n, 0.5f);
          kernels::linear_ex(*pool, x.data(), s.m, s.k, wq, &b, got.data(), s.n, epilogue);
          CHECK(same_bits(got, expected));
        }
      }
    }
  }
}

// A DiT block with q8_0/q4_0 matrices = the same block with their dequantized values in f32.
void block_forward_matches_dequantized_f32() {
  ThreadPool pool(2);
  DitDims dims;
  dims.hidden = 64;
  dims.heads = 4;
  dims.channels = 8;
  dims.batch = 2;
  dims.tokens = 5;
  const int64_t D = dims.hidden, M = dims.rows();
  for (DType dtype : {DType::Q8_0, DType::Q4_0}) {
    std::vector<std::string> q;         // quantized matrices
    std::vector<std::vector<float>> f;  // their dequantized values, and the f32 vectors
    auto matrix = [&](int64_t out, int64_t in, uint64_t seed) {
      q.push_back(quantize(dtype, random_values(out * in, seed, 1.0f / std::sqrt(float(in)))));
      f.push_back(dequantized(dtype, q.back(), out * in));
    };
    matrix(3 * D, D, 1);
    matrix(D, D, 2);
    matrix(4 * D, D, 3);
    matrix(D, 4 * D, 4);
    const auto norm1 = random_values(D, 5, 0.1f), norm2 = random_values(D, 6, 0.1f);
    const auto qkv_b = random_values(3 * D, 7, 0.02f), out_b = random_values(D, 8, 0.02f);
    const auto fc1_b = random_values(4 * D, 9, 0.02f), fc2_b = random_values(D, 10, 0.02f);
    auto vec = [](const std::vector<float>& v) {
      return TensorView{v.data(), DType::F32, {static_cast<int64_t>(v.size())}};
    };
    auto weights = [&](bool quantized) {
      auto mat = [&](size_t i, int64_t out, int64_t in) {
        return quantized ? TensorView{q[i].data(), dtype, {out, in}}
                         : TensorView{f[i].data(), DType::F32, {out, in}};
      };
      return BlockWeights{vec(norm1), mat(0, 3 * D, D), vec(qkv_b), mat(1, D, D),     vec(out_b),
                          vec(norm2), mat(2, 4 * D, D), vec(fc1_b), mat(3, D, 4 * D), vec(fc2_b)};
    };
    std::vector<float> scratch(kernels::block_scratch_bytes(dims) / 4);
    std::vector<float> x = random_values(M * D, 12, 1.0f);
    std::vector<float> xq = x;
    kernels::block_forward(pool, dims, weights(false), x.data(), scratch.data());
    kernels::block_forward(pool, dims, weights(true), xq.data(), scratch.data());
    CHECK(same_bits(x, xq));
  }
}

void quantized_arguments_are_checked() {
  ThreadPool pool(1);
  std::string blocks(34 * 2, '\0');
  std::vector<float> x(48), y(4);
  // Rows of 48 are not whole blocks.
  TensorView w{blocks.data(), DType::Q8_0, {1, 48}};
  CHECK_THROWS(InvalidArgumentError, kernels::linear(pool, x.data(), 1, w, nullptr, y.data()),
               "whole blocks of 32");
  // A quantized bias is refused.
  TensorView w2{blocks.data(), DType::Q8_0, {2, 32}};
  TensorView qb{blocks.data(), DType::Q8_0, {2}};
  CHECK_THROWS(InvalidArgumentError, kernels::linear(pool, x.data(), 1, w2, &qb, y.data()),
               "bias must be F32, F16 or BF16");
}

}  // namespace

int main() {
  return run_all({
      {"sizes_and_names", sizes_and_names},
      {"block_layouts", block_layouts},
      {"vectorized_dequantization_is_exact", vectorized_dequantization_is_exact},
      {"linear_matches_dequantized_f32", linear_matches_dequantized_f32},
      {"block_forward_matches_dequantized_f32", block_forward_matches_dequantized_f32},
      {"quantized_arguments_are_checked", quantized_arguments_are_checked},
  });
}
