// dtype.h: sizes, names, safetensors parsing, and the F16/BF16 conversions — edge cases, round
// trips, agreement with an independent double-precision rounding reference, and agreement of the
// portable code with the F16C path.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "check.h"
#include "ferry/dtype.h"
#include "ferry/kernels_detail.h"

using namespace ferry;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

bool same_bits(float a, float b) { return bits(a) == bits(b); }

// The value of a half, computed from its fields in double (independent of the code under test).
double half_value(uint16_t h) {
  const int exp = (h >> 10) & 31, mant = h & 1023;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (exp == 0) return sign * std::ldexp(mant, -24);
  if (exp == 31) return mant ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  return sign * std::ldexp(1024 + mant, exp - 25);
}

// Nearest half to f, ties to even, by search over the ordered positive halfs.
uint16_t reference_f16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7C00;
  uint16_t lo = 0, hi = 0x7BFF;  // largest h with half_value(h) <= a
  while (lo < hi) {
    const uint16_t mid = static_cast<uint16_t>((lo + hi + 1) / 2);
    if (half_value(mid) <= a) {
      lo = mid;
    } else {
      hi = static_cast<uint16_t>(mid - 1);
    }
  }
  if (lo == 0x7BFF) return sign | (a - 65504.0 < 65536.0 - a ? 0x7BFF : 0x7C00);
  const double down = a - half_value(lo), up = half_value(static_cast<uint16_t>(lo + 1)) - a;
  uint16_t r = lo;
  if (up < down || (up == down && (lo & 1))) r = static_cast<uint16_t>(lo + 1);
  return sign | r;
}

// Nearest bfloat16 to a finite f, ties to even, from the two candidates around it.
uint16_t reference_bf16(float f) {
  const uint32_t u = bits(f);
  const uint16_t down = static_cast<uint16_t>(u >> 16);
  const uint16_t up = static_cast<uint16_t>(down + 1);
  const double a = std::fabs(static_cast<double>(f));
  const double vd = std::fabs(static_cast<double>(bf16_to_f32(down)));
  // The candidate above may be Inf (its value is then 2^128 for the purpose of rounding).
  const double vu = (up & 0x7FFF) == 0x7F80 ? std::ldexp(1.0, 128)
                                            : std::fabs(static_cast<double>(bf16_to_f32(up)));
  if (a - vd < vu - a) return down;
  if (a - vd > vu - a) return up;
  return (down & 1) ? up : down;
}

void test_sizes_and_names() {
  KCHECK(dtype_nbytes(DType::F32, 10) == 40);
  KCHECK(dtype_nbytes(DType::F16, 10) == 20);
  KCHECK(dtype_nbytes(DType::BF16, 10) == 20);
  KCHECK(dtype_nbytes(DType::F32, 0) == 0);
  KCHECK(std::string(dtype_name(DType::F32)) == "F32");
  KCHECK(std::string(dtype_name(DType::F16)) == "F16");
  KCHECK(std::string(dtype_name(DType::BF16)) == "BF16");
  for (DType d : {DType::F32, DType::F16, DType::BF16}) {
    DType parsed = DType::F32;
    KCHECK(dtype_from_safetensors(dtype_name(d), &parsed));
    KCHECK(parsed == d);
  }
  DType untouched = DType::BF16;
  for (const char* bad : {"F64", "I8", "f32", "", "Q4_0", "BF16 "}) {
    KCHECKF(!dtype_from_safetensors(bad, &untouched), "%s", bad);
  }
  KCHECK(untouched == DType::BF16);
}

