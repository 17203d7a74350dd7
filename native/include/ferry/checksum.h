#pragma once
// A 64-bit checksum of a byte range that any device can compute in parallel: the bytes are read
// as little-endian 64-bit words (the last one zero-padded), each word is mixed with its index by
// SplitMix64's finaliser, and the mixed words are added mod 2^64 — a sum, so the order in which
// threads or GPU blocks combine their parts cannot change it. A flipped, dropped or moved word
// changes it (except with probability ~2^-64). Used to verify transfers (RunRequest::verify).
#include <cstddef>
#include <cstdint>

namespace ferry {

// The per-word term; also compiled into the CUDA device's checksum kernel.
#if defined(__CUDACC__)
__host__ __device__
#endif
    inline uint64_t
    checksum_term(uint64_t word, uint64_t index) {
  uint64_t z = word + index * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The sum of checksum_term over the words, plus the length (so trailing zero bytes count).
uint64_t checksum64(const void* data, size_t bytes);

}  // namespace ferry
