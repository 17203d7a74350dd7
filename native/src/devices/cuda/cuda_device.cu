// The CUDA device (cuda_device.h): one cudaMalloc carved by an Arena; a copy stream fed by a copy
// thread (pinned sources go straight to cudaMemcpyAsync, pageable ones through a ring of
// cudaHostAlloc staging buffers so the DMA engine always reads page-locked memory); timed events
// whose start/end are mapped to wall-clock time; the model's forwards as CUDA kernels (cuBLAS
// GEMMs for the linears when FERRY_WITH_CUBLAS) on a compute stream.
#include <cuda_runtime.h>

#if defined(FERRY_WITH_CUBLAS)
#include <cublas_v2.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_kernels.h"
#include "ferry/arena.h"
#include "ferry/checksum.h"
#include "ferry/cuda_device.h"
#include "ferry/errors.h"
#include "ferry/events.h"

namespace ferry {

namespace {

[[noreturn]] void throw_cuda(cudaError_t e, const char* what) {
  const std::string message = std::string("cuda: ") + what + ": " + cudaGetErrorString(e);
  if (e == cudaErrorMemoryAllocation) throw DeviceOutOfMemoryError(message);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice) {
    throw DeviceUnavailableError(message);
  }
  throw Error(message);
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw_cuda(e, what);
}

#if defined(FERRY_WITH_CUBLAS)
inline void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw Error(std::string("cuda: cuBLAS ") + what + " failed with status " +
                std::to_string(static_cast<int>(s)));
  }
}
#endif

// Maps a stream's timing events to wall-clock time: `epoch` was recorded on an idle stream and
// synchronised, so it completed at `epoch_wall_us`; an event's wall time is that plus
// cudaEventElapsedTime(epoch, event). Shared by the events timed against it, which may outlive a
// re-anchoring.
struct Timebase {
  cudaEvent_t epoch = nullptr;
  double epoch_wall_us = 0;
  ~Timebase() {
    if (epoch) cudaEventDestroy(epoch);
  }
};

// Elapsed times are float milliseconds: re-anchor often enough that their resolution stays
// around a microsecond.
constexpr double kReanchorUs = 10e6;

std::shared_ptr<Timebase> anchor(cudaStream_t stream) {
  auto tb = std::make_shared<Timebase>();
  check(cudaEventCreate(&tb->epoch), "cudaEventCreate");
  check(cudaEventRecord(tb->epoch, stream), "cudaEventRecord");
  check(cudaEventSynchronize(tb->epoch), "cudaEventSynchronize");
  tb->epoch_wall_us = wall_clock_us();
  return tb;
}

// An event of the CUDA device. Copies are queued by the copy thread, so the CUDA events exist
// only once that thread has issued the work: wait() first waits for that (host side), then for
// the GPU. `start`/`end` bracket the work on its stream.
class CudaEvent final : public Event {
 public:
  explicit CudaEvent(int ordinal) : ordinal_(ordinal) {}
  ~CudaEvent() override {
    if (start_) cudaEventDestroy(start_);
    if (end_) cudaEventDestroy(end_);
  }

  // Creates the CUDA events (called by whoever records them).
  void create(bool timed) {
    const unsigned flags = timed ? cudaEventDefault : cudaEventDisableTiming;
    if (timed) check(cudaEventCreateWithFlags(&start_, flags), "cudaEventCreate");
    check(cudaEventCreateWithFlags(&end_, flags), "cudaEventCreate");
  }
  cudaEvent_t start_event() const { return start_; }
  cudaEvent_t end_event() const { return end_; }