void test_f16_edges() {
  KCHECK(f32_to_f16(0.0f) == 0x0000);
  KCHECK(f32_to_f16(-0.0f) == 0x8000);
  KCHECK(f32_to_f16(1.0f) == 0x3C00);
  KCHECK(f32_to_f16(-2.0f) == 0xC000);
  KCHECK(f32_to_f16(65504.0f) == 0x7BFF);
  KCHECK(f32_to_f16(65519.99f) == 0x7BFF);
  KCHECK(f32_to_f16(65520.0f) == 0x7C00);  // the tie above the largest half rounds to Inf
  KCHECK(f32_to_f16(1e10f) == 0x7C00);
  KCHECK(f32_to_f16(-1e10f) == 0xFC00);
  KCHECK(f32_to_f16(INFINITY) == 0x7C00);
  KCHECK(f32_to_f16(-INFINITY) == 0xFC00);
  // Smallest subnormal 2⁻²⁴; 2⁻²⁵ is the tie with zero and goes to even (zero).
  KCHECK(f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001);
  KCHECK(f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);
  KCHECK(f32_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  KCHECK(f32_to_f16(1.5f * std::ldexp(1.0f, -24)) == 0x0002);      // tie → even
  KCHECK(f32_to_f16(2.5f * std::ldexp(1.0f, -24)) == 0x0002);      // tie → even
  KCHECK(f32_to_f16(-std::ldexp(1.0f, -14)) == 0x8400);            // smallest normal
  KCHECK(f32_to_f16(std::ldexp(1023.5f, -24)) == 0x0400);          // rounds up into the normals
  KCHECK(f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);      // tie → even (down)
  KCHECK(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);  // tie → even (up)
  KCHECK(f32_to_f16(1e-30f) == 0x0000);
  KCHECK(f32_to_f16(std::numeric_limits<float>::denorm_min()) == 0x0000);
  const uint16_t nan = f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  KCHECK((nan & 0x7C00) == 0x7C00 && (nan & 0x3FF) != 0);
  const uint16_t snan = f32_to_f16(from_bits(0x7F800001u));  // payload only in the low bits
  KCHECK((snan & 0x7C00) == 0x7C00 && (snan & 0x3FF) != 0);  // still NaN, not Inf

  KCHECK(f16_to_f32(0x0000) == 0.0f && !std::signbit(f16_to_f32(0x0000)));
  KCHECK(std::signbit(f16_to_f32(0x8000)));
  KCHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));
  KCHECK(f16_to_f32(0x03FF) == std::ldexp(1023.0f, -24));
  KCHECK(f16_to_f32(0x7BFF) == 65504.0f);
  KCHECK(std::isinf(f16_to_f32(0x7C00)) && f16_to_f32(0x7C00) > 0);
  KCHECK(std::isinf(f16_to_f32(0xFC00)) && f16_to_f32(0xFC00) < 0);
  KCHECK(std::isnan(f16_to_f32(0x7E00)));
  KCHECK(std::isnan(f16_to_f32(0x7C01)));
}

void test_f16_every_half() {
  for (uint32_t h = 0; h < 65536; h++) {
    const uint16_t hh = static_cast<uint16_t>(h);
    const float f = f16_to_f32(hh);
    const double want = half_value(hh);
    if (std::isnan(want)) {
      KCHECKF(std::isnan(f), "h=%04x", h);
      KCHECKF(std::isnan(f16_to_f32(f32_to_f16(f))), "h=%04x", h);
    } else {
      KCHECKF(static_cast<double>(f) == want && std::signbit(f) == ((h & 0x8000) != 0), "h=%04x",
              h);
      KCHECKF(f32_to_f16(f) == hh, "round trip h=%04x", h);
    }
    const float p = detail::f16_to_f32_portable(hh);
    KCHECKF(same_bits(p, f) || (std::isnan(p) && std::isnan(f)), "portable h=%04x", h);
  }
}

// Every 1021st float (all exponents and many mantissas), plus the neighbourhood of every half and
// of every midpoint between halfs — where rounding decisions are made.
std::vector<float> float_sweep() {
  std::vector<float> out;
  for (uint64_t u = 0; u <= 0xFFFFFFFFu; u += 1021)
    out.push_back(from_bits(static_cast<uint32_t>(u)));
  for (uint32_t h = 0; h < 0x7C00; h++) {
    const double v = half_value(static_cast<uint16_t>(h));
    const double next = half_value(static_cast<uint16_t>(h + 1));
    for (double c : {v, (v + next) / 2}) {
      float f = static_cast<float>(c);
      for (float g : {std::nextafter(f, 0.0f), f, std::nextafter(f, INFINITY)}) {
        out.push_back(g);
        out.push_back(-g);
      }
    }
  }
  return out;
}

void test_f16_rounding_matches_reference() {
  int bad = 0;
  for (float f : float_sweep()) {
    const uint16_t got = f32_to_f16(f);
    const uint16_t portable = detail::f32_to_f16_portable(f);
    if (std::isnan(f)) {
      if ((got & 0x7C00) != 0x7C00 || (got & 0x3FF) == 0 || got != portable) bad++;
      continue;
    }
    const uint16_t want = reference_f16(f);
    if (got != want || portable != want) {
      if (bad++ < 10) {
        std::fprintf(stderr, "f=%a (%08x): got %04x portable %04x want %04x\n", f, bits(f), got,
                     portable, want);
      }
    }
  }
  KCHECKF(bad == 0, "%d mismatches", bad);
}

