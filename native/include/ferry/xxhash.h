#pragma once
// XXH64 (Yann Collet's xxHash, 64-bit variant; https://github.com/Cyan4973/xxHash, spec in
// doc/xxhash_spec.md), one-shot and streaming. Used for the params cache's per-segment checksums:
// it runs at several GB/s on one core, so hashing a segment as it is loaded costs a small fraction
// of the disk read. Output is identical to the reference implementation's XXH64(data, len, seed).
#include <cstddef>
#include <cstdint>

namespace ferry {

uint64_t xxhash64(const void* data, size_t bytes, uint64_t seed = 0);

// Incremental XXH64: update() any number of times, then digest() (which does not reset, so more
// update() calls may follow). The result equals xxhash64 of the concatenated input.
class Xxhash64 {
 public:
  explicit Xxhash64(uint64_t seed = 0);
  void update(const void* data, size_t bytes);
  uint64_t digest() const;

 private:
  uint64_t acc_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  uint8_t buffer_[32];
  size_t buffered_ = 0;
};

}  // namespace ferry