  // The work is queued (or failed while being queued).
  void issued(std::shared_ptr<const Timebase> timebase, std::exception_ptr error) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      timebase_ = std::move(timebase);
      error_ = std::move(error);
      issued_ = true;
    }
    cv_.notify_all();
  }

  bool ready() const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!issued_) return false;
    if (error_ || done_) return true;
    return cudaEventQuery(end_) == cudaSuccess;
  }

  void wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return issued_; });
    if (error_) std::rethrow_exception(error_);
    if (done_) return;
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    check(cudaEventSynchronize(end_), "waiting for a copy or kernel");
    const double now = wall_clock_us();
    start_us_ = end_us_ = now;
    if (timebase_ && start_) {
      float start_ms = 0, end_ms = 0;
      if (cudaEventElapsedTime(&start_ms, timebase_->epoch, start_) == cudaSuccess &&
          cudaEventElapsedTime(&end_ms, timebase_->epoch, end_) == cudaSuccess) {
        start_us_ = timebase_->epoch_wall_us + 1e3 * static_cast<double>(start_ms);
        end_us_ = timebase_->epoch_wall_us + 1e3 * static_cast<double>(end_ms);
      }
    }
    done_ = true;
  }

  double start_us() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return start_us_;
  }
  double end_us() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return end_us_;
  }

 private:
  const int ordinal_;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t end_ = nullptr;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool issued_ = false;
  bool done_ = false;
  std::exception_ptr error_;
  std::shared_ptr<const Timebase> timebase_;
  double start_us_ = 0;
  double end_us_ = 0;
};

// Pageable host memory is copied through page-locked staging buffers: kStagingBuffers of
// kStagingBytes, so the host memcpy into one overlaps the DMA out of the others.
constexpr size_t kStagingBytes = size_t{8} << 20;
constexpr int kStagingBuffers = 4;

}  // namespace

// Host→device and device→host copies, in order, on a dedicated CUDA stream. A thread issues them
// (so that staging pageable memory never blocks the caller); each transfer is bracketed by timed
// events.
class CudaCopyStream final : public Stream {
 public:
  explicit CudaCopyStream(int ordinal) : ordinal_(ordinal) {
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    for (int i = 0; i < kStagingBuffers; i++) {
      void* p = nullptr;
      check(cudaHostAlloc(&p, kStagingBytes, cudaHostAllocDefault), "cudaHostAlloc (staging)");
      staging_.push_back(p);
      cudaEvent_t e = nullptr;
      check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
      staging_free_.push_back(e);
    }
    timebase_ = anchor(stream_);
    thread_ = std::thread([this] { loop(); });
  }

