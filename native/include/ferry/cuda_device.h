#pragma once
// The CUDA device (native/src/devices/cuda/): device memory is one cudaMalloc with an arena on
// top, capped at the budget; host→device copies are cudaMemcpyAsync on a copy stream (from
// page-locked memory directly, from pageable memory through a ring of cudaHostAlloc staging
// buffers), with events between the copy and compute streams; the model's operations are CUDA
// kernels (cuBLAS GEMMs for the linears when the build found cuBLAS) queued on a compute stream.
//
// This header has no CUDA types, so code built without the toolkit can include it: without
// FERRY_WITH_CUDA, cuda_device_count() is 0 and make_cuda_device() throws
// DeviceUnavailableError saying the build has no CUDA support.
#include <cstddef>
#include <memory>
#include <string>

#include "ferry/device.h"

namespace ferry {

struct CudaDeviceOptions {
  int ordinal = 0;  // which GPU (cudaSetDevice)
  // Device memory to reserve for the arena; 0 = the GPU's free memory less reserve_bytes.
  size_t capacity_bytes = 0;
  // Left to the CUDA context, cuBLAS workspaces and other processes when capacity_bytes is 0.
  size_t reserve_bytes = size_t{256} << 20;
};

// Whether this build includes the CUDA device.
bool cuda_built() noexcept;
// GPUs the CUDA runtime sees; 0 without a GPU, a driver, or CUDA support in this build.
int cuda_device_count() noexcept;
// Whether this build's linears use cuBLAS.
bool cuda_has_cublas() noexcept;

// Opens GPU `options.ordinal`. DeviceUnavailableError when there is no such GPU (or no CUDA in
// this build), DeviceOutOfMemoryError when the arena cannot be reserved.
std::shared_ptr<Device> make_cuda_device(const CudaDeviceOptions& options);

}  // namespace ferry
