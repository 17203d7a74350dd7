// Weight element types: sizes, names, and IEEE half / bfloat16 conversions.
#include "ferry/dtype.h"

#include <cstring>

#include "ferry/kernels_detail.h"

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ferry {

namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

int64_t dtype_block_size(DType dtype) { return dtype_is_quantized(dtype) ? kQuantBlock : 1; }

size_t dtype_block_bytes(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return 4;
    case DType::F16:
    case DType::BF16:
      return 2;
    case DType::Q8_0:
      return kQ8_0BlockBytes;
    case DType::Q4_0:
      return kQ4_0BlockBytes;
  }
  return 0;
}

size_t dtype_nbytes(DType dtype, int64_t elements) {
  if (elements <= 0) return 0;
  const size_t n = static_cast<size_t>(elements);
  switch (dtype) {
    case DType::F32:
      return n * 4;
    case DType::F16:
    case DType::BF16:
      return n * 2;
    // Whole blocks only; callers validate that rows are a multiple of the block.
    case DType::Q8_0:
      return n / kQuantBlock * kQ8_0BlockBytes;
    case DType::Q4_0:
      return n / kQuantBlock * kQ4_0BlockBytes;
  }
  return 0;
}

uint32_t dtype_ggml_id(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return 0;
    case DType::F16:
      return 1;
    case DType::BF16:
      return 30;
    case DType::Q8_0:
      return 8;
    case DType::Q4_0:
      return 2;
  }
  return 0;
}

const char* dtype_ggml_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "f32";
    case DType::F16:
      return "f16";
    case DType::BF16:
      return "bf16";
    case DType::Q8_0:
      return "q8_0";
    case DType::Q4_0:
      return "q4_0";
  }
  return "?";
}

bool dtype_from_ggml(uint32_t ggml_id, DType* out) {
  for (DType d : {DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0}) {
    if (dtype_ggml_id(d) == ggml_id) {
      if (out) *out = d;
      return true;
    }
  }
  return false;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::Q8_0:
      return "Q8_0";
    case DType::Q4_0:
      return "Q4_0";
  }
  return "?";
}

bool dtype_from_safetensors(const std::string& name, DType* out) {
  DType d;
  if (name == "F32") {
    d = DType::F32;
  } else if (name == "F16") {
    d = DType::F16;
  } else if (name == "BF16") {
    d = DType::BF16;
  } else {
    return false;
  }
  if (out) *out = d;
  return true;
}

namespace detail {

float f16_to_f32_portable(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    // Zero or subnormal: mant·2⁻²⁴ is exact in float; build it arithmetically, then the sign.
    const float magnitude = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return bits_float(sign | float_bits(magnitude));
  }
  if (exp == 31) {
    // Inf keeps a zero mantissa; NaN keeps its payload (shifted into the top bits, as F16C does).
    return bits_float(sign | 0x7F800000u | (mant << 13));
  }
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t f32_to_f16_portable(float f) {
  const uint32_t bits = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t x = bits & 0x7FFFFFFFu;
  if (x >= 0x7F800000u) {
    if (x == 0x7F800000u) return sign | 0x7C00u;
    // NaN: quiet it and keep the top of the payload, matching vcvtps2ph.
    return static_cast<uint16_t>(sign | 0x7E00u | ((x >> 13) & 0x3FFu));
  }
  // 65520 is halfway between 65504 (largest half, odd mantissa) and 2¹⁶: ties-to-even goes up.
  if (x >= 0x477FF000u) return sign | 0x7C00u;
  if (x < 0x38800000u) {
    // Below the smallest normal half (2⁻¹⁴): the result is a subnormal m·2⁻²⁴ (or zero).
    // 2⁻²⁵ is the tie between 0 and the smallest subnormal; it rounds to even (0).
    if (x <= 0x33000000u) return sign;
    const uint32_t e = x >> 23;  // biased float exponent, 102..112 here
    const uint32_t m = (x & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24: from units of 2^(e−150) to units of 2⁻²⁴
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;  // may carry into the smallest normal: fine
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = (((x >> 23) - 112) << 10) | ((x >> 13) & 0x3FFu);
  const uint32_t rem = x & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;  // a carry bumps the exponent: correct
  return static_cast<uint16_t>(sign | r);
}

}  // namespace detail

float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return detail::f16_to_f32_portable(h);
#endif
}

uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  return detail::f32_to_f16_portable(f);
#endif
}

uint16_t f32_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
    // NaN: truncating could clear every payload bit left and turn it into Inf; force it quiet.
    return static_cast<uint16_t>((x >> 16) | 0x40u);
  }
  // Round to nearest, ties to even, on the 16 bits dropped. Overflow lands on Inf correctly.
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

