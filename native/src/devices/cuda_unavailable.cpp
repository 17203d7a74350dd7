// The CUDA entry points of a build without the CUDA toolkit (FERRY_WITH_CUDA undefined): there is
// no GPU to open, and saying why is the whole job. With the toolkit, cuda/cuda_device.cu defines
// them instead.
#include "ferry/cuda_device.h"

#ifndef FERRY_WITH_CUDA

#include "ferry/errors.h"

namespace ferry {

bool cuda_built() noexcept { return false; }
int cuda_device_count() noexcept { return 0; }
bool cuda_has_cublas() noexcept { return false; }

std::shared_ptr<Device> make_cuda_device(const CudaDeviceOptions&) {
  throw DeviceUnavailableError(
      "cuda: this build of Ferry has no CUDA support (CMake did not find the CUDA toolkit, or "
      "FERRY_CUDA was OFF); rebuild on a machine with nvcc, or use the cpu device");
}

}  // namespace ferry

#endif  // FERRY_WITH_CUDA
