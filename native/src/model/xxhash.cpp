// XXH64, written from the xxHash specification (doc/xxhash_spec.md): four 64-bit lanes over
// 32-byte stripes, merged, then the tail (8-, 4- and 1-byte steps) and the avalanche.
#include "ferry/xxhash.h"

#include <cstring>

namespace ferry {

namespace {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kP3 = 0x165667B19E3779F9ull;
constexpr uint64_t kP4 = 0x85EBCA77C2B2AE63ull;
constexpr uint64_t kP5 = 0x27D4EB2F165667C5ull;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// The format is little-endian; so is every host Ferry builds for.
inline uint64_t read64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t read32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint64_t round(uint64_t acc, uint64_t lane) {
  acc += lane * kP2;
  acc = rotl(acc, 31);
  return acc * kP1;
}

inline uint64_t merge(uint64_t acc, uint64_t lane) {
  acc ^= round(0, lane);
  return acc * kP1 + kP4;
}

// Consumes whole 32-byte stripes from p; returns the bytes consumed.
size_t stripes(uint64_t acc[4], const uint8_t* p, size_t bytes) {
  const size_t n = bytes / 32 * 32;
  uint64_t a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
  for (size_t i = 0; i < n; i += 32) {
    a0 = round(a0, read64(p + i));
    a1 = round(a1, read64(p + i + 8));
    a2 = round(a2, read64(p + i + 16));
    a3 = round(a3, read64(p + i + 24));
  }
  acc[0] = a0;
  acc[1] = a1;
  acc[2] = a2;
  acc[3] = a3;
  return n;
}

uint64_t finish(uint64_t h, const uint8_t* p, size_t left) {
  while (left >= 8) {
    h ^= round(0, read64(p));
    h = rotl(h, 27) * kP1 + kP4;
    p += 8;
    left -= 8;
  }
  if (left >= 4) {
    h ^= static_cast<uint64_t>(read32(p)) * kP1;
    h = rotl(h, 23) * kP2 + kP3;
    p += 4;
    left -= 4;
  }
  while (left > 0) {
    h ^= static_cast<uint64_t>(*p) * kP5;
    h = rotl(h, 11) * kP1;
    p++;
    left--;
  }
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

uint64_t converge(const uint64_t acc[4]) {
  uint64_t h = rotl(acc[0], 1) + rotl(acc[1], 7) + rotl(acc[2], 12) + rotl(acc[3], 18);
  for (int i = 0; i < 4; i++) h = merge(h, acc[i]);
  return h;
}

void init(uint64_t acc[4], uint64_t seed) {
  acc[0] = seed + kP1 + kP2;
  acc[1] = seed + kP2;
  acc[2] = seed;
  acc[3] = seed - kP1;
}

}  // namespace

uint64_t xxhash64(const void* data, size_t bytes, uint64_t seed) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t h;
  size_t done = 0;
  if (bytes >= 32) {
    uint64_t acc[4];
    init(acc, seed);
    done = stripes(acc, p, bytes);
    h = converge(acc);
  } else {
    h = seed + kP5;
  }
  h += static_cast<uint64_t>(bytes);
  return finish(h, p + done, bytes - done);
}

Xxhash64::Xxhash64(uint64_t seed) : seed_(seed) { init(acc_, seed); }

void Xxhash64::update(const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  total_ += bytes;
  if (buffered_ > 0) {
    const size_t take = bytes < 32 - buffered_ ? bytes : 32 - buffered_;
    std::memcpy(buffer_ + buffered_, p, take);
    buffered_ += take;
    p += take;
    bytes -= take;
    if (buffered_ < 32) return;
    stripes(acc_, buffer_, 32);
    buffered_ = 0;
  }
  const size_t n = stripes(acc_, p, bytes);
  std::memcpy(buffer_, p + n, bytes - n);
  buffered_ = bytes - n;
}

uint64_t Xxhash64::digest() const {
  uint64_t h = total_ >= 32 ? converge(acc_) : seed_ + kP5;
  h += total_;
  return finish(h, buffer_, buffered_);
}

}  // namespace ferry