namespace {

// ggml's block scale: an IEEE half at the start of each block (unaligned: blocks are 34 or 18
// bytes).
inline float block_scale(const uint8_t* block) {
  uint16_t h;
  std::memcpy(&h, block, 2);
  return f16_to_f32(h);
}

// Dequantization is value = q·d, one float multiply per element, so the vector paths below give
// the scalar loop's bits exactly (an int8 or a nibble times an f16 scale is exact in float32
// anyway: at most 8 + 11 significant bits).
void dequantize_q8_0(const uint8_t* block, float* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; b++, block += kQ8_0BlockBytes, dst += kQuantBlock) {
    const float d = block_scale(block);
    const int8_t* q = reinterpret_cast<const int8_t*>(block + 2);
#if defined(__AVX512F__)
    const __m512 vd = _mm512_set1_ps(d);
    for (int j = 0; j < kQuantBlock; j += 16) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j));
      _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), vd));
    }
#elif defined(__AVX2__)
    const __m256 vd = _mm256_set1_ps(d);
    for (int j = 0; j < kQuantBlock; j += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
      _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), vd));
    }
#else
    for (int64_t j = 0; j < kQuantBlock; j++) dst[j] = static_cast<float>(q[j]) * d;
#endif
  }
}

// Element j of a q4_0 block is the low nibble of byte j, element j + 16 the high nibble; both are
// offset by 8.
void dequantize_q4_0(const uint8_t* block, float* dst, int64_t blocks) {
  constexpr int64_t kHalf = kQuantBlock / 2;
  for (int64_t b = 0; b < blocks; b++, block += kQ4_0BlockBytes, dst += kQuantBlock) {
    const float d = block_scale(block);
    const uint8_t* q = block + 2;
#if defined(__AVX512F__)
    const __m512 vd = _mm512_set1_ps(d);
    const __m512i eight = _mm512_set1_epi32(8);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m512i lo32 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight);
    const __m512i hi32 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight);
    _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_cvtepi32_ps(lo32), vd));
    _mm512_storeu_ps(dst + kHalf, _mm512_mul_ps(_mm512_cvtepi32_ps(hi32), vd));
#elif defined(__AVX2__)
    const __m256 vd = _mm256_set1_ps(d);
    const __m256i eight = _mm256_set1_epi32(8);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    for (int half = 0; half < 2; half++) {
      const __m128i nibbles = half == 0 ? lo : hi;
      const __m128i upper = _mm_srli_si128(nibbles, 8);
      const __m256i a = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nibbles), eight);
      const __m256i c = _mm256_sub_epi32(_mm256_cvtepu8_epi32(upper), eight);
      _mm256_storeu_ps(dst + half * kHalf, _mm256_mul_ps(_mm256_cvtepi32_ps(a), vd));
      _mm256_storeu_ps(dst + half * kHalf + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(c), vd));
    }
#else
    for (int64_t j = 0; j < kHalf; j++) {
      dst[j] = static_cast<float>(static_cast<int>(q[j] & 0x0F) - 8) * d;
      dst[j + kHalf] = static_cast<float>(static_cast<int>(q[j] >> 4) - 8) * d;
    }
#endif
  }
}

}  // namespace

namespace detail {

void dequantize_reference(DType dtype, const void* src, float* dst, int64_t n) {
  const uint8_t* block = static_cast<const uint8_t*>(src);
  if (dtype == DType::Q8_0) {
    for (int64_t i = 0; i < n; i += kQuantBlock, block += kQ8_0BlockBytes) {
      const float d = block_scale(block);
      const int8_t* q = reinterpret_cast<const int8_t*>(block + 2);
      for (int64_t j = 0; j < kQuantBlock; j++) dst[i + j] = static_cast<float>(q[j]) * d;
    }
  } else if (dtype == DType::Q4_0) {
    for (int64_t i = 0; i < n; i += kQuantBlock, block += kQ4_0BlockBytes) {
      const float d = block_scale(block);
      const uint8_t* q = block + 2;
      for (int64_t j = 0; j < kQuantBlock / 2; j++) {
        dst[i + j] = static_cast<float>(static_cast<int>(q[j] & 0x0F) - 8) * d;
        dst[i + j + kQuantBlock / 2] = static_cast<float>(static_cast<int>(q[j] >> 4) - 8) * d;
      }
    }
  } else {
    convert_to_f32(dtype, src, dst, n);
  }
}

}  // namespace detail

void convert_to_f32(DType dtype, const void* src, float* dst, int64_t n) {
  if (n <= 0) return;
  switch (dtype) {
    case DType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      return;
    case DType::BF16: {
      // A shift per element; the compiler vectorizes this loop.
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; i++) {
        const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
        std::memcpy(dst + i, &bits, 4);
      }
      return;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      int64_t i = 0;
#if defined(__F16C__)
      // 8 at a time (the 16-wide AVX-512 form is no faster here: the loop is load/store bound).
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
#endif
      for (; i < n; i++) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::Q8_0:
      dequantize_q8_0(static_cast<const uint8_t*>(src), dst, n / kQuantBlock);
      return;
    case DType::Q4_0:
      dequantize_q4_0(static_cast<const uint8_t*>(src), dst, n / kQuantBlock);
      return;
  }
}

}  // namespace ferry