  ~CudaCopyStream() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
    cudaSetDevice(ordinal_);
    cudaStreamSynchronize(stream_);
    for (cudaEvent_t e : staging_free_) cudaEventDestroy(e);
    for (void* p : staging_) cudaFreeHost(p);
    cudaStreamDestroy(stream_);
  }

  cudaStream_t handle() const { return stream_; }

  EventPtr copy_batch_async(const CopyRegion* regions, size_t count) override {
    Task task;
    task.regions.assign(regions, regions + count);
    task.event = std::make_shared<CudaEvent>(ordinal_);
    EventPtr event = task.event;
    enqueue(std::move(task));
    return event;
  }

  EventPtr record() override {
    Task task;
    task.event = std::make_shared<CudaEvent>(ordinal_);
    EventPtr event = task.event;
    enqueue(std::move(task));
    return event;
  }

  void wait_event(const EventPtr& event) override {
    Task task;
    task.wait_for = event;
    enqueue(std::move(task));
  }

 private:
  struct Task {
    std::vector<CopyRegion> regions;
    EventPtr wait_for;
    std::shared_ptr<CudaEvent> event;  // null for wait_event
  };

  void enqueue(Task task) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

  void loop() {
    cudaSetDevice(ordinal_);
    for (;;) {
      Task task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      std::exception_ptr error;
      try {
        issue(task);
      } catch (...) {
        error = std::current_exception();
      }
      if (task.event) task.event->issued(timebase_, error);
    }
  }

  void issue(const Task& task) {
    if (task.wait_for) {
      auto* cuda_event = dynamic_cast<CudaEvent*>(task.wait_for.get());
      if (cuda_event && cuda_event->end_event()) {
        check(cudaStreamWaitEvent(stream_, cuda_event->end_event(), 0), "cudaStreamWaitEvent");
      } else {
        task.wait_for->wait();  // an event of another device kind: order it on the host
      }
    }
    if (!task.event) return;
    if (wall_clock_us() - timebase_->epoch_wall_us > kReanchorUs) timebase_ = anchor(stream_);
    task.event->create(/*timed=*/true);
    check(cudaEventRecord(task.event->start_event(), stream_), "cudaEventRecord");
    for (const CopyRegion& r : task.regions) copy(r);
    check(cudaEventRecord(task.event->end_event(), stream_), "cudaEventRecord");
  }

  void copy(const CopyRegion& r) {
    if (r.bytes == 0) return;
    cudaPointerAttributes src{}, dst{};
    check(cudaPointerGetAttributes(&src, r.src), "cudaPointerGetAttributes");
    check(cudaPointerGetAttributes(&dst, r.dst), "cudaPointerGetAttributes");
    const bool src_pageable = src.type == cudaMemoryTypeUnregistered;
    const bool dst_device = dst.type == cudaMemoryTypeDevice || dst.type == cudaMemoryTypeManaged;
    if (!(src_pageable && dst_device)) {
      // Pinned or device source (or a device→host copy): the DMA engine reads it directly.
      check(cudaMemcpyAsync(r.dst, r.src, r.bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
      return;
    }
    const auto* src_bytes = static_cast<const uint8_t*>(r.src);
    auto* dst_bytes = static_cast<uint8_t*>(r.dst);
    for (size_t offset = 0; offset < r.bytes; offset += kStagingBytes) {
      const size_t n = std::min(kStagingBytes, r.bytes - offset);
      const size_t s = next_staging_++ % kStagingBuffers;
      // The DMA out of this staging buffer, queued kStagingBuffers chunks ago, must be done.
      check(cudaEventSynchronize(staging_free_[s]), "waiting for a staging buffer");
      std::memcpy(staging_[s], src_bytes + offset, n);
      check(cudaMemcpyAsync(dst_bytes + offset, staging_[s], n, cudaMemcpyHostToDevice, stream_),
            "cudaMemcpyAsync");
      check(cudaEventRecord(staging_free_[s], stream_), "cudaEventRecord");
    }
  }

  const int ordinal_;
  cudaStream_t stream_ = nullptr;
  std::vector<void*> staging_;
  std::vector<cudaEvent_t> staging_free_;
  size_t next_staging_ = 0;
  std::shared_ptr<const Timebase> timebase_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  bool stopping_ = false;
  std::thread thread_;
};

// The compute stream: kernels are queued here by the caller's thread directly.
class CudaComputeStream final : public Stream {
 public:
  explicit CudaComputeStream(int ordinal) : ordinal_(ordinal) {
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~CudaComputeStream() override {
    cudaSetDevice(ordinal_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  cudaStream_t handle() const { return stream_; }

  EventPtr copy_batch_async(const CopyRegion* regions, size_t count) override {
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    for (size_t i = 0; i < count; i++) {
      if (regions[i].bytes == 0) continue;
      check(cudaMemcpyAsync(regions[i].dst, regions[i].src, regions[i].bytes, cudaMemcpyDefault,
                            stream_),
            "cudaMemcpyAsync");
    }
    return record();
  }

  EventPtr record() override {
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    auto event = std::make_shared<CudaEvent>(ordinal_);
    event->create(/*timed=*/false);
    check(cudaEventRecord(event->end_event(), stream_), "cudaEventRecord");
    event->issued(nullptr, nullptr);
    return event;
  }

  void wait_event(const EventPtr& event) override {
    auto* cuda_event = dynamic_cast<CudaEvent*>(event.get());
    if (!cuda_event) return event->wait();
    // A copy's CUDA event exists once the copy thread issued it; wait for that on the host (it
    // is quick), then let the GPU order the rest.
    if (!cuda_event->end_event()) event->wait();
    if (cuda_event->end_event()) {
      check(cudaSetDevice(ordinal_), "cudaSetDevice");
      check(cudaStreamWaitEvent(stream_, cuda_event->end_event(), 0), "cudaStreamWaitEvent");
    }
  }

 private:
  const int ordinal_;
  cudaStream_t stream_ = nullptr;
};

namespace {

class CudaDevice final : public Device {
 public:
  explicit CudaDevice(const CudaDeviceOptions& options) : ordinal_(options.ordinal) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();
      count = 0;
    }
    if (options.ordinal < 0 || options.ordinal >= count) {
      throw DeviceUnavailableError("cuda: no GPU " + std::to_string(options.ordinal) +
                                   " (the CUDA runtime sees " + std::to_string(count) +
                                   "); use the cpu device, or run where a GPU is attached");
    }
    check(cudaSetDevice(ordinal_), "cudaSetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, ordinal_), "cudaGetDeviceProperties");
    name_ = prop.name;
    size_t free = 0, total = 0;
    check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    size_t capacity = options.capacity_bytes;
    if (capacity == 0) {
      capacity = free > options.reserve_bytes ? free - options.reserve_bytes : 0;
    }
    if (capacity == 0 || capacity > free) {
      throw DeviceOutOfMemoryError("cuda: cannot reserve " + std::to_string(capacity) +
                                   " bytes of device memory on " + name_ + " (" +
                                   std::to_string(free) + " free)");
    }
    check(cudaMalloc(&memory_, capacity), "cudaMalloc (the device arena)");
    try {
      arena_ = std::make_unique<Arena>(memory_, capacity, "cuda:" + std::to_string(ordinal_));
      check(cudaMalloc(&checksum_result_, sizeof(unsigned long long)), "cudaMalloc");
      copy_ = std::make_unique<CudaCopyStream>(ordinal_);
      compute_ = std::make_unique<CudaComputeStream>(ordinal_);
#if defined(FERRY_WITH_CUBLAS)
      check_cublas(cublasCreate(&cublas_), "cublasCreate");
      check_cublas(cublasSetStream(cublas_, compute_->handle()), "cublasSetStream");
      // Full float32 accuracy for f32 weights (no TF32).
      check_cublas(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
#endif
    } catch (...) {
      release();
      throw;
    }
  }

  ~CudaDevice() override { release(); }

  const std::string& name() const override { return name_; }
  DeviceKind kind() const override { return DeviceKind::kCuda; }
  size_t total_bytes() const override { return arena_->capacity(); }
  size_t free_bytes() const override { return arena_->free_bytes(); }
  MemoryStats memory_stats() const override { return arena_->stats(); }
  void reset_window_peak() override { arena_->reset_window_peak(); }
  Stream& copy_stream() override { return *copy_; }
  Stream& compute_stream() override { return *compute_; }

  void prelude_forward(const DitDims& d, const PreludeWeights& w, const float* z, float* x,
                       void*) override {
    select();
    linear(z, d.rows(), d.channels, d.channels, w.embed_weight, &w.embed_bias, x, d.hidden,
           cuda::Epilogue::kStore, nullptr);
  }

  void block_forward(const DitDims& dims, const BlockWeights& w, float* x, void* scratch) override {
    select();
    const int64_t d = dims.hidden, m = dims.rows(), t = dims.tokens, h = dims.heads;
    const int64_t dh = d / h;
    // The CPU kernels' scratch layout (kernels.h): h [M,D] | qkv [M,3D] | att [M,D] |
    // mlp [M,4D] | scores [H,T,T]. Regions not in use by a product double as its cuBLAS
    // conversion workspace (the activations as f16/bf16).
    float* hbuf = static_cast<float*>(scratch);
    float* qkv = hbuf + m * d;
    float* att = qkv + m * 3 * d;
    float* mlp = att + m * d;
    float* scores = mlp + m * 4 * d;
    cudaStream_t s = compute_->handle();

    norm(x, m, d, w.norm1, hbuf);
    linear(hbuf, m, d, d, w.qkv_weight, &w.qkv_bias, qkv, 3 * d, cuda::Epilogue::kStore, att);
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    for (int64_t b = 0; b < dims.batch; b++) {
      const float* base = qkv + b * t * 3 * d;
      cuda::GemmArgs qk;
      qk.a = base;  // q of head j at column j·dh
      qk.lda = 3 * d;
      qk.stride_a = dh;
      qk.b = base + d;  // k
      qk.ldb = 3 * d;
      qk.stride_b = dh;
      qk.b_transposed = true;
      qk.c = scores;
      qk.ldc = t;
      qk.stride_c = t * t;
      qk.m = t;
      qk.n = t;
      qk.k = dh;
      qk.batch = h;
      qk.alpha = scale;
      cuda::gemm(qk, s);
      cuda::softmax_rows(scores, h * t, t, s);
      cuda::GemmArgs pv;
      pv.a = scores;
      pv.lda = t;
      pv.stride_a = t * t;
      pv.b = base + 2 * d;  // v
      pv.ldb = 3 * d;
      pv.stride_b = dh;
      pv.b_transposed = false;
      pv.c = att + b * t * d;
      pv.ldc = d;
      pv.stride_c = dh;
      pv.m = t;
      pv.n = dh;
      pv.k = t;
      pv.batch = h;
      cuda::gemm(pv, s);
    }
    linear(att, m, d, d, w.out_weight, &w.out_bias, x, d, cuda::Epilogue::kAccumulate, hbuf);
    norm(x, m, d, w.norm2, hbuf);
    linear(hbuf, m, d, d, w.fc1_weight, &w.fc1_bias, mlp, 4 * d, cuda::Epilogue::kGelu, att);
    linear(mlp, m, 4 * d, 4 * d, w.fc2_weight, &w.fc2_bias, x, d, cuda::Epilogue::kAccumulate, qkv);
  }

  void final_forward(const DitDims& d, const FinalWeights& w, const float* x, float* y,
                     void* scratch) override {
    select();
    float* hbuf = static_cast<float*>(scratch);
    norm(x, d.rows(), d.hidden, w.norm, hbuf);
    linear(hbuf, d.rows(), d.hidden, d.hidden, w.out_weight, &w.out_bias, y, d.channels,
           cuda::Epilogue::kStore, nullptr);
  }

  void euler_update(float* z, const float* y, size_t n, float dt) override {
    select();
    cuda::euler_update(z, y, n, dt, compute_->handle());
  }

  uint64_t checksum(const void* device_data, size_t bytes) override {
    select();
    copy_->synchronize();
    cudaStream_t s = compute_->handle();
    check(cudaMemsetAsync(checksum_result_, 0, sizeof(unsigned long long), s), "cudaMemsetAsync");
    cuda::checksum_words(device_data, bytes, checksum_result_, s);
    unsigned long long sum = 0;
    check(cudaMemcpyAsync(&sum, checksum_result_, sizeof(sum), cudaMemcpyDeviceToHost, s),
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    return static_cast<uint64_t>(sum) + checksum_term(static_cast<uint64_t>(bytes), ~uint64_t{0});
  }

 protected:
  void* alloc_raw(size_t bytes) override { return arena_->allocate(bytes); }
  void free_raw(void* data) noexcept override { arena_->release(data); }
  void* alloc_host_raw(size_t bytes) override {
    select();
    void* p = nullptr;
    const cudaError_t e = cudaHostAlloc(&p, std::max<size_t>(bytes, 1), cudaHostAllocDefault);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw std::bad_alloc();
    }
    return p;
  }
  void free_host_raw(void* data) noexcept override {
    cudaSetDevice(ordinal_);
    cudaFreeHost(data);
  }

 private:
  void select() { check(cudaSetDevice(ordinal_), "cudaSetDevice"); }

  void norm(const float* x, int64_t m, int64_t d, const TensorView& w, float* y) {
    cuda::rmsnorm(x, m, d, w.data, w.dtype, kernels::kRmsNormEps, y, compute_->handle());
  }

  // y[m, n] (ldy) ← epilogue(x[m, k] (ldx) · Wᵀ + bias). `workspace` (≥ 2·m·k bytes, or null)
  // holds the activations converted for a cuBLAS f16/bf16 GEMM.
  void linear(const float* x, int64_t m, int64_t k, int64_t ldx, const TensorView& w,
              const TensorView* bias, float* y, int64_t ldy, cuda::Epilogue epilogue,
              void* workspace) {
    const int64_t n = w.shape[0];
    cudaStream_t s = compute_->handle();
    if (dtype_is_quantized(w.dtype)) {
      // The CPU kernels dequantize Q8_0/Q4_0 on the fly; the CUDA GEMMs do not yet.
      throw InvalidArgumentError(std::string("the CUDA device does not run ") +
                                 dtype_name(w.dtype) + " weights yet; use the CPU device");
    }
#if defined(FERRY_WITH_CUBLAS)
    if (linear_cublas(x, m, k, ldx, w, bias, y, ldy, epilogue, workspace)) return;
#else
    (void)workspace;
#endif
    cuda::GemmArgs g;
    g.a = x;
    g.lda = ldx;
    g.b = w.data;
    g.ldb = k;
    g.b_type = w.dtype;
    g.b_transposed = true;
    g.bias = bias ? bias->data : nullptr;
    g.bias_type = bias ? bias->dtype : DType::F32;
    g.c = y;
    g.ldc = ldy;
    g.m = m;
    g.n = n;
    g.k = k;
    g.epilogue = epilogue;
    cuda::gemm(g, s);
  }

#if defined(FERRY_WITH_CUBLAS)
  // Row-major Y[M,N] = X[M,K]·Wᵀ is column-major Yᵀ[N,M] = W_cᵀ·X_c with W_c the column-major
  // K×N view of W [N,K]: cublasGemmEx(OP_T, OP_N, N, M, K, W (ld K), X (ld ldx), Y (ld ldy)).
  // The residual add is beta = 1 into y, applied before the bias by the epilogue kernel.
  bool linear_cublas(const float* x, int64_t m, int64_t k, int64_t ldx, const TensorView& w,
                     const TensorView* bias, float* y, int64_t ldy, cuda::Epilogue epilogue,
                     void* workspace) {
    const int64_t n = w.shape[0];
    cudaStream_t s = compute_->handle();
    const float alpha = 1.0f;
    const float beta = epilogue == cuda::Epilogue::kAccumulate ? 1.0f : 0.0f;
    if (w.dtype == DType::F32) {
      check_cublas(cublasSgemm(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                               static_cast<int>(m), static_cast<int>(k), &alpha,
                               static_cast<const float*>(w.data), static_cast<int>(k), x,
                               static_cast<int>(ldx), &beta, y, static_cast<int>(ldy)),
                   "Sgemm");
    } else if ((w.dtype == DType::F16 || w.dtype == DType::BF16) && workspace) {
      const cudaDataType_t type = w.dtype == DType::F16 ? CUDA_R_16F : CUDA_R_16BF;
      cuda::convert_from_f32(x, m, k, ldx, w.dtype, workspace, s);
      check_cublas(
          cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                       static_cast<int>(k), &alpha, w.data, type, static_cast<int>(k), workspace,
                       type, static_cast<int>(k), &beta, y, CUDA_R_32F, static_cast<int>(ldy),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "GemmEx");
    } else {
      return false;
    }
    // The product (plus the residual, through beta) is in y; add the bias and apply gelu.
    const cuda::Epilogue rest =
        epilogue == cuda::Epilogue::kGelu ? cuda::Epilogue::kGelu : cuda::Epilogue::kStore;
    if (bias || rest != cuda::Epilogue::kStore) {
      cuda::bias_epilogue(y, ldy, nullptr, m, n, bias ? bias->data : nullptr,
                          bias ? bias->dtype : DType::F32, rest, s);
    }
    return true;
  }
#endif

  void release() noexcept {
    cudaSetDevice(ordinal_);
    release_residency();
#if defined(FERRY_WITH_CUBLAS)
    if (cublas_) cublasDestroy(cublas_);
    cublas_ = nullptr;
#endif
    compute_.reset();
    copy_.reset();
    arena_.reset();
    if (checksum_result_) cudaFree(checksum_result_);
    checksum_result_ = nullptr;
    if (memory_) cudaFree(memory_);
    memory_ = nullptr;
  }

  const int ordinal_;
  std::string name_;
  void* memory_ = nullptr;
  unsigned long long* checksum_result_ = nullptr;
  std::unique_ptr<Arena> arena_;
  std::unique_ptr<CudaCopyStream> copy_;
  std::unique_ptr<CudaComputeStream> compute_;
#if defined(FERRY_WITH_CUBLAS)
  cublasHandle_t cublas_ = nullptr;
#endif
};

}  // namespace

bool cuda_built() noexcept { return true; }

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error for later calls
    return 0;
  }
  return count;
}

bool cuda_has_cublas() noexcept {
#if defined(FERRY_WITH_CUBLAS)
  return true;
#else
  return false;
#endif
}

std::shared_ptr<Device> make_cuda_device(const CudaDeviceOptions& options) {
  return std::make_shared<CudaDevice>(options);
}

}  // namespace ferry
