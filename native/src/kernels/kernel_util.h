#pragma once
// Helpers shared by the kernel sources: argument checks, per-element reads of any DType, a
// per-thread float buffer, and the rule for when work is too small to hand to the pool.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <new>
#include <string>
#include <vector>

#include "ferry/dtype.h"
#include "ferry/errors.h"
#include "ferry/kernels.h"
#include "ferry/thread_pool.h"

namespace ferry::kernels::util {

inline std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Throws InvalidArgumentError unless `view` has data and exactly `shape`.
inline void expect_shape(const char* where, const char* name, const TensorView& view,
                         std::initializer_list<int64_t> shape) {
  const std::vector<int64_t> want(shape);
  if (view.shape != want) {
    throw InvalidArgumentError(std::string(where) + ": " + name + " has shape " +
                               shape_string(view.shape) + ", expected " + shape_string(want));
  }
  if (view.data == nullptr && view.elements() > 0) {
    throw InvalidArgumentError(std::string(where) + ": " + name + " has no data");
  }
}

// Element i of a tensor of type DT, as float.
template <DType DT>
inline float element(const void* data, int64_t i) {
  if constexpr (DT == DType::F32) {
    return static_cast<const float*>(data)[i];
  } else if constexpr (DT == DType::BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(data)[i]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(data)[i]);
  }
}

inline float element(const TensorView& v, int64_t i) {
  switch (v.dtype) {
    case DType::F32:
      return element<DType::F32>(v.data, i);
    case DType::F16:
      return element<DType::F16>(v.data, i);
    case DType::BF16:
      return element<DType::BF16>(v.data, i);
    case DType::Q8_0:
    case DType::Q4_0:
      break;  // vectors are never quantized: DitModel and the kernels' checks refuse them
  }
  return 0.0f;
}

// A 64-byte-aligned float buffer that only grows: one per thread holds converted weight rows, so
// after the first call at a given size the hot path allocates nothing.
class GrowBuffer {
 public:
  GrowBuffer() = default;
  GrowBuffer(const GrowBuffer&) = delete;
  GrowBuffer& operator=(const GrowBuffer&) = delete;
  ~GrowBuffer() { std::free(data_); }

  float* get(size_t floats) {
    if (floats > capacity_) {
      const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      void* p = std::aligned_alloc(64, bytes);
      if (!p) throw std::bad_alloc();
      std::free(data_);
      data_ = static_cast<float*>(p);
      capacity_ = bytes / sizeof(float);
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t capacity_ = 0;
};

// Below this many multiply-adds (a few tens of microseconds) waking the pool costs more than it
// saves, so the work runs on the calling thread. Results are identical either way.
constexpr int64_t kSerialWork = int64_t{1} << 16;

inline void run_tasks(ThreadPool& pool, int64_t tasks, int64_t work,
                      const std::function<void(int64_t, int64_t)>& fn) {
  if (tasks <= 0) return;
  if (work < kSerialWork || tasks == 1 || pool.size() <= 1) {
    fn(0, tasks);
  } else {
    pool.parallel_for(tasks, fn);
  }
}

}  // namespace ferry::kernels::util