void test_bf16() {
  KCHECK(f32_to_bf16(0.0f) == 0x0000);
  KCHECK(f32_to_bf16(-0.0f) == 0x8000);
  KCHECK(f32_to_bf16(1.0f) == 0x3F80);
  KCHECK(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);        // tie → even (down)
  KCHECK(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);    // tie → even (up)
  KCHECK(f32_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);  // rounds to Inf
  KCHECK(f32_to_bf16(INFINITY) == 0x7F80);
  KCHECK(f32_to_bf16(-INFINITY) == 0xFF80);
  KCHECK(f32_to_bf16(std::numeric_limits<float>::denorm_min()) == 0x0000);
  KCHECK(f32_to_bf16(from_bits(0x00018000u)) == 0x0002);     // subnormal tie → even (up)
  const uint16_t nan = f32_to_bf16(from_bits(0x7F800001u));  // payload only in the dropped bits
  KCHECK((nan & 0x7F80) == 0x7F80 && (nan & 0x7F) != 0);
  KCHECK(std::isnan(bf16_to_f32(f32_to_bf16(-std::numeric_limits<float>::quiet_NaN()))));
  KCHECK(std::signbit(bf16_to_f32(f32_to_bf16(-std::numeric_limits<float>::quiet_NaN()))));

  for (uint32_t b = 0; b < 65536; b++) {
    const uint16_t bb = static_cast<uint16_t>(b);
    const float f = bf16_to_f32(bb);
    KCHECKF(bits(f) == (b << 16), "b=%04x", b);
    if (!std::isnan(f)) KCHECKF(f32_to_bf16(f) == bb, "round trip b=%04x", b);
  }
  int bad = 0;
  for (uint64_t u = 0; u <= 0xFFFFFFFFu; u += 97) {
    const float f = from_bits(static_cast<uint32_t>(u));
    if (std::isnan(f)) continue;
    if (f32_to_bf16(f) != reference_bf16(f) && bad++ < 10) {
      std::fprintf(stderr, "bf16 f=%a: got %04x want %04x\n", f, f32_to_bf16(f), reference_bf16(f));
    }
  }
  KCHECKF(bad == 0, "%d mismatches", bad);
}

void test_convert_to_f32() {
  std::vector<float> src;
  for (int i = 0; i < 67; i++) src.push_back(std::ldexp(static_cast<float>(i - 33), i % 7 - 3));
  src[5] = INFINITY;
  src[6] = -0.0f;
  std::vector<uint16_t> h, b;
  for (float f : src) {
    h.push_back(f32_to_f16(f));
    b.push_back(f32_to_bf16(f));
  }
  // Every length up to 67 exercises each vector width and tail.
  for (int n = 0; n <= 67; n++) {
    std::vector<float> out(n + 1, 42.0f);
    convert_to_f32(DType::F16, h.data(), out.data(), n);
    for (int i = 0; i < n; i++) KCHECKF(same_bits(out[i], f16_to_f32(h[i])), "f16 n=%d i=%d", n, i);
    KCHECK(out[n] == 42.0f);
    convert_to_f32(DType::BF16, b.data(), out.data(), n);
    for (int i = 0; i < n; i++)
      KCHECKF(same_bits(out[i], bf16_to_f32(b[i])), "bf16 n=%d i=%d", n, i);
    KCHECK(out[n] == 42.0f);
    convert_to_f32(DType::F32, src.data(), out.data(), n);
    for (int i = 0; i < n; i++) KCHECKF(same_bits(out[i], src[i]), "f32 n=%d i=%d", n, i);
    KCHECK(out[n] == 42.0f);
  }
}

}  // namespace

int main() {
  return ferry_check::run({
      {"sizes_and_names", test_sizes_and_names},
      {"f16_edges", test_f16_edges},
      {"f16_every_half", test_f16_every_half},
      {"f16_rounding_matches_reference", test_f16_rounding_matches_reference},
      {"bf16", test_bf16},
      {"convert_to_f32", test_convert_to_f32},
  });
}
