// y = x·Wᵀ + b for a PyTorch Linear weight W [N, K] in any DType, float32 activations.
//
// The hot op of every segment, with M = B·T small (tens to hundreds of rows) and W large, so the
// work is split over output columns: a task is a panel of kPanel weight rows (and, when there are
// too few panels to keep every thread busy, a range of x rows). An F16/BF16 panel is converted to
// float once into a per-thread buffer, then reused for every row of x. Each output is one
// gemm_nt dot product (see gemm.h), so its value never depends on the split or the thread count.
#include <cmath>
#include <cstring>

#include "ferry/kernels.h"
#include "ferry/kernels_detail.h"
#include "gemm.h"
#include "kernel_util.h"

namespace ferry::kernels {

namespace {

// Weight rows per task. 16 rows × K floats stay in L2 while every tile of x rows streams past
// them, and N/16 tasks is plenty of parallelism for the hidden sizes that matter.
constexpr int64_t kPanel = 16;

thread_local util::GrowBuffer tls_panel;

template <Epilogue E>
struct Sink {
  float* y;  // at the task's first row and panel's first column
  int64_t ldy;
  const float* bias;  // kPanel values

  void operator()(int64_t i, int64_t j, float dot) const {
    const float v = dot + bias[j];
    float& out = y[i * ldy + j];
    if constexpr (E == Epilogue::kStore || E == Epilogue::kGelu) {
      out = v;  // gelu goes over the finished tile 16 at a time (apply_gelu)
    } else {
      out = out + v;
    }
  }
};

// y ← gelu_tanh(y) over a rows × np tile (np ≤ 16): one vector per row, the same lanes as the
// scalar gelu_tanh().
static_assert(kPanel == simd::kLanes, "apply_gelu takes one vector per panel row");
void apply_gelu(float* y, int64_t ldy, int64_t rows, int64_t np) {
  for (int64_t i = 0; i < rows; i++) {
    float* row = y + i * ldy;
    if (np == kPanel) {
      simd::store(row, simd::gelu16(simd::load(row)));
    } else {
      float tmp[kPanel] = {};
      std::memcpy(tmp, row, static_cast<size_t>(np) * 4);
      simd::store(tmp, simd::gelu16(simd::load(tmp)));
      std::memcpy(row, tmp, static_cast<size_t>(np) * 4);
    }
  }
}

template <Epilogue E>
void run_linear(ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const TensorView& weight,
                const TensorView* bias, float* y, int64_t ldy) {
  const int64_t n = weight.shape[0];
  const int64_t k = weight.shape[1];
  const int64_t panels = (n + kPanel - 1) / kPanel;

  // Split rows too when there are fewer panels than a few per thread (the final layer's C
  // outputs, small models), in whole micro-kernel tiles.
  const int64_t want_tasks = 4 * static_cast<int64_t>(pool.size());
  const int64_t row_tiles = (m + kMr - 1) / kMr;
  int64_t row_parts = 1;
  if (panels < want_tasks) {
    row_parts = std::min(row_tiles, (want_tasks + panels - 1) / panels);
  }
  const int64_t rows_per_part = (row_tiles + row_parts - 1) / row_parts * kMr;
  row_parts = (m + rows_per_part - 1) / rows_per_part;

  // Bytes per weight row (quantized rows are whole blocks, so this is not k × element size).
  const size_t row_bytes = dtype_nbytes(weight.dtype, k);
  const char* wbytes = static_cast<const char*>(weight.data);
  // Converted rows start on 64-byte boundaries, so vector loads never split a cache line, and are
  // an odd number of cache lines apart, so rows do not collide in the same cache sets.
  int64_t ldw = (k + 15) / 16 * 16;
  if ((ldw / 16) % 2 == 0) ldw += 16;

  util::run_tasks(pool, panels * row_parts, m * n * k, [&](int64_t begin, int64_t end) {
    int64_t converted = -1;  // panel held in this thread's buffer, if any
    float* buffer = nullptr;
    for (int64_t t = begin; t < end; t++) {
      const int64_t panel = t / row_parts;
      const int64_t part = t % row_parts;
      const int64_t n0 = panel * kPanel;
      const int64_t np = std::min(kPanel, n - n0);

      // Every dtype goes through the per-thread buffer, F32 too: the copy is cheap next to the
      // M·16·K multiply-adds, and the padded stride keeps the panel's rows off the same L1 sets
      // (a power-of-two K would otherwise alias all 16 rows onto a handful of sets).
      if (converted != panel) {
        buffer = tls_panel.get(static_cast<size_t>(kPanel * ldw));
        for (int64_t j = 0; j < np; j++) {
          convert_to_f32(weight.dtype, wbytes + static_cast<size_t>(n0 + j) * row_bytes,
                         buffer + j * ldw, k);
        }
        converted = panel;
      }

      float b[kPanel] = {};
      if (bias) {
        for (int64_t j = 0; j < np; j++) b[j] = util::element(*bias, n0 + j);
      }

      const int64_t r0 = part * rows_per_part;
      const int64_t rows = std::min(rows_per_part, m - r0);
      gemm_nt(x + r0 * ldx, ldx, rows, buffer, ldw, np, k, Sink<E>{y + r0 * ldy + n0, ldy, b});
      if constexpr (E == Epilogue::kGelu) apply_gelu(y + r0 * ldy + n0, ldy, rows, np);
    }
  });
}

void check_linear(const float* x, int64_t m, int64_t ldx, const TensorView& weight,
                  const TensorView* bias, const float* y, int64_t ldy) {
  if (weight.shape.size() != 2 || weight.shape[0] < 0 || weight.shape[1] < 0) {
    throw InvalidArgumentError("linear: weight must be 2-D [out, in], got shape " +
                               util::shape_string(weight.shape));
  }
  const int64_t n = weight.shape[0], k = weight.shape[1];
  if (dtype_is_quantized(weight.dtype) && k % kQuantBlock != 0) {
    throw InvalidArgumentError(std::string("linear: ") + dtype_name(weight.dtype) +
                               " weight rows must be whole blocks of 32, got shape " +
                               util::shape_string(weight.shape));
  }
  if (bias && dtype_is_quantized(bias->dtype)) {
    throw InvalidArgumentError("linear: a bias must be F32, F16 or BF16");
  }
  if (bias && bias->elements() != n) {
    throw InvalidArgumentError("linear: bias has shape " + util::shape_string(bias->shape) +
                               ", expected [" + std::to_string(n) + "]");
  }
  if (m < 0 || ldx < k || ldy < n) {
    throw InvalidArgumentError("linear: bad sizes (m " + std::to_string(m) + ", ldx " +
                               std::to_string(ldx) + ", ldy " + std::to_string(ldy) +
                               ") for weight " + util::shape_string(weight.shape));
  }
  if (m > 0 && n > 0 && ((k > 0 && (!x || !weight.data)) || !y || (bias && !bias->data))) {
    throw InvalidArgumentError("linear: null data pointer");
  }
}

}  // namespace

void linear_ex(ThreadPool& pool, const float* x, int64_t m, int64_t ldx, const TensorView& weight,
               const TensorView* bias, float* y, int64_t ldy, Epilogue epilogue) {
  if (bias && bias->data == nullptr && bias->shape.empty()) bias = nullptr;  // a null view
  check_linear(x, m, ldx, weight, bias, y, ldy);
  if (m == 0 || weight.shape[0] == 0) return;
  switch (epilogue) {
    case Epilogue::kStore:
      return run_linear<Epilogue::kStore>(pool, x, m, ldx, weight, bias, y, ldy);
    case Epilogue::kGelu:
      return run_linear<Epilogue::kGelu>(pool, x, m, ldx, weight, bias, y, ldy);
    case Epilogue::kAccumulate:
      return run_linear<Epilogue::kAccumulate>(pool, x, m, ldx, weight, bias, y, ldy);
  }
}

float dot(const float* a, const float* b, int64_t n) { return simd::dot(a, b, n); }

void linear(ThreadPool& pool, const float* x, int64_t m, const TensorView& weight,
            const TensorView* bias, float* y) {
  const int64_t k = weight.shape.size() == 2 ? weight.shape[1] : 0;
  const int64_t n = weight.shape.size() == 2 ? weight.shape[0] : 0;
  linear_ex(pool, x, m, k, weight, bias, y, n, Epilogue::kStore);
}

}  // namespace ferry::kernels
